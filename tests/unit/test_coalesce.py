"""
Tests for L{spegel.coalesce} and the mirror's use of it: a node that misses a manifest another
node is pulling from upstream waits for it; one that nobody is pulling says it will pull it.
Socket-free: a scripted router and a fake clock.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from spegel import oci
from spegel.coalesce import BUCKET_SECONDS, PullCoalescer, marker_key
from spegel.dht.ids import Provider
from spegel.interfaces import ICoalescingRouter
from spegel.metrics import Metrics
from spegel.mirror import Mirror
from spegel.registry import ask_mirror
from spegel.oci import BlobUnknown, ManifestUnknown, Reference
from tests.unit.test_mirror import REGISTRY, ClientRequest, FakeHTTP, digest_of, provider

TAG_KEY = f"{REGISTRY}/team/app:v1"
# A wall-clock time in the middle of a minute.
NOW = 1_800_000_030.0


@implementer(ICoalescingRouter)
class ScriptedRouter:
    """
    A DHT whose lookups answer at once from C{providers} (key -> providers), or never, for the
    keys in C{hanging}; provides and withdrawals are recorded.
    """

    def __init__(self) -> None:
        self.providers: dict[str, list[Provider]] = {}
        self.hanging: set[str] = set()
        self.lookups: list[tuple[str, bool]] = []
        self.provided: list[str] = []
        self.withdrawn: list[str] = []
        self.cancelled: list[str] = []

    def find_providers(self, key: str, *, on_provider: Callable[[Provider], None] | None = None,
                       limit: int = 20, use_cache: bool = True) -> Deferred[list[Provider]]:
        self.lookups.append((key, use_cache))
        if key in self.hanging:
            return Deferred(lambda d: self.cancelled.append(key))
        found = self.providers.get(key, [])[:limit]
        for p in found:
            if on_provider is not None:
                on_provider(p)
        return succeed(list(found))

    def provide(self, keys: Iterable[str]) -> None:
        self.provided.extend(keys)

    def withdraw(self, keys: Iterable[str]) -> None:
        self.withdrawn.extend(keys)


class CoalescerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.router = ScriptedRouter()
        self.coalescer = PullCoalescer(self.clock, self.router, timeout=30.0, marker_lifetime=120.0, metrics=Metrics())
        self.minute = int(NOW // BUCKET_SECONDS)

    def test_pulling_provides_a_marker_for_this_minute_then_withdraws_it(self) -> None:
        self.coalescer.pulling(TAG_KEY)
        marker = marker_key(TAG_KEY, self.minute)
        self.assertEqual(marker, f"pulling:{self.minute}:{TAG_KEY}")
        self.assertEqual(self.router.provided, [marker])
        self.clock.advance(119)
        self.assertEqual(self.router.withdrawn, [])
        self.clock.advance(1)
        self.assertEqual(self.router.withdrawn, [marker])

    def test_marking_again_keeps_the_marker_longer(self) -> None:
        self.coalescer.pulling(TAG_KEY)
        self.clock.advance(20)  # still the same minute
        self.coalescer.pulling(TAG_KEY)
        self.clock.advance(110)
        self.assertEqual(self.router.withdrawn, [])
        self.clock.advance(10)
        self.assertEqual(self.router.withdrawn, [marker_key(TAG_KEY, self.minute)])

    def test_markers_of_this_and_the_previous_minute_count(self) -> None:
        for minute, expected in [(self.minute, True), (self.minute - 1, True), (self.minute - 2, False)]:
            with self.subTest(minute=minute):
                self.router.providers = {marker_key(TAG_KEY, minute): [provider(4)]}
                d = ensureDeferred(self.coalescer.others_pulling(TAG_KEY))
                self.assertIs(self.successResultOf(d), expected)
        # Asked afresh: a cached "nobody" must not hide a pull that started since.
        self.assertTrue(all(not use_cache for _, use_cache in self.router.lookups))

    def test_a_lookup_that_does_not_finish_counts_as_nobody(self) -> None:
        self.router.hanging = {marker_key(TAG_KEY, self.minute), marker_key(TAG_KEY, self.minute - 1)}
        d = ensureDeferred(self.coalescer.others_pulling(TAG_KEY))
        self.assertNoResult(d)
        self.clock.advance(0.25)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(self.router.cancelled), 2)


class TieBreakTests(SynchronousTestCase):
    """
    Nodes that set their markers at the same moment: the lowest id pulls, the others wait.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.router = ScriptedRouter()
        self.me = provider(5)
        self.coalescer = PullCoalescer(
            self.clock, self.router, timeout=30.0, node_id=self.me.node_id, settle=0.5, metrics=Metrics()
        )
        self.marker = marker_key(TAG_KEY, int(NOW // BUCKET_SECONDS))

    def first(self) -> bool | None:
        d = ensureDeferred(self.coalescer.first_to_pull(TAG_KEY))
        self.assertNoResult(d)  # it lets the markers settle first
        self.clock.advance(0.5)
        return self.successResultOf(d)

    def test_alone_or_with_higher_ids_it_pulls(self) -> None:
        self.router.providers = {self.marker: [self.me]}
        self.assertIs(self.first(), True)
        self.router.providers = {self.marker: [provider(6), self.me, provider(9)]}
        self.assertIs(self.first(), True)
        self.assertIn((self.marker, False), self.router.lookups, "not looked at afresh")

    def test_a_lower_id_pulls_instead(self) -> None:
        self.router.providers = {self.marker: [provider(6), provider(9), provider(4)]}
        self.assertIs(self.first(), False)

    def test_a_lookup_that_does_not_finish_counts_as_alone(self) -> None:
        self.router.hanging = {self.marker, marker_key(TAG_KEY, int(NOW // BUCKET_SECONDS) - 1)}
        d = ensureDeferred(self.coalescer.first_to_pull(TAG_KEY))
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(0.25)
        self.assertIs(self.successResultOf(d), True)

    def test_without_an_id_no_tie_break(self) -> None:
        coalescer = PullCoalescer(self.clock, self.router, timeout=30.0, metrics=Metrics())
        self.router.providers = {self.marker: [provider(1)]}
        self.assertIs(self.successResultOf(ensureDeferred(coalescer.first_to_pull(TAG_KEY))), True)


class MirrorCoalescingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.router = ScriptedRouter()
        self.http = FakeHTTP()
        self.metrics = Metrics()
        self.coalescer = PullCoalescer(self.clock, self.router, timeout=30.0, poll_interval=0.25, metrics=self.metrics)
        self.mirror = Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, pick=lambda n: 0,
            coalescer=self.coalescer, metrics=self.metrics,
        )
        self.minute = int(NOW // BUCKET_SECONDS)
        self.manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                    "config": {}, "layers": []}).encode()

    def counted(self) -> dict[str, float]:
        return {
            name: self.metrics.registry.get_sample_value("spegel_pull_coalescing_total", {"outcome": name}) or 0.0
            for name in ("upstream", "waited", "timeout")
        }

    def manifest_by_tag(self) -> Deferred[Any]:
        return ensureDeferred(ask_mirror(self.mirror, ClientRequest(), Reference(REGISTRY, "team/app", tag="v1"), "manifest"))  # type: ignore[arg-type]  # a DummyRequest

    def assert_served_by_node_4(self, d: Deferred[Any]) -> None:
        """The mirror asked node 4, the only one asked, for the manifest; it answers it."""
        self.assertEqual(len(self.http.requests), 1)
        self.assertIn("127.0.0.4", self.http.requests[0][1])
        response = self.http.answer(0, 200, len(self.manifest), content_type=oci.OCI_MANIFEST,
                                    docker_content_digest=digest_of(self.manifest))
        response.send(self.manifest)
        response.end()
        self.assertEqual(self.successResultOf(d), self.manifest)

    def test_nobody_pulling_goes_upstream_at_once_and_says_so(self) -> None:
        d = self.manifest_by_tag()
        self.failureResultOf(d, ManifestUnknown)
        self.assertEqual(self.router.provided, [marker_key(TAG_KEY, self.minute)])
        self.assertEqual(self.counted(), {"upstream": 1, "waited": 0, "timeout": 0})

    def test_waits_for_another_nodes_pull_then_serves_from_it(self) -> None:
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4)]}
        d = self.manifest_by_tag()
        self.clock.pump([0.25] * 20)
        self.assertNoResult(d)
        self.assertEqual(self.http.requests, [])
        # Node 4's containerd has the image now: its tag key is announced.
        self.router.providers[TAG_KEY] = [provider(4)]
        self.clock.advance(0.25)
        self.clock.advance(0)
        self.assert_served_by_node_4(d)
        self.assertEqual(self.router.provided, [])
        self.assertEqual(self.counted(), {"upstream": 0, "waited": 1, "timeout": 0})
        # Every poll asked the cluster, not the cache that holds the first miss.
        polls = [use_cache for key, use_cache in self.router.lookups[1:] if key == TAG_KEY]
        self.assertGreater(len(polls), 10)
        self.assertFalse(any(polls))
        # Only the first miss counts as unresolved; the wait's looks are not 404s.
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_mirror_unresolved_total", {"reason": "not_found"}), 1)

    def test_a_look_of_the_wait_may_outlast_the_resolve_timeout(self) -> None:
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4)]}
        d = self.manifest_by_tag()
        # The cluster is slow now: a look of the wait gets its answer 0.2 s after asking, ten
        # times the resolve timeout but within the poll interval.
        slow: list[Deferred[list[Provider]]] = []
        self.router.find_providers = self.slow_lookup(self.router.find_providers, slow)  # type: ignore[method-assign]
        self.clock.advance(0.25)
        self.assertEqual(len(slow), 1)
        self.clock.advance(0.2)
        slow[0].callback([provider(4)])
        self.clock.advance(0)
        self.assertEqual(len(self.http.requests), 1)
        self.assertNoResult(d)

    def slow_lookup(self, find: Any, slow: list[Deferred[list[Provider]]]) -> Any:
        def find_providers(key: str, *, on_provider: Any = None, limit: int = 20, use_cache: bool = True) -> Any:
            if key != TAG_KEY:
                return find(key, on_provider=on_provider, limit=limit, use_cache=use_cache)
            d: Deferred[list[Provider]] = Deferred()
            def found(providers: list[Provider]) -> list[Provider]:
                for p in providers:
                    on_provider(p)
                return providers
            d.addCallback(found)
            slow.append(d)
            return d
        return find_providers

    def test_a_node_that_marked_at_the_same_moment_as_a_lower_id_waits_for_it(self) -> None:
        coalescer = PullCoalescer(
            self.clock, self.router, timeout=30.0, poll_interval=0.25, node_id=provider(5).node_id,
            metrics=self.metrics,
        )
        self.mirror = Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, pick=lambda n: 0,
            coalescer=coalescer, metrics=self.metrics,
        )
        d = self.manifest_by_tag()
        marker = marker_key(TAG_KEY, self.minute)
        self.assertEqual(self.router.provided, [marker])  # nobody was pulling: it marked
        self.router.providers = {marker: [provider(4)]}  # node 4 marked at the same moment
        self.clock.advance(0.5)
        self.assertNoResult(d)  # node 4 pulls: this one waits
        self.router.providers[TAG_KEY] = [provider(4)]
        self.clock.pump([0.25] * 2)
        self.assert_served_by_node_4(d)
        self.assertEqual(self.counted(), {"upstream": 0, "waited": 1, "timeout": 0})

    def test_the_lowest_id_of_a_tie_goes_upstream(self) -> None:
        coalescer = PullCoalescer(
            self.clock, self.router, timeout=30.0, node_id=provider(3).node_id, metrics=self.metrics,
        )
        self.mirror = Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, coalescer=coalescer, metrics=self.metrics,
        )
        d = self.manifest_by_tag()
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4), provider(3)]}
        self.clock.advance(0.5)
        self.failureResultOf(d, ManifestUnknown)
        self.assertEqual(self.counted(), {"upstream": 1, "waited": 0, "timeout": 0})

    def test_gives_up_after_the_timeout_and_pulls_itself(self) -> None:
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4)]}
        d = self.manifest_by_tag()
        self.clock.pump([0.25] * 119)
        self.assertNoResult(d)
        self.clock.pump([0.25] * 2)
        self.failureResultOf(d, ManifestUnknown)
        # 30 s later it is the next minute.
        self.assertEqual(self.router.provided, [marker_key(TAG_KEY, self.minute + 1)])
        self.assertEqual(self.counted(), {"upstream": 1, "waited": 0, "timeout": 1})

    def test_blobs_never_wait(self) -> None:
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4)]}
        digest = digest_of(b"layer")
        d = ensureDeferred(ask_mirror(self.mirror, ClientRequest(), Reference(REGISTRY, "team/app", digest=digest), "blob"))  # type: ignore[arg-type]  # a DummyRequest
        self.failureResultOf(d, BlobUnknown)
        self.assertEqual([key for key, _ in self.router.lookups], [digest])
        self.assertEqual(self.router.provided, [])

    def test_off_without_a_coalescer(self) -> None:
        mirror = Mirror(self.clock, self.router, self.http, resolve_timeout=0.02, metrics=Metrics())
        self.router.providers = {marker_key(TAG_KEY, self.minute): [provider(4)]}
        d = ensureDeferred(ask_mirror(mirror, ClientRequest(), Reference(REGISTRY, "team/app", tag="v1"), "manifest"))  # type: ignore[arg-type]  # a DummyRequest
        self.failureResultOf(d, ManifestUnknown)
        self.assertEqual([key for key, _ in self.router.lookups], [TAG_KEY])
        self.assertEqual(self.router.provided, [])
