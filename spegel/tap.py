# -*- test-case-name: tests.unit.test_tap -*-
"""
The spegel node as a twistd application: C{twistd -n spegel [options]}.

L{Options} validates every flag into a L{NodeConfig}; L{makeService} only wires services.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from attrs import frozen
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from spegel import flags
from spegel.addresses import ListenAddress, parse_host_port, parse_http_url
from spegel.pacing import MIN_RATE, TokenBucket
from spegel.registry import RegistryFilter
from spegel.uploads import UploadSlots

_log = Logger()

LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
}
BOOTSTRAP_KINDS = ("static", "dns", "http")


@frozen
class NodeConfig:
    """
    Everything a node is told on its command line, validated.
    """

    registry_addr: ListenAddress
    router_addr: ListenAddress
    metrics_addr: ListenAddress
    registry_listen_backlog: int
    registry_connections_per_client: int
    containerd_sock: str
    containerd_namespace: str
    containerd_content_path: str
    containerd_config_file: str
    containerd_registry_config_path: str
    data_dir: str | None
    registry_filter: RegistryFilter
    mirror_resolve_timeout: float
    mirror_coalesce_timeout: float
    mirror_coalesce_blob_timeout: float
    mirror_blob_headers_after: float
    mirror_resolve_retries: int
    mirror_parallel_min_size: int
    mirror_parallel_peers: int
    max_uploads: int
    max_upload_rate: float
    log_level: LogLevel
    bootstrap_kind: str | None
    static_bootstrap_peers: tuple[tuple[str, int], ...]
    dns_bootstrap_domain: str | None
    http_bootstrap_addr: ListenAddress | None
    http_bootstrap_url: str | None
    router_secret: bytes | None
    router_secrets_accepted: tuple[bytes, ...]
    debug_web_enabled: bool


def read_router_keys(text: str) -> tuple[bytes, ...]:
    """
    The cluster keys in the files of C{--router-secret-file} (C{FILE} or C{FILE1,FILE2}).
    """
    files = flags.parse_list(text)
    if len(files) > 2:
        raise ValueError("at most two files (the key, and during a rotation the other one)")
    keys = []
    for path in files:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            raise ValueError(f"{e.strerror}: {e.filename}") from None
        if len(key) < 16:
            raise ValueError(f"the key in {path} must be at least 16 bytes")
        keys.append(key)
    return tuple(keys)


_parameter = flags.parameter


class Options(flags.CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Serve this node's containerd content as a pull-only OCI registry mirror and share it "
        "with the other nodes of the cluster."
    )

    optParameters = [
        _parameter("registry-addr", ":5000", "Address the registry listens on ([host]:port).", flags.parse_listen_address),
        _parameter("router-addr", ":5001", "UDP address of the DHT router ([host]:port).", flags.parse_listen_address),
        _parameter("metrics-addr", ":9090", "Address serving Prometheus metrics at /metrics.", flags.parse_listen_address),
        _parameter(
            "registry-listen-backlog",
            "1024",
            "Connections the kernel queues for the registry before it accepts them (Twisted's "
            "default, 50, makes a burst of pulls wait for SYN retransmits; capped by "
            "net.core.somaxconn).",
            flags.whole_number(1, 65535),
        ),
        _parameter(
            "registry-max-connections-per-client",
            "128",
            "Connections one client address may hold open to the registry at once (429 beyond); "
            "0: no bound.",
            flags.whole_number(0, 1_000_000, " (0: no bound)"),
        ),
        _parameter("containerd-sock", "/run/containerd/containerd.sock", "containerd's gRPC socket.", flags.non_empty),
        _parameter("containerd-namespace", "k8s.io", "containerd namespace whose images are served.", flags.non_empty),
        _parameter(
            "containerd-content-path",
            "/var/lib/containerd/io.containerd.content.v1.content",
            "containerd's content store, read directly when readable.",
        ),
        _parameter(
            "containerd-config-file",
            "/etc/containerd/config.toml",
            "containerd's configuration, read at start (when it exists) to check that the node "
            "can work with spegel.",
        ),
        _parameter(
            "containerd-registry-config-path",
            "/etc/containerd/certs.d",
            "Where 'spegel configuration' writes containerd's hosts.toml, for the same check.",
        ),
        _parameter("data-dir", "/var/lib/spegel", "Where the node keeps its identity; empty for none."),
        _parameter(
            "mirrored-registries",
            "",
            "Comma-separated registry URLs to serve (e.g. https://docker.io); empty: all.",
            flags.list_of(flags.parse_registry_url),
        ),
        _parameter(
            "registry-filters",
            "",
            "Comma-separated regexes on registry/repo[:tag] to refuse.",
            lambda text: flags.parse_regexes(flags.parse_list(text)),
        ),
        _parameter(
            "mirror-resolve-timeout",
            "100ms",
            "How long to look for a peer before a 404 (20 ms, the reference's, sent 11 copies of an "
            "image upstream in a 50-node rollout here; 100 ms, one).",
            flags.parse_duration,
        ),
        _parameter(
            "mirror-coalesce-timeout",
            "5s",
            "How long to wait for another node's upstream pull of a manifest rather than pull "
            "it upstream too (0s: never wait). In a staggered cold rollout here, 5s cut upstream "
            "from 9 copies of the image to 3 and mean pull time by 4-6x.",
            flags.parse_duration,
        ),
        _parameter(
            "mirror-coalesce-blob-timeout",
            "60s",
            "How long to wait for a holder of a blob named by a manifest a peer served, rather "
            "than pull it upstream (0s: never wait). The image is being pulled in the cluster, and "
            "a node says it holds a blob as soon as its containerd starts downloading it.",
            flags.parse_duration,
        ),
        _parameter(
            "mirror-blob-headers-after",
            "20s",
            "A layer of an image a peer served whose holders are all busy this long is answered with "
            "its headers now and its bytes when a holder is free (0s: never). containerd 2.4 gives "
            "a mirror 30s to send headers, then pulls the layer upstream.",
            flags.parse_duration,
        ),
        _parameter("mirror-resolve-retries", "3", "How many peers to try for one request.", flags.whole_number(1, 100)),
        _parameter(
            "mirror-parallel-min-size",
            "32Mi",
            "Blobs this large or larger are fetched in pieces from several holders at once, when "
            "more than one is found (0: always from one).",
            flags.parse_size,
        ),
        _parameter(
            "mirror-parallel-peers",
            "4",
            "At most this many holders send pieces of one blob at once (1: one holder per blob).",
            flags.whole_number(1, 64),
        ),
        _parameter(
            "max-uploads",
            "3",
            "Blob bodies served to peers at once; the next peer is told to ask another holder "
            "(429) at once. With blobs served while they download, the nodes of a rollout form "
            "a tree this wide. 0: no limit.",
            flags.whole_number(0, 10_000, " (0: no limit)"),
        ),
        _parameter(
            "max-upload-rate",
            "0",
            "Bytes per second the blob bodies served to peers may take together, e.g. 100MiB or "
            "12.5MB/s (k, M, G: powers of 1000; Ki, Mi, Gi: of 1024); the node's own containerd "
            "is not held back. 0: no cap.",
            flags.byte_rate(MIN_RATE),
        ),
        _parameter("log-level", "info", "debug, info, warn or error.", flags.Choice(LOG_LEVELS, fold_case=True)),
        _parameter(
            "bootstrap-kind",
            "",
            "How to find peers: static, dns or http.",
            flags.Choice({"": None, **{kind: kind for kind in BOOTSTRAP_KINDS}}),
        ),
        _parameter(
            "static-bootstrap-peers",
            "",
            "Comma-separated router addresses host:port.",
            flags.list_of(parse_host_port),
        ),
        _parameter("dns-bootstrap-domain", "", "Domain whose A/AAAA records are peers."),
        _parameter(
            "http-bootstrap-addr",
            "",
            "Address to serve this node's id for http bootstrap.",
            flags.optional(flags.parse_listen_address),
        ),
        _parameter(
            "http-bootstrap-url",
            "",
            "URL of a peer's http bootstrap address.",
            flags.optional(lambda text: parse_http_url(text, role="HTTP bootstrap")),
        ),
        _parameter(
            "router-secret-file",
            "",
            "File with the cluster key (at least 16 bytes) that authenticates every DHT "
            "datagram; FILE1,FILE2 during a key rotation: sign with the first, accept both.",
            read_router_keys,
        ),
        _parameter(
            "debug-web-enabled",
            "false",
            "Serve read-only debug pages at /debug/web/ on the metrics address (or =true/=false).",
            flags.parse_bool,
        ),
    ]
    booleans = frozenset({"debug-web-enabled"})
    lists = frozenset(
        {"mirrored-registries", "registry-filters", "static-bootstrap-peers", "router-secret-file"}
    )

    def parseOptions(self, options: list[str] | None = None) -> None:
        # One clear line instead of the whole usage text and a traceback.
        try:
            super().parseOptions(sys.argv[1:] if options is None else options)
        except usage.UsageError as e:
            sys.stderr.write(f"spegel: error: {e}\n")
            raise SystemExit(2) from None
        except flags.ShowText as shown:
            sys.stdout.write(shown.text + "\n")
            raise SystemExit(0) from None

    def postOptions(self) -> None:
        self.node = self._node_config()
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            # twistd takes its log observer factory as a dotted name, resolved after this.
            _log_settings["level"] = self.node.log_level
            _log_settings["logfile"] = parent.get("logfile")
            parent["logger"] = f"{__name__}.log_observer"

    def _node_config(self) -> NodeConfig:
        kind = self["bootstrap-kind"]
        # What one bootstrap kind needs of the other flags.
        for needed_by, flag in (
            ("static", "static-bootstrap-peers"),
            ("dns", "dns-bootstrap-domain"),
            ("http", "http-bootstrap-url"),
        ):
            if kind == needed_by and not self[flag]:
                raise usage.UsageError(f"--bootstrap-kind {kind} needs --{flag}")
        keys = self["router-secret-file"]
        return NodeConfig(
            registry_addr=self["registry-addr"],
            router_addr=self["router-addr"],
            metrics_addr=self["metrics-addr"],
            registry_listen_backlog=self["registry-listen-backlog"],
            registry_connections_per_client=self["registry-max-connections-per-client"],
            containerd_sock=self["containerd-sock"],
            containerd_namespace=self["containerd-namespace"],
            containerd_content_path=self["containerd-content-path"],
            containerd_config_file=self["containerd-config-file"],
            containerd_registry_config_path=self["containerd-registry-config-path"],
            data_dir=self["data-dir"] or None,
            registry_filter=RegistryFilter(
                frozenset(self["mirrored-registries"]), self["registry-filters"]
            ),
            mirror_resolve_timeout=self["mirror-resolve-timeout"],
            mirror_coalesce_timeout=self["mirror-coalesce-timeout"],
            mirror_coalesce_blob_timeout=self["mirror-coalesce-blob-timeout"],
            mirror_blob_headers_after=self["mirror-blob-headers-after"],
            mirror_resolve_retries=self["mirror-resolve-retries"],
            mirror_parallel_min_size=self["mirror-parallel-min-size"],
            mirror_parallel_peers=self["mirror-parallel-peers"],
            max_uploads=self["max-uploads"],
            max_upload_rate=self["max-upload-rate"],
            log_level=self["log-level"],
            bootstrap_kind=kind,
            static_bootstrap_peers=self["static-bootstrap-peers"],
            dns_bootstrap_domain=self["dns-bootstrap-domain"] or None,
            http_bootstrap_addr=self["http-bootstrap-addr"],
            http_bootstrap_url=self["http-bootstrap-url"],
            router_secret=keys[0] if keys else None,
            router_secrets_accepted=keys[1:],
            debug_web_enabled=self["debug-web-enabled"],
        )


# What twistd's log observer needs, set once by Options at the process boundary.
_log_settings: dict[str, Any] = {"level": LogLevel.info, "logfile": None}


def log_observer() -> ILogObserver:
    """
    The log observer twistd is told to use (C{--logger spegel.tap.log_observer}).
    """
    return make_log_observer(_log_settings["level"], _log_settings["logfile"])


def make_log_observer(level: LogLevel, logfile: str | None) -> ILogObserver:
    """
    twistd's log observer, less the events below C{--log-level}.
    """
    output: TextIO
    if logfile in (None, "", "-"):
        output = sys.stdout
    else:
        # Open for as long as the process lives: the observer writes to it until exit.
        output = open(logfile, "a", encoding="utf-8")
    return FilteringLogObserver(
        textFileLogObserver(output), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Wire a node: the containerd bridge, the DHT router, the mirror, the registry and the
    metrics endpoint (with the debug pages under it when enabled).
    """
    if reactor is None:
        from twisted.internet import reactor  # the process boundary: nothing below imports it

    from spegel.advertiser import Advertiser
    from spegel.containerd.client import ContainerdClient
    from spegel.containerd.events import EventSubscriber
    from spegel.dht.service import DHTService
    from spegel import relay
    from spegel.coalesce import PullCoalescer
    from spegel.metrics import Metrics, node_registry
    from spegel.mirror import Mirror, SpliceRelaying
    from spegel.peers import peer_client
    from spegel.preflight import PreflightService
    from spegel.httpserver import make_site
    from spegel.registry import RegistryResource
    from spegel.ingest import PartialPulls
    from spegel.store import ContainerdContent

    config: NodeConfig = options.node
    node = MultiService()
    # Made on the registry the node's /metrics serves, and handed to every part that records.
    metrics = Metrics(node_registry())

    PreflightService(
        reactor,
        config_file=config.containerd_config_file or None,
        certs_dir=config.containerd_registry_config_path,
        socket_path=config.containerd_sock,
        namespace=config.containerd_namespace,
        gauge=metrics.preflight_problems,
    ).setServiceParent(node)

    client = ContainerdClient(reactor, config.containerd_sock, config.containerd_namespace)
    client.setServiceParent(node)
    content = ContainerdContent(client, config.containerd_content_path, metrics=metrics)

    router = DHTService(reactor, router_config(config), metrics=metrics.dht)
    router.setServiceParent(node)

    # After the client and the router (it calls both as soon as it starts); the event
    # subscriber last, so it stops first.
    advertiser = Advertiser(
        reactor, client, router, config.registry_filter, namespace=config.containerd_namespace, metrics=metrics
    )
    advertiser.setServiceParent(node)
    EventSubscriber(
        reactor, client, advertiser.on_event, advertiser.on_resubscribed
    ).setServiceParent(node)

    splice = None
    if relay.available():
        hashing = relay.HashingPool(reactor)
        hashing.setServiceParent(node)
        splice = SpliceRelaying(reactor, hashing.run)
    else:
        _log.info("splice(2) or tee(2) is not available: large blobs from peers are relayed through Python")
    peers = peer_client(reactor, connect_timeout=2)
    mirror = Mirror(
        reactor,
        router,
        peers,
        resolve_timeout=config.mirror_resolve_timeout,
        retries=config.mirror_resolve_retries,
        splice=splice,
        parallel_min_size=config.mirror_parallel_min_size,
        parallel_peers=config.mirror_parallel_peers,
        blob_wait=config.mirror_coalesce_blob_timeout,
        blob_headers_after=config.mirror_blob_headers_after,
        # With a cluster key only members can announce content: no provider is a stranger.
        members_only=config.router_secret is not None,
        coalescer=(
            PullCoalescer(
                reactor, router, timeout=config.mirror_coalesce_timeout, node_id=router.node_id, metrics=metrics
            )
            if config.mirror_coalesce_timeout > 0
            else None
        ),
        metrics=metrics,
    )
    # A peer that announces content or pings us as a (re)joining node does is asked again at
    # once, not after the rest of its put-aside minute.
    router.node.on_peer_alive = mirror.put_aside.lift
    partials = None
    if config.containerd_content_path:
        partials = PartialPulls(reactor, router, config.containerd_content_path, is_held=content.holds, metrics=metrics)
        partials.setServiceParent(node)
    registry = RegistryResource(
        reactor,
        content,
        config.registry_filter,
        ready=lambda: router.ready,
        mirror=mirror,
        partials=partials,
        uploads=UploadSlots(
            config.max_uploads,
            bandwidth=TokenBucket(reactor, config.max_upload_rate, metrics=metrics) if config.max_upload_rate else None,
            metrics=metrics,
        ),
        metrics=metrics,
    )
    _listen(
        reactor, config.registry_addr, make_site(registry.resource(), reactor=reactor, connections_per_client=config.registry_connections_per_client),
        backlog=config.registry_listen_backlog,
    ).setServiceParent(node)

    metrics_root = Resource()
    metrics_root.putChild(b"metrics", MetricsResource(metrics.registry))
    if config.debug_web_enabled:
        from spegel.debugweb import DebugWeb

        # Beside the metrics, as the reference has it: away from the port containerd and the
        # peers use.
        debug = DebugWeb(
            reactor,
            router,
            mirror.put_aside,
            registry_address=(config.registry_addr.host, config.registry_addr.port),
        )
        metrics_root.putChild(b"debug", debug.resource())
    _listen(reactor, config.metrics_addr, Site(metrics_root)).setServiceParent(node)
    return node


def router_config(config: NodeConfig) -> Any:
    """
    The DHT's configuration from the node's.
    """
    from spegel.dht.config import RouterConfig

    return RouterConfig(
        listen_host=config.router_addr.host,
        listen_port=config.router_addr.port,
        registry_port=config.registry_addr.port,
        data_dir=config.data_dir,
        secret=config.router_secret,
        also_accepted=config.router_secrets_accepted,
        bootstrap_kind=config.bootstrap_kind,
        static_peers=config.static_bootstrap_peers,
        dns_domain=config.dns_bootstrap_domain,
        http_bootstrap_addr=(
            config.http_bootstrap_addr.endpoint_description() if config.http_bootstrap_addr else None
        ),
        http_bootstrap_url=config.http_bootstrap_url,
    )


def _listen(reactor: Any, address: ListenAddress, site: Site, backlog: int | None = None) -> IService:
    endpoint = serverFromString(reactor, address.endpoint_description(backlog=backlog))
    service = StreamServerEndpointService(endpoint, site)
    # A port that cannot be bound stops the process instead of leaving a node that serves nothing.
    service._raiseSynchronously = True
    return service
