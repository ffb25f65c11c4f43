"""
Tests for L{spegel.dht.finder.ProviderFinder}: lookups shared by the callers that want the same
key at once, and a cache that is refreshed in the background so new holders are not hidden.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.finder import ProviderFinder
from spegel.dht.ids import Provider


def provider(n: int) -> Provider:
    return Provider(node_id=bytes([n]) * 32, host=f"198.18.0.{n}", registry_port=5000)


class FakeLookups:
    """Lookups the test finishes by hand: each call is one lookup."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object, Deferred[list[Provider]]]] = []
        self.cancelled = 0

    def __call__(self, key, limit, on_provider):  # type: ignore[no-untyped-def]
        def cancel(d: Deferred[list[Provider]]) -> None:
            self.cancelled += 1

        d: Deferred[list[Provider]] = Deferred(cancel)
        self.calls.append((key, limit, on_provider, d))
        return d

    def find(self, index: int, *providers: Provider) -> None:
        on_provider = self.calls[index][2]
        for p in providers:
            on_provider(p)  # type: ignore[operator]

    def end(self, index: int, *providers: Provider) -> None:
        self.calls[index][3].callback(list(providers))


class FinderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lookups = FakeLookups()
        self.finder = ProviderFinder(self.clock, self.lookups, ttl=5.0, refresh_after=1.0)

    def test_callers_at_once_share_one_lookup(self) -> None:
        first_seen: list[Provider] = []
        late_seen: list[Provider] = []
        first = self.finder.find("k", on_provider=first_seen.append)
        self.lookups.find(0, provider(1))
        late = self.finder.find("k", on_provider=late_seen.append)
        # The late caller is handed what was found so far at once, then what comes next.
        self.assertEqual(late_seen, [provider(1)])
        self.lookups.find(0, provider(2))
        self.lookups.end(0, provider(1), provider(2))
        self.assertEqual(len(self.lookups.calls), 1)
        self.assertEqual(first_seen, [provider(1), provider(2)])
        self.assertEqual(late_seen, [provider(1), provider(2)])
        self.assertEqual(self.successResultOf(first), [provider(1), provider(2)])
        self.assertEqual(self.successResultOf(late), [provider(1), provider(2)])

    def test_each_caller_keeps_its_limit(self) -> None:
        seen: list[Provider] = []
        wide = self.finder.find("k", limit=20)
        narrow = self.finder.find("k", limit=1, on_provider=seen.append)
        self.lookups.find(0, provider(1), provider(2))
        self.lookups.end(0, provider(1), provider(2))
        self.assertEqual(len(self.lookups.calls), 1)
        self.assertEqual(seen, [provider(1)])
        self.assertEqual(self.successResultOf(narrow), [provider(1)])
        self.assertEqual(len(self.successResultOf(wide)), 2)

    def test_a_wider_caller_does_not_join_a_narrower_lookup(self) -> None:
        narrow = self.finder.find("k", limit=1)
        wide = self.finder.find("k", limit=20)
        self.assertEqual([c[1] for c in self.lookups.calls], [1, 20])
        self.lookups.end(0, provider(1))
        self.lookups.end(1, provider(1), provider(2))
        self.assertEqual(self.successResultOf(narrow), [provider(1)])
        self.assertEqual(self.successResultOf(wide), [provider(1), provider(2)])

    def test_the_lookup_stops_when_the_last_caller_leaves(self) -> None:
        first = self.finder.find("k")
        second = self.finder.find("k")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.lookups.cancelled, 0)  # the second still waits for it
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.lookups.cancelled, 1)

    def test_answers_are_cached(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        seen: list[Provider] = []
        self.clock.advance(0.5)
        cached = self.finder.find("k", on_provider=seen.append)
        self.assertEqual(self.successResultOf(cached), [provider(1)])
        self.assertEqual(seen, [provider(1)])
        self.assertEqual(len(self.lookups.calls), 1)

    def test_an_older_answer_is_served_and_refreshed(self) -> None:
        """
        A second into a rollout a second node holds the blob: a caller still gets the cached
        answer at once, a lookup runs in the background, and the next caller is offered both.
        """
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(self.finder.find("k")), [provider(1)])
        self.assertEqual(len(self.lookups.calls), 2)
        # Asked again while the refresh runs: the cache answers, no third lookup.
        self.assertEqual(self.successResultOf(self.finder.find("k")), [provider(1)])
        self.assertEqual(len(self.lookups.calls), 2)
        self.lookups.end(1, provider(1), provider(2))
        self.assertEqual(self.successResultOf(self.finder.find("k")), [provider(1), provider(2)])

    def test_nobody_waiting_does_not_stop_a_refresh(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(1.0)
        self.successResultOf(self.finder.find("k"))
        # A caller joins the refresh (cache bypassed) and leaves: the refresh goes on.
        joined = self.finder.find("k", use_cache=False)
        joined.cancel()
        self.failureResultOf(joined, CancelledError)
        self.assertEqual(self.lookups.cancelled, 0)

    def test_a_fresh_miss_forgets_the_cached_holders(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(1.0)
        self.finder.find("k")
        self.lookups.end(1)  # the holder is gone
        after = self.finder.find("k")
        self.assertNoResult(after)
        self.assertEqual(len(self.lookups.calls), 3)
        self.lookups.end(2)
        self.assertEqual(self.successResultOf(after), [])

    def test_past_the_ttl_the_lookup_runs_first(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(5.0)
        later = self.finder.find("k")
        self.assertNoResult(later)
        self.lookups.end(1, provider(2))
        self.assertEqual(self.successResultOf(later), [provider(2)])

    def test_a_failed_refresh_is_logged_and_the_cache_kept(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(1.0)
        self.finder.find("k")
        self.lookups.calls[1][3].errback(RuntimeError("socket gone"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.successResultOf(self.finder.find("k")), [provider(1)])

    def test_a_failed_lookup_fails_every_caller(self) -> None:
        first = self.finder.find("k")
        second = self.finder.find("k")
        self.lookups.calls[0][3].errback(RuntimeError("socket gone"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)

    def test_a_lookup_that_ends_at_once(self) -> None:
        finder = ProviderFinder(self.clock, lambda key, limit, on: succeed([]), ttl=5.0, refresh_after=1.0)
        self.assertEqual(self.successResultOf(finder.find("k")), [])

    def test_a_bad_callback_does_not_break_the_others(self) -> None:
        seen: list[Provider] = []

        def broken(p: Provider) -> None:
            raise ValueError("caller bug")

        self.finder.find("k", on_provider=broken)
        self.finder.find("k", on_provider=seen.append)
        self.lookups.find(0, provider(1))
        self.assertEqual(seen, [provider(1)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.lookups.end(0, provider(1))

    def test_stop_cancels_lookups_in_flight(self) -> None:
        d = self.finder.find("k")
        self.finder.stop()
        self.assertEqual(self.lookups.cancelled, 1)
        self.failureResultOf(d, CancelledError)

    def test_expire_drops_old_answers(self) -> None:
        d = self.finder.find("k")
        self.lookups.end(0, provider(1))
        self.successResultOf(d)
        self.clock.advance(5.0)
        self.finder.expire()
        self.assertEqual(self.finder._cache, {})

    def test_a_full_cache_forgets_the_least_recently_used_answer(self) -> None:
        finder = ProviderFinder(self.clock, self.lookups, ttl=5.0, refresh_after=1.0, max_cached=2)
        for index, key in enumerate(["a", "b"]):
            finder.find(key)
            self.lookups.end(index, provider(index + 1))
        finder.find("a")  # a is now the more recently used
        finder.find("c")
        self.lookups.end(2, provider(3))
        self.assertEqual(len(self.lookups.calls), 3)
        # a and c are answered from the cache; b was dropped to make room, so it is looked up.
        self.assertEqual(self.successResultOf(finder.find("a")), [provider(1)])
        self.assertEqual(self.successResultOf(finder.find("c")), [provider(3)])
        finder.find("b")
        self.assertEqual([call[0] for call in self.lookups.calls], ["a", "b", "c", "b"])
