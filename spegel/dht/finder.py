# -*- test-case-name: tests.unit.test_dht_finder -*-
"""
Provider lookups as the mirror asks for them: one lookup in flight per key, and a short cache
that does not hide new holders.

In a rollout every layer request on a node asks for the same few digests at the same moment,
and the set of nodes holding them grows by the second.  Two things follow:

  - A request that arrives while a lookup of its key is running joins that lookup: it is
    handed the providers found so far at once and each later one as it arrives, and gets the
    lookup's result.  The DHT sees one lookup per key per node, not one per request (at 50
    nodes the lookups of a rollout were what slowed the DHT).
  - A cached answer is served at once, but once it is older than C{refresh_after} a fresh
    lookup starts in the background and its answer replaces the cached one.  A node that began
    to hold a blob a second ago is offered within about a second, where a plain TTL cache
    offered only the first holder for its whole lifetime (and the mirror asked it for
    everything).

A fresh lookup that finds nobody removes the cached answer: its holders are gone.
"""

from __future__ import annotations

from typing import Callable

from attrs import define, field
from cachetools import TTLCache
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.dht.ids import Provider

OnProvider = Callable[[Provider], None]
# (key, limit, on_provider) -> the lookup: fires with the providers found when it ends.
Lookup = Callable[[str, int, OnProvider], "Deferred[list[Provider]]"]

log = Logger()


def _offer(on_provider: OnProvider | None, provider: Provider) -> None:
    if on_provider is None:
        return
    try:
        on_provider(provider)
    except Exception:
        log.failure("Error in an on_provider callback")


@define
class _Cached:
    stored_at: float
    providers: list[Provider]


@define(eq=False)
class _Waiter:
    """One caller of a shared lookup: its own limit, callback and result."""

    limit: int
    on_provider: OnProvider | None
    result: Deferred[list[Provider]] = field(init=False)
    offered: int = 0

    def offer(self, provider: Provider) -> None:
        if self.offered < self.limit:
            self.offered += 1
            _offer(self.on_provider, provider)


@define(eq=False)
class _Flight:
    """A lookup in flight, and who waits for it."""

    limit: int
    background: bool = False
    found: list[Provider] = field(factory=list)
    waiters: list[_Waiter] = field(factory=list)
    lookup: Deferred[list[Provider]] | None = None
    outcome: list[Provider] | Failure | None = None


class ProviderFinder:
    """
    @param lookup: runs one DHT lookup (L{spegel.dht.node.KademliaNode.find_providers} on a
        key id).
    @param ttl: how long an answer may be served from the cache at all.
    @param refresh_after: a cached answer older than this is served and refreshed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lookup: Lookup,
        *,
        ttl: float,
        refresh_after: float,
        max_cached: int = 10_000,
    ) -> None:
        self._clock = clock
        self._lookup = lookup
        self._ttl = ttl
        self._refresh_after = min(refresh_after, ttl)
        # Expiry and the size bound (least recently used first) on the injected clock; the age
        # kept in each entry decides the background refresh, which a TTL cache does not model.
        self._cache: TTLCache[str, _Cached] = TTLCache(maxsize=max_cached, ttl=ttl, timer=clock.seconds)
        self._flights: dict[str, _Flight] = {}

    def find(
        self, key: str, *, on_provider: OnProvider | None = None, limit: int = 20, use_cache: bool = True
    ) -> Deferred[list[Provider]]:
        """
        Providers of C{key}: from the cache when C{use_cache} and fresh enough, else from the
        lookup in flight for it (started if none).  Cancelling the result stops waiting; the
        lookup itself stops once nobody waits for it.
        """
        now = self._clock.seconds()
        cached = self._cache.get(key) if use_cache else None
        if cached is not None:
            providers = cached.providers[:limit]
            for provider in providers:
                _offer(on_provider, provider)
            if now - cached.stored_at >= self._refresh_after and key not in self._flights:
                self._start(key, max(limit, len(cached.providers)), background=True)
            return succeed(list(providers))
        flight = self._flights.get(key)
        if flight is None or flight.limit < limit:
            flight = self._start(key, limit, background=False)
        return self._join(flight, limit, on_provider)

    def expire(self) -> None:
        """Drop cached answers past their TTL (memory only: stale ones are never served)."""
        self._cache.expire()

    def clear(self) -> None:
        self._cache.clear()

    def stop(self) -> None:
        """Cancel every lookup in flight (the service is stopping)."""
        for flight in list(self._flights.values()):
            if flight.lookup is not None:
                flight.lookup.cancel()

    def _start(self, key: str, limit: int, *, background: bool) -> _Flight:
        flight = _Flight(limit, background=background)
        self._flights[key] = flight

        def arrived(provider: Provider) -> None:
            flight.found.append(provider)
            for waiter in list(flight.waiters):
                waiter.offer(provider)

        lookup = self._lookup(key, limit, arrived)
        flight.lookup = lookup
        lookup.addBoth(self._landed, key, flight)
        return flight

    def _join(self, flight: _Flight, limit: int, on_provider: OnProvider | None) -> Deferred[list[Provider]]:
        waiter = _Waiter(limit, on_provider)
        for provider in flight.found:
            waiter.offer(provider)
        if flight.outcome is not None:  # the lookup ended at once (e.g. no contacts)
            if isinstance(flight.outcome, Failure):
                return fail(flight.outcome)
            return succeed(flight.outcome[:limit])

        def leave(result: Deferred[list[Provider]]) -> None:
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)
            if not flight.waiters and not flight.background and flight.lookup is not None:
                flight.lookup.cancel()

        waiter.result = Deferred(leave)
        flight.waiters.append(waiter)
        return waiter.result

    def _landed(self, outcome: list[Provider] | Failure, key: str, flight: _Flight) -> None:
        flight.outcome = outcome
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiters, flight.waiters = flight.waiters, []
        if isinstance(outcome, Failure):
            if flight.background and not outcome.check(CancelledError):
                log.failure("Refreshing the providers of {key} failed", outcome, key=key)
            for waiter in waiters:
                waiter.result.errback(outcome)
            return None
        if outcome:
            self._cache[key] = _Cached(self._clock.seconds(), list(outcome))
        else:
            self._cache.pop(key, None)
        for waiter in waiters:
            waiter.result.callback(outcome[: waiter.limit])
        return None
