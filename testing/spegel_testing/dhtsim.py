# -*- test-case-name: tests.unit.test_dht_simulation -*-
"""
An in-memory UDP network on a simulated clock, for running hundreds of DHT nodes in one
process, deterministically and much faster than real time.

L{SimulatedClock} is an C{IReactorTime} like C{twisted.internet.task.Clock}, but keeps its
calls in a heap and runs each at its own time (C{Clock} re-sorts a list on every call and
runs everything at the end time of an C{advance}), which matters with tens of thousands of
pending timeouts.  L{MemoryNetwork} hands out per-host reactors whose C{listenUDP} returns
ports that deliver datagrams through the clock, with configurable latency and loss.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any, Callable

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

Address = tuple[str, int]


@implementer(IReactorTime)
class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._sequence = itertools.count()

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall:
        call = DelayedCall(
            self.now + delay, callable, args, kw, lambda c: None, self._push, self.seconds
        )
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._sequence), call))

    def getDelayedCalls(self) -> list[DelayedCall]:
        return [c for t, _, c in self._heap if self._live(t, c)]

    @staticmethod
    def _live(time: float, call: DelayedCall) -> bool:
        # Reset calls leave their old heap entry behind; only the entry at the current time counts.
        return not call.cancelled and not call.called and call.getTime() == time

    def advance(self, amount: float) -> None:
        """
        Run every call due within C{amount} seconds, each at its own time.
        """
        self.run_until(self.now + amount)

    def run_until(self, end: float, stop: Callable[[], bool] = lambda: False) -> None:
        while self._heap and self._heap[0][0] <= end:
            time, _, call = heapq.heappop(self._heap)
            if not self._live(time, call):
                continue
            self.now = max(self.now, time)
            call.called = 1
            call.func(*call.args, **call.kw)
            if stop():
                return
        self.now = max(self.now, end)


class MemoryPort:
    """
    A listening UDP port of the memory network: the protocol's transport.
    """

    def __init__(self, network: MemoryNetwork, address: Address, protocol: DatagramProtocol) -> None:
        self.network = network
        self.address = address
        self.protocol = protocol

    def write(self, data: bytes, addr: Address) -> None:
        self.network.send(self.address, (addr[0], addr[1]), data)

    def getHost(self) -> Address:
        return self.address

    def stopListening(self) -> None:
        if self.network.ports.get(self.address) is self:
            del self.network.ports[self.address]
            self.protocol.doStop()


@implementer(IReactorUDP, IReactorTime)
class HostReactor:
    """
    The reactor of one simulated host: the shared clock plus C{listenUDP} on its IP.
    """

    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self.network = network
        self.host = host

    # A MemoryPort is the part of a UDP port and transport that a DHT node uses (its address is
    # a plain (host, port) tuple), not the whole of IListeningPort and IUDPTransport.
    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192) -> MemoryPort:  # type: ignore[override]  # a partial port
        if port == 0:
            port = self.network.free_port(self.host)
        address = (self.host, port)
        if address in self.network.ports:
            raise OSError(f"address in use: {address}")
        listening = self.network.ports[address] = MemoryPort(self.network, address, protocol)
        protocol.makeConnection(listening)  # type: ignore[arg-type]  # a partial transport, as above
        return listening

    def seconds(self) -> float:
        return self.network.clock.seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall:
        return self.network.clock.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self) -> list[DelayedCall]:
        return self.network.clock.getDelayedCalls()


class MemoryNetwork:
    """
    @ivar latency: one-way delay of a datagram, seconds (a callable draws one per datagram).
    @ivar loss: probability that a datagram is lost.
    @ivar sent: datagrams written; C{delivered}, C{lost} and C{unreachable} say what became
        of them.
    """

    def __init__(
        self,
        clock: SimulatedClock,
        *,
        latency: float | Callable[[], float] = 0.001,
        loss: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.loss = loss
        self.rng = rng or random.Random(0)
        self.ports: dict[Address, MemoryPort] = {}
        self.sent = 0
        self.delivered = 0
        self.lost = 0
        self.unreachable = 0
        self._next_port = itertools.count(20000)

    def reactor(self, host: str) -> HostReactor:
        return HostReactor(self, host)

    def free_port(self, host: str) -> int:
        return next(self._next_port)

    def send(self, source: Address, destination: Address, data: bytes) -> None:
        self.sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        delay = self.latency() if callable(self.latency) else self.latency
        self.clock.callLater(delay, self._deliver, source, destination, data)

    def _deliver(self, source: Address, destination: Address, data: bytes) -> None:
        port = self.ports.get(destination)
        if port is None:
            self.unreachable += 1
            return
        self.delivered += 1
        port.protocol.datagramReceived(data, source)


class SimulatedCluster:
    """
    C{n} DHT services on a L{MemoryNetwork}, bootstrapping statically from the first few.

    Node C{i} has IP C{10.<i // 250>.<i % 250>.1} and listens on the router port of the
    config; ids come from C{rng}, so a seeded run is reproducible.
    """

    def __init__(
        self,
        network: MemoryNetwork,
        config: Any,
        *,
        rng: random.Random,
        seeds: int = 3,
    ) -> None:
        self.network = network
        self.config = config
        self.rng = rng
        self.seeds = seeds
        self.services: list[Any] = []

    @staticmethod
    def host(i: int) -> str:
        return f"10.{i // 250}.{i % 250 + 1}.1"

    def add_node(self) -> Any:
        from attrs import evolve

        from spegel.dht.metrics import DHTMetrics
        from spegel.dht.node import KademliaNode
        from spegel.dht.service import DHTService

        i = len(self.services)
        host = self.host(i)
        peers = tuple((self.host(j), self.config.listen_port) for j in range(min(self.seeds, i + 1)))
        config = evolve(self.config, listen_host=host, bootstrap_kind="static", static_peers=peers)
        reactor = self.network.reactor(host)
        # Each simulated node's own figures, as a real node's process would have.
        metrics = DHTMetrics()
        node = KademliaNode(
            self.rng.randbytes(32),
            reactor,
            config,
            metrics=metrics,
            randbytes=self.rng.randbytes,
            rng=random.Random(self.rng.random()),
        )
        service = DHTService(reactor, config, metrics=metrics, node=node)
        if service.bootstrapping is not None:
            service.bootstrapping._random = self.rng.random
        self.services.append(service)
        service.startService()
        return service

    def start(self, n: int, spacing: float = 0.01) -> None:
        for _ in range(n):
            self.add_node()
            self.network.clock.advance(spacing)

    def alive(self) -> list[Any]:
        return [s for s in self.services if s.running]

    def crash(self, service: Any) -> None:
        """
        Stop a node abruptly: its port vanishes, it says goodbye to nobody.
        """
        service.stopService()
