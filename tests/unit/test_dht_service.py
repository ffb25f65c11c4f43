"""
Tests for L{spegel.dht.service.DHTService} on the in-memory network: providing, withdrawing,
finding with the cache, readiness, and start/stop.
"""

import random
from typing import cast

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.config import RouterConfig
from spegel.dht.ids import NODE_ID_FILE, Provider
from spegel.dht.metrics import DHTMetrics
from spegel.dht.service import PROVIDER_CACHE_REFRESH, DHTService
from spegel_testing.dhtsim import MemoryNetwork, SimulatedClock, SimulatedCluster

CONFIG = RouterConfig(
    listen_port=5001,
    k=5,
    rpc_timeout=0.2,
    announce_delay=0.05,
    provider_ttl=100.0,
    republish_interval=60.0,
    provider_cache_ttl=2.0,
)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = SimulatedClock()
        self.network = MemoryNetwork(self.clock, latency=0.001)
        self.cluster = SimulatedCluster(self.network, CONFIG, rng=random.Random(8))
        self.cluster.start(12)
        self.clock.advance(2)
        self.services = self.cluster.services
        self.addCleanup(lambda: [s.stopService() for s in self.services if s.running])

    def find(self, service: DHTService, key: str, **kwargs):  # type: ignore[no-untyped-def]
        d = service.find_providers(key, **kwargs)
        self.clock.advance(2)
        return self.successResultOf(d)

    def test_ready_after_join(self) -> None:
        self.assertTrue(all(s.ready for s in self.services))

    def test_provide_is_announced_after_a_short_delay(self) -> None:
        holder, asker = self.services[3], self.services[9]
        holder.provide(["sha256:aa", "sha256:bb", "sha256:aa"])
        self.assertEqual(holder.provided_keys_count(), 2)
        self.clock.advance(0.5)
        found: list[Provider] = []
        providers = self.find(asker, "sha256:aa", on_provider=found.append)
        self.assertEqual([p.node_id for p in providers], [holder.node_id])
        self.assertEqual(found, providers)
        self.assertEqual(providers[0].registry_port, CONFIG.registry_port)

    def test_results_are_cached_briefly(self) -> None:
        holder, asker = self.services[2], self.services[5]
        holder.provide(["k"])
        self.clock.advance(0.5)
        d = asker.find_providers("k")
        self.clock.advance(0.1)
        self.successResultOf(d)
        sent = sum(asker.node.protocol.sent.values())
        # Within the refresh age: from the cache, nothing sent.
        found: list[Provider] = []
        d = asker.find_providers("k", on_provider=found.append)
        self.assertEqual([p.node_id for p in self.successResultOf(d)], [holder.node_id])
        self.assertEqual(len(found), 1)
        self.assertEqual(sum(asker.node.protocol.sent.values()), sent)
        # Older: still answered from the cache at once, and looked up again in the background.
        self.clock.advance(PROVIDER_CACHE_REFRESH)
        d = asker.find_providers("k")
        self.assertEqual([p.node_id for p in self.successResultOf(d)], [holder.node_id])
        self.assertGreater(sum(asker.node.protocol.sent.values()), sent)
        # Past the TTL of the refreshed answer: the lookup must run before an answer.
        self.clock.advance(CONFIG.provider_cache_ttl + 0.5)
        d = asker.find_providers("k")
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual([p.node_id for p in self.successResultOf(d)], [holder.node_id])

    def test_each_node_records_its_own_figures(self) -> None:
        """
        Every simulated node has its own metrics: a node's counters are its datagrams, its
        gauges its routing table and records, not a sum over the process.
        """
        holder = self.services[3]
        holder.provide(["sha256:aa", "sha256:bb"])
        self.clock.advance(0.5)
        for service in self.services:
            value = service.metrics.registry.get_sample_value
            sent = service.node.protocol.sent
            self.assertEqual(
                {kind: value("spegel_dht_datagrams_sent_total", {"kind": kind}) for kind in sent}, dict(sent)
            )
            self.assertEqual(value("spegel_dht_routing_table_contacts"), len(service.node.routing))
            self.assertEqual(value("spegel_dht_provided_keys"), 2 if service is holder else 0)
        self.assertEqual(len({id(service.metrics.registry) for service in self.services}), len(self.services))

    def test_cache_can_be_bypassed(self) -> None:
        holder, asker = self.services[2], self.services[5]
        holder.provide(["k"])
        self.clock.advance(0.5)
        self.find(asker, "k")
        sent = sum(asker.node.protocol.sent.values())
        providers = self.find(asker, "k", use_cache=False)
        self.assertGreater(sum(asker.node.protocol.sent.values()), sent)
        self.assertEqual([p.node_id for p in providers], [holder.node_id])

    def test_one_full_refresh_after_joining(self) -> None:
        service = self.services[4]
        self.assertIsNotNone(service._settle_call)
        refreshed: list[float | None] = []
        def refresh(interval: float | None = None) -> Deferred[None]:
            refreshed.append(interval)
            return succeed(None)

        self.patch(service.node, "refresh", refresh)
        self.clock.advance(CONFIG.settle_refresh_delay)
        self.assertEqual(refreshed.count(0), 1)
        service.join([])  # later joins schedule nothing more
        self.clock.advance(CONFIG.settle_refresh_delay)
        self.assertEqual(refreshed.count(0), 1)

    def test_misses_are_not_cached(self) -> None:
        asker = self.services[5]
        self.assertEqual(self.find(asker, "late"), [])
        self.services[1].provide(["late"])
        self.clock.advance(0.5)
        self.assertEqual(len(self.find(asker, "late")), 1)

    def test_reannounced_until_withdrawn(self) -> None:
        holder, asker = self.services[4], self.services[8]
        holder.provide(["kept", "dropped"])
        self.clock.advance(0.5)
        holder.withdraw(["dropped"])
        self.assertEqual(holder.provided_keys_count(), 1)
        self.assertEqual(holder.metrics.registry.get_sample_value("spegel_dht_provided_keys"), 1)
        # Several TTLs later the kept key is still found (re-announced), the other lapsed.
        self.clock.advance(3 * CONFIG.provider_ttl)
        self.assertEqual(len(self.find(asker, "kept")), 1)
        self.assertEqual(self.find(asker, "dropped"), [])

    def test_keys_provided_before_start_and_before_joining(self) -> None:
        config = evolve(CONFIG, listen_host="10.9.0.1", bootstrap_kind="static", static_peers=(("10.9.0.2", 5001),))
        lonely = DHTService(self.network.reactor("10.9.0.1"), config, metrics=DHTMetrics())
        lonely.provide(["early"])
        lonely.startService()
        self.addCleanup(lonely.stopService)
        self.clock.advance(5)
        self.assertFalse(lonely.ready)
        # Its peer appears later; the join announces what was provided meanwhile.
        peer_config = evolve(config, listen_host="10.9.0.2", static_peers=(self.services[0].address,))
        peer = DHTService(self.network.reactor("10.9.0.2"), peer_config, metrics=DHTMetrics())
        peer.startService()
        self.addCleanup(peer.stopService)
        self.clock.advance(40)
        self.assertTrue(lonely.ready)
        self.assertEqual([p.node_id for p in self.find(self.services[6], "early")], [lonely.node_id])

    def test_stop_leaves_no_calls(self) -> None:
        for service in self.services:
            service.provide(["x"])
            service.stopService()
        self.clock.advance(1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.network.ports, {})

    def test_bootstrap_info(self) -> None:
        info = self.services[0].bootstrap_info()
        self.assertEqual((info.node_id, info.host, info.port), (self.services[0].node_id, "10.0.1.1", 5001))
        advertised = DHTService(self.network.reactor("10.200.0.1"), evolve(CONFIG, listen_host="10.200.0.1", advertise_host="192.0.2.1"), metrics=DHTMetrics())
        advertised.startService()
        self.addCleanup(advertised.stopService)
        self.assertEqual(advertised.bootstrap_info().host, "192.0.2.1")


