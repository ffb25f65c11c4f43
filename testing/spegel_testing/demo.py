# -*- test-case-name: tests.e2e.test_e2e_node -*-
"""
The README demo: a cluster shares an image peer to peer, upstream gone.

Run with C{python -m spegel_testing.demo}.  Where the machine allows it (root, network
namespaces, C{tc}), every node is a host of its own (L{spegel_testing.netcluster}): its own
address on a bridge, containerd, and a spegel node on the chart's ports, found through DNS, with
the upstream registry behind a 100 Mbit/s link with 30 ms of round trip; node 1 pulls from
upstream, then every other node at once, as in a DaemonSet rollout, with a progress line while
they pull.  Elsewhere, or with C{--loopback}, it says why and runs three nodes on 127.0.0.1
(static bootstrap), pulling one after another.  In both, every containerd mirrors through its own
node (C{spegel configuration}), as in a real cluster.
It pushes an image of a few random layers upstream, pulls it on node 1 (its node finds nothing in
the cluster, so containerd falls back upstream), waits until the other nodes find it in the
cluster, stops the upstream registry, and pulls it on node 2 by tag and on node 3 by digest.
For each pull it prints how long it took and where the bytes came from (upstream, the node's own
disk, or which peer), from the nodes' metrics.  Exits 0 when every node ends with the pushed
digests, non-zero with a one-line reason otherwise, and always cleans up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from spegel_testing.cluster import Cluster, Served, static_bootstrap
from spegel_testing.containerd import newest_containerd
from spegel_testing.images import TestImage, build_image
from spegel_testing.netcluster import BOOTSTRAP_DOMAIN, NetCluster
from spegel_testing.process import CommandFailed, ProcessFailed, failure_line, last_line

MiB = 1 << 20

# The target is about a second; a loaded machine gets some slack before the demo gives up.
FINDABLE_WITHIN = 5.0

# How often a running pull reports its progress.
PROGRESS_EVERY = 0.5


class DemoFailed(Exception):
    """
    A check of the demo failed; the message is the one-line reason.
    """


@frozen
class PullReport:
    """
    One pull: how long it took and where its bytes came from.

    @ivar node: the pulling node (0-based).
    @ivar upstream: bytes containerd fetched from the upstream registry (what the nodes did
        not serve).
    @ivar own_disk: bytes the pulling node served from its own containerd.
    @ivar from_peers: bytes the pulling node passed on from peers.
    @ivar spliced: of those, the bytes it moved by splice, never through Python.
    @ivar by_peer: bytes each other node served from its disk meanwhile (0-based index).
    """

    node: int
    how: str
    seconds: float
    upstream: float
    own_disk: float
    from_peers: float
    spliced: float
    by_peer: dict[int, float]


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f}s] {message}", flush=True)


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def rig_unavailable() -> str | None:
    """
    Why nodes cannot be hosts of their own here (L{None} when they can): the rig needs root,
    C{ip}, C{tc}, C{nsenter} and C{unshare}, and a kernel that lets it make network namespaces.
    """
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    name = f"spdemo{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make network namespaces ({last_line(made.stderr)})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def run_demo(
    layers: int,
    total_mib: float,
    seed: str,
    keep: bool,
    node_args: Sequence[str] = (),
    nodes: int = 3,
    rig: bool = False,
) -> list[PullReport]:
    """
    Run the demo, printing progress.

    @param node_args: extra arguments for every node.
    @return: one report per pull.
    @raise DemoFailed: when a step does not end as it should.
    """
    clock = _Clock()
    layer_size = int(total_mib * MiB / layers)
    with tempfile.TemporaryDirectory(prefix="spegel-demo-") as scratch:
        clock.say(f"building a {layers}-layer image of {_mib(layer_size * layers)} of random bytes (seed {seed!r})")
        image = build_image(seed=seed, layer_sizes=[layer_size] * layers, directory=scratch)

        def args(index: int, cluster: Cluster) -> list[str]:
            return [*static_bootstrap(index, cluster), *node_args]

        build = newest_containerd()
        cluster: Any
        if rig:
            clock.say(
                f"starting {nodes} hosts of their own (network namespaces on a bridge), each with "
                f"containerd {build.version} and a spegel node on ports 5000/5001/9090, and an "
                "upstream registry behind a 100 Mbit/s link with 30 ms of round trip"
            )
            cluster = NetCluster(nodes, containerd_build=build, node_args=list(node_args))
        else:
            clock.say(
                f"starting an upstream registry, {nodes} containerd {build.version} daemons and "
                f"{nodes} spegel nodes on 127.0.0.1"
            )
            cluster = Cluster(nodes, keep_dir=keep, node_args=args, wait_ready=True, containerd_build=build)
        try:
            with cluster:
                return _run_in(cluster, image, clock, rig)
        except BaseException:
            if keep:
                print(cluster.dump_logs(20), file=sys.stderr)
            raise
        finally:
            if keep and not rig:
                clock.say(f"logs and data kept in {cluster.base_dir}")


def _run_in(cluster: Any, image: TestImage, clock: _Clock, rig: bool = False) -> list[PullReport]:
    registry = cluster.registry
    count = len(cluster.nodes)
    repo = "demo/app"
    if rig:
        clock.say(f"up: upstream {cluster.upstream_url} (a host of its own); nodes found through DNS as {BOOTSTRAP_DOMAIN}")
        for index, (node, daemon) in enumerate(zip(cluster.nodes, cluster.containerds)):
            clock.say(f"    node {index + 1} at {node.address} (containerd {daemon.socket})")
        clock.say("spegel configuration: every containerd tries its own node before upstream")
        tag_ref = cluster.push_image(repo, "v1", image)
        digest_ref = cluster.ref(repo, image.digest)
    else:
        clock.say(f"up: registry {registry.url}")
        for index, (node, daemon) in enumerate(zip(cluster.nodes, cluster.containerds)):
            clock.say(f"    node {index + 1} {node.registry_url} (containerd {daemon.socket})")
        cluster.mirror_through_own_nodes()
        clock.say("spegel configuration: every containerd tries its own node before upstream")
        tag_ref = registry.push_image(repo, "v1", image)
        digest_ref = registry.ref(repo, image.digest)
    clock.say(f"pushed {tag_ref} ({image.digest}, {_mib(image.total_size())} in {len(image.blobs())} blobs)")

    # Node 1 and every other puller by tag, the rest by digest: containerd asks for both kinds.
    refs = [tag_ref, *(tag_ref if index % 2 else digest_ref for index in range(1, count))]
    reports = [_pull(cluster, image, 0, tag_ref, "by tag", clock)]
    if reports[0].from_peers:
        raise DemoFailed(f"node 1 got {int(reports[0].from_peers)} bytes from peers: the cluster was not empty")

    others = list(range(1, count))
    try:
        seconds = cluster.wait_findable(others, repo, image, tag="v1", timeout=FINDABLE_WITHIN)
    except ProcessFailed:
        raise DemoFailed(f"node 1's image is not findable from the other nodes after {FINDABLE_WITHIN:.0f}s") from None
    clock.say(f"every blob and the tag are findable from nodes {_names(others)} after {seconds:.2f}s")

    registry.stop()
    clock.say("upstream registry stopped")
    if rig:
        wave = _rollout(cluster, image, others, refs, tag_ref, clock)
    else:
        wave = [_pull(cluster, image, index, refs[index], "by tag" if refs[index] == tag_ref else "by digest", clock) for index in others]
    for report in wave:
        index = report.node
        reports.append(report)
        if report.upstream > 0:
            raise DemoFailed(
                f"node {index + 1}'s node served {int(report.own_disk + report.from_peers)} of "
                f"{image.total_size()} bytes, upstream is stopped"
            )

    for index, daemon in enumerate(cluster.containerds):
        ref = refs[index]
        digest = daemon.images().get(ref)
        if digest != image.digest:
            raise DemoFailed(f"node {index + 1} holds {ref} as {digest}, pushed {image.digest}")
        missing = image.digests() - daemon.content_digests()
        if missing:
            raise DemoFailed(f"node {index + 1} lacks {len(missing)} blobs of the image, e.g. {sorted(missing)[0]}")
        damaged = daemon.damaged_content()
        if damaged:
            raise DemoFailed(f"node {index + 1} stored wrong bytes for {sorted(damaged)[0]}")

    _summary(reports, image, tag_ref, count)
    return reports


def _pull(cluster: Cluster, image: TestImage, index: int, ref: str, how: str, clock: _Clock) -> PullReport:
    """
    Pull C{ref} on node C{index}, printing progress while it runs, and work out from the nodes'
    metrics where the bytes came from.
    """
    clock.say(f"node {index + 1} pulls {ref} {how} through its own node ...")
    before = cluster.served()
    started = time.monotonic()
    process = cluster.containerds[index].start_pull(ref)
    try:
        last = started
        while process.running:
            time.sleep(0.05)
            if time.monotonic() - last >= PROGRESS_EVERY and process.running:
                last = time.monotonic()
                now, then = cluster.served()[index], before[index]
                got = 0.0 if now is None or then is None else (now - then).peer
                if got >= image.total_size():
                    clock.say(f"    ... node {index + 1}: every byte in, containerd unpacking the layers")
                elif got > 0:
                    clock.say(f"    ... node {index + 1}: {_mib(got)} of {_mib(image.total_size())} from peers so far")
                else:
                    clock.say(f"    ... node {index + 1}: pulling, nothing from peers")
        status = process.wait(timeout=5)
    finally:
        process.kill()
    seconds = time.monotonic() - started
    if status != 0:
        raise DemoFailed(f"node {index + 1}'s pull failed: {last_line(process.log_text())}")
    delta = [None if a is None or b is None else a - b for a, b in zip(cluster.served(), before)]
    mine: Served = delta[index] or Served(0, 0)
    by_peer = {i: d.local for i, d in enumerate(delta) if i != index and d is not None and d.local > 0}
    upstream = max(0.0, image.total_size() - mine.local - mine.peer)
    report = PullReport(index, how, seconds, upstream, mine.local, mine.peer, mine.spliced, by_peer)
    clock.say(f"node {index + 1} pulled {ref} {how} in {seconds:.2f}s: {_sources(report)}")
    return report


def _rollout(cluster: Any, image: TestImage, indexes: list[int], refs: list[str], tag_ref: str, clock: _Clock) -> list[PullReport]:
    """
    Pull on every node of C{indexes} at once, as a DaemonSet rollout does, printing one line of
    progress for all of them, then what each got from where and what each served the others.
    """
    clock.say(f"nodes {_names(indexes)} pull at once, each through its own node ...")
    before = cluster.served()
    started = time.monotonic()
    processes = {index: cluster.containerds[index].start_pull(refs[index]) for index in indexes}
    ended: dict[int, float] = {}
    try:
        last = started
        while len(ended) < len(processes):
            time.sleep(0.05)
            for index, process in processes.items():
                if index not in ended and not process.running:
                    ended[index] = time.monotonic() - started
            if time.monotonic() - last >= PROGRESS_EVERY and len(ended) < len(processes):
                last = time.monotonic()
                now = cluster.served()
                parts = []
                for index in indexes:
                    got = 0.0 if now[index] is None or before[index] is None else (now[index] - before[index]).peer
                    parts.append(f"node {index + 1} " + ("done" if index in ended else _mib(got)))
                clock.say("    ... " + " | ".join(parts))
        statuses = {index: process.wait(timeout=5) for index, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
    failed = [index for index, status in statuses.items() if status != 0]
    if failed:
        raise DemoFailed(f"node {failed[0] + 1}'s pull failed: {last_line(processes[failed[0]].log_text())}")
    delta = [None if a is None or b is None else a - b for a, b in zip(cluster.served(), before)]
    reports = []
    for index in indexes:
        mine: Served = delta[index] or Served(0, 0)
        upstream = max(0.0, image.total_size() - mine.local - mine.peer)
        how = "by tag" if refs[index] == tag_ref else "by digest"
        report = PullReport(index, how, ended[index], upstream, mine.local, mine.peer, mine.spliced, {})
        clock.say(f"node {index + 1} pulled {refs[index]} {how} in {ended[index]:.2f}s: {_sources(report)}")
        reports.append(report)
    served = ", ".join(f"node {i + 1} {_mib(d.local)}" for i, d in enumerate(delta) if d is not None and d.local > 0)
    clock.say(f"served to the others during the rollout: {served or 'nothing'}")
    return reports


def _sources(report: PullReport) -> str:
    parts = [f"{_mib(report.upstream)} from upstream", f"{_mib(report.own_disk)} from its own disk"]
    peers = ", ".join(f"node {i + 1} {_mib(n)}" for i, n in sorted(report.by_peer.items()))
    parts.append(f"{_mib(report.from_peers)} from peers" + (f" ({peers})" if peers else ""))
    if report.from_peers:
        parts.append(f"{report.spliced / report.from_peers:.0%} of those by splice")
    return ", ".join(parts)


def _summary(reports: list[PullReport], image: TestImage, ref: str, count: int) -> None:
    nodes = " = ".join(f"node {i + 1}" for i in range(count))
    print()
    print(f"image          {ref}")
    print(f"digest         {image.digest} (upstream = {nodes}: yes)")
    print(f"image size     {_mib(image.total_size())} in {len(image.blobs())} blobs")
    print(f"{'pull':<24} {'time':>7} {'upstream':>11} {'own disk':>11} {'peers':>11}  served by")
    for r in reports:
        # A rollout's pulls ran at once: who served whom is not told apart (see above).
        peers = ", ".join(f"node {i + 1}" for i in sorted(r.by_peer)) or "peers (at once)"
        print(
            f"{f'node {r.node + 1} {r.how}':<24} {r.seconds:>6.2f}s {_mib(r.upstream):>11} "
            f"{_mib(r.own_disk):>11} {_mib(r.from_peers):>11}  {peers if r.from_peers else 'upstream'}"
        )


def _names(indexes: Sequence[int]) -> str:
    return " and ".join(str(i + 1) for i in indexes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel_testing.demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--size-mib", type=float, default=50.0, help="total layer payload in MiB (default 50)")
    parser.add_argument("--seed", default="demo", help="seed of the random image bytes")
    parser.add_argument("--keep", action="store_true", help="keep logs and data, print log tails on failure")
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every spegel node, repeatable (e.g. --node-arg=--mirror-resolve-retries=1)",
    )
    parser.add_argument("--loopback", action="store_true", help="run on 127.0.0.1 even where nodes can be hosts of their own")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default 5 as hosts of their own, 3 on loopback)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.size_mib <= 0:
        parser.error("--layers must be at least 1 and --size-mib positive")
    rig = False
    if not args.loopback:
        why = rig_unavailable()
        if why is None:
            rig = True
        else:
            print(f"nodes cannot be hosts of their own here ({why}): running on 127.0.0.1", flush=True)
    nodes = args.nodes or (5 if rig else 3)
    if nodes < 2:
        parser.error("--nodes must be at least 2")
    # A plain kill must clean up too: turn SIGTERM into an exception that unwinds the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_demo(args.layers, args.size_mib, args.seed, args.keep, args.node_arg, nodes=nodes, rig=rig)
    except DemoFailed as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except (CommandFailed, ProcessFailed) as e:
        print(f"demo failed: {failure_line(e, command_words=3)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    print("demo ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
