# -*- test-case-name: tests.unit.test_dht_service -*-
"""
The DHT's configuration, built by the node wiring from the command line.
"""

from __future__ import annotations

from attrs import field, frozen, validators
from twisted.internet.interfaces import IResolver

Address = tuple[str, int]

BOOTSTRAP_KINDS = ("static", "dns", "http")


def _positive(instance: object, attribute: object, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")  # type: ignore[attr-defined]


def _port(instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a port number, got {value!r}")  # type: ignore[attr-defined]


@frozen
class RouterConfig:
    """
    Everything a L{spegel.dht.service.DHTService} needs.

    @ivar listen_host: IP the router's UDP socket binds to (C{""} or C{"0.0.0.0"}: all).
    @ivar listen_port: UDP port of the router (0: any, for tests).
    @ivar registry_port: the TCP port this node's registry serves on; advertised in provider
        records so peers need not share one port.
    @ivar data_dir: where the node id is persisted, or L{None} for a fresh id every start.
    @ivar secret: cluster key; when set every datagram carries an HMAC made with it.
    @ivar also_accepted: further keys whose HMAC is accepted (not used to sign): the old or the
        new key during a rotation.
    @ivar advertise_host: IP served by the HTTP bootstrap server as this node's address;
        defaults to C{listen_host}.
    @ivar provider_ttl: how long a stored provider record stays valid (seconds).
    @ivar republish_interval: how often this node re-announces the keys it provides.
    @ivar announce_delay: how long newly provided keys wait to be announced in one batch.
    @ivar rpc_timeout: how long a request waits for its reply.
    @ivar refresh_interval: a k-bucket untouched for this long is refreshed by a lookup.
    @ivar provider_cache_ttl: how long found providers are cached by C{find_providers}.
    @ivar beta: a provider lookup that found providers ends once this many of the closest
        nodes it has seen have answered (go-libp2p-kad-dht's "resiliency").
    @ivar max_failures: consecutive unanswered requests after which a contact is dropped.
    @ivar announce_window: ADD_PROVIDER requests in flight at once during an announcement.
    """

    listen_host: str = ""
    listen_port: int = field(default=5001, validator=_port)
    registry_port: int = field(default=5000, validator=_port)
    data_dir: str | None = None
    secret: bytes | None = None
    also_accepted: tuple[bytes, ...] = ()
    bootstrap_kind: str | None = field(
        default=None, validator=validators.optional(validators.in_(BOOTSTRAP_KINDS))
    )
    static_peers: tuple[Address, ...] = ()
    dns_domain: str | None = None
    dns_resolver: IResolver | None = None
    http_bootstrap_addr: str | None = None
    http_bootstrap_url: str | None = None
    advertise_host: str | None = None
    k: int = field(default=20, validator=_positive)
    alpha: int = field(default=3, validator=_positive)
    beta: int = field(default=3, validator=_positive)
    provider_ttl: float = field(default=19 * 60.0, validator=_positive)
    republish_interval: float = field(default=15 * 60.0, validator=_positive)
    announce_delay: float = field(default=0.05, validator=_positive)
    rpc_timeout: float = field(default=0.5, validator=_positive)
    refresh_interval: float = field(default=15 * 60.0, validator=_positive)
    expiry_sweep_interval: float = field(default=60.0, validator=_positive)
    provider_cache_ttl: float = field(default=5.0, validator=_positive)
    max_failures: int = field(default=2, validator=_positive)
    announce_window: int = field(default=16, validator=_positive)
    bootstrap_min_backoff: float = field(default=0.5, validator=_positive)
    bootstrap_max_backoff: float = field(default=30.0, validator=_positive)
    bootstrap_rejoin_interval: float = field(default=300.0, validator=_positive)
    # Nodes that start together (a DaemonSet rollout) join a cluster that is still forming; one
    # full bucket refresh this long after the first successful join meets the ones that came later.
    settle_refresh_delay: float = field(default=30.0, validator=_positive)
