"""
Tests for the node's metrics: made per node, on the registry its /metrics serves.
"""

from __future__ import annotations

import importlib
import pkgutil

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

import spegel
from spegel import tap
from spegel.dht.metrics import DHTMetrics
from spegel.metrics import Metrics, node_registry


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
        self.assertEqual(samples["spegel_mirror_last_success_timestamp_seconds"], 0)
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


class MetricsTests(SynchronousTestCase):
    def test_nothing_registered_at_import(self) -> None:
        """
        Importing every module of spegel registers nothing on prometheus_client's default
        registry: it holds only what prometheus_client puts there itself.
        """
        for module in pkgutil.walk_packages(spegel.__path__, "spegel."):
            importlib.import_module(module.name)
        names = {family.name for family in REGISTRY.collect()}
        self.assertTrue(names)
        self.assertEqual({name for name in names if not name.startswith(("process_", "python_"))}, set())

    def test_dht_on_the_same_registry(self) -> None:
        """
        A node's DHT figures are on its registry, beside the rest.
        """
        metrics = Metrics()
        metrics.dht.provided_keys.set(3)
        metrics.uploads_active.set(2)
        value = metrics.registry.get_sample_value
        self.assertEqual((value("spegel_dht_provided_keys"), value("spegel_uploads_active")), (3, 2))

    def test_node_registry_has_the_process_collectors(self) -> None:
        """
        What the default registry showed at /metrics besides the node's figures is still there.
        """
        names = {family.name for family in node_registry().collect()}
        self.assertLessEqual({"process_cpu_seconds", "python_info", "python_gc_collections"}, names)
        self.assertEqual(names, {family.name for family in REGISTRY.collect()})
