"""
Benchmark: a DaemonSet rollout on the multi-host rig (spegel_testing.netcluster): N nodes, each
a host of its own (own address, the chart's ports, DNS bootstrap), pull the same image, with
upstream behind a 100 Mbit/s link with 30 ms of round trip, against the same pulls with no
spegel at all (every node straight from upstream).

    .venv/bin/python benchmarks/rollout.py [--nodes 10,20] [--sizes 10,100] \\
        [--mode seeded|concurrent] [--stagger 0] [--coalesce 5s] [--no-baseline] [--fetch-only]

Modes: C{seeded}: one node pulls first (from upstream), then all the others at once, as when a
rollout follows a canary; C{concurrent}: every node at once, nobody holding the image yet (only
coalescing, on by default, keeps that from being N upstream pulls).  C{--stagger S} starts the nodes S
seconds apart.  Per case: mean, p50, p99 and max pull time, the time until every node holds the
image, upstream bytes (counted on the upstream link), bytes each node served to its peers (max
and mean: is the first holder a hot spot?), and the nodes' RSS.  The reference's published
figures (50 nodes, mean pull) are printed beside.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from spegel_testing.images import build_image
from spegel_testing.netcluster import NetCluster
from spegel_testing.process import CommandFailed, ProcessFailed

MiB = 1 << 20
# The reference's README: 50 nodes, mean pull time without / with it, milliseconds.
REFERENCE = {10: (1220, 210), 100: (1725, 560), 1000: (8429, 6682)}


def layers_for(size_mb: int) -> tuple[int, ...]:
    """About C{size_mb} MB in five layers of decreasing size, as real images are cut."""
    total = size_mb * 1000 * 1000
    shares = (0.4, 0.25, 0.15, 0.12, 0.08)
    return tuple(max(1024, int(total * share)) for share in shares)


# A node's log lines about a provider that failed it (spegel.mirror logs each at info).
PEER_FAILURE = re.compile(r"peer (?P<peer>\S+?)(?: failed(?: a manifest)?)?: (?P<why>.*)$|peer (?P<slow>\S+) sent no response headers")


def peer_failures(log: str) -> list[str]:
    """
    Why providers failed this node, one entry per failure, worded by kind (digits dropped, so
    "sent no response headers in 2.01s" and "...in 2.93s" count together).
    """
    kinds = []
    for line in log.splitlines():
        match = PEER_FAILURE.search(line)
        if match is None or "relaying through Python" in line:
            continue
        why = "no response headers before the deadline" if match["slow"] else match["why"]
        kinds.append(re.sub(r"\d+(\.\d+)?", "N", why)[:90])
    return kinds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_case(
    nodes: int,
    size_mb: int,
    *,
    spegel: bool,
    mode: str,
    stagger: float,
    coalesce: str | None,
    node_args: Sequence[str] = (),
    keep_logs: str | None = None,
    fetch_only: bool = False,
) -> dict:
    image = build_image(seed=f"rollout-{size_mb}", layer_sizes=layers_for(size_mb))
    coalesce_args = ["--mirror-coalesce-timeout", coalesce] if coalesce is not None else []
    node_args = [*coalesce_args, *node_args] if spegel else []
    with NetCluster(nodes, spegel=spegel, node_args=node_args) as cluster:
        ref = cluster.push_image("rollout/app", "v1", image)
        started = time.monotonic()
        times: dict[int, float] = {}
        failed: dict[int, str] = {}
        wave = list(range(nodes))
        if mode == "seeded":
            times[0] = cluster.pull(0, ref, fetch_only=fetch_only)
            wave = wave[1:]
            if spegel:
                time.sleep(1.0)  # advertised: every blob is findable well within this
            started = time.monotonic()

        def pull(position: int, index: int) -> None:
            time.sleep(position * stagger)
            try:
                times[index] = cluster.pull(index, ref, timeout=1800, fetch_only=fetch_only)
            except (CommandFailed, ProcessFailed) as e:
                # The command, then what it said: the last line says why.
                lines = [line for line in str(e).splitlines() if line.strip()]
                failed[index] = lines[-1][-300:] if lines else repr(e)

        with ThreadPoolExecutor(len(wave)) as executor:
            list(executor.map(lambda item: pull(*item), enumerate(wave)))
        everyone = time.monotonic() - started
        served = []
        from_peers = [0.0] * nodes
        failures: list[list[str]] = [[] for _ in range(nodes)]
        unresolved = {"timeout": 0.0, "peers_failed": 0.0}
        if spegel:
            metrics = [n.metrics() for n in cluster.nodes]
            served = [m.total("spegel_served_bytes_total", source="local") / MiB for m in metrics]
            from_peers = [m.total("spegel_served_bytes_total", source="peer") / MiB for m in metrics]
            for reason in unresolved:
                unresolved[reason] = sum(m.total("spegel_mirror_unresolved_total", reason=reason) for m in metrics)
            failures = [peer_failures(n.log_text()) for n in cluster.nodes]
        from_upstream = [b / MiB for b in cluster.upstream_bytes_by_node()]
        if keep_logs and spegel:
            os.makedirs(keep_logs, exist_ok=True)
            for index, node in enumerate(cluster.nodes):
                shutil.copy(node.log_path, os.path.join(keep_logs, f"node-{index + 1}.log"))
        rollout = [times[i] for i in wave if i in times]
        # Where the slowest pull's time went: how much of the image it took from upstream (at
        # the shared 100 Mbit/s) and from peers, and which providers failed it on the way.
        slowest = max((i for i in wave if i in times), key=lambda i: times[i], default=None)
        return {
            "nodes": nodes,
            "size": size_mb,
            "spegel": spegel,
            "mean": statistics.mean(rollout) if rollout else float("nan"),
            "p50": percentile(rollout, 0.5) if rollout else float("nan"),
            "p99": percentile(rollout, 0.99) if rollout else float("nan"),
            "max": max(rollout) if rollout else float("nan"),
            "everyone": everyone,
            "upstream": cluster.upstream_bytes() / MiB,
            "image": image.total_size() / MiB,
            "served_max": max(served) if served else 0.0,
            "served_mean": statistics.mean(served) if served else 0.0,
            "rss": statistics.mean(cluster.rss_mib()) if spegel else 0.0,
            "rss_max": max(cluster.rss_mib()) if spegel else 0.0,
            "failed": failed,
            "unresolved": unresolved,
            "failure_kinds": statistics_of(failures),
            "slowest": None if slowest is None else {
                "node": slowest + 1,
                "seconds": times[slowest],
                "upstream": from_upstream[slowest],
                "peers": from_peers[slowest],
                "failures": statistics_of([failures[slowest]]),
            },
        }


def statistics_of(failures: list[list[str]]) -> dict[str, int]:
    """Failures counted by kind, most frequent first."""
    counts: dict[str, int] = {}
    for kinds in failures:
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10")
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--mode", choices=("seeded", "concurrent"), default="seeded")
    parser.add_argument("--stagger", type=float, default=0.0)
    parser.add_argument("--coalesce", default=None, help="--mirror-coalesce-timeout (default: the node's own)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--node-arg", action="append", default=[], help="extra spegel node argument, repeatable")
    parser.add_argument("--runs", type=int, default=1, help="repeat each case (baseline and spegel interleaved)")
    parser.add_argument("--keep-logs", default=None, help="copy the spegel nodes' logs of each case into this directory")
    parser.add_argument(
        "--fetch-only", action="store_true",
        help="fetch the content without unpacking it (ctr content fetch): half the disk, for 50 nodes of 1 GB",
    )
    args = parser.parse_args()
    print(
        f"mode {args.mode}, stagger {args.stagger}s, coalesce {args.coalesce or '(node default)'}; upstream 100 Mbit/s, 30 ms RTT"
        + ("; content fetched, not unpacked" if args.fetch_only else "")
    )
    print("nodes  size MB  mirror   pull mean / p50 / p99 / max s   all done s  upstream MiB  served max / mean MiB  RSS mean / max MiB  reference mean ms (none -> spegel, 50 nodes)")
    for nodes in (int(n) for n in args.nodes.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            for spegel in [mirror for _ in range(args.runs) for mirror in ([True] if args.no_baseline else [False, True])]:
                try:
                    r = run_case(
                        nodes, size, spegel=spegel, mode=args.mode, stagger=args.stagger, coalesce=args.coalesce,
                        node_args=args.node_arg, fetch_only=args.fetch_only,
                        keep_logs=args.keep_logs and os.path.join(args.keep_logs, f"{nodes}x{size}-{time.strftime('%H%M%S')}"),
                    )
                except (CommandFailed, ProcessFailed) as e:
                    print(f"{nodes:5d}  {size:7d}  {'spegel' if spegel else 'none':7s}  failed: {str(e).splitlines()[0]}")
                    continue
                reference = REFERENCE.get(size)
                print(
                    f"{r['nodes']:5d}  {r['size']:7d}  {'spegel' if spegel else 'none':7s}"
                    f"  {r['mean']:6.2f} / {r['p50']:6.2f} / {r['p99']:6.2f} / {r['max']:6.2f}"
                    f"  {r['everyone']:9.2f}  {r['upstream']:12.1f}"
                    f"  {r['served_max']:9.1f} / {r['served_mean']:7.1f}"
                    f"  {r['rss']:8.0f} / {r['rss_max']:4.0f}"
                    f"  {f'{reference[0]} -> {reference[1]}' if reference else '-'}"
                    + (
                        f"  (404s: {r['unresolved']['timeout']:.0f} resolve timeouts, "
                        f"{r['unresolved']['peers_failed']:.0f} with every provider failing)"
                        if spegel else ""
                    )
                    + (f"  FAILED on {len(r['failed'])}: {next(iter(r['failed'].values()))}" if r["failed"] else ""),
                    flush=True,
                )
                if spegel:
                    for kind, count in r["failure_kinds"].items():
                        print(f"        provider failures: {count:4d} x {kind}")
                    slow = r["slowest"]
                    if slow:
                        print(
                            f"        slowest pull: node {slow['node']}, {slow['seconds']:.2f} s, "
                            f"{slow['upstream']:.1f} MiB from upstream, {slow['peers']:.1f} MiB from peers, "
                            f"provider failures {slow['failures'] or 'none'}",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
