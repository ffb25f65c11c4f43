# -*- test-case-name: tests.unit.test_dht_service -*-
"""
The DHT as a Twisted service: what the rest of spegel uses.

L{DHTService} listens on the router's UDP port, keeps the node joined through
L{spegel.dht.bootstrap.Bootstrapping}, optionally serves the HTTP bootstrap document, runs
the upkeep loops (bucket refresh, provider record expiry, re-announcement) and offers
C{provide}/C{withdraw}/C{find_providers} on string keys.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from spegel.dht import bootstrap
from spegel.dht.config import RouterConfig
from spegel.dht.finder import ProviderFinder
from spegel.dht.ids import Provider, key_id, load_or_create_node_id
from spegel.dht.metrics import DHTMetrics
from spegel.dht.node import AnnounceResult, KademliaNode
from spegel.interfaces import ICoalescingRouter, IDebugRouter

Address = tuple[str, int]
MAX_CACHED_LOOKUPS = 10_000
# A cached lookup answer older than this is still served, and refreshed in the background: in a
# rollout new holders appear every second, and the mirror should spread over them (see
# spegel.dht.finder).
PROVIDER_CACHE_REFRESH = 1.0


MAX_UDP_BYTES_PER_TURN = 16 * 1024


class _UDPListener(Service):
    """
    Binds the node's protocol to the router port while running.
    """

    def __init__(self, reactor: Any, config: RouterConfig, node: KademliaNode) -> None:
        self.reactor = reactor
        self.config = config
        self.node = node
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        # Bind errors propagate: a node that cannot listen must not pretend to run.
        self.port = self.reactor.listenUDP(
            self.config.listen_port,
            self.node.protocol,
            interface=self.config.listen_host,
            maxPacketSize=2048,
        )
        # Twisted reads up to 256 KiB of datagrams per reactor turn: in a flood that is ~600
        # datagrams handled back to back, a 200 ms stall of everything else on the reactor (the
        # registry included).  16 KiB keeps a turn to a few milliseconds; the kernel's socket
        # buffer holds the rest, and drops what it cannot, which is what a flood deserves.
        if hasattr(self.port, "maxThroughput"):
            self.port.maxThroughput = MAX_UDP_BYTES_PER_TURN
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _logged(log: Logger, what: str) -> Callable[[Failure], None]:
    def errback(failure: Failure) -> None:
        log.failure("DHT {what} failed", failure, what=what)

    return errback


@implementer(ICoalescingRouter, IDebugRouter)
class DHTService(MultiService):
    """
    @ivar node_id: this node's 256-bit id (persisted in C{config.data_dir} when set).
    @ivar node: the L{KademliaNode} (tests and benchmarks reach in).
    @ivar metrics: where the node's figures are recorded (a given C{node} must record there too).
    @ivar bootstrapping: the join service, or L{None} without a bootstrap kind.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, config: RouterConfig, *, metrics: DHTMetrics, node: KademliaNode | None = None
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        if node is None:
            node = KademliaNode(load_or_create_node_id(config.data_dir), reactor, config, metrics=metrics)
        elif node.metrics is not metrics:
            raise ValueError("the node must record on the service's metrics")
        self.node = node
        self.node_id = node.node_id
        self._listener = _UDPListener(reactor, config, node)
        self._listener.setServiceParent(self)
        self._provided: dict[bytes, str] = {}
        node.provided = self._provided.keys
        node.provides = self._provided.__contains__
        self._unannounced: set[bytes] = set()
        self._announce_call: IDelayedCall | None = None
        self._settle_call: IDelayedCall | None = None
        self._announcing: Deferred[AnnounceResult] | None = None
        self._finder = ProviderFinder(
            reactor,
            lambda key, limit, on_provider: node.find_providers(key_id(key), limit=limit, on_provider=on_provider),
            ttl=config.provider_cache_ttl,
            refresh_after=PROVIDER_CACHE_REFRESH,
            max_cached=MAX_CACHED_LOOKUPS,
        )
        self._loops: list[LoopingCall] = []
        self.bootstrapping: bootstrap.Bootstrapping | None = None
        bootstrapper = bootstrap.bootstrapper_from_config(reactor, config)
        if bootstrapper is not None:
            self.bootstrapping = bootstrap.Bootstrapping(
                reactor,
                bootstrapper,
                self.join,
                min_backoff=config.bootstrap_min_backoff,
                max_backoff=config.bootstrap_max_backoff,
                rejoin_interval=config.bootstrap_rejoin_interval,
            )
            self.bootstrapping.setServiceParent(self)
        if config.http_bootstrap_addr:
            bootstrap.HTTPBootstrapServer(
                reactor, config.http_bootstrap_addr, self.bootstrap_info
            ).setServiceParent(self)

    # -- lifecycle ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # listens first: joining needs the socket
        keys = 0 if self.config.secret is None else 1 + len(self.config.also_accepted)
        self.metrics.cluster_keys.set(keys)
        if not keys:
            self.log.warn(
                "No cluster key (--router-secret-file): any pod on the network can send this "
                "node DHT datagrams, and forge or hide providers; give every node the same key"
            )
        for interval, work in (
            (self.config.refresh_interval / 4, self._refresh),
            (self.config.expiry_sweep_interval, self._sweep),
            (self.config.republish_interval, self._republish),
        ):
            loop = LoopingCall(work)
            loop.clock = self.reactor
            loop.start(interval, now=False).addErrback(_logged(self.log, "upkeep loop"))
            self._loops.append(loop)
        if self._unannounced:
            self._schedule_announce()

    def stopService(self) -> Deferred[None]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
        self._announce_call = None
        if self._announcing is not None:
            self._announcing.cancel()
        if self._settle_call is not None and self._settle_call.active():
            self._settle_call.cancel()
        self._settle_call = None
        self._finder.stop()
        return super().stopService()

    @property
    def address(self) -> Address:
        """
        The router's bound (host, port); only while running.
        """
        if self._listener.port is None:
            raise RuntimeError("the DHT service is not listening")
        # An IPv4Address or IPv6Address; the DHT simulator's port gives its (host, port) tuple.
        host: Any = self._listener.port.getHost()
        return (host.host, host.port) if hasattr(host, "host") else (host[0], host[1])

    @property
    def ready(self) -> bool:
        """
        Part of the cluster: joined (a single-node cluster counts), or no bootstrap configured.
        """
        if self.bootstrapping is None:
            return bool(self.running)
        return self.bootstrapping.joined

    def bootstrap_info(self) -> bootstrap.BootstrapInfo:
        host, port = self.address
        advertised = self.config.advertise_host or host or "0.0.0.0"
        return bootstrap.BootstrapInfo(node_id=self.node_id, host=advertised, port=port)

    def join(self, addresses: list[Address]) -> Deferred[bootstrap.JoinResult]:
        was_alone = len(self.node.routing) == 0

        def joined(outcome: Any) -> bootstrap.JoinResult:
            if was_alone and outcome.peers_found and self._provided:
                # Keys provided before anyone was reachable went nowhere: announce them now.
                self._unannounced.update(self._provided)
                self._schedule_announce()
            if outcome.peers_found and self._settle_call is None and self.running:
                self._settle_call = self.reactor.callLater(
                    self.config.settle_refresh_delay, self._settle_refresh
                )
            return bootstrap.JoinResult(outcome.peers_found, outcome.only_self)

        return self.node.join(addresses).addCallback(joined)

    # -- upkeep ---------------------------------------------------------------------------

    def _refresh(self) -> Deferred[None]:
        return self.node.refresh().addErrback(_logged(self.log, "bucket refresh"))

    def _settle_refresh(self) -> Deferred[None]:
        return self.node.refresh(0).addErrback(_logged(self.log, "settling bucket refresh"))

    def _sweep(self) -> None:
        try:
            self.node.store.expire()
            self._finder.expire()
            if len(self.node.routing) == 0 and self.bootstrapping is not None:
                self.bootstrapping.bootstrap_now()
        except Exception:
            self.log.failure("DHT expiry sweep failed")

    def _republish(self) -> None:
        self._unannounced.update(self._provided)
        self._schedule_announce(0)

    # -- providing ------------------------------------------------------------------------

    def provide(self, keys: Iterable[str]) -> None:
        """
        Announce C{keys} (soon, batched with other new keys) and keep re-announcing them
        every C{republish_interval} until withdrawn.
        """
        added = 0
        for key in keys:
            kid = key_id(key)
            if kid not in self._provided:
                self._provided[kid] = key
                self._unannounced.add(kid)
                added += 1
        self.metrics.provided_keys.set(len(self._provided))
        if added:
            self._schedule_announce()

    def withdraw(self, keys: Iterable[str]) -> None:
        """
        Stop announcing C{keys}; records already stored elsewhere lapse within their TTL.
        """
        for key in keys:
            kid = key_id(key)
            self._provided.pop(kid, None)
            self._unannounced.discard(kid)
        self.metrics.provided_keys.set(len(self._provided))

    def provided_keys_count(self) -> int:
        return len(self._provided)

    def _schedule_announce(self, delay: float | None = None) -> None:
        if not self.running or self._announce_call is not None:
            return
        self._announce_call = self.reactor.callLater(
            self.config.announce_delay if delay is None else delay, self._announce
        )

    def _announce(self) -> None:
        self._announce_call = None
        if self._announcing is not None:
            # One announcement at a time; the keys wait for the next one.
            return
        keys, self._unannounced = self._unannounced, set()
        keys &= self._provided.keys()
        if not keys:
            return
        d = self._announcing = self.node.announce(keys)

        def done(result: object) -> object:
            self._announcing = None
            if self._unannounced:
                self._schedule_announce()
            return result

        d.addBoth(done)
        d.addCallback(self._announced)
        d.addErrback(lambda f: f.trap(CancelledError))
        d.addErrback(_logged(self.log, "announcement"))
        if d.called:
            # An announcement that finished at once (nobody to tell) must not block the next.
            self._announcing = None

    def _announced(self, result: AnnounceResult) -> None:
        self.log.debug(
            "Announced {keys} keys: {lookups} lookups, {messages} messages, {acked} acknowledged",
            keys=result.keys,
            lookups=result.lookups,
            messages=result.messages,
            acked=result.acknowledged,
        )

    # -- finding --------------------------------------------------------------------------

    def find_providers(
        self,
        key: str,
        *,
        on_provider: Callable[[Provider], None] | None = None,
        limit: int = 20,
        use_cache: bool = True,
    ) -> Deferred[list[Provider]]:
        """
        Providers of C{key} other than this node.  C{on_provider} is called as each is found;
        the result fires when the lookup ends; cancelling it stops waiting (and the lookup, once
        nobody else waits for it).  Callers asking for a key while it is being looked up share
        that lookup.  Non-empty results are cached for C{provider_cache_ttl} seconds, refreshed
        in the background once a second old (L{spegel.dht.finder}); C{use_cache=False} asks the
        cluster afresh (for a caller that found every cached provider unusable).
        """
        return self._finder.find(key, on_provider=on_provider, limit=limit, use_cache=use_cache)

    def clear_provider_cache(self) -> None:
        """Forget cached lookup answers (benchmarks measure lookups, not the cache)."""
        self._finder.clear()

