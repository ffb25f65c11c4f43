# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A stand-in for a spegel node, to test the rig's process handling without the real node.

Run as C{python -m spegel_testing.fakenode spegel --registry-addr 127.0.0.1:P ... --metrics-addr
127.0.0.1:Q ...}: it accepts the node's command line, answers C{/livez} and C{/readyz} with 200
on the registry address, 404 to everything else there, and serves on the metrics address a
C{spegel_fake_requests_total} counter of the registry requests it answered.  With
C{--fail-start} it exits at once with status 3, as a node with a bad configuration would.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_requests = 0
_lock = threading.Lock()


def _address(args: list[str], flag: str) -> tuple[str, int]:
    host, _, port = args[args.index(flag) + 1].rpartition(":")
    return host or "127.0.0.1", int(port)


class _Registry(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        global _requests
        with _lock:
            _requests += 1
        status = 200 if self.path in ("/livez", "/readyz") else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"fakenode registry: {format % args}\n")
        sys.stdout.flush()


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with _lock:
            count = _requests
        body = (
            "# HELP spegel_fake_requests_total Registry requests answered.\n"
            "# TYPE spegel_fake_requests_total counter\n"
            f'spegel_fake_requests_total{{port="registry"}} {count}.0\n'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    if "--fail-start" in argv:
        print("fakenode: refusing to start (--fail-start)", flush=True)
        return 3
    registry = ThreadingHTTPServer(_address(argv, "--registry-addr"), _Registry)
    metrics = ThreadingHTTPServer(_address(argv, "--metrics-addr"), _Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    print(f"fakenode: serving on {registry.server_address}", flush=True)
    registry.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
