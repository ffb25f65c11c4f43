"""
Twenty DHT nodes over real UDP sockets on loopback, in this process's reactor.

Datagrams take as long as the machine lets them: the tests wait for what should happen (a key
found, a datagram dropped) with generous deadlines, never for a fixed time. How fast a key
becomes findable is measured in benchmarks/.
"""

import random
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from spegel.dht.config import RouterConfig
from spegel.dht.ids import Provider
from spegel.dht.metrics import DHTMetrics
from spegel.dht.service import DHTService

N = 20
SECRET = b"loopback cluster key"
#: How long a test waits for something that takes milliseconds on an idle machine.
DEADLINE = 20.0


async def start_cluster(test: TestCase, n: int, secret: bytes | None = SECRET) -> list[DHTService]:
    services: list[DHTService] = []

    test.addCleanup(lambda: gatherResults([_stop(s) for s in services]))
    base = RouterConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        registry_port=30020,
        secret=secret,
        rpc_timeout=0.5,
        announce_delay=0.01,
    )
    first = DHTService(reactor, base, metrics=DHTMetrics())
    first.startService()
    services.append(first)
    seed = first.address
    config = RouterConfig(**{**_fields(base), "bootstrap_kind": "static", "static_peers": (seed,)})
    for _ in range(n - 1):
        service = DHTService(reactor, config, metrics=DHTMetrics())
        service.startService()
        services.append(service)
    await gatherResults(
        [s.bootstrapping.when_joined() for s in services if s.bootstrapping is not None]
    )
    return services


async def find_holder(
    test: TestCase, asker: DHTService, key: str, holder: DHTService
) -> tuple[list[Provider], list[Provider]]:
    """
    Look C{key} up from C{asker}, uncached, until C{holder} is among its providers (the
    holder's announcement is on its way over UDP); the providers and those reported one by one
    by the lookup that found it.
    """
    started = reactor.seconds()
    while True:
        found: list[Provider] = []
        providers = await asker.find_providers(key, on_provider=found.append, use_cache=False)
        if holder.node_id in [p.node_id for p in providers]:
            return providers, found
        if reactor.seconds() - started > DEADLINE:
            test.fail(f"{key} not found at its holder within {DEADLINE}s: {providers}")
        await deferLater(reactor, 0.05, lambda: None)


async def wait_for(test: TestCase, predicate: Callable[[], bool], what: str) -> None:
    """
    Let the reactor run until C{predicate} holds; fail after L{DEADLINE} seconds.
    """
    started = reactor.seconds()
    while not predicate():
        if reactor.seconds() - started > DEADLINE:
            test.fail(f"timed out after {DEADLINE}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


def _fields(config: RouterConfig) -> dict:
    from attrs import asdict

    return asdict(config, recurse=False)


def _stop(service: DHTService) -> Deferred[None]:
    from twisted.internet.defer import maybeDeferred

    if not service.running:
        return Deferred.fromCoroutine(_noop())
    return maybeDeferred(service.stopService)


async def _noop() -> None:
    return None


class LoopbackClusterTests(TestCase):
    timeout = 120

    async def _twenty_nodes(self) -> None:
        services = await start_cluster(self, N)
        self.assertTrue(all(s.ready for s in services))
        self.assertTrue(all(len(s.node.routing) >= N // 2 for s in services))
        rng = random.Random(7)
        holders = {}
        for i in range(30):
            holder = rng.choice(services)
            key = f"sha256:{i:064x}"
            holder.provide([key])
            holders[key] = holder
        # New keys become findable cluster-wide.
        for key, holder in holders.items():
            asker = rng.choice([s for s in services if s is not holder])
            providers, found = await find_holder(self, asker, key, holder)
            self.assertEqual(found, providers)
            provider = next(p for p in providers if p.node_id == holder.node_id)
            self.assertEqual((provider.host, provider.registry_port), ("127.0.0.1", 30020))
            self.assertNotIn(asker.node_id, [p.node_id for p in providers])
        self.assertEqual(sum(s.node.protocol.dropped["bad_mac"] for s in services), 0)

    def test_twenty_nodes_join_and_find_providers(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._twenty_nodes())

    async def _outsider(self) -> None:
        services = await start_cluster(self, 3)
        outsider = DHTService(
            reactor,
            RouterConfig(
                listen_host="127.0.0.1",
                listen_port=0,
                secret=b"wrong key",
                bootstrap_kind="static",
                static_peers=(services[0].address,),
                rpc_timeout=0.2,
            ),
            metrics=DHTMetrics(),
        )
        outsider.startService()
        self.addCleanup(_stop, outsider)
        # Its first attempt to join fails: its datagrams were dropped for their signature.
        assert outsider.bootstrapping is not None
        bootstrapping = outsider.bootstrapping
        await wait_for(self, lambda: bootstrapping.consecutive_failures > 0, "the outsider's join to fail")
        self.assertFalse(outsider.ready)
        self.assertGreater(services[0].node.protocol.dropped["bad_mac"], 0)
        self.assertNotIn(outsider.node_id, services[0].node.routing)

    def test_outsider_without_the_key_cannot_join(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._outsider())

    async def _rotation(self) -> None:
        """
        A key rotation is three rollouts: every node on C{old,new} (signs with the old key,
        accepts both), then C{new,old}, then C{new}.  Mid-way through the second, nodes of the
        first two steps side by side form one cluster: each finds what the others provide, and
        no datagram is dropped for its key.
        """
        old, new = b"the old cluster key", b"the new cluster key"

        def node(secret: bytes, also: bytes, peers: tuple = ()) -> DHTService:
            service = DHTService(
                reactor,
                RouterConfig(
                    listen_host="127.0.0.1",
                    listen_port=0,
                    registry_port=30020,
                    secret=secret,
                    also_accepted=(also,),
                    bootstrap_kind="static" if peers else None,
                    static_peers=peers,
                ),
                metrics=DHTMetrics(),
            )
            service.startService()
            self.addCleanup(_stop, service)
            return service

        first = node(old, new)
        services = [first, node(new, old, (first.address,)), node(old, new, (first.address,)), node(new, old, (first.address,))]
        for service in services[1:]:
            await service.join([first.address])
        keys = {f"sha256:{i:064x}": service for i, service in enumerate(services)}
        for key, holder in keys.items():
            holder.provide([key])
        for key, holder in keys.items():
            for asker in services:
                if asker is not holder:
                    await find_holder(self, asker, key, holder)
        self.assertEqual(sum(s.node.protocol.dropped["bad_mac"] for s in services), 0)

    def test_key_rotation_keeps_one_cluster(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rotation())

    async def _alone(self) -> None:
        service = DHTService(
            reactor,
            RouterConfig(listen_host="127.0.0.1", listen_port=0, bootstrap_kind="static",
                         static_peers=(("127.0.0.1", 1),)),
            metrics=DHTMetrics(),
        )
        # The node's own address, as a headless Service's DNS would list it.
        service.startService()
        self.addCleanup(_stop, service)
        single = DHTService(
            reactor,
            RouterConfig(listen_host="127.0.0.1", listen_port=0),
            metrics=DHTMetrics(),
        )
        self.assertTrue(single.ready is False)
        single.startService()
        self.addCleanup(_stop, single)
        self.assertTrue(single.ready)
        result = await service.join([service.address])
        self.assertTrue(result.only_self)
        self.assertEqual(result.peers_found, 0)

    def test_single_node_cluster_is_ready(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._alone())
