# -*- test-case-name: tests.test_e2e_node -*-
"""
The README demo: a three-node loopback cluster shares an image peer to peer, upstream gone.

Run with C{python -m spegel.testing.demo}.  On 127.0.0.1 it starts an upstream registry and, per
node, a containerd daemon and a spegel node; the nodes bootstrap from each other (static) and
every containerd mirrors through its own node (C{spegel configuration}), as in a real cluster.
It pushes an image of a few random layers upstream, pulls it on node 1 (its node finds nothing in
the cluster, so containerd falls back upstream), waits until the other nodes find it in the
cluster, stops the upstream registry, and pulls it on node 2 by tag and on node 3 by digest.
For each pull it prints how long it took and where the bytes came from (upstream, the node's own
disk, or which peer), from the nodes' metrics.  Exits 0 when every node ends with the pushed
digests, non-zero with a one-line reason otherwise, and always cleans up.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from attrs import frozen

from spegel.testing.cluster import Cluster, Served, static_bootstrap
from spegel.testing.containerd import newest_containerd
from spegel.testing.images import TestImage, build_image
from spegel.testing.process import CommandFailed, ProcessFailed, failure_line, last_line

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


def run_demo(
    layers: int, total_mib: float, seed: str, keep: bool, node_args: Sequence[str] = (), nodes: int = 3
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
        clock.say(
            f"starting an upstream registry, {nodes} containerd {build.version} daemons and "
            f"{nodes} spegel nodes on 127.0.0.1"
        )
        cluster = Cluster(nodes, keep_dir=keep, node_args=args, wait_ready=True, containerd_build=build)
        try:
            with cluster:
                return _run_in(cluster, image, clock)
        except BaseException:
            if keep:
                print(cluster.dump_logs(20), file=sys.stderr)
            raise
        finally:
            if keep:
                clock.say(f"logs and data kept in {cluster.base_dir}")


def _run_in(cluster: Cluster, image: TestImage, clock: _Clock) -> list[PullReport]:
    registry = cluster.registry
    count = len(cluster.nodes)
    clock.say(f"up: registry {registry.url}")
    for index, (node, daemon) in enumerate(zip(cluster.nodes, cluster.containerds)):
        clock.say(f"    node {index + 1} {node.registry_url} (containerd {daemon.socket})")

    cluster.mirror_through_own_nodes()
    clock.say("spegel configuration: every containerd tries its own node before upstream")

    repo = "demo/app"
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
        raise DemoFailed(f"node 1's image is not findable from the other nodes after {FINDABLE_WITHIN:.0f}s")
    clock.say(f"every blob and the tag are findable from nodes {_names(others)} after {seconds:.2f}s")

    registry.stop()
    clock.say("upstream registry stopped")
    for index in others:
        how = "by tag" if refs[index] == tag_ref else "by digest"
        report = _pull(cluster, image, index, refs[index], how, clock)
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
                now = cluster.served()[index]
                got = 0.0 if now is None or before[index] is None else (now - before[index]).peer
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
        peers = ", ".join(f"node {i + 1}" for i in sorted(r.by_peer)) or "-"
        print(
            f"{f'node {r.node + 1} {r.how}':<24} {r.seconds:>6.2f}s {_mib(r.upstream):>11} "
            f"{_mib(r.own_disk):>11} {_mib(r.from_peers):>11}  {peers if r.from_peers else 'upstream'}"
        )


def _names(indexes: Sequence[int]) -> str:
    return " and ".join(str(i + 1) for i in indexes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel.testing.demo", description=__doc__.strip().splitlines()[0])
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
    args = parser.parse_args(argv)
    if args.layers < 1 or args.size_mib <= 0:
        parser.error("--layers must be at least 1 and --size-mib positive")
    # A plain kill must clean up too: turn SIGTERM into an exception that unwinds the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_demo(args.layers, args.size_mib, args.seed, args.keep, args.node_arg)
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
