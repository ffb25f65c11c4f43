# -*- test-case-name: tests.unit.test_dht_node -*-
"""
A Kademlia node: the routing table, the provider store and the protocol, tied together.

L{KademliaNode} answers the four requests (PING, FIND_NODE, ADD_PROVIDER, GET_PROVIDERS),
keeps its routing table fresh from every message it accepts (pinging the oldest contact of a
full bucket before letting a newcomer in), and runs the iterative lookups, the join used by
bootstrapping, bucket refresh and the announcement of the keys it provides.

Announcing many keys cheaply
============================
Announcing each key with its own lookup plus k ADD_PROVIDER messages costs dozens of
datagrams per key.  Instead, L{KademliaNode.announce} works on the whole sorted key set:

 1. From the distance to our k-th closest contact it estimates the network size C{n}, and
    cuts the id space into C{2**b} regions by the keys' first C{b} bits, with C{b} chosen so
    a region holds about k nodes or fewer (C{b = ceil(log2(n / k))}).  In the XOR metric the
    k closest nodes of any key in a region are the region's nodes, topped up from its
    nearest neighbours.
 2. It runs one node lookup per region that holds keys (not per key), which finds those
    nodes; every node that answers also lands in the routing table.
 3. For each key it picks the k closest of the nodes now known, groups keys by destination,
    and sends each destination its keys, up to L{wire.KEYS_PER_MESSAGE} per datagram, with a
    bounded window of requests in flight.

The cost is a fixed number of lookups plus about C{k / KEYS_PER_MESSAGE} datagrams per key.
"""

from __future__ import annotations

import math
import random
import secrets
from collections import defaultdict
from typing import Callable, Collection, Iterable

from attrs import frozen
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    gatherResults,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.dht import wire
from spegel.dht.config import RouterConfig
from spegel.dht.ids import ID_BITS, Contact, Provider, random_id_in_bucket
from spegel.dht.lookup import IterativeLookup, LookupResult
from spegel.dht.metrics import DHTMetrics
from spegel.dht.protocol import Address, DHTError, DHTProtocol
from spegel.dht.providers import ProviderStore
from spegel.dht.routing import RoutingTable
from spegel.dht.wire import Message

KEYS_PER_MESSAGE = 32
# The host of a provider record that names its sender: the asker knows where it reached it.
UNSPECIFIED_HOST = "0.0.0.0"
MAX_REGION_BITS = 12
PROVIDERS_PER_REPLY = 20


def _resolve_self_records(providers: Iterable[Provider], sender_id: bytes, sender_host: str) -> list[Provider]:
    """
    A reply's providers, with the replying node's record of itself given the address it
    answered from; any other record with an unspecified address is dropped.
    """
    resolved = []
    for provider in providers:
        if provider.host == UNSPECIFIED_HOST:
            if provider.node_id != sender_id:
                continue
            resolved.append(Provider(provider.node_id, sender_host, provider.registry_port))
        else:
            resolved.append(provider)
    return resolved


@frozen
class JoinOutcome:
    """
    @ivar peers_found: routing table size after the join.
    @ivar only_self: some address answered, and every one that did was this very node.
    """

    peers_found: int
    only_self: bool


@frozen
class AnnounceResult:
    """
    @ivar keys: keys announced.
    @ivar lookups: region lookups run.
    @ivar messages: ADD_PROVIDER datagrams sent.
    @ivar acknowledged: ADD_PROVIDER datagrams acknowledged.
    @ivar replicas: (key, node) records sent.
    """

    keys: int
    lookups: int
    messages: int
    acknowledged: int
    replicas: int


