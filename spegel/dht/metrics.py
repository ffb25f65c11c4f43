# -*- test-case-name: tests.unit.test_metrics -*-
"""
Prometheus metrics of the DHT: one L{DHTMetrics} per node, made on the registry its figures are
exported from.

Nothing is registered at import: tests, benchmarks and the simulator run many nodes in one
process, each with its own L{DHTMetrics} (on a registry of its own), so every figure is that
node's, gauges are set to what they are, and a test reads exact values.
"""

from __future__ import annotations

from typing import Any

from attrs import Factory, field, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def collector(kind: type, name: str, documentation: str, labels: tuple[str, ...] = (), **options: Any) -> Any:
    """
    An attrs field holding a C{kind} collector made on the instance's C{registry} when the
    instance is made: the declaration reads like the module-level one it replaces.
    """
    return field(
        init=False,
        repr=False,
        eq=False,
        default=Factory(
            lambda self: kind(name, documentation, labels, registry=self.registry, **options), takes_self=True
        ),
    )


@frozen
class DHTMetrics:
    """
    The DHT's collectors, registered on C{registry} (a registry of their own by default).
    """

    registry: CollectorRegistry = field(factory=CollectorRegistry, eq=False)

    datagrams_sent: Counter = collector(
        Counter, "spegel_dht_datagrams_sent_total", "DHT datagrams sent, by message kind.", ("kind",)
    )
    datagrams_received: Counter = collector(
        Counter,
        "spegel_dht_datagrams_received_total",
        "Valid DHT datagrams received, by message kind.",
        ("kind",),
    )
    datagrams_dropped: Counter = collector(
        Counter,
        "spegel_dht_datagrams_dropped_total",
        "DHT datagrams dropped, by reason (malformed, oversized, bad_mac, unsolicited, ...).",
        ("reason",),
    )
    rpc_timeouts: Counter = collector(
        Counter, "spegel_dht_rpc_timeouts_total", "DHT requests that got no reply in time.", ("kind",)
    )
    routing_table_contacts: Gauge = collector(
        Gauge, "spegel_dht_routing_table_contacts", "Contacts in the DHT routing table."
    )
    provider_records: Gauge = collector(
        Gauge, "spegel_dht_provider_records", "Provider records stored for other nodes."
    )
    provided_keys: Gauge = collector(Gauge, "spegel_dht_provided_keys", "Keys this node announces.")
    cluster_keys: Gauge = collector(
        Gauge,
        "spegel_dht_cluster_keys",
        "Cluster keys this node accepts DHT datagrams under (0: none, any pod on the network can "
        "take part in, and steer, the DHT; 2: a key rotation is under way).",
    )
    lookups: Counter = collector(
        Counter, "spegel_dht_lookups_total", "Iterative DHT lookups, by kind and outcome.", ("kind", "outcome")
    )
    lookup_duration: Histogram = collector(
        Histogram,
        "spegel_dht_lookup_duration_seconds",
        "Duration of iterative DHT lookups.",
        ("kind",),
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    )
    announced_keys: Counter = collector(
        Counter, "spegel_dht_announced_keys_total", "Keys sent in ADD_PROVIDER messages (per replica)."
    )