class IdentityTests(SynchronousTestCase):
    def test_node_id_persisted_in_data_dir(self) -> None:
        data_dir = self.mktemp()
        network = MemoryNetwork(SimulatedClock())
        first = DHTService(network.reactor("10.0.0.1"), evolve(CONFIG, data_dir=data_dir), metrics=DHTMetrics())
        again = DHTService(network.reactor("10.0.0.1"), evolve(CONFIG, data_dir=data_dir), metrics=DHTMetrics())
        self.assertEqual(first.node_id, again.node_id)
        with open(f"{data_dir}/{NODE_ID_FILE}") as f:
            self.assertEqual(f.read().strip(), first.node_id.hex())
        self.assertNotEqual(DHTService(network.reactor("10.0.0.1"), CONFIG, metrics=DHTMetrics()).node_id, first.node_id)

    def test_not_ready_until_started_without_bootstrap(self) -> None:
        service = DHTService(MemoryNetwork(SimulatedClock()).reactor("10.0.0.1"), CONFIG, metrics=DHTMetrics())
        self.assertFalse(service.ready)
        service.startService()
        self.assertTrue(service.ready)
        service.stopService()

    def test_cluster_keys_exported_and_missing_key_warned(self) -> None:
        """
        A node without a cluster key says so at start (anyone on the pod network can steer its
        DHT) and exports 0; with one key 1, during a rotation 2.
        """
        from twisted.logger import ILogObserver, globalLogPublisher

        events: list[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for config, keys in (
            (CONFIG, 0.0),
            (evolve(CONFIG, secret=b"k" * 16), 1.0),
            (evolve(CONFIG, secret=b"k" * 16, also_accepted=(b"o" * 16,)), 2.0),
        ):
            service = DHTService(MemoryNetwork(SimulatedClock()).reactor("10.0.0.1"), config, metrics=DHTMetrics())
            service.startService()
            self.addCleanup(service.stopService)
            self.assertEqual(service.metrics.registry.get_sample_value("spegel_dht_cluster_keys"), keys)
        warnings = [e for e in events if "No cluster key" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_bad_config_rejected(self) -> None:
        self.assertRaises(ValueError, RouterConfig, bootstrap_kind="carrier-pigeon")
        self.assertRaises(ValueError, RouterConfig, listen_port=70000)
        self.assertRaises(ValueError, RouterConfig, k=0)
