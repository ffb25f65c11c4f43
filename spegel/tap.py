# -*- test-case-name: tests.test_tap -*-
"""
The spegel node as a twistd application: C{twistd -n spegel [options]}.

L{Options} validates every flag into a L{NodeConfig}; L{makeService} only wires services.
"""

from __future__ import annotations

import itertools
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
from spegel.dht.bootstrap import parse_host_port
from spegel.flags import ListenAddress
from spegel.registry import RegistryFilter

_log = Logger()

LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
}
BOOTSTRAP_KINDS = ("static", "dns", "http")
# Boolean flags the reference also takes as --flag=true or --flag=false, the form its manifests
# and charts write; usage.Options alone knows only the bare --flag.
BOOLEAN_FLAGS = frozenset({"debug-web-enabled"})


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
    mirror_resolve_retries: int
    log_level: LogLevel
    bootstrap_kind: str | None
    static_bootstrap_peers: tuple[tuple[str, int], ...]
    dns_bootstrap_domain: str | None
    http_bootstrap_addr: ListenAddress | None
    http_bootstrap_url: str | None
    router_secret: bytes | None
    router_secrets_accepted: tuple[bytes, ...]
    debug_web_enabled: bool


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve this node's containerd content as a pull-only OCI registry mirror and share it "
        "with the other nodes of the cluster."
    )

    optParameters = [
        ["registry-addr", None, ":5000", "Address the registry listens on ([host]:port)."],
        ["router-addr", None, ":5001", "UDP address of the DHT router ([host]:port)."],
        ["metrics-addr", None, ":9090", "Address serving Prometheus metrics at /metrics."],
        [
            "registry-listen-backlog",
            None,
            "1024",
            "Connections the kernel queues for the registry before it accepts them (Twisted's "
            "default, 50, makes a burst of pulls wait for SYN retransmits; capped by "
            "net.core.somaxconn).",
        ],
        [
            "registry-max-connections-per-client",
            None,
            "128",
            "Connections one client address may hold open to the registry at once (429 beyond); "
            "0: no bound.",
        ],
        ["containerd-sock", None, "/run/containerd/containerd.sock", "containerd's gRPC socket."],
        ["containerd-namespace", None, "k8s.io", "containerd namespace whose images are served."],
        [
            "containerd-content-path",
            None,
            "/var/lib/containerd/io.containerd.content.v1.content",
            "containerd's content store, read directly when readable.",
        ],
        [
            "containerd-config-file",
            None,
            "/etc/containerd/config.toml",
            "containerd's configuration, read at start (when it exists) to check that the node "
            "can work with spegel.",
        ],
        [
            "containerd-registry-config-path",
            None,
            "/etc/containerd/certs.d",
            "Where 'spegel configuration' writes containerd's hosts.toml, for the same check.",
        ],
        ["data-dir", None, "/var/lib/spegel", "Where the node keeps its identity; empty for none."],
        [
            "mirrored-registries",
            None,
            "",
            "Comma-separated registry URLs to serve (e.g. https://docker.io); empty: all.",
        ],
        ["registry-filters", None, "", "Comma-separated regexes on registry/repo[:tag] to refuse."],
        [
            "mirror-resolve-timeout",
            None,
            "100ms",
            "How long to look for a peer before a 404 (20 ms, the reference's, sent 11 copies of an "
            "image upstream in a 50-node rollout here; 100 ms, one).",
        ],
        [
            "mirror-coalesce-timeout",
            None,
            "0s",
            "How long to wait for another node's upstream pull of a manifest rather than pull "
            "it upstream too (0s: never wait).",
        ],
        ["mirror-resolve-retries", None, "3", "How many peers to try for one request."],
        ["log-level", None, "info", "debug, info, warn or error."],
        ["bootstrap-kind", None, "", "How to find peers: static, dns or http."],
        ["static-bootstrap-peers", None, "", "Comma-separated router addresses host:port."],
        ["dns-bootstrap-domain", None, "", "Domain whose A/AAAA records are peers."],
        ["http-bootstrap-addr", None, "", "Address to serve this node's id for http bootstrap."],
        ["http-bootstrap-url", None, "", "URL of a peer's http bootstrap address."],
        [
            "router-secret-file",
            None,
            "",
            "File with the cluster key (at least 16 bytes) that authenticates every DHT "
            "datagram; FILE1,FILE2 during a key rotation: sign with the first, accept both.",
        ],
    ]
    optFlags = [
        [
            "debug-web-enabled",
            None,
            "Serve read-only debug pages at /debug/web/ on the metrics address (or =true/=false).",
        ],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        # One clear line instead of the whole usage text and a traceback.
        try:
            super().parseOptions(self._boolean_flags(sys.argv[1:] if options is None else options))
        except usage.UsageError as e:
            sys.stderr.write(f"spegel: error: {e}\n")
            raise SystemExit(2)

    def _boolean_flags(self, argv: list[str]) -> list[str]:
        """
        C{argv} with the L{BOOLEAN_FLAGS} written bare, for getopt: C{--flag=false} dropped,
        C{--flag=true} as C{--flag}; the last mention of a flag wins, as with the reference.
        """
        takes_value = {parameter[0] for parameter in self.optParameters}
        enabled: dict[str, bool] = {}
        rest: list[str] = []
        args = iter(argv)
        for arg in args:
            if arg == "--":
                rest.append(arg)
                rest.extend(args)
                break
            name, sep, value = arg.partition("=")
            flag = name[2:] if name.startswith("--") else ""
            if flag in BOOLEAN_FLAGS:
                try:
                    enabled[flag] = flags.parse_bool(value) if sep else True
                except ValueError as e:
                    raise usage.UsageError(f"--{flag}: {e}") from None
                continue
            rest.append(arg)
            if flag in takes_value and not sep:
                # "--data-dir --debug-web-enabled=x" names a directory: leave the value alone.
                rest.extend(itertools.islice(args, 1))
        return [f"--{flag}" for flag, on in enabled.items() if on] + rest

    def postOptions(self) -> None:
        try:
            self.node = self._node_config()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            # twistd takes its log observer factory as a dotted name, resolved after this.
            _log_settings["level"] = self.node.log_level
            _log_settings["logfile"] = parent.get("logfile")
            parent["logger"] = f"{__name__}.log_observer"

    def _node_config(self) -> NodeConfig:
        def address(flag: str) -> ListenAddress:
            try:
                return flags.parse_listen_address(self[flag])
            except ValueError as e:
                raise ValueError(f"--{flag}: {e}") from None

        try:
            registries = frozenset(
                flags.parse_registry_url(url) for url in flags.parse_list(self["mirrored-registries"])
            )
        except ValueError as e:
            raise ValueError(f"--mirrored-registries: {e}") from None
        try:
            patterns = flags.parse_regexes(flags.parse_list(self["registry-filters"]))
        except ValueError as e:
            raise ValueError(f"--registry-filters: {e}") from None
        try:
            timeout = flags.parse_duration(self["mirror-resolve-timeout"])
        except ValueError as e:
            raise ValueError(f"--mirror-resolve-timeout: {e}") from None
        try:
            coalesce_timeout = flags.parse_duration(self["mirror-coalesce-timeout"])
        except ValueError as e:
            raise ValueError(f"--mirror-coalesce-timeout: {e}") from None
        backlog_text = self["registry-listen-backlog"]
        if not backlog_text.isdigit() or not 1 <= int(backlog_text) <= 65535:
            raise ValueError("--registry-listen-backlog: must be a whole number from 1 to 65535")
        per_client_text = self["registry-max-connections-per-client"]
        if not per_client_text.isdigit() or int(per_client_text) > 1_000_000:
            raise ValueError("--registry-max-connections-per-client: must be a whole number (0: no bound)")
        retries_text = self["mirror-resolve-retries"]
        if not retries_text.isdigit() or not 1 <= int(retries_text) <= 100:
            raise ValueError("--mirror-resolve-retries: must be a whole number from 1 to 100")
        level = LOG_LEVELS.get(self["log-level"].lower())
        if level is None:
            raise ValueError("--log-level: must be one of debug, info, warn, error")
        kind = self["bootstrap-kind"] or None
        if kind is not None and kind not in BOOTSTRAP_KINDS:
            raise ValueError("--bootstrap-kind: must be one of static, dns, http")
        try:
            peers = tuple(
                parse_host_port(peer) for peer in flags.parse_list(self["static-bootstrap-peers"])
            )
        except ValueError as e:
            raise ValueError(f"--static-bootstrap-peers: {e}") from None
        if kind == "static" and not peers:
            raise ValueError("--bootstrap-kind static needs --static-bootstrap-peers")
        if kind == "dns" and not self["dns-bootstrap-domain"]:
            raise ValueError("--bootstrap-kind dns needs --dns-bootstrap-domain")
        if kind == "http" and not self["http-bootstrap-url"]:
            raise ValueError("--bootstrap-kind http needs --http-bootstrap-url")
        for flag in ("containerd-sock", "containerd-namespace"):
            if not self[flag]:
                raise ValueError(f"--{flag} must not be empty")
        keys = []
        files = flags.parse_list(self["router-secret-file"])
        if len(files) > 2:
            raise ValueError("--router-secret-file: at most two files (the key, and during a rotation the other one)")
        for path in files:
            try:
                with open(path, "rb") as f:
                    key = f.read().strip()
            except OSError as e:
                raise ValueError(f"--router-secret-file: {e.strerror}: {e.filename}") from None
            if len(key) < 16:
                raise ValueError(f"--router-secret-file: the key in {path} must be at least 16 bytes")
            keys.append(key)
        secret = keys[0] if keys else None
        return NodeConfig(
            registry_addr=address("registry-addr"),
            router_addr=address("router-addr"),
            metrics_addr=address("metrics-addr"),
            registry_listen_backlog=int(backlog_text),
            registry_connections_per_client=int(per_client_text),
            containerd_sock=self["containerd-sock"],
            containerd_namespace=self["containerd-namespace"],
            containerd_content_path=self["containerd-content-path"],
            containerd_config_file=self["containerd-config-file"],
            containerd_registry_config_path=self["containerd-registry-config-path"],
            data_dir=self["data-dir"] or None,
            registry_filter=RegistryFilter(registries, patterns),
            mirror_resolve_timeout=timeout,
            mirror_coalesce_timeout=coalesce_timeout,
            mirror_resolve_retries=int(retries_text),
            log_level=level,
            bootstrap_kind=kind,
            static_bootstrap_peers=peers,
            dns_bootstrap_domain=self["dns-bootstrap-domain"] or None,
            http_bootstrap_addr=address("http-bootstrap-addr") if self["http-bootstrap-addr"] else None,
            http_bootstrap_url=self["http-bootstrap-url"] or None,
            router_secret=secret,
            router_secrets_accepted=tuple(keys[1:]),
            debug_web_enabled=bool(self["debug-web-enabled"]),
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
        output = open(logfile, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
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
    from spegel.mirror import Mirror, SpliceRelaying
    from spegel.peers import peer_client
    from spegel.preflight import PreflightService
    from spegel.registry import RegistryResource, make_site
    from spegel.store import ContainerdContent

    config: NodeConfig = options.node
    node = MultiService()

    PreflightService(
        reactor,
        config_file=config.containerd_config_file or None,
        certs_dir=config.containerd_registry_config_path,
        socket_path=config.containerd_sock,
        namespace=config.containerd_namespace,
    ).setServiceParent(node)

    client = ContainerdClient(reactor, config.containerd_sock, config.containerd_namespace)
    client.setServiceParent(node)
    content = ContainerdContent(client, config.containerd_content_path)

    router = DHTService(reactor, router_config(config))
    router.setServiceParent(node)

    # After the client and the router (it calls both as soon as it starts); the event
    # subscriber last, so it stops first.
    advertiser = Advertiser(
        reactor, client, router, config.registry_filter, namespace=config.containerd_namespace
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
        coalescer=(
            PullCoalescer(reactor, router, timeout=config.mirror_coalesce_timeout)
            if config.mirror_coalesce_timeout > 0
            else None
        ),
    )
    # A peer that announces content or pings us as a (re)joining node does is asked again at
    # once, not after the rest of its put-aside minute.
    router.node.on_peer_alive = mirror.put_aside.lift
    registry = RegistryResource(
        reactor, content, config.registry_filter, ready=lambda: router.ready, mirror=mirror
    )
    _listen(
        reactor, config.registry_addr, make_site(registry.resource(), reactor=reactor, connections_per_client=config.registry_connections_per_client),
        backlog=config.registry_listen_backlog,
    ).setServiceParent(node)

    metrics_root = Resource()
    metrics_root.putChild(b"metrics", MetricsResource())
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