class KademliaNode:
    log = Logger()

    def __init__(
        self,
        node_id: bytes,
        clock: IReactorTime,
        config: RouterConfig,
        *,
        metrics: DHTMetrics,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.clock = clock
        self.config = config
        self.k = config.k
        self.alpha = config.alpha
        self.randbytes = randbytes
        self.routing = RoutingTable(
            node_id,
            config.k,
            clock.seconds,
            max_failures=config.max_failures,
            on_size_change=metrics.routing_table_contacts.inc,
        )
        # Ids whose old address is being pinged because a datagram came from a new one.
        self._moving: set[bytes] = set()
        # Told when a node shows it is (back) up: it announced content (host and registry
        # port) or pinged us, as a node does when it (re)joins (host only).  The mirror lifts
        # its put-aside of that peer.
        self.on_peer_alive: Callable[[str, int | None], None] = lambda host, registry_port: None
        # The key ids this node provides itself (the service's): it answers GET_PROVIDERS for
        # them with itself, and hands them to nodes that join close to them.
        self.provided: Callable[[], Collection[bytes]] = lambda: ()
        self.provides: Callable[[bytes], bool] = lambda key: False
        self.store = ProviderStore(
            clock.seconds,
            config.provider_ttl,
            on_change=metrics.provider_records.inc,
            random=rng or random.Random(),
        )
        self.protocol = DHTProtocol(
            node_id,
            clock,
            self,
            metrics=metrics,
            secret=config.secret,
            also_accepted=config.also_accepted,
            timeout=config.rpc_timeout,
            randbytes=randbytes,
        )

    # -- MessageHandler -------------------------------------------------------------------

    def message_received(self, message: Message, address: Address) -> None:
        contact = Contact(message.sender_id, address[0], address[1])
        known = self.routing.get(message.sender_id)
        if known is not None and known.address != address:
            # A known id from a new address: a restarted pod that kept its id, or anyone who
            # copied the id.  As Kademlia prescribes, the contact we have stays unless its
            # address fails to answer (with that id); only then does the new one take its place.
            self._check_moved(known, contact)
            return
        oldest = self.routing.observe(contact)
        if oldest is not None:
            self._check_oldest(oldest)

    def _check_moved(self, known: Contact, moved: Contact) -> None:
        if known.node_id in self._moving:
            return
        self._moving.add(known.node_id)
        d = self.protocol.request(known.address, wire.Ping())

        def answered(reply: Message) -> None:
            if reply.sender_id != known.node_id:
                gone(None)

        def gone(failure: Failure | None) -> None:
            if failure is not None:
                failure.trap(DHTError)
            if self.routing.get(known.node_id) != known:
                return
            self.log.info(
                "Node {node} moved from {old} to {new}",
                node=known.node_id.hex()[:16],
                old=known.host,
                new=moved.host,
            )
            self.routing.evict(known.node_id)
            self.store.remove_provider(known.node_id, known.host)
            oldest = self.routing.observe(moved)
            if oldest is not None:
                self._check_oldest(oldest)

        d.addCallbacks(answered, gone)
        d.addBoth(lambda _: self._moving.discard(known.node_id))

    def _check_oldest(self, oldest: Contact) -> None:
        # A reply refreshes it through message_received; silence evicts it.
        d = self.protocol.request(oldest.address, wire.Ping())

        def silent(failure: Failure) -> None:
            failure.trap(DHTError)
            self.routing.evict(oldest.node_id)

        d.addErrback(silent)

    def handle_request(self, message: Message, address: Address) -> wire.Body:
        body = message.body
        if isinstance(body, wire.Ping):
            self._peer_alive(address[0], None)
            return wire.Pong()
        if isinstance(body, wire.FindNode):
            return wire.Nodes(self._closest_for(body.target, message.sender_id))
        if isinstance(body, wire.AddProvider):
            provider = Provider(message.sender_id, address[0], body.registry_port)
            stored = sum(1 for key in body.keys if self.store.add(key, provider))
            self._peer_alive(address[0], body.registry_port)
            return wire.AddProviderAck(stored)
        if isinstance(body, wire.GetProviders):
            providers = tuple(self.store.get(body.key, PROVIDERS_PER_REPLY))
            if self.provides(body.key):
                # A holder answers with itself: its content must not depend on the store of
                # some other node (which may have died since the last announcement).  Its
                # address is the one the asker reached it at (UNSPECIFIED_HOST, see take()).
                itself = Provider(self.node_id, UNSPECIFIED_HOST, self.config.registry_port)
                providers = (itself, *(p for p in providers if p.node_id != self.node_id))[:PROVIDERS_PER_REPLY]
            return wire.Providers(providers, self._closest_for(body.key, message.sender_id))
        raise TypeError(f"not a request: {body!r}")

    def address_verified(self, address: Address, sender_id: bytes) -> None:
        """
        C{address} answered a request of ours for the first time (the protocol's hook): a node
        that just joined, or just became reachable.  Kademlia's join rule, as a provider can
        follow it when only providers may announce themselves: hand it the keys we provide
        for which it is now among the closest nodes, so no key depends on nodes that knew it
        before (they may be gone) until the next republish.
        """
        contact = self.routing.get(sender_id)
        if contact is None or contact.address != address:
            return
        keys = self._keys_near(sender_id)
        for start in range(0, len(keys), KEYS_PER_MESSAGE):
            request = wire.AddProvider(self.config.registry_port, tuple(keys[start : start + KEYS_PER_MESSAGE]))
            self._add_provider(contact, request).addErrback(lambda failure: failure.trap(DHTError))

    def _keys_near(self, node_id: bytes) -> list[bytes]:
        """
        Our provided keys whose k closest nodes likely include C{node_id}: those in its region
        of the id space (see the module docstring), and for a small network (one region) all.
        """
        provided = self.provided()
        if not provided:
            return []
        bits = self.region_bits()
        if bits == 0:
            return sorted(provided)
        shift = ID_BITS - bits
        region = int.from_bytes(node_id, "big") >> shift
        return sorted(key for key in provided if int.from_bytes(key, "big") >> shift == region)

    def _peer_alive(self, host: str, registry_port: int | None) -> None:
        try:
            self.on_peer_alive(host, registry_port)
        except Exception:
            self.log.failure("Error in on_peer_alive")

    def _closest_for(self, target: bytes, asker: bytes) -> tuple[Contact, ...]:
        return tuple(self.routing.closest(target, self.k, exclude=(asker,)))

    # -- lookups --------------------------------------------------------------------------

    def _lookup(
        self,
        target: bytes,
        request: wire.Body,
        on_reply: Callable[[Contact, Message], bool] = lambda c, m: False,
        seeds: Iterable[Contact] | None = None,
        satisfied: Callable[[], bool] = lambda: False,
    ) -> Deferred[LookupResult]:
        self.routing.touch(target)
        lookup = IterativeLookup(
            target,
            self.k,
            self.alpha,
            query=lambda contact: self.protocol.request(contact.address, request),
            on_reply=on_reply,
            on_failure=lambda contact: self.routing.failed(contact.node_id),
            satisfied=satisfied,
            beta=self.config.beta,
            exclude=frozenset({self.node_id}),
        )
        return lookup.start(self.routing.closest(target, self.k) if seeds is None else seeds)

    def find_node(self, target: bytes) -> Deferred[LookupResult]:
        """
        Iterative FIND_NODE: the k nodes closest to C{target} that answered.
        """
        started = self.clock.seconds()
        d = self._lookup(target, wire.FindNode(target))
        return d.addBoth(self._observe_lookup, "find_node", started)

    def find_providers(
        self,
        key: bytes,
        *,
        limit: int = 20,
        on_provider: Callable[[Provider], None] | None = None,
    ) -> Deferred[list[Provider]]:
        """
        Iterative GET_PROVIDERS for the key id C{key}: up to C{limit} providers, never this
        node.  C{on_provider} sees each one as soon as it is found.  The lookup stops once
        C{limit} are found; else, once at least one is found and the C{beta} closest nodes
        seen have all answered (see L{spegel.dht.lookup}); else when the k closest have all
        answered.
        """
        # By id and address: a record that copies a real provider's id from another address
        # must not hide the real one.
        found: dict[tuple[bytes, str, int], Provider] = {}

        def take(providers: Iterable[Provider]) -> bool:
            for provider in providers:
                identity = (provider.node_id, provider.host, provider.registry_port)
                if provider.node_id == self.node_id or identity in found:
                    continue
                found[identity] = provider
                if on_provider is not None:
                    try:
                        on_provider(provider)
                    except Exception:
                        self.log.failure("Error in an on_provider callback")
                if len(found) >= limit:
                    return True
            return False

        # Records we store ourselves (we are among the key's k closest) are handed out at once,
        # but the network is asked all the same and they do not end the lookup: our store may
        # hold records that another node forged, and they must not hide the real providers.
        take(self.store.get(key, limit))
        answered_with_providers = False

        def on_reply(contact: Contact, message: Message) -> bool:
            nonlocal answered_with_providers
            body = message.body
            if not isinstance(body, wire.Providers):
                return False
            answered_with_providers = answered_with_providers or bool(body.providers)
            return take(_resolve_self_records(body.providers, message.sender_id, contact.host))

        started = self.clock.seconds()
        d = self._lookup(key, wire.GetProviders(key), on_reply, satisfied=lambda: answered_with_providers)
        d.addBoth(self._observe_lookup, "get_providers", started)
        return d.addCallback(lambda result: list(found.values()))

    def _observe_lookup(self, result: object, kind: str, started: float) -> object:
        outcome = "ok" if isinstance(result, LookupResult) else "error"
        if isinstance(result, Failure) and result.check("twisted.internet.defer.CancelledError"):
            outcome = "cancelled"
        self.metrics.lookups.labels(kind, outcome).inc()
        self.metrics.lookup_duration.labels(kind).observe(self.clock.seconds() - started)
        return result

    # -- joining and upkeep ---------------------------------------------------------------

    def ping(self, address: Address) -> Deferred[Message]:
        return self.protocol.request(address, wire.Ping())

    def join(self, addresses: Collection[Address]) -> Deferred[JoinOutcome]:
        """
        Ping every candidate address (answers from our own id mean the address was us), let
        the others into the routing table, look up our own id, then refresh every bucket
        further away than our closest neighbour (paper, section 2.3).

        The last step matters: the self-lookup only meets nodes near our id.  Without it, a
        bucket covering a distant part of the id space stays empty until the periodic refresh
        (C{refresh_interval}), and if the nodes near a key all lack contacts in the sibling
        subtree that holds the key's closest nodes, their lookups never reach them (seen in
        the 100-node benchmark: one provider lookup in six missed a key stored at all of its
        k closest nodes).  Nodes joining at the same moment can still miss each other, each
        refreshing before the other was known; the periodic rejoin and refresh heal that.
        """
        return Deferred.fromCoroutine(self._join(addresses))

    async def _join(self, addresses: Collection[Address]) -> JoinOutcome:
        pings = [self.ping(address) for address in addresses]
        results = await DeferredList(pings, consumeErrors=True)
        answered = [message for ok, message in results if ok]
        only_self = bool(answered) and all(m.sender_id == self.node_id for m in answered)
        if len(self.routing):
            await self.find_node(self.node_id)
            await self._refresh_far_buckets()
        return JoinOutcome(peers_found=len(self.routing), only_self=only_self)

    async def _refresh_far_buckets(self) -> None:
        nearest = self.routing.closest(self.node_id, 1)
        if not nearest:
            return
        # One lookup at a time: a join is rare, and a burst of them would compete with the
        # lookups of the node's real work (and, in one-process benchmarks, of every node).
        for index in range(self.routing.bucket_index(nearest[0].node_id)):
            await self.find_node(random_id_in_bucket(self.node_id, index, self.randbytes))

    def refresh(self, interval: float | None = None) -> Deferred[None]:
        """
        Look up a random id in every bucket no lookup touched for C{interval} seconds
        (default C{refresh_interval}; 0 refreshes them all).
        """
        if interval is None:
            interval = self.config.refresh_interval
        stale = self.routing.stale_buckets(interval)
        lookups = [
            self.find_node(random_id_in_bucket(self.node_id, index, self.randbytes))
            for index in stale
        ]
        return gatherResults(lookups, consumeErrors=True).addCallback(lambda _: None)

    # -- announcing -----------------------------------------------------------------------

    def estimated_network_size(self) -> int:
        """
        Nodes in the network, estimated from how close our k-th closest contact is: n nodes
        spread uniformly put the k-th nearest at about C{k / n} of the id space.
        """
        closest = self.routing.closest(self.node_id, self.k)
        if len(closest) < self.k:
            return len(closest) + 1
        kth = int.from_bytes(closest[-1].node_id, "big") ^ int.from_bytes(self.node_id, "big")
        return max(self.k, (self.k << ID_BITS) // max(kth, 1))

    def region_bits(self) -> int:
        ratio = self.estimated_network_size() / self.k
        if ratio <= 1:
            return 0
        return min(MAX_REGION_BITS, math.ceil(math.log2(ratio)))

    def announce(self, keys: Collection[bytes]) -> Deferred[AnnounceResult]:
        """
        Store provider records for C{keys} (key ids) at the k closest nodes of each, with
        batched messages (see the module docstring).
        """
        return Deferred.fromCoroutine(self._announce(sorted(set(keys))))

    async def _announce(self, keys: list[bytes]) -> AnnounceResult:
        if not keys:
            return AnnounceResult(0, 0, 0, 0, 0)
        bits = self.region_bits()
        regions: dict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            regions[int.from_bytes(key, "big") >> (ID_BITS - bits)].append(key)
        # One lookup per region, a few at a time: each has alpha requests in flight already.
        limiter = DeferredSemaphore(4)
        lookups = [limiter.run(self.find_node, members[0]) for members in regions.values()]
        results: list[LookupResult] = await gatherResults(lookups, consumeErrors=True)
        known = {c.node_id: c for c in self.routing}
        for result in results:
            known.update((c.node_id, c) for c in result.closest)
        batches: dict[Contact, list[bytes]] = defaultdict(list)
        for members in regions.values():
            # Candidates for the whole region first, so each key sorts a short list.
            region_target = int.from_bytes(members[0], "big")
            pool = sorted(
                known.values(),
                key=lambda c: int.from_bytes(c.node_id, "big") ^ region_target,
            )[: 3 * self.k]
            for key in members:
                key_int = int.from_bytes(key, "big")
                pool.sort(key=lambda c: int.from_bytes(c.node_id, "big") ^ key_int)
                for contact in pool[: self.k]:
                    batches[contact].append(key)
        return await self._send_batches(len(keys), len(regions), batches)

    async def _send_batches(
        self, key_count: int, lookups: int, batches: dict[Contact, list[bytes]]
    ) -> AnnounceResult:
        limiter = DeferredSemaphore(self.config.announce_window)
        sends: list[Deferred[Message]] = []
        replicas = 0
        for contact, keys in batches.items():
            for start in range(0, len(keys), KEYS_PER_MESSAGE):
                chunk = tuple(keys[start : start + KEYS_PER_MESSAGE])
                replicas += len(chunk)
                request = wire.AddProvider(self.config.registry_port, chunk)
                sends.append(limiter.run(self._add_provider, contact, request))
        self.metrics.announced_keys.inc(replicas)
        outcomes = await DeferredList(sends, consumeErrors=True)
        acknowledged = sum(1 for ok, _ in outcomes if ok)
        return AnnounceResult(key_count, lookups, len(sends), acknowledged, replicas)

    def _add_provider(self, contact: Contact, request: wire.AddProvider) -> Deferred[Message]:
        d = self.protocol.request(contact.address, request)

        def failed(failure: Failure) -> Failure:
            if failure.check(DHTError):
                self.routing.failed(contact.node_id)
            return failure

        return d.addErrback(failed)
