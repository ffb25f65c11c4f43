"""
Benchmark: one node pulls a large blob that several nodes hold, every node's uplink capped at
the same rate: in pieces from all the holders at once (spegel.piecewise) against from one holder
(the same node with --mirror-parallel-min-size=0), runs interleaved, medians.

    .venv/bin/python benchmarks/holders.py [--size-mb 1024] [--holders 4] [--rate 200mbit] [--runs 3] \
        [--slow-rate 20mbit] [--modes parallel,one]

C{--slow-rate}: holder 1's uplink is capped lower than the others' while it still reports no
uploads (C{Spegel-Uploads: 0/...}): a peer that says it is idle and is slow, which work stealing
must route around (the pieces it held up show as stolen).

On the multi-host rig (spegel_testing.netcluster: a network namespace per node on one bridge,
C{tc tbf} on each node's link): the image (one uncompressed layer of C{--size-mb}) is pulled by
the holders' containerds, then node 0 is asked for the layer's blob over HTTP, as its containerd
would ask it, from inside its namespace; the bytes are hashed by the client (C{sha256sum}).
Printed per run: seconds, whether the digest matched, node 0's peak RSS (sampled every 50 ms),
and the MiB each holder sent; then medians per mode.  Every namespace and process is removed on
every exit path (NetCluster.stop, also at exit).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time

from spegel_testing.images import build_image
from spegel_testing.netcluster import REGISTRY_PORT, NetCluster

MiB = 1 << 20
REPO = "holders/app"
SINGLE = ["--mirror-parallel-min-size", "0"]


def rss_mib(pid: int | None) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


class PeakRSS:
    """Samples a process's resident memory in a thread, keeping the largest."""

    def __init__(self, pid: int | None, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def local_bytes(cluster: NetCluster) -> list[float]:
    return [node.metrics().total("spegel_served_bytes_total", source="local") for node in cluster.nodes]


def pull_blob(cluster: NetCluster, digest: str, parallel: bool, base_args: list[str]) -> dict:
    """Restart node 0 in C{parallel} mode or not, and fetch the blob through it."""
    node = cluster.nodes[0]
    node.extra_args = [*base_args, *([] if parallel else SINGLE)]
    node.restart(timeout=60)
    node.wait_ready(60)
    before = local_bytes(cluster)
    pieces_before = node.metrics().total("spegel_mirror_pieces_fetched_total")
    url = f"http://{node.address}:{REGISTRY_PORT}/v2/{REPO}/blobs/{digest}?ns={cluster.upstream_ns}"
    with PeakRSS(node.pid) as rss:
        started = time.monotonic()
        out = cluster.hosts[0].run(["sh", "-c", f"curl -sSf '{url}' | sha256sum"], timeout=1800)
        seconds = time.monotonic() - started
    metrics = node.metrics()
    served = [(after - was) / MiB for after, was in zip(local_bytes(cluster), before)]
    return {
        "seconds": seconds,
        "verified": out.split()[0] == digest.removeprefix("sha256:"),
        "rss": rss.peak,
        "served": served[1:],
        "pieces": metrics.total("spegel_mirror_pieces_fetched_total") - pieces_before,
        "stolen": metrics.total("spegel_mirror_pieces_stolen_total", event="started"),
        "refetched": metrics.total("spegel_mirror_piece_refetches_total"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--holders", type=int, default=4)
    parser.add_argument("--rate", default="200mbit", help="every node's uplink (tc tbf rate)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slow-rate", default=None, help="holder 1's uplink instead (tc tbf rate)")
    parser.add_argument("--modes", default="parallel,one", help="parallel, one (holder), or both")
    args = parser.parse_args()
    wanted = ["parallel" if mode == "parallel" else "one holder" for mode in args.modes.split(",")]
    scratch = tempfile.mkdtemp(prefix="spegel-holders-", dir="/var/tmp")
    cluster = NetCluster(args.holders + 1, upstream_rate=None, node_rate=args.rate)
    try:
        image = build_image(seed="holders", layer_sizes=(args.size_mb * MiB,), compress=False, directory=scratch)
        digest = image.layers[0].digest
        cluster.start()
        base_args = list(cluster.nodes[0].extra_args)
        ref = cluster.push_image(REPO, "v1", image)
        started = time.monotonic()
        seeders = [threading.Thread(target=cluster.pull, args=(i, ref, 1800)) for i in range(1, args.holders + 1)]
        for seeder in seeders:
            seeder.start()
        for seeder in seeders:
            seeder.join()
        for i in range(1, args.holders + 1):
            if digest not in cluster.containerds[i].content_digests():
                raise SystemExit(f"holder {i} did not get the layer")
        cluster.wait_findable([0], REPO, image, tag="v1", timeout=60)
        if args.slow_rate:
            cluster.hosts[1].limit_rate(args.slow_rate)
        print(
            f"{args.size_mb} MiB blob on {args.holders} holders (seeded in {time.monotonic() - started:.0f}s), "
            f"every node's uplink {args.rate}"
            + (f" but holder 1's, {args.slow_rate}" if args.slow_rate else "")
            + "; node 0 fetches it through its spegel",
            flush=True,
        )
        print("run  mode        seconds  MiB/s  verified  node-0 RSS max MiB  MiB sent by each holder        pieces", flush=True)
        results: dict[str, list[dict]] = {mode: [] for mode in wanted}
        for run in range(args.runs):
            modes = wanted if run % 2 == 0 else wanted[::-1]
            for mode in modes:
                r = pull_blob(cluster, digest, mode == "parallel", base_args)
                results[mode].append(r)
                print(
                    f"{run:3d}  {mode:10s}  {r['seconds']:7.1f}  {args.size_mb / r['seconds']:5.1f}  {str(r['verified']):8s}"
                    f"  {r['rss']:18.0f}  {' / '.join(f'{s:6.0f}' for s in r['served']):28s}  {r['pieces']:.0f}"
                    f" (stolen {r['stolen']:.0f}, refetched {r['refetched']:.0f})",
                    flush=True,
                )
        print("median:")
        for mode, rows in results.items():
            seconds = statistics.median(r["seconds"] for r in rows)
            print(
                f"     {mode:10s}  {seconds:7.1f}  {args.size_mb / seconds:5.1f}  "
                f"{'all' if all(r['verified'] for r in rows) else 'NOT ALL':8s}  "
                f"{statistics.median(r['rss'] for r in rows):18.0f}",
                flush=True,
            )
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
