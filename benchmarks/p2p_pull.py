# -*- test-case-name: tests.test_rig -*-
"""
Benchmark: a real containerd pulling an image through the P2P mirror (its own node misses, a peer
holds the image) against pulling it straight from docker-registry, on loopback.

Run with C{.venv/bin/python benchmarks/p2p_pull.py [--layers-mib 40,30,20,10] [--runs 5]}.  It
starts a two-node cluster (A and B bootstrap from each other), pushes an image of a few gzip'd
layers of random bytes (about 100 MB by default), pulls it on B straight from the registry, and
waits until A finds it (tag and every digest) through the DHT.  Then A's containerd pulls it with
C{ctr images pull --hosts-dir}, alternately:

  - P2P: A's hosts.toml as C{spegel configuration} writes it (A's node first, then upstream);
    A's node misses locally, looks the tag and every digest up in the DHT and streams from B;
  - registry: a hosts.toml with only C{server = <registry>}, no mirror.

Before every pull the image is removed from A (C{ctr images rm --sync}, which waits for garbage
collection), so each pull fetches and unpacks everything again.  One untimed pull of each kind
comes first (it checks that the P2P pull really is served by B, and warms the caches), then the
timed pulls alternate P2P, registry, P2P, registry...  It prints every pull, the median time of
each, and the ratio of the medians P2P/registry: below 1 the P2P pull is faster.  Each P2P pull
must have been served entirely by peers (A's C{spegel_served_bytes_total{source="peer"}}) with no
digest mismatch; each registry pull not by the node at all.  It exits 1 with a one-line reason when
something fails; the rig kills every process it started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence

from attrs import frozen

from p2p_blob import A, B, FINDABLE_TIMEOUT, NodeCounters, Stopwatch
from serve_blob import guarded
from serve_blob import BenchmarkFailed
from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.images import TestImage, build_image
from spegel_testing.process import ProcessFailed

MiB = 1 << 20
REPO = "bench/p2p-pull"
TAG = "v1"
P2P, REGISTRY = "p2p", "registry"
PULL_TIMEOUT = 300.0


@frozen
class Pull:
    """
    One timed pull on A.

    @ivar seconds: wall time of C{ctr images pull}, from start to exit.
    @ivar from_peers: bytes A's node passed on from peers during the pull.
    """

    mode: str
    seconds: float
    from_peers: float


def run_benchmark(layer_sizes: Sequence[int], runs: int) -> float:
    """
    Set everything up, measure, print the report.

    @return: the ratio of the median pull times, P2P/registry.
    @raise BenchmarkFailed: when something does not work.
    """
    clock = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="spegel-bench-") as scratch:
        clock.say(f"building an image with {len(layer_sizes)} gzip'd layers of random bytes "
                  f"({', '.join(str(s // MiB) for s in layer_sizes)} MiB)")
        image = build_image(seed="p2p-pull", layer_sizes=layer_sizes, directory=scratch)
        clock.say("starting docker-registry, two containerds and two spegel nodes (A, B) on 127.0.0.1")
        with Cluster(2, node_args=static_bootstrap, wait_ready=True, log_level="info") as cluster:
            registry = cluster.registry
            ref = registry.push_image(REPO, TAG, image)
            clock.say(f"pushed {ref} ({image.total_size() / MiB:.1f} MiB in {len(image.blobs())} blobs)")
            pulled_in = cluster.pull(B, ref, timeout=PULL_TIMEOUT)
            clock.say(f"B pulled it straight from the registry in {pulled_in:.2f}s")
            try:
                seconds = cluster.wait_findable([A], REPO, image, tag=TAG, timeout=FINDABLE_TIMEOUT)
            except ProcessFailed:
                raise BenchmarkFailed(f"A does not find B's image through the DHT after {FINDABLE_TIMEOUT:.0f}s") from None
            clock.say(f"A finds the tag and every digest through the DHT ({seconds:.2f}s later)")
            hosts = _hosts_files(cluster)
            return _measure(cluster, image, ref, hosts, runs, clock)


def _hosts_files(cluster: Cluster) -> dict[str, str]:
    """
    The two hosts.toml texts A's containerd switches between: through A's node, and upstream only.
    """
    cluster.configure_mirrors(A, [A])
    through_node = cluster.hosts_toml(A)
    if cluster.nodes[A].registry_url not in through_node:
        raise BenchmarkFailed(f"spegel configuration wrote no mirror entry for A's node: {through_node!r}")
    return {P2P: through_node, REGISTRY: f'server = "{cluster.registry.url}"\n'}


def _pull_once(cluster: Cluster, image: TestImage, ref: str, mode: str, hosts: dict[str, str]) -> Pull:
    """
    Remove the image from A (synchronous garbage collection), switch A's hosts.toml to C{mode},
    pull, and check where the bytes came from.
    """
    daemon, node = cluster.containerds[A], cluster.nodes[A]
    if ref in daemon.images():
        daemon.remove_image(ref)
    left = [blob.digest for blob in image.layers if os.path.exists(daemon.blob_path(blob.digest))]
    if left:
        raise BenchmarkFailed(f"A still holds {left[0]} after removing the image: the pull would be a local hit")
    daemon.write_hosts_toml(cluster.registry.host, hosts[mode])
    before = NodeCounters.of(node)
    seconds = cluster.pull(A, ref, timeout=PULL_TIMEOUT)
    used = NodeCounters.of(node) - before
    if daemon.images().get(ref) != image.digest:
        raise BenchmarkFailed(f"A's {mode} pull did not leave {ref} as {image.digest}")
    if used.mismatches:
        raise BenchmarkFailed(f"A's node counted {used.mismatches:.0f} digest mismatches during a {mode} pull")
    if mode == P2P and used.peer < image.total_size():
        raise BenchmarkFailed(
            f"A's node passed on {used.peer:.0f} of {image.total_size()} bytes from peers: "
            "the P2P pull went partly upstream"
        )
    if mode == REGISTRY and (used.peer or used.local):
        raise BenchmarkFailed("A's node served bytes during a pull configured without the mirror")
    return Pull(mode, seconds, used.peer)


def _measure(
    cluster: Cluster, image: TestImage, ref: str, hosts: dict[str, str], runs: int, clock: Stopwatch
) -> float:
    size_mb = image.total_size() / 1e6
    for mode in (P2P, REGISTRY):
        pull = _pull_once(cluster, image, ref, mode, hosts)
        clock.say(f"untimed {mode} pull: {pull.seconds:.2f}s, {pull.from_peers / MiB:.1f} MiB from peers")
    clock.say(f"{runs} timed pulls of each kind on A, interleaved, the image removed before each")
    results: dict[str, list[Pull]] = {P2P: [], REGISTRY: []}
    for run in range(1, runs + 1):
        for mode in (P2P, REGISTRY):
            pull = _pull_once(cluster, image, ref, mode, hosts)
            results[mode].append(pull)
            print(
                f"  run {run}  {mode:<8}  {pull.seconds:6.2f} s  ({size_mb / pull.seconds:6.1f} MB/s; "
                f"{pull.from_peers / MiB:6.1f} MiB from peers)",
                flush=True,
            )
    medians = {mode: statistics.median(p.seconds for p in pulls) for mode, pulls in results.items()}
    ratio = medians[P2P] / medians[REGISTRY]
    print()
    print(f"image          {ref} ({image.digest})")
    print(f"               {size_mb:.1f} MB: {len(image.layers)} gzip'd layers, config, manifest; held by B")
    print(f"pulls          ctr images pull --hosts-dir on A, {runs} of each kind, interleaved, image removed before each")
    for mode, label in ((P2P, "P2P (A's node, from B)"), (REGISTRY, "registry (no mirror)")):
        times = sorted(p.seconds for p in results[mode])
        print(f"{label:<24} median {medians[mode]:6.2f} s  (min {times[0]:.2f}, max {times[-1]:.2f})")
    verdict = "P2P faster" if ratio < 1 else "P2P SLOWER" if ratio > 1 else "the same"
    print(f"ratio          P2P/registry time = {ratio:.2f} (below 1: P2P faster): {verdict} "
          f"by {abs(medians[P2P] - medians[REGISTRY]):.2f} s")
    return ratio


def _layer_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) * MiB for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of whole MiB: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("every layer must be at least 1 MiB")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/p2p_pull.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument(
        "--layers-mib", type=_layer_sizes, default=[40 * MiB, 30 * MiB, 20 * MiB, 10 * MiB],
        help="layer payloads in MiB, comma-separated (default 40,30,20,10: about 100 MB)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed pulls of each kind (default 5)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return guarded(lambda: run_benchmark(args.layers_mib, args.runs))


if __name__ == "__main__":
    sys.exit(main())
