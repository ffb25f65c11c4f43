# -*- test-case-name: tests.test_rig -*-
"""
Benchmark: how long 500 simultaneous connections to the registry's port take to be accepted,
with Twisted's default listen backlog (50) against the node's (--registry-listen-backlog, 1024).

Run with C{.venv/bin/python benchmarks/connect_burst.py [--connections 500] [--runs 3]}.  Each run
starts a server process listening as the node does (C{make_site}, the endpoint string the node
builds, one backlog or the other), opens every connection at once from this process with
non-blocking sockets, and times each until it is established and its C{GET /v2/} answered.  A
connection that finds the accept queue full waits for a SYN retransmit (1 s, then 3 s...), which
is what the p99 shows.  Runs alternate between the two backlogs; medians of the runs' p50, p99
and max are printed per backlog.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import subprocess
import sys
import time
from typing import cast

from spegel_testing.ports import free_port

SERVER = """
import sys
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from spegel.flags import ListenAddress
from spegel.httpserver import make_site

class V2(Resource):
    isLeaf = True
    def render_GET(self, request):
        return b""

port, backlog = int(sys.argv[1]), int(sys.argv[2])
endpoint = serverFromString(reactor, ListenAddress("127.0.0.1", port).endpoint_description(backlog=backlog))
endpoint.listen(make_site(V2(), connections_per_client=0)).addCallback(lambda _: print("listening", flush=True))
reactor.run()
"""


def burst(port: int, connections: int, timeout: float = 30.0) -> list[float]:
    """
    Open C{connections} connections at once and send each a request; the seconds each took to
    get its response's first bytes.
    """
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    pending = {}
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)
        pending[sock] = "connecting"
    times = []
    deadline = started + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            sock = cast(socket.socket, key.fileobj)  # as registered
            if pending[sock] == "connecting":
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    continue
                sock.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                pending[sock] = "waiting"
                selector.modify(sock, selectors.EVENT_READ)
            else:
                if sock.recv(4096):
                    times.append(time.monotonic() - started)
                selector.unregister(sock)
                sock.close()
                del pending[sock]
    for sock in pending:
        sock.close()
    if pending:
        times += [float("inf")] * len(pending)
    return sorted(times)


def one_run(backlog: int, connections: int) -> tuple[float, float, float]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(backlog)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "listening":
            raise SystemExit("the server did not start")
        times = burst(port, connections)
    finally:
        server.kill()
        server.wait()
    return times[len(times) // 2], times[int(len(times) * 0.99) - 1], times[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/connect_burst.py", description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    somaxconn = open("/proc/sys/net/core/somaxconn").read().strip()
    print(f"{args.connections} connections at once, {args.runs} runs per backlog, interleaved (net.core.somaxconn {somaxconn})")
    results: dict[int, list[tuple[float, float, float]]] = {50: [], 1024: []}
    for _ in range(args.runs):
        for backlog in results:
            p50, p99, worst = one_run(backlog, args.connections)
            results[backlog].append((p50, p99, worst))
            print(f"  backlog {backlog:5}: p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  max {worst * 1000:7.1f} ms", flush=True)
    for backlog, runs in results.items():
        print(
            f"backlog {backlog:5} (median of runs): p50 {statistics.median(r[0] for r in runs) * 1000:.1f} ms, "
            f"p99 {statistics.median(r[1] for r in runs) * 1000:.1f} ms, max {statistics.median(r[2] for r in runs) * 1000:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
