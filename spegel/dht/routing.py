# -*- test-case-name: tests.unit.test_dht_routing -*-
"""
The Kademlia routing table: k-buckets indexed by shared id prefix length (paper, section 2.2).

Bucket C{i} holds up to C{k} contacts whose ids share exactly C{i} leading bits with ours,
least-recently seen first.  A new contact for a full bucket does not push anyone out: the
oldest contact is pinged, and only replaced (by the freshest contact of the bucket's
replacement cache) if it fails to answer.  Long-lived nodes therefore stay, which the paper
argues is what makes the table resistant to churn and flooding.

The table does no I/O: L{RoutingTable.observe} returns the contact the caller should ping,
and the caller reports the outcome with L{RoutingTable.observe} (it answered) or
L{RoutingTable.evict} (it did not).

Ids cost nothing to make, so one sender could fill every bucket with ids of its choosing (a
Sybil attack).  The table therefore holds at most C{max_per_address} contacts at one IP address:
in a cluster each node has an address of its own, and one more leaves room for a pod that came
back under a new id before its old one was evicted.  Loopback addresses are exempt: only tests
and benchmarks, which run many nodes on one machine, have peers there.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import OrderedDict
from typing import Callable, Iterable, Iterator

from attrs import define, field

from spegel.dht.ids import ID_BITS, Contact, common_prefix_bits, distance


@define(eq=False)
class KBucket:
    """
    One k-bucket.  C{contacts} is ordered least-recently seen first.
    """

    last_lookup: float
    contacts: OrderedDict[bytes, Contact] = field(factory=OrderedDict)
    replacements: OrderedDict[bytes, Contact] = field(factory=OrderedDict)
    pinging: bytes | None = None


@define(eq=False)
class RoutingTable:
    """
    @ivar own_id: this node's id (never stored in its own table).
    @ivar k: bucket capacity (and replacement cache size).
    @ivar now: current time, for bucket refresh bookkeeping.
    @ivar max_failures: consecutive failed requests after which a contact is dropped.
    @ivar on_size_change: called with +1/-1 as contacts come and go (metrics).
    @ivar max_per_address: contacts at one (non-loopback) IP address beyond this are ignored.
    """

    own_id: bytes
    k: int
    now: Callable[[], float]
    max_failures: int = 2
    on_size_change: Callable[[int], None] = lambda delta: None
    max_per_address: int = 2
    _buckets: list[KBucket] = field(init=False)
    _failures: dict[bytes, int] = field(init=False, factory=dict)
    _size: int = field(init=False, default=0)
    # Every contact of every bucket, for iteration without visiting 256 buckets.
    _all: dict[bytes, Contact] = field(init=False, factory=dict)
    # The same ids as integers: closest() runs for every FIND_NODE and GET_PROVIDERS
    # answered, and converting each id on every call was most of its cost.
    _id_ints: dict[bytes, int] = field(init=False, factory=dict)
    # Contacts in the table per host (loopback hosts are not counted).
    _per_address: dict[str, int] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        start = self.now()
        self._buckets = [KBucket(last_lookup=start) for _ in range(ID_BITS)]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Contact]:
        return iter(list(self._all.values()))

    def bucket(self, index: int) -> list[Contact]:
        """
        The contacts of bucket C{index}, least-recently seen first.
        """
        return list(self._buckets[index].contacts.values())

    def __contains__(self, node_id: bytes) -> bool:
        return self.get(node_id) is not None

    def get(self, node_id: bytes) -> Contact | None:
        if node_id == self.own_id:
            return None
        return self._bucket(node_id).contacts.get(node_id)

    def bucket_index(self, node_id: bytes) -> int:
        return common_prefix_bits(self.own_id, node_id)

    def _bucket(self, node_id: bytes) -> KBucket:
        return self._buckets[self.bucket_index(node_id)]

    def observe(self, contact: Contact) -> Contact | None:
        """
        Record that C{contact} was just heard from (a request or a reply).

        @return: the least-recently seen contact of a full bucket, which the caller should
            ping before C{contact} can take its place; L{None} otherwise.
        """
        if contact.node_id == self.own_id:
            return None
        self._failures.pop(contact.node_id, None)
        bucket = self._bucket(contact.node_id)
        if contact.node_id in bucket.contacts:
            # Refreshed (and possibly moved address, once the caller checked the old one is
            # gone): to the tail.
            old = bucket.contacts.pop(contact.node_id)
            if old.host != contact.host:
                self._count_address(old.host, -1)
                self._count_address(contact.host, +1)
            bucket.contacts[contact.node_id] = contact
            self._all[contact.node_id] = contact
            if bucket.pinging == contact.node_id:
                bucket.pinging = None
            return None
        if self.address_full(contact.host):
            return None
        if len(bucket.contacts) < self.k:
            bucket.contacts[contact.node_id] = contact
            self._remember(contact)
            bucket.replacements.pop(contact.node_id, None)
            self._resize(+1)
            return None
        bucket.replacements.pop(contact.node_id, None)
        bucket.replacements[contact.node_id] = contact
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        if bucket.pinging is not None:
            return None
        oldest = next(iter(bucket.contacts.values()))
        bucket.pinging = oldest.node_id
        return oldest

    def evict(self, node_id: bytes) -> None:
        """
        Drop C{node_id} (it failed to answer) and promote the freshest replacement.
        """
        bucket = self._bucket(node_id)
        if bucket.pinging == node_id:
            bucket.pinging = None
        self._failures.pop(node_id, None)
        evicted = bucket.contacts.pop(node_id, None)
        if evicted is None:
            bucket.replacements.pop(node_id, None)
            return
        del self._all[node_id]
        del self._id_ints[node_id]
        self._count_address(evicted.host, -1)
        self._resize(-1)
        while bucket.replacements:
            _, replacement = bucket.replacements.popitem(last=True)
            if self.address_full(replacement.host):
                continue
            bucket.contacts[replacement.node_id] = replacement
            self._remember(replacement)
            self._resize(+1)
            break

    def failed(self, node_id: bytes) -> None:
        """
        A request to C{node_id} went unanswered; drop it after C{max_failures} in a row.
        """
        if node_id not in self:
            self._bucket(node_id).replacements.pop(node_id, None)
            return
        count = self._failures.get(node_id, 0) + 1
        if count >= self.max_failures:
            self.evict(node_id)
        else:
            self._failures[node_id] = count

    def closest(self, target: bytes, count: int, exclude: Iterable[bytes] = ()) -> list[Contact]:
        """
        The (at most) C{count} known contacts nearest to C{target} by XOR distance.
        """
        excluded = set(exclude)
        target_int = int.from_bytes(target, "big")
        nearest = heapq.nsmallest(
            count + len(excluded),
            self._id_ints.items(),
            key=lambda item: item[1] ^ target_int,
        )
        return [self._all[node_id] for node_id, _ in nearest if node_id not in excluded][:count]

    def _remember(self, contact: Contact) -> None:
        self._all[contact.node_id] = contact
        self._id_ints[contact.node_id] = int.from_bytes(contact.node_id, "big")
        self._count_address(contact.host, +1)

    def address_full(self, host: str) -> bool:
        """Whether the table holds as many contacts at C{host} as it takes."""
        return self._per_address.get(host, 0) >= self.max_per_address

    def _count_address(self, host: str, delta: int) -> None:
        if _is_loopback(host):
            return
        count = self._per_address.get(host, 0) + delta
        if count > 0:
            self._per_address[host] = count
        else:
            self._per_address.pop(host, None)

    def touch(self, target: bytes) -> None:
        """
        A lookup for C{target} just ran: its bucket needs no refresh for a while.
        """
        if target != self.own_id:
            self._bucket(target).last_lookup = self.now()

    def stale_buckets(self, interval: float) -> list[int]:
        """
        Indexes of buckets not looked up for C{interval} seconds, among those that can hold
        anyone: up to one past the deepest non-empty bucket (deeper ones are empty in any
        network smaller than 2**index nodes, and looking them up only finds our neighbours).
        """
        deepest = max((i for i, b in enumerate(self._buckets) if b.contacts), default=0)
        limit = min(ID_BITS, deepest + 2)
        now = self.now()
        return [i for i in range(limit) if now - self._buckets[i].last_lookup >= interval]

    def _resize(self, delta: int) -> None:
        self._size += delta
        self.on_size_change(delta)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sort_by_distance(target: bytes, contacts: Iterable[Contact]) -> list[Contact]:
    return sorted(contacts, key=lambda c: distance(c.node_id, target))
