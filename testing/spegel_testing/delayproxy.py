# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A TCP proxy that adds latency: what puts the rig's upstream registry "across the internet".

    python -m spegel_testing.delayproxy --listen 198.18.1.2:5000 --to 198.18.1.2:5001 \\
        --delay 0.015 --stats stats.json

Every chunk read from either side is forwarded C{--delay} seconds later, in order, so a
round trip costs twice the delay, as a link with that one-way latency does.  (The kernel here has
no C{netem}; bandwidth is limited by C{tc tbf} on the registry host's link, see
L{spegel_testing.netns.Host.limit_rate}.)  Backpressure is kept: a side that stops reading
stops the other.  C{--stats} is rewritten every half second with the bytes sent to clients and
the connections accepted, in total and per client address, so a benchmark can tell how much
came from upstream and to which node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from typing import Any


def serve(listen: tuple[str, int], target: tuple[str, int], delay: float, stats_path: str | None) -> None:
    from twisted.internet import protocol, reactor, task, tcp

    totals: dict[str, Any] = {"bytes_to_clients": 0, "bytes_from_clients": 0, "connections": 0}
    # Per client address: which node took how much from upstream (where a slow pull's time went).
    by_client: dict[str, int] = {}
    totals["bytes_to_client_hosts"] = by_client

    class Side(protocol.Protocol):
        """
        One connection; what it reads goes to C{peer} C{delay} seconds later, in order (a
        FIFO with one timer: equal-time delayed calls would not keep their order).
        """

        # A TCP connection, set by makeConnection before any other call.
        transport: tcp.Connection
        peer: "Side | None" = None
        direction = ""
        client_host = ""

        def connectionMade(self) -> None:
            self.queue: deque[tuple[float, bytes | None]] = deque()
            self.timer: Any = None
            self.unsent: list[bytes | None] = []

        def dataReceived(self, data: bytes) -> None:
            totals[self.direction] += len(data)
            if self.direction == "bytes_to_clients":
                by_client[self.client_host] = by_client.get(self.client_host, 0) + len(data)
            self._later(data)

        def connectionLost(self, reason: Any = None) -> None:
            self._later(None)  # the close travels behind the data

        def _later(self, item: bytes | None) -> None:
            self.queue.append((reactor.seconds() + delay, item))
            if self.timer is None:
                self.timer = reactor.callLater(delay, self._due)

        def _due(self) -> None:
            self.timer = None
            now = reactor.seconds()
            while self.queue and self.queue[0][0] <= now:
                self._deliver(self.queue.popleft()[1])
            if self.queue:
                self.timer = reactor.callLater(max(0.0, self.queue[0][0] - now), self._due)

        def _deliver(self, item: bytes | None) -> None:
            peer = self.peer
            if peer is None:
                self.unsent.append(item)
            elif item is None:
                peer.transport.loseConnection()
            else:
                peer.transport.write(item)

    class Client(Side):
        direction = "bytes_from_clients"

        def connectionMade(self) -> None:
            super().connectionMade()
            totals["connections"] += 1
            self.transport.pauseProducing()

            def built(upstream: "Upstream") -> None:
                upstream.peer, self.peer = self, upstream
                upstream.client_host = self.transport.getPeer().host
                for item in self.unsent:
                    self._deliver(item)
                self.unsent = []
                # Backpressure both ways: whoever is slow to read slows the other.
                upstream.transport.registerProducer(self.transport, True)
                self.transport.registerProducer(upstream.transport, True)
                self.transport.resumeProducing()

            connector = protocol.ClientCreator(reactor, Upstream)
            connector.connectTCP(*target).addCallbacks(built, lambda f: self.transport.loseConnection())

    class Upstream(Side):
        direction = "bytes_to_clients"

    def write_stats() -> None:
        if stats_path:
            partial = stats_path + ".partial"
            with open(partial, "w") as f:
                json.dump(totals, f)
            os.replace(partial, stats_path)

    factory = protocol.ServerFactory()
    factory.protocol = Client
    reactor.listenTCP(listen[1], factory, interface=listen[0], backlog=1024)
    task.LoopingCall(write_stats).start(0.5)
    print(f"delaying {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} by {delay * 1000:.0f} ms each way", flush=True)
    reactor.run()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel_testing.delayproxy")
    parser.add_argument("--listen", required=True, type=_address)
    parser.add_argument("--to", required=True, type=_address)
    parser.add_argument("--delay", type=float, default=0.015, help="one-way delay, seconds")
    parser.add_argument("--stats", default=None)
    args = parser.parse_args(argv)
    serve(args.listen, args.to, args.delay, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
