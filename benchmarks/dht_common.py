"""
Shared set-up of the DHT benchmarks: N real nodes on loopback UDP in one reactor.
"""

from __future__ import annotations

import time
from typing import Any

from attrs import evolve
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from spegel.dht.config import RouterConfig
from spegel.dht.service import DHTService

BASE = RouterConfig(listen_host="127.0.0.1", listen_port=0, registry_port=30020, announce_delay=0.01)


async def start_nodes(reactor: Any, n: int, config: RouterConfig = BASE) -> list[DHTService]:
    """
    Start C{n} nodes; all but the first bootstrap from the first two.  Returns once all joined
    and one bucket-refresh round filled their tables.
    """
    services: list[DHTService] = []
    first = DHTService(reactor, config)
    first.startService()
    services.append(first)
    seeds: tuple[tuple[str, int], ...] = (first.address,)
    for i in range(n - 1):
        service = DHTService(
            reactor, evolve(config, bootstrap_kind="static", static_peers=seeds)
        )
        service.startService()
        services.append(service)
        if i == 0:
            seeds = (first.address, service.address)
    await gatherResults([s.bootstrapping.when_joined() for s in services if s.bootstrapping])
    await gatherResults([s.node.find_node(s.node_id) for s in services])
    return services


def busy(services: list[DHTService]) -> bool:
    """
    Whether any node is announcing, about to announce, or waiting for a reply.
    """
    return any(
        s._unannounced or s._announce_call or s._announcing or s.node.protocol.pending
        for s in services
    )


async def settle(reactor: Any, services: list[DHTService], quiet: float = 0.05) -> float:
    """
    Wait until the cluster has been idle (see L{busy}) for C{quiet} seconds, so background
    work (announcements of the set-up keys, their lookups) does not run during, and get
    counted in, the measurements that follow.  Returns the seconds waited.
    """
    started = now()
    idle_since: float | None = None
    while True:
        if busy(services):
            idle_since = None
        elif idle_since is None:
            idle_since = now()
        elif now() - idle_since >= quiet:
            return now() - started
        await deferLater(reactor, 0.005, lambda: None)


async def stop_nodes(services: list[DHTService]) -> None:
    for service in services:
        await service.stopService()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def now() -> float:
    # Benchmarks measure wall time; library code never does.
    return time.perf_counter()
