"""
Hundreds of DHT nodes on an in-memory network with latency and loss, on a simulated clock:
lookup success, hop counts and churn.
"""

import math
import random

from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.config import RouterConfig
from spegel.dht.ids import distance, key_id
from spegel_testing.dhtsim import MemoryNetwork, SimulatedClock, SimulatedCluster

N = 200
CONFIG = RouterConfig(
    listen_port=5001,
    registry_port=5000,
    rpc_timeout=0.3,
    provider_ttl=190.0,
    republish_interval=150.0,
    refresh_interval=600.0,
    bootstrap_rejoin_interval=600.0,
)


def resolve(clock: SimulatedClock, d, limit: float = 30.0):  # type: ignore[no-untyped-def]
    results: list = []
    d.addBoth(results.append)
    clock.run_until(clock.now + limit, stop=lambda: bool(results))
    assert results, "lookup did not finish"
    return results[0]


def build(seed: int) -> tuple[random.Random, SimulatedClock, MemoryNetwork, SimulatedCluster]:
    rng = random.Random(seed)
    clock = SimulatedClock()
    network = MemoryNetwork(
        clock, latency=lambda: rng.uniform(0.0005, 0.005), loss=0.02, rng=random.Random(seed + 1)
    )
    cluster = SimulatedCluster(network, CONFIG, rng=rng)
    cluster.start(N)
    clock.advance(5)
    return rng, clock, network, cluster


_shared: list = []


class SimulationTests(SynchronousTestCase):
    """
    Tests that leave the cluster usable share one (building 200 nodes takes seconds);
    the churn test, which kills nodes, builds its own.
    """

    def setUp(self) -> None:
        if not _shared:
            _shared.extend(build(1234))
        self.rng, self.clock, self.network, self.cluster = _shared

    def test_all_nodes_join(self) -> None:
        services = self.cluster.services
        self.assertEqual(sum(1 for s in services if s.ready), N)
        self.assertGreaterEqual(min(len(s.node.routing) for s in services), CONFIG.k)

    def test_node_lookups_find_the_true_closest_within_hop_bound(self) -> None:
        services = self.cluster.services
        ids = [s.node_id for s in services]
        hops = []
        found = 0
        trials = 200
        for _ in range(trials):
            target = self.rng.randbytes(32)
            asker = self.rng.choice(services)
            result = resolve(self.clock, asker.node.find_node(target))
            truth = sorted((i for i in ids if i != asker.node_id), key=lambda i: distance(i, target))
            if result.closest and result.closest[0].node_id == truth[0]:
                found += 1
            hops.append(result.hops)
        self.assertGreaterEqual(found / trials, 0.99)
        # The paper: O(log n) hops; with k = 20 contacts per answer far fewer in practice.
        self.assertLessEqual(max(hops), math.ceil(math.log2(N)))
        self.assertLessEqual(sum(hops) / len(hops), 4)

    def test_provider_lookups_succeed(self) -> None:
        services = self.cluster.services
        keys = {}
        for i in range(100):
            holder = self.rng.choice(services)
            key = f"sha256:{i:064x}"
            holder.provide([key])
            keys[key] = holder
        self.clock.advance(5)
        successes = 0
        for key, holder in keys.items():
            asker = self.rng.choice([s for s in services if s is not holder])
            providers = resolve(self.clock, asker.find_providers(key))
            if any(p.node_id == holder.node_id for p in providers):
                successes += 1
                provider = next(p for p in providers if p.node_id == holder.node_id)
                self.assertEqual((provider.host, provider.registry_port), (holder.config.listen_host, 5000))
        self.assertGreaterEqual(successes / len(keys), 0.99)


    def test_batched_announcement_cost(self) -> None:
        announcer = self.cluster.services[7]
        keys = [key_id(f"sha256:{i:064x}") for i in range(1000)]
        sent_before = sum(announcer.node.protocol.sent.values())
        result = resolve(self.clock, announcer.node.announce(keys))
        sent = sum(announcer.node.protocol.sent.values()) - sent_before
        self.assertEqual(result.keys, 1000)
        self.assertEqual(result.replicas, 1000 * CONFIG.k)
        self.assertGreaterEqual(result.acknowledged, result.messages * 0.9)
        # Far below one lookup plus k messages per key.
        self.assertLess(sent / 1000, 1.5)
        # Each key landed at (nearly all of) its true k closest nodes.
        ids = [s.node_id for s in self.cluster.services if s is not announcer]
        placed = 0
        for key in keys[:50]:
            for node_id in sorted(ids, key=lambda i: distance(i, key))[: CONFIG.k]:
                service = next(s for s in self.cluster.services if s.node_id == node_id)
                placed += bool(service.node.store.get(key, 50))
        self.assertGreaterEqual(placed / (50 * CONFIG.k), 0.9)


class ChurnTests(SynchronousTestCase):
    def test_churn(self) -> None:
        self.rng, self.clock, self.network, self.cluster = build(4321)
        services = self.cluster.services
        keys = {}
        for i in range(100):
            holder = self.rng.choice(services)
            key = f"example.com/repo:tag{i}"
            holder.provide([key])
            keys[key] = holder
        self.clock.advance(5)
        for victim in self.rng.sample(services, int(0.3 * N)):
            self.cluster.crash(victim)
        alive = self.cluster.alive()
        self.assertEqual(len(alive), N - int(0.3 * N))
        # Past the next re-announcement (and the death of the records of departed nodes).
        self.clock.advance(CONFIG.republish_interval + 10)
        live_keys = {k: h for k, h in keys.items() if h.running}
        self.assertGreater(len(live_keys), 50)
        successes = 0
        for key, holder in live_keys.items():
            asker = self.rng.choice([s for s in alive if s is not holder])
            providers = resolve(self.clock, asker.find_providers(key))
            successes += any(p.node_id == holder.node_id for p in providers)
        self.assertGreaterEqual(successes / len(live_keys), 0.99)
        # Dead nodes leave the routing tables of those that noticed.
        dead = {s.node_id for s in services if not s.running}
        stale = sum(1 for s in alive for c in s.node.routing if c.node_id in dead)
        total = sum(len(s.node.routing) for s in alive)
        self.assertLess(stale / total, 0.3)
