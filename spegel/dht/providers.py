# -*- test-case-name: tests.unit.test_dht_providers -*-
"""
The provider records a node stores for others: key id -> providers, each until it expires.

A record lives C{ttl} seconds from its last announcement (about 19 minutes by default, as in
the reference); providers re-announce every 15 minutes, so a live provider's record never
lapses while a departed one's disappears within one TTL.

Anyone on the pod network can send ADD_PROVIDER, with any node id, so the store is built to
stay useful and small when some of them lie (without a cluster key to stop them first):

- A record is the sender's own: its id I{and} the address its datagram came from (the node
  wiring never takes a provider address from the message).  A datagram that reuses a real
  node's id from another address therefore adds a record of its own and never replaces or
  removes the real one.
- Per key, one source address holds at most L{PER_ADDRESS_PER_KEY} records: a flood of
  fake ids from one address cannot crowd the real providers out of a key's answer.
- Per source address at most C{max_per_address} records, and C{max_records} in all: the memory
  another node can make us spend is bounded, with room for real clusters (see the defaults).
- Forgetting a provider (its address stopped answering) costs O(its records), through an
  index by provider, never a scan of the store.
"""

from __future__ import annotations

import random
from typing import Callable

from attrs import define, field

from spegel.dht.ids import Provider

# A restarted pod without a persisted id comes back with a new id at the same address while its
# old records live on: two per key and address leave room for both, and no more.
PER_ADDRESS_PER_KEY = 2

# Sized for 10,000 digests held by each of 1,000 nodes: every record is stored at the key's k=20
# closest nodes, 200,000 per node on average, and a small cluster stores every provider's every
# key at every node (10,000 per provider).  Measured: about 216 bytes per record (200,000
# records: 41 MiB; the bound of 1,000,000: about 210 MiB; one address's 50,000: about 10 MiB).
DEFAULT_MAX_RECORDS = 1_000_000
DEFAULT_MAX_PER_ADDRESS = 50_000

_ProviderKey = tuple[bytes, str]


@define(eq=False)
class ProviderStore:
    """
    @ivar now: the current time (the reactor's C{seconds}).
    @ivar ttl: lifetime of a record from its latest announcement.
    @ivar max_records: records beyond this are refused.
    @ivar max_per_address: records from one source address beyond this are refused.
    @ivar on_change: called with the change in the number of records (metrics).
    """

    now: Callable[[], float]
    ttl: float
    max_records: int = DEFAULT_MAX_RECORDS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    on_change: Callable[[int], None] = lambda delta: None
    random: random.Random = field(factory=random.Random)
    # key -> (node id, source address) -> (provider, expiry time)
    _records: dict[bytes, dict[_ProviderKey, tuple[Provider, float]]] = field(init=False, factory=dict)
    # (node id, source address) -> the keys it holds records for
    _by_provider: dict[_ProviderKey, set[bytes]] = field(init=False, factory=dict)
    # source address -> its number of records
    _per_address: dict[str, int] = field(init=False, factory=dict)
    _count: int = field(init=False, default=0)

    def __len__(self) -> int:
        return self._count

    def add(self, key: bytes, provider: Provider) -> bool:
        """
        Store (or refresh) that C{provider} holds C{key}.

        @return: whether the record is stored (C{False} when a bound is reached).
        """
        identity = (provider.node_id, provider.host)
        providers = self._records.get(key)
        if providers is not None and identity in providers:
            providers[identity] = (provider, self.now() + self.ttl)
            return True
        if self._count >= self.max_records:
            return False
        if self._per_address.get(provider.host, 0) >= self.max_per_address:
            return False
        if providers is None:
            providers = self._records[key] = {}
        elif sum(1 for _, host in providers if host == provider.host) >= PER_ADDRESS_PER_KEY:
            return False
        providers[identity] = (provider, self.now() + self.ttl)
        self._by_provider.setdefault(identity, set()).add(key)
        self._per_address[provider.host] = self._per_address.get(provider.host, 0) + 1
        self._changed(+1)
        return True

    def get(self, key: bytes, limit: int) -> list[Provider]:
        """
        Up to C{limit} unexpired providers of C{key}, in random order: a random sample when
        there are more, so that different nodes answering one lookup return different
        providers, and shuffled when there are fewer, because the asking mirror asks the first
        it sees first. In the order they announced, the first holder of an image came first in
        every answer of a rollout and served the most.
        """
        providers = self._records.get(key)
        if not providers:
            return []
        now = self.now()
        live = [p for p, expires in providers.values() if expires > now]
        return self.random.sample(live, min(limit, len(live)))

    def remove_provider(self, node_id: bytes, host: str) -> int:
        """
        Forget every record of the node C{node_id} at C{host} (it no longer answers there);
        the same id's records from other addresses stay.

        @return: how many records were removed.
        """
        identity = (node_id, host)
        keys = list(self._by_provider.get(identity, ()))
        for key in keys:
            self._discard(key, identity)
        return len(keys)

    def expire(self) -> int:
        """
        Drop expired records; return how many.
        """
        now = self.now()
        expired = [
            (key, identity)
            for key, providers in self._records.items()
            for identity, (_, expires) in providers.items()
            if expires <= now
        ]
        for key, identity in expired:
            self._discard(key, identity)
        return len(expired)

    def records_of(self, node_id: bytes, host: str) -> int:
        """How many records the node C{node_id} at C{host} has here."""
        return len(self._by_provider.get((node_id, host), ()))

    def _discard(self, key: bytes, identity: _ProviderKey) -> None:
        providers = self._records[key]
        del providers[identity]
        if not providers:
            del self._records[key]
        keys = self._by_provider[identity]
        keys.discard(key)
        if not keys:
            del self._by_provider[identity]
        host = identity[1]
        remaining = self._per_address[host] - 1
        if remaining:
            self._per_address[host] = remaining
        else:
            del self._per_address[host]
        self._changed(-1)

    def _changed(self, delta: int) -> None:
        self._count += delta
        self.on_change(delta)
