# -*- test-case-name: tests.test_rig -*-
"""
Benchmark: how soon after a pull completes on node B node A can serve the image from B.

Run with C{.venv/bin/python benchmarks/p2p_propagation.py [--runs 7] [--interval-ms 5]
[--containerd all|1.6|2.1|2.4]}, once per containerd (by default each one the tests run).  It
starts a two-node cluster (A and B bootstrap from each other; B's containerd mirrors through its
own node, as in a real cluster) and pushes one small image per run (different seeds, so every run
announces new keys).  For each image a poller asks A's registry C{HEAD
/v2/<repo>/manifests/<digest>?ns=<registry>} every few milliseconds, as a containerd on A would,
from before B's pull starts; A answers 200 only once it finds B in the DHT and B answers it.  B's
containerd then pulls the image (C{ctr images pull}).

A second poller asks A the same way for the image's largest layer: on containerd 2.1+, which
announces each blob as it is committed (C{/content/create}), the layer is findable before the
pull completes; on 1.6 only once the image exists.

For each run it prints how long the pull took and when A first answered 200, relative to the pull
completing (C{ctr} exiting): the propagation delay is that time, or 0 when A already answered
before (containerd records the image, which is what the node advertises, before it has finished
unpacking the layers).  It then waits until A finds the tag and every digest of the image too, and
prints that delay as well.  At the end: the median and maximum of both against the target (the
manifest within 1 s).  It exits 1 with a one-line reason when something fails (an image not
findable within the timeout included); the rig kills every process it started.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence

from attrs import define, field, frozen

from p2p_blob import A, B, Stopwatch
from serve_blob import guarded
from serve_blob import BenchmarkFailed
from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.containerd import ContainerdBuild, containerd_builds
from spegel_testing.images import TestImage, build_image
from spegel_testing.node import SpegelNode
from spegel_testing.process import ProcessFailed

KiB = 1 << 10
MiB = 1 << 20
REPO = "bench/p2p-propagation"
TAG = "v1"
TARGET_SECONDS = 1.0
# A few small layers: the pull is quick, and there are several keys to announce per image.
LAYER_SIZES = (2 * MiB, 512 * KiB, 64 * KiB)
REQUEST_TIMEOUT = 5.0


@define(eq=False)
class Poller:
    """
    A thread asking A for one manifest until it answers 200.

    @ivar found_at: C{time.monotonic()} when the first 200 arrived.
    @ivar polls: requests sent.
    @ivar error: why the poller gave up, if it did.
    """

    node: SpegelNode
    path: str
    interval: float
    found_at: float | None = None
    polls: int = 0
    error: str | None = None
    _stop: threading.Event = field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            try:
                status = self.node.request("HEAD", self.path, timeout=REQUEST_TIMEOUT).status
            except (OSError, http.client.HTTPException) as e:
                self.error = f"HEAD {self.path} on A failed: {e}"
                return
            if status == 200:
                self.found_at = time.monotonic()
                return
            if status != 404:
                self.error = f"A answered {status} to HEAD {self.path}"
                return
            self._stop.wait(self.interval)

    def wait(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT + 1)


@frozen
class Run:
    """
    One image: its pull on B and when A could serve it.

    @ivar pull_seconds: how long B's C{ctr images pull} took.
    @ivar manifest_after: seconds from the pull completing to A's first 200 for the manifest
        (negative: A answered before the pull completed).
    @ivar everything_after: seconds from the pull completing until A found the tag and every
        digest.
    """

    pull_seconds: float
    manifest_after: float
    everything_after: float
    polls: int
    layer_after: float = 0.0

    @property
    def manifest_delay(self) -> float:
        return max(0.0, self.manifest_after)

    @property
    def everything_delay(self) -> float:
        return max(0.0, self.everything_after)


def run_benchmark(runs: int, interval: float, timeout: float, build: ContainerdBuild) -> Summary:
    """
    Set everything up, measure, print the report.

    @return: whether every run met the target.
    @raise BenchmarkFailed: when something does not work.
    """
    clock = Stopwatch()
    clock.say(f"building {runs} images of {len(LAYER_SIZES)} small gzip'd layers (different seeds)")
    images = [build_image(seed=f"p2p-propagation-{run}", layer_sizes=LAYER_SIZES) for run in range(runs)]
    clock.say(f"starting docker-registry, two containerd {build.version} and two spegel nodes (A, B) on 127.0.0.1")
    with Cluster(2, node_args=static_bootstrap, wait_ready=True, log_level="info", containerd_build=build) as cluster:
        cluster.configure_mirrors(B, [B])
        refs = [cluster.registry.push_image(f"{REPO}-{run}", TAG, image) for run, image in enumerate(images)]
        clock.say(f"pushed {runs} images to {cluster.registry.url}; B's containerd mirrors through B's node")
        clock.say(f"per image: A polled every {interval * 1000:.0f} ms from before B's pull starts")
        results = []
        for run, (image, ref) in enumerate(zip(images, refs), start=1):
            result = _one_run(cluster, f"{REPO}-{run - 1}", image, ref, interval, timeout)
            results.append(result)
            print(
                f"  run {run}  pull on B {result.pull_seconds:5.2f} s; A serves the largest layer "
                f"{_relative(result.layer_after)}, the manifest "
                f"{_relative(result.manifest_after)} ({result.polls} polls), the tag and every digest "
                f"{_relative(result.everything_after)}",
                flush=True,
            )
        return _report(build, results, 1 + len(images[0].digests()))


def _one_run(cluster: Cluster, repo: str, image: TestImage, ref: str, interval: float, timeout: float) -> Run:
    ns = urllib.parse.quote(cluster.registry.host, safe="")
    poller = Poller(cluster.nodes[A], f"/v2/{repo}/manifests/{image.digest}?ns={ns}", interval)
    largest = max(image.layers, key=lambda layer: layer.size)
    layer_poller = Poller(cluster.nodes[A], f"/v2/{repo}/blobs/{largest.digest}?ns={ns}", interval)
    poller.start()
    layer_poller.start()
    try:
        started = time.monotonic()
        cluster.containerds[B].pull(ref)
        done = time.monotonic()
        poller.wait(timeout)
        layer_poller.wait(timeout)
    finally:
        poller.stop()
        layer_poller.stop()
    for what, p in (("manifest", poller), ("largest layer", layer_poller)):
        if p.error is not None:
            raise BenchmarkFailed(p.error)
        if p.found_at is None:
            raise BenchmarkFailed(f"A did not serve the {what} of {ref} within {timeout:.0f}s of B's pull")
    assert poller.found_at is not None and layer_poller.found_at is not None
    try:
        cluster.wait_findable([A], repo, image, tag=TAG, timeout=timeout, interval=interval)
    except ProcessFailed as e:
        raise BenchmarkFailed(str(e)) from None
    everything = time.monotonic()
    return Run(
        done - started, poller.found_at - done, everything - done, poller.polls, layer_poller.found_at - done
    )


def _relative(seconds: float) -> str:
    if seconds < 0:
        return f"{-seconds:.3f} s before it completed"
    return f"{seconds:.3f} s after it completed"


@frozen
class Summary:
    """
    One containerd's figures: medians and maxima, in seconds after the pull completed (the
    layer's may be negative: findable before).
    """

    version: str
    layer_median: float
    manifest_median: float
    manifest_max: float
    everything_median: float
    everything_max: float
    met: bool


def _report(build: ContainerdBuild, results: Sequence[Run], requests: int) -> Summary:
    manifest = sorted(r.manifest_delay for r in results)
    everything = sorted(r.everything_delay for r in results)
    early = sum(1 for r in results if r.manifest_after < 0)
    print()
    polls = sum(r.polls for r in results) / sum(r.pull_seconds for r in results)
    print(f"runs           {len(results)} images, each pulled once on B; A polled from before the pull "
          f"(about one answer every {1000 / polls:.0f} ms, a miss included)")
    print(f"manifest       median {statistics.median(manifest):.3f} s, max {manifest[-1]:.3f} s after the pull "
          f"completed (already served before completion in {early} of {len(results)} runs)")
    print(f"whole image    median {statistics.median(everything):.3f} s, max {everything[-1]:.3f} s "
          f"(tag and every digest findable from A; taken at the end of the first check that found all "
          f"{requests}, one HEAD each in turn, so an upper bound)")
    layer = sorted(r.layer_after for r in results)
    before = sum(1 for r in results if r.layer_after < 0)
    print(f"largest layer  median {_relative(statistics.median(layer))} (findable before the pull completed "
          f"in {before} of {len(results)} runs)")
    met = manifest[-1] <= TARGET_SECONDS
    verdict = "target met" if met else "ABOVE target"
    print(f"propagation    max {manifest[-1]:.3f} s (target <= {TARGET_SECONDS:.1f} s): {verdict}")
    return Summary(
        build.version,
        statistics.median(layer),
        statistics.median(manifest),
        manifest[-1],
        statistics.median(everything),
        everything[-1],
        met,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/p2p_propagation.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=7, help="images pulled on B, one per run (default 7)")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="pause between A's polls (default 5)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds A may take to serve an image after B's pull (default 10)")
    builds = {f"{b.major_minor[0]}.{b.major_minor[1]}": b for b in containerd_builds()}
    parser.add_argument("--containerd", choices=["all", *builds], default="all",
                        help="which containerd the nodes run (default: each the tests run, in turn)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.interval_ms <= 0 or args.timeout <= 0:
        parser.error("--runs must be at least 1, --interval-ms and --timeout positive")
    chosen = list(builds.values()) if args.containerd == "all" else [builds[args.containerd]]

    def run_all() -> bool:
        summaries = []
        for build in chosen:
            build.check()
            summaries.append(run_benchmark(args.runs, args.interval_ms / 1000, args.timeout, build))
            print()
        print("containerd   largest layer (median)   manifest (median / max)   tag and every digest (median / max)")
        for s in summaries:
            print(f"{s.version:<12} {s.layer_median:+8.3f} s               {s.manifest_median:.3f} / {s.manifest_max:.3f} s"
                  f"         {s.everything_median:.3f} / {s.everything_max:.3f} s")
        print("(seconds after the pull completed; negative: findable before it completed)")
        return all(s.met for s in summaries)

    return guarded(run_all)


if __name__ == "__main__":
    sys.exit(main())
