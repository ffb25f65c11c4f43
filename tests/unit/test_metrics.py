"""
Tests for the node's metrics: made per node, on the registry its /metrics serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from spegel import tap
from spegel.dht.metrics import DHTMetrics


class NodeMetricsTests(SynchronousTestCase):
    def served(self, *argv: str) -> CollectorRegistry:
        """
        The registry the /metrics of a node made with C{argv} serves.
        """
        served: list[CollectorRegistry] = []

        def resource(registry: CollectorRegistry) -> Resource:
            served.append(registry)
            return Resource()

        # The real resource renders on the global reactor's thread pool.
        self.patch(tap, "MetricsResource", resource)
        options = tap.Options()
        options.parseOptions(["--data-dir", "", *argv])
        tap.makeService(options, MemoryReactorClock())
        (registry,) = served
        return registry

    def samples(self, registry: CollectorRegistry) -> dict[str, float]:
        exposition = generate_latest(registry).decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
            if not sample.labels
        }

    def test_each_node_serves_its_own(self) -> None:
        """
        Two nodes made in one process each serve their own figures (no collector is shared, so
        making the second does not collide with the first), with the process's beside them.
        """
        first, second = self.served(), self.served()
        self.assertIsNot(first, second)
        samples = self.samples(first)
        self.assertEqual(samples["spegel_dht_routing_table_contacts"], 0)
        self.assertIn("process_cpu_seconds_total", samples)
        self.assertEqual(self.samples(second)["spegel_dht_provided_keys"], 0)


class DHTMetricsTests(SynchronousTestCase):
    def test_own_registry_by_default(self) -> None:
        """
        Each L{DHTMetrics} made without a registry has one of its own: nothing is shared.
        """
        one, two = DHTMetrics(), DHTMetrics()
        one.cluster_keys.set(2)
        self.assertEqual(one.registry.get_sample_value("spegel_dht_cluster_keys"), 2)
        self.assertEqual(two.registry.get_sample_value("spegel_dht_cluster_keys"), 0)
