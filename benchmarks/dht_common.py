"""
Shared set-up of the DHT benchmarks: N real nodes on loopback UDP, in this process's reactor
(L{start_nodes}) or spread over several processes (L{Cluster}).

Why several processes: in one process every node's work (decoding, answering, routing
upkeep) runs on one thread, so a lookup's latency is the sum of the CPU time of the asker and
of every node it asks, where a real cluster spends them on different machines at once.
L{Cluster} keeps some nodes here (the askers) and runs the rest in worker processes, each
driven over its stdin/stdout by JSON lines; this file is the worker's program:

    python benchmarks/dht_common.py --worker COUNT HOST:PORT [HOST:PORT...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from spegel.dht.config import RouterConfig
from spegel.dht.ids import random_id_in_bucket
from spegel.dht.metrics import DHTMetrics
from spegel.dht.service import DHTService

BASE = RouterConfig(listen_host="127.0.0.1", listen_port=0, registry_port=30020, announce_delay=0.01)


async def start_nodes(
    reactor: Any,
    n: int,
    config: RouterConfig = BASE,
    seeds: tuple[tuple[str, int], ...] = (),
) -> list[DHTService]:
    """
    Start C{n} nodes; without C{seeds}, all but the first bootstrap from the first two.
    Returns once all joined and refreshed all their buckets (see L{refresh}).
    """
    services: list[DHTService] = []
    first_two_seed = not seeds
    for _ in range(n):
        if seeds:
            service = DHTService(reactor, evolve(config, bootstrap_kind="static", static_peers=seeds), metrics=DHTMetrics())
        else:
            service = DHTService(reactor, config, metrics=DHTMetrics())
        service.startService()
        services.append(service)
        if first_two_seed and len(services) <= 2:
            seeds = tuple(s.address for s in services)
    await gatherResults([s.bootstrapping.when_joined() for s in services if s.bootstrapping])
    await refresh(services)
    return services


async def refresh(services: list[DHTService], at_once: int = 4) -> None:
    """
    Refresh every bucket of every node, C{at_once} nodes at a time: what the periodic bucket
    refresh does in a running cluster.  All nodes join at the same moment here, and a node
    joining does not learn of nodes joining after it (unless they ask it something); without
    this, some runs had whole subtrees of the id space unknown to the nodes next to them, and
    one provider lookup in six missed.  A few nodes at a time, so the set-up does not flood
    this process and time out requests (which would evict live contacts).
    """
    limiter = DeferredSemaphore(at_once)
    await gatherResults([limiter.run(_refresh_all, s) for s in services])


def _refresh_all(service: DHTService) -> Deferred[Any]:
    # What node.refresh(0) does, spelled out so the benchmark also runs on older versions of
    # the node (to compare before and after a change with the same set-up).
    node = service.node
    return gatherResults(
        [
            node.find_node(random_id_in_bucket(node.node_id, index, node.randbytes))
            for index in node.routing.stale_buckets(0)
        ]
    )


async def stop_nodes(services: list[DHTService]) -> None:
    for service in services:
        await service.stopService()


def busy(services: list[DHTService]) -> bool:
    """
    Whether any node is announcing, about to announce, or waiting for a reply.
    """
    return any(announcing(s) or s.node.protocol.pending for s in services)


def announcing(service: DHTService) -> bool:
    return bool(service._unannounced or service._announce_call or service._announcing)


async def provide_and_time(reactor: Any, service: DHTService, key: str) -> float:
    """
    Provide C{key} and return the seconds until its records were acknowledged by the key's
    k closest nodes (the announcement is over).
    """
    started = now()
    service.provide([key])
    while announcing(service):
        await deferLater(reactor, 0.001, lambda: None)
    return now() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def now() -> float:
    # Benchmarks measure wall time; library code never does.
    return time.perf_counter()


# -- several processes ----------------------------------------------------------------------


class WorkerError(Exception):
    """
    A worker process answered a command with an error, or went away.
    """


class _Worker(ProcessProtocol):
    """
    The parent's side of one worker process: numbered JSON commands out, replies in.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        self._calls: dict[int, Deferred[Any]] = {}
        self._next = 0
        self.running = True

    def call(self, op: str, **args: Any) -> Deferred[Any]:
        if not self.running:
            raise WorkerError("the worker has exited")
        self._next += 1
        d: Deferred[Any] = Deferred()
        self._calls[self._next] = d
        assert self.transport is not None
        self.transport.write(json.dumps({"id": self._next, "op": op, **args}).encode() + b"\n")
        return d

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            reply = json.loads(line)
            if "ready" in reply:
                self.ready.callback(None)
                continue
            d = self._calls.pop(reply["id"])
            if "error" in reply:
                d.errback(WorkerError(reply["error"]))
            else:
                d.callback(reply["result"])

    def errReceived(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)

    def processEnded(self, reason: Any) -> None:
        self.running = False
        calls, self._calls = self._calls, {}
        for d in calls.values():
            d.errback(WorkerError("the worker exited"))
        if not self.ready.called:
            self.ready.errback(WorkerError("the worker exited before it was ready"))
        self.ended.callback(None)


