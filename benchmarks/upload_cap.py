# -*- test-case-name: tests.e2e.test_upload_cap -*-
"""
Benchmark: how closely a node's uploads to peers follow C{--max-upload-rate}, on loopback.

Run with C{.venv/bin/python benchmarks/upload_cap.py [--caps 16MiB,64MiB,128MiB] [--runs 5]}.
It builds an image with one layer of random bytes, fetches it into one containerd, and starts
one spegel node per cap on that containerd (plus one without a cap, the machine's ceiling for
comparison), each serving the layer from the content store by sendfile.  A "peer" (a raw socket
sending C{X-Spegel-Mirrored: true}) then asks each node for C{cap x --seconds} bytes of the
layer (a C{Range}), once alone and once as three clients at once, each asking a third: the
three share the node's one bucket.  Runs are interleaved over the nodes (the machine is shared
and noisy) and medians reported.

For each cap it prints the median rate achieved alone and by the three together, each as a
ratio to the cap, next to the bound: the fastest the bucket allows for that many bytes (its
burst, an eighth of a second of the rate, goes at once, so a body of C{cap x seconds} bytes may
go up to C{1 / (1 - 1/(8 x seconds))} times the cap).  A ratio above the bound is a failure of
the cap; far below it, pacing that wastes the allowance.  It also prints the share of the bytes
the node sent by sendfile (from C{/proc/<pid>/io}): the cap does not cost the zero-copy path.
It exits non-zero with a one-line reason when something fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from attrs import frozen

from serve_blob import (
    BenchmarkFailed,
    IOCounters,
    _fetch_into_containerd,
    _read_response_head,
    _say,
    cpu_seconds,
    guarded,
)
from spegel import flags
from spegel.interfaces import MIRRORED_HEADER
from spegel.pacing import BURST_FLOOR, BURST_SECONDS, MIN_RATE
from spegel_testing.cluster import Cluster
from spegel_testing.images import build_image
from spegel_testing.node import SpegelNode

MiB = 1 << 20
REPO = "bench/capped"
CLIENTS_AT_ONCE = 3
RECV_BUFFER_SIZE = 4 * MiB


@frozen
class CappedNode:
    """
    A node under test: its cap (0: none, the ceiling) as given and in bytes per second.
    """

    flag: str
    rate: float
    node: SpegelNode

    @property
    def label(self) -> str:
        return self.flag if self.rate else "no cap"

    @property
    def pid(self) -> int:
        pid = self.node.pid
        assert pid is not None, f"{self.label}: the node is not running"
        return pid

    def length(self, seconds: float, size: int) -> int:
        """Bytes asked for in one run: C{seconds} of the cap, within the layer."""
        return size if not self.rate else min(size, int(self.rate * seconds))

    def bound(self, length: int) -> float:
        """The most a body of C{length} bytes may achieve under this cap, as a ratio to it."""
        burst = max(self.rate * BURST_SECONDS, BURST_FLOOR)
        return length / (length - burst) if length > burst else float("inf")


def fetch_range(port: int, path: str, first: int, length: int, timeout: float) -> float:
    """
    Ask for C{length} bytes from C{first} as a peer does; read them into one reused buffer.

    @return: seconds from before connecting to the last byte.
    """
    buffer = bytearray(RECV_BUFFER_SIZE)
    view = memoryview(buffer)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{MIRRORED_HEADER}: true\r\n"
            f"Range: bytes={first}-{first + length - 1}\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        status, announced, received = _read_response_head(sock, buffer)
        if status not in (200, 206) or announced != length:
            raise BenchmarkFailed(f"port {port} answered {status} with {announced} bytes, not 206 with {length}")
        while received < length:
            n = sock.recv_into(view, min(RECV_BUFFER_SIZE, length - received))
            if n == 0:
                raise BenchmarkFailed(f"port {port} closed the connection after {received} of {length} bytes")
            received += n
    return time.perf_counter() - started


def together(port: int, path: str, length: int, timeout: float) -> float:
    """
    L{CLIENTS_AT_ONCE} peers at once, each asking a different part of C{length} bytes.

    @return: seconds from before the first connects to the last byte of all.
    """
    part = length // CLIENTS_AT_ONCE
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS_AT_ONCE) as pool:
        list(pool.map(lambda i: fetch_range(port, path, i * part, part, timeout), range(CLIENTS_AT_ONCE)))
    return time.perf_counter() - started


def run_benchmark(caps: Sequence[str], size_mib: int, seconds: float, runs: int, timeout: float) -> None:
    started = time.monotonic()
    parse = flags.byte_rate(MIN_RATE)
    with tempfile.TemporaryDirectory(prefix="spegel-bench-") as scratch:
        _say(f"building an image with one {size_mib} MiB layer of random bytes", started)
        image = build_image(seed="upload-cap", layer_sizes=[size_mib * MiB], compress=False, directory=scratch)
        (layer,) = image.layers
        with Cluster(1, start_nodes=False, log_level="info") as cluster:
            registry, daemon = cluster.registry, cluster.containerds[0]
            ref = registry.push_image(REPO, "v1", image)
            shutil.rmtree(scratch, ignore_errors=True)
            _say(f"fetching {ref} into containerd", started)
            _fetch_into_containerd(daemon, ref)
            nodes = []
            for index, flag in enumerate(["0", *caps]):
                node = cluster.nodes[0] if index == 0 else SpegelNode(
                    containerd=daemon,
                    mirrored_registries=[registry.url],
                    name=f"spegel-cap-{index}",
                    base_dir=os.path.join(cluster.base_dir, f"cap{index}"),
                    log_level="info",
                )
                if index:
                    # Killed with the cluster's nodes when it stops.
                    cluster.nodes.append(node)
                node.extra_args.extend(["--max-upload-rate", flag])
                nodes.append(CappedNode(flag, parse(flag), node))
            for capped in nodes:
                capped.node.start()
            ns = urllib.parse.quote(registry.host, safe="")
            path = f"/v2/{REPO}/blobs/{layer.digest}?ns={ns}"
            _measure(nodes, path, layer.size, seconds, runs, timeout, started)


def _measure(
    nodes: Sequence[CappedNode], path: str, size: int, seconds: float, runs: int, timeout: float, started: float
) -> None:
    os.sync()
    for capped in nodes:
        # Warm-up (page cache, connections' first costs), untimed.
        fetch_range(capped.node.registry_port, path, 0, min(size, 8 * MiB), timeout)
    alone: dict[str, list[float]] = {capped.flag: [] for capped in nodes}
    shared: dict[str, list[float]] = {capped.flag: [] for capped in nodes}
    io_before = {capped.flag: IOCounters.of(capped.pid) for capped in nodes}
    # The node's CPU time and the wall time while its uploads ran (not while the others' did).
    busy = {capped.flag: [0.0, 0.0] for capped in nodes}
    # Each node's bucket refills in 1/8 s; a pause longer than that between runs gives every
    # run the same full burst to start with, as the bound assumes.
    settle = 0.25
    for run in range(runs):
        for capped in nodes:
            length = capped.length(seconds, size)
            port, pid = capped.node.registry_port, capped.pid
            time.sleep(settle)
            cpu = cpu_seconds(pid)
            took = fetch_range(port, path, 0, length, timeout)
            time.sleep(settle)
            part_total = (length // CLIENTS_AT_ONCE) * CLIENTS_AT_ONCE
            took_together = together(port, path, length, timeout)
            alone[capped.flag].append(length / took)
            shared[capped.flag].append(part_total / took_together)
            busy[capped.flag][0] += cpu_seconds(pid) - cpu
            busy[capped.flag][1] += took + took_together
        _say(f"run {run + 1} of {runs} done", started)
    print()
    print(f"{'cap':>10} {'asked':>9} {'alone':>12} {'ratio':>6} {f'{CLIENTS_AT_ONCE} at once':>12} {'ratio':>6} "
          f"{'bound':>6} {'sendfile':>9} {'CPU':>6}")
    for capped in nodes:
        length = capped.length(seconds, size)
        io = IOCounters.of(capped.pid) - io_before[capped.flag]
        cpu, wall = busy[capped.flag]
        sent = runs * 2 * length
        one, three = statistics.median(alone[capped.flag]), statistics.median(shared[capped.flag])
        # Used within this iteration only.
        ratio = (lambda rate: f"{rate / capped.rate:6.2f}") if capped.rate else (lambda rate: f"{'-':>6}")  # noqa: B023
        bound = f"{capped.bound(length):6.2f}" if capped.rate else f"{'-':>6}"
        print(
            f"{capped.label:>10} {length / MiB:6.0f}MiB {one / MiB:8.1f}MiB/s {ratio(one)} "
            f"{three / MiB:8.1f}MiB/s {ratio(three)} {bound} {100 * min(io.wchar, sent) / sent:8.1f}% "
            f"{100 * cpu / wall:5.1f}%"
        )
        if capped.rate and max(one, three) > capped.rate * capped.bound(length) * 1.02:
            raise BenchmarkFailed(f"{capped.label}: uploads went faster than the cap allows")
    print()
    print(f"runs: {runs} interleaved; alone: one peer asks {seconds:g} s of the cap; {CLIENTS_AT_ONCE} at once: "
          "three peers ask a third each; bound: the most the burst allows for that length;\n"
          "sendfile: the share of the bytes sent by sendfile; CPU: the node's, while its uploads ran "
          "(% of one core)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/upload_cap.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    parser.add_argument("--caps", default="16MiB,64MiB,128MiB", help="comma-separated caps (default 16MiB,64MiB,128MiB)")
    parser.add_argument("--size-mib", type=int, default=384, help="layer payload in MiB (default 384)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of the cap asked per run (default 3)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per node (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one fetch (default 120)")
    args = parser.parse_args(argv)
    caps = flags.parse_list(args.caps)
    try:
        if any(flags.byte_rate(MIN_RATE)(cap) == 0 for cap in caps):
            parser.error("every cap must be above 0 (the node without a cap is always measured)")
    except ValueError as e:
        parser.error(f"--caps: {e}")
    if args.size_mib < 1 or args.runs < 1 or args.seconds <= 0 or args.timeout <= 0:
        parser.error("--size-mib and --runs must be at least 1, --seconds and --timeout positive")
    return guarded(lambda: run_benchmark(caps, args.size_mib, args.seconds, args.runs, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
