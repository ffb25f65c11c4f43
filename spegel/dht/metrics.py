# -*- test-case-name: tests.unit.test_dht_protocol -*-
"""
Prometheus metrics of the DHT, on prometheus_client's default registry.

They are module-level singletons: tests and benchmarks run many nodes in one process, and
per-instance registrations would collide.  Gauges are therefore moved by deltas, so with
several nodes in one process they show the sum over all of them.
"""

from prometheus_client import Counter, Gauge, Histogram

DATAGRAMS_SENT = Counter(
    "spegel_dht_datagrams_sent_total", "DHT datagrams sent, by message kind.", ["kind"]
)
DATAGRAMS_RECEIVED = Counter(
    "spegel_dht_datagrams_received_total",
    "Valid DHT datagrams received, by message kind.",
    ["kind"],
)
DATAGRAMS_DROPPED = Counter(
    "spegel_dht_datagrams_dropped_total",
    "DHT datagrams dropped, by reason (malformed, oversized, bad_mac, unsolicited, ...).",
    ["reason"],
)
RPC_TIMEOUTS = Counter(
    "spegel_dht_rpc_timeouts_total", "DHT requests that got no reply in time.", ["kind"]
)
ROUTING_TABLE_CONTACTS = Gauge(
    "spegel_dht_routing_table_contacts", "Contacts in the DHT routing table."
)
PROVIDER_RECORDS = Gauge(
    "spegel_dht_provider_records", "Provider records stored for other nodes."
)
PROVIDED_KEYS = Gauge("spegel_dht_provided_keys", "Keys this node announces.")
CLUSTER_KEYS = Gauge(
    "spegel_dht_cluster_keys",
    "Cluster keys this node accepts DHT datagrams under (0: none, any pod on the network can "
    "take part in, and steer, the DHT; 2: a key rotation is under way).",
)
LOOKUPS = Counter(
    "spegel_dht_lookups_total", "Iterative DHT lookups, by kind and outcome.", ["kind", "outcome"]
)
LOOKUP_DURATION = Histogram(
    "spegel_dht_lookup_duration_seconds",
    "Duration of iterative DHT lookups.",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ANNOUNCED_KEYS = Counter(
    "spegel_dht_announced_keys_total", "Keys sent in ADD_PROVIDER messages (per replica)."
)