class NodeRef:
    """
    One node of a L{Cluster}, here (C{service}) or in a worker (C{worker}, C{index}).
    """

    def __init__(self, service: DHTService | None = None, worker: _Worker | None = None, index: int = 0) -> None:
        self.service = service
        self.worker = worker
        self.index = index

    async def provide(self, key: str) -> None:
        if self.service is not None:
            self.service.provide([key])
        else:
            assert self.worker is not None
            await self.worker.call("provide", node=self.index, key=key)

    async def provide_and_time(self, reactor: Any, key: str) -> float:
        if self.service is not None:
            return await provide_and_time(reactor, self.service, key)
        assert self.worker is not None
        return float(await self.worker.call("provide_and_time", node=self.index, key=key))

    async def count_providers(self, key: str, limit: int = 1) -> int:
        if self.service is not None:
            return len(await self.service.find_providers(key, limit=limit))
        assert self.worker is not None
        return int(await self.worker.call("count_providers", node=self.index, key=key, limit=limit))


class Cluster:
    """
    C{n} nodes: C{local} in this reactor, the others spread evenly over C{processes - 1}
    worker processes.  With C{processes=1} it is L{start_nodes}.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.local: list[DHTService] = []
        self.workers: list[_Worker] = []
        self.nodes: list[NodeRef] = []

    async def start(self, n: int, processes: int = 1, config: RouterConfig = BASE) -> None:
        shares = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        self.local = await start_nodes(self.reactor, shares[0], config)
        self.nodes = [NodeRef(service=s) for s in self.local]
        seeds = [f"{host}:{port}" for host, port in (s.address for s in self.local[:2])]
        for count in shares[1:]:
            worker = _Worker()
            self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, os.path.abspath(__file__), "--worker", str(count), *seeds],
                env=os.environ,
            )
            self.workers.append(worker)
            self.nodes.extend(NodeRef(worker=worker, index=i) for i in range(count))
        await gatherResults([w.ready for w in self.workers])
        # Everyone joined while others were still arriving: one more self-lookup each, as
        # start_nodes does, so every table holds the whole cluster's neighbourhood.
        await gatherResults(
            [Deferred.fromCoroutine(refresh(self.local))] + [w.call("refresh") for w in self.workers]
        )

    async def busy(self) -> bool:
        if busy(self.local):
            return True
        answers = await gatherResults([w.call("busy") for w in self.workers])
        return any(answers)

    async def settle(self, quiet: float = 0.05) -> float:
        """
        Wait until no node anywhere has been busy (see L{busy}) for C{quiet} seconds, so
        background work (announcements of the set-up keys, their lookups) does not run
        during, and get counted in, the measurements that follow.  Returns the seconds waited.
        """
        started = now()
        idle_since: float | None = None
        while True:
            if await self.busy():
                idle_since = None
            elif idle_since is None:
                idle_since = now()
            elif now() - idle_since >= quiet:
                return now() - started
            await deferLater(self.reactor, 0.005, lambda: None)

    async def stop(self) -> None:
        for worker in self.workers:
            if worker.running:
                worker.call("stop").addErrback(lambda f: None)
        for worker in self.workers:
            timer = self.reactor.callLater(10, _kill, worker)
            await worker.ended
            if timer.active():
                timer.cancel()
        await stop_nodes(self.local)


def _kill(worker: _Worker) -> None:
    if worker.running:
        assert worker.transport is not None
        worker.transport.signalProcess("KILL")


class _Commands(LineReceiver):
    """
    The worker's side: runs the parent's commands on its nodes.
    """

    delimiter = b"\n"

    def __init__(self, reactor: Any, services: list[DHTService], done: Deferred[None]) -> None:
        self.reactor = reactor
        self.services = services
        self.done = done

    def lineReceived(self, line: bytes) -> None:
        command = json.loads(line)
        d = Deferred.fromCoroutine(self.run(command))

        def reply(result: Any) -> None:
            self.sendLine(json.dumps({"id": command["id"], "result": result}).encode())

        def failed(failure: Any) -> None:
            self.sendLine(json.dumps({"id": command["id"], "error": str(failure.value)}).encode())

        d.addCallbacks(reply, failed)

    async def run(self, command: dict[str, Any]) -> Any:
        op = command["op"]
        if op == "refresh":
            await refresh(self.services)
            return None
        if op == "busy":
            return busy(self.services)
        if op == "provide":
            self.services[command["node"]].provide([command["key"]])
            return None
        if op == "provide_and_time":
            return await provide_and_time(self.reactor, self.services[command["node"]], command["key"])
        if op == "count_providers":
            service = self.services[command["node"]]
            return len(await service.find_providers(command["key"], limit=command["limit"]))
        if op == "stop":
            self.reactor.callLater(0, self.done.callback, None)
            return None
        raise ValueError(f"unknown command {op!r}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The parent went away: so do we.
        if not self.done.called:
            self.done.callback(None)


async def _worker(reactor: Any, count: int, seeds: list[str]) -> None:
    from twisted.internet.stdio import StandardIO

    peers = tuple((host, int(port)) for host, port in (s.rsplit(":", 1) for s in seeds))
    services = await start_nodes(reactor, count, BASE, seeds=peers)
    done: Deferred[None] = Deferred()
    commands = _Commands(reactor, services, done)
    StandardIO(commands, reactor=reactor)
    commands.sendLine(json.dumps({"ready": True}).encode())
    await done
    await stop_nodes(services)


if __name__ == "__main__":
    from twisted.internet.task import react

    if sys.argv[1:2] != ["--worker"] or len(sys.argv) < 4:
        sys.exit(__doc__)
    react(lambda reactor: Deferred.fromCoroutine(_worker(reactor, int(sys.argv[2]), sys.argv[3:])))
