# -*- test-case-name: tests.test_dht_providers -*-
"""
The provider records a node stores for others: key id -> providers, each until it expires.

A record lives C{ttl} seconds from its last announcement (about 19 minutes by default, as in
the reference); providers re-announce every 15 minutes, so a live provider's record never
lapses while a departed one's disappears within one TTL.
"""

from __future__ import annotations

import random
from typing import Callable

from attrs import define, field

from spegel.dht.ids import Provider


@define(eq=False)
class ProviderStore:
    """
    @ivar now: the current time (the reactor's C{seconds}).
    @ivar ttl: lifetime of a record from its latest announcement.
    @ivar max_records: records beyond this are refused, bounding the memory another node can
        make us spend.
    @ivar on_change: called with the change in the number of records (metrics).
    """

    now: Callable[[], float]
    ttl: float
    max_records: int = 2_000_000
    on_change: Callable[[int], None] = lambda delta: None
    random: random.Random = field(factory=random.Random)
    _records: dict[bytes, dict[bytes, tuple[Provider, float]]] = field(init=False, factory=dict)
    _count: int = field(init=False, default=0)

    def __len__(self) -> int:
        return self._count

    def add(self, key: bytes, provider: Provider) -> bool:
        """
        Store (or refresh) that C{provider} holds C{key}.

        @return: whether the record is stored (C{False} when the store is full).
        """
        providers = self._records.get(key)
        if providers is None:
            if self._count >= self.max_records:
                return False
            providers = self._records[key] = {}
        if provider.node_id not in providers:
            if self._count >= self.max_records:
                return False
            self._changed(+1)
        providers[provider.node_id] = (provider, self.now() + self.ttl)
        return True

    def get(self, key: bytes, limit: int) -> list[Provider]:
        """
        Up to C{limit} unexpired providers of C{key}; a random sample when there are more, so
        that different nodes answering one lookup return different providers.
        """
        providers = self._records.get(key)
        if not providers:
            return []
        now = self.now()
        live = [p for p, expires in providers.values() if expires > now]
        if len(live) > limit:
            return self.random.sample(live, limit)
        return live

    def remove_provider(self, node_id: bytes) -> None:
        """
        Forget every record of C{node_id} (it restarted under a new identity, for instance).
        """
        for key in list(self._records):
            providers = self._records[key]
            if providers.pop(node_id, None) is not None:
                self._changed(-1)
                if not providers:
                    del self._records[key]

    def expire(self) -> int:
        """
        Drop expired records; return how many.
        """
        now = self.now()
        dropped = 0
        for key in list(self._records):
            providers = self._records[key]
            for node_id in [n for n, (_, expires) in providers.items() if expires <= now]:
                del providers[node_id]
                dropped += 1
            if not providers:
                del self._records[key]
        if dropped:
            self._changed(-dropped)
        return dropped

    def _changed(self, delta: int) -> None:
        self._count += delta
        self.on_change(delta)
