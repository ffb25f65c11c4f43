# -*- test-case-name: tests.unit.test_metrics -*-
"""
The node's Prometheus metrics, under the names operators' dashboards already use.

One L{Metrics} per node, made on the registry its C{/metrics} serves (L{node_registry}), is
handed to every component that records; nothing is registered at import.  Tests make their own
(on a registry of their own) and read exact values; several nodes in one process never share a
figure.
"""

from __future__ import annotations

from attrs import Factory, field, frozen
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from spegel.dht.metrics import DHTMetrics, collector

HTTP_LABELS = ("handler", "method", "code")


def node_registry() -> CollectorRegistry:
    """
    A registry for a node's C{/metrics}, holding what prometheus_client's default registry
    holds (the process's CPU, memory and file descriptors, the Python platform, the garbage
    collector), which C{/metrics} has always shown beside the node's own figures.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@frozen
class Metrics:
    """
    Every collector of a node, registered on C{registry} (a registry of their own by default).

    @ivar dht: the DHT's, on the same registry.
    """

    registry: CollectorRegistry = field(factory=CollectorRegistry, eq=False)
    dht: DHTMetrics = field(
        init=False, repr=False, eq=False, default=Factory(lambda self: DHTMetrics(self.registry), takes_self=True)
    )

    http_request_duration_seconds: Histogram = collector(
        Histogram,
        "http_request_duration_seconds",
        "Time from a request's arrival until its response was finished.",
        HTTP_LABELS,
    )
    http_response_size_bytes: Histogram = collector(
        Histogram,
        "http_response_size_bytes",
        "Bytes of response bodies.",
        HTTP_LABELS,
        buckets=(0, 1024, 16384, 262144, 1048576, 16777216, 134217728, 1073741824, float("inf")),
    )
    http_requests_inflight: Gauge = collector(
        Gauge,
        "http_requests_inflight",
        "Requests being served right now.",
        ("handler",),
    )
    mirror_requests_total: Counter = collector(
        Counter,
        "spegel_mirror_requests_total",
        "Registry requests for content, by upstream registry and whether this node could serve them.",
        ("registry", "cache"),
    )
    mirror_last_success_timestamp_seconds: Gauge = collector(
        Gauge,
        "spegel_mirror_last_success_timestamp_seconds",
        "When a request was last served successfully through a peer.",
    )
    resolve_duration_seconds: Histogram = collector(
        Histogram,
        "spegel_resolve_duration_seconds",
        "Time to find a provider of a key in the cluster.",
        ("router",),
        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf")),
    )
    unresolved_total: Counter = collector(
        Counter,
        "spegel_mirror_unresolved_total",
        "Content requests answered 404 because no provider was found in the cluster, by why: "
        "timeout (none within --mirror-resolve-timeout: a slow DHT, or a timeout too short), "
        "not_found (the lookup ended without one), peers_failed (providers were found, and each "
        "failed, timed out before its response headers, or the retry budget ran out).",
        ("reason",),
    )
    served_bytes_total: Counter = collector(
        Counter,
        "spegel_served_bytes_total",
        "Body bytes served to clients, by where they came from (local: this node's containerd; "
        "peer: streamed from another node).",
        ("source",),
    )
    spliced_bytes_total: Counter = collector(
        Counter,
        "spegel_spliced_bytes_total",
        "Of the bytes served from peers, those moved from the peer's socket to the client's by "
        "splice, without passing through this process.",
    )
    pull_coalescing_total: Counter = collector(
        Counter,
        "spegel_pull_coalescing_total",
        "Manifest misses with coalescing on, and misses of blobs of an image a peer served, by outcome: upstream (this node's containerd pulls "
        "it and said so), waited (another node's pull provided it), timeout (waited in vain).",
        ("outcome",),
    )
    peers_busy_total: Counter = collector(
        Counter,
        "spegel_mirror_peers_busy_total",
        "Peer answers of 429 (the peer was at its --max-uploads): another holder was asked, or the "
        "same one again shortly.",
    )
    mirror_early_headers_total: Counter = collector(
        Counter,
        "spegel_mirror_early_headers_total",
        "Blob requests of containerd answered with headers before any holder was free "
        "(--mirror-blob-headers-after), by outcome: served (a holder then sent the bytes), cut (none "
        "did: the connection was closed, and containerd's next request got a 404).",
        ("outcome",),
    )
    uploads_active: Gauge = collector(
        Gauge,
        "spegel_uploads_active",
        "Blob bodies being served to peers now (bounded by --max-uploads).",
    )
    uploads_refused_total: Counter = collector(
        Counter,
        "spegel_uploads_refused_total",
        "Peer blob requests answered 429 because --max-uploads were being served.",
    )
    uploads_deferred_total: Counter = collector(
        Counter,
        "spegel_uploads_deferred_total",
        "Peer blob requests answered 429 because this node had served its share of the blob and the peer had other holders to ask.",
    )
    partial_uploads_total: Counter = collector(
        Counter,
        "spegel_partial_uploads_total",
        "Peer blob requests served from a blob this node's containerd was still downloading.",
    )
    uploaded_bytes_total: Counter = collector(
        Counter,
        "spegel_uploaded_bytes_total",
        "Blob body bytes this node sent to peers (a part of spegel_served_bytes_total{source=\"local\"}).",
    )
    upload_throttled_seconds_total: Counter = collector(
        Counter,
        "spegel_upload_throttled_seconds_total",
        "Time during which uploads to peers waited for --max-upload-rate: a node whose cap, not "
        "its peers, sets the pace of the uploads.",
    )
    digest_mismatches_total: Counter = collector(
        Counter,
        "spegel_digest_mismatches_total",
        "Bytes from a peer that did not match their digest; the copy was aborted.",
    )
    containerd_errors_total: Counter = collector(
        Counter,
        "spegel_containerd_errors_total",
        "Calls to containerd that failed for a reason other than missing content.",
    )
    peer_failures_total: Counter = collector(
        Counter,
        "spegel_mirror_peer_failures_total",
        "Peers that failed a request or a copy, by why: header_deadline (no response headers "
        "before the deadline), connect (refused, unreachable, or the connection failed before the "
        "headers), status (an answer other than the 200/206 asked for: a 404 from a stale record, a "
        "5xx, a wrong range, no usable length), body (the body stalled, was short, too long, or was "
        "cut mid-way), digest (the bytes, or the digest announced, did not match).",
        ("reason",),
    )
    mirror_parallel_copies_total: Counter = collector(
        Counter,
        "spegel_mirror_parallel_copies_total",
        "Large blobs fetched from several peers at once, in pieces (--mirror-parallel-min-size).",
    )
    mirror_pieces_fetched_total: Counter = collector(
        Counter,
        "spegel_mirror_pieces_fetched_total",
        "Pieces of blobs fetched from several peers at once that were completed.",
    )
    mirror_pieces_stolen_total: Counter = collector(
        Counter,
        "spegel_mirror_pieces_stolen_total",
        "Pieces whose rest an idle peer fetched because the peer fetching them was much slower, by "
        "event: started (a steal began), thief_won (the idle peer finished first), owner_won (the "
        "slow peer did).",
        ("event",),
    )
    mirror_piece_refetches_total: Counter = collector(
        Counter,
        "spegel_mirror_piece_refetches_total",
        "Pieces whose rest was fetched again from another peer, by why: busy (429), gone (404/416), "
        "status (a 200 for a range, another range, another status), short (the body ended early), "
        "too_long (more bytes than asked), stall (silent for the idle timeout mid-piece), connect "
        "(no response headers: refused, unreachable, past the deadline).",
        ("reason",),
    )
    advertised_image_tags: Gauge = collector(
        Gauge,
        "spegel_advertised_image_tags",
        "Image tags this node advertises, by registry.",
        ("registry",),
    )
    advertised_image_digests: Gauge = collector(
        Gauge,
        "spegel_advertised_image_digests",
        "Root digests (the manifest or index an image name points at) this node advertises, by registry.",
        ("registry",),
    )
    advertised_content_digests: Gauge = collector(
        Gauge,
        "spegel_advertised_content_digests",
        "Digests of every kind (indexes, manifests, configs, layers) this node advertises, by registry.",
        ("registry",),
    )
    preflight_problems: Gauge = collector(
        Gauge,
        "spegel_preflight_problems",
        "1 for each check of the node's containerd that found a problem at start, 0 for those that "
        "did not (see the node's log for the line with the fix).",
        ("check",),
    )
