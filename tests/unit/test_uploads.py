"""
Tests for L{spegel.uploads} and the registry's upload limit (C{--max-uploads}): a node at its
limit answers peers at once with 429 and Retry-After; every blob answer to a peer says how busy
the node is; a node that has served its share of a blob leaves a peer with other holders to them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests.unit.stubtreq import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from spegel.interfaces import MIRRORED_HEADER
from spegel.metrics import Metrics
from spegel.registry import RegistryFilter, RegistryResource
from spegel.uploads import (
    ALTERNATIVES_HEADER,
    DEFERRED_ASKER_FOR,
    DEFERRED_HEADER,
    FAIR_SHARE_COPIES,
    MAX_SHARED_DIGESTS,
    SHARE_WINDOW,
    UPLOADS_HEADER,
    UploadShares,
    UploadSlots,
    parse_alternatives,
    parse_uploads_header,
)
from tests.unit.test_registry import BASE, REGISTRY, MemoryContent


class SlotTests(SynchronousTestCase):
    def test_limit(self) -> None:
        slots = UploadSlots(2, metrics=Metrics())
        self.assertTrue(slots.take())
        self.assertTrue(slots.take())
        self.assertFalse(slots.take())
        self.assertEqual(slots.metrics.registry.get_sample_value("spegel_uploads_refused_total"), 1)
        self.assertEqual(slots.header_value(), "2/2")
        slots.give_back()
        self.assertTrue(slots.take())

    def test_no_limit(self) -> None:
        slots = UploadSlots(metrics=Metrics())
        for _ in range(1000):
            self.assertTrue(slots.take())
        self.assertEqual(slots.header_value(), "1000/0")
        self.assertEqual(slots.metrics.registry.get_sample_value("spegel_uploads_active"), 1000)

    def test_parse_header(self) -> None:
        self.assertEqual(parse_uploads_header("3/8"), (3, 8))
        self.assertEqual(parse_uploads_header("0/0"), (0, 0))
        for bad in (None, "", "3", "-1/2", "a/b", "3/8/1", "9999999/1", " 3/8"):
            with self.subTest(bad=bad):
                self.assertIsNone(parse_uploads_header(bad))


class SlowContent(MemoryContent):
    """Blobs read through containerd, each read waiting until the test answers it."""

    def __init__(self, tmpdir: str) -> None:
        super().__init__(tmpdir)
        self.pending: list[tuple[Deferred[bytes], bytes]] = []

    def read(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.pending.append((d, self.blobs[digest][offset : offset + size]))
        return d

    def answer_all(self) -> None:
        while self.pending:
            d, data = self.pending.pop(0)
            d.callback(data)


class RegistryLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.content = SlowContent(self.mktemp())
        os.makedirs(self.content.tmpdir)
        self.data = os.urandom(3000)
        self.digest = self.content.add_blob(self.data, on_disk=False)
        metrics = Metrics()
        self.uploads = UploadSlots(1, metrics=metrics)
        registry = RegistryResource(
            task.Clock(), self.content, RegistryFilter(frozenset({REGISTRY})), uploads=self.uploads, metrics=metrics
        )
        self.treq = StubTreq(registry.resource())
        self.path = f"{BASE}/v2/team/app/blobs/{self.digest}?ns={REGISTRY}"

    def get(self, method: str = "GET", peer: bool = True) -> Deferred[Any]:
        headers = {MIRRORED_HEADER: "true"} if peer else {}
        return self.treq.request(method, self.path, headers=headers)

    def test_a_peer_over_the_limit_is_told_at_once(self) -> None:
        first = self.get()
        self.treq.flush()
        self.assertEqual(self.uploads.active, 1)
        second = self.successResultOf(self.get())
        self.assertEqual(second.code, 429)
        self.assertEqual(second.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(second.headers.getRawHeaders(UPLOADS_HEADER), ["1/1"])
        self.assertIsNone(second.headers.getRawHeaders("docker-content-digest"))
        body = json.loads(self.successResultOf(second.content()))
        self.assertEqual(body["errors"][0]["code"], "TOOMANYREQUESTS")
        # The first upload goes on, whole, and frees its slot.
        self.content.answer_all()
        self.treq.flush()
        response = self.successResultOf(first)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(UPLOADS_HEADER), ["0/1"])
        self.assertEqual(self.successResultOf(response.content()), self.data)
        self.assertEqual(self.uploads.active, 0)
        third = self.get()
        self.treq.flush()
        self.content.answer_all()
        self.treq.flush()
        self.assertEqual(self.successResultOf(third).code, 200)

    def test_containerd_and_heads_are_not_limited(self) -> None:
        self.get()
        self.treq.flush()
        local = self.get(peer=False)
        self.treq.flush()
        self.content.answer_all()
        self.treq.flush()
        response = self.successResultOf(local)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(UPLOADS_HEADER))
        head = self.successResultOf(self.get("HEAD"))
        self.assertEqual(head.code, 200)

    def test_a_failed_upload_frees_its_slot(self) -> None:
        first = self.get()
        self.treq.flush()
        d, _ = self.content.pending.pop(0)
        d.errback(OSError("containerd went away"))
        self.treq.flush()
        self.failureResultOf(first)  # the response is cut: the peer sees a broken transfer
        self.assertEqual(self.uploads.active, 0)


class ShareTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.shares = UploadShares(self.clock)

    def test_over_after_the_fair_copies(self) -> None:
        self.assertEqual(FAIR_SHARE_COPIES, 2)
        self.assertFalse(self.shares.over("sha256:a", 1000))
        self.shares.promise("sha256:a", 1000)
        self.shares.promise("sha256:a", 999)
        self.assertFalse(self.shares.over("sha256:a", 1000))
        self.shares.promise("sha256:a", 1)
        self.assertTrue(self.shares.over("sha256:a", 1000))
        self.assertFalse(self.shares.over("sha256:b", 1000), "counted per blob")

    def test_counted_again_after_the_window(self) -> None:
        self.shares.promise("sha256:a", 2000)
        self.clock.advance(SHARE_WINDOW - 1)
        self.assertTrue(self.shares.over("sha256:a", 1000))
        self.shares.promise("sha256:a", 10)  # asked again: the window starts again
        self.clock.advance(SHARE_WINDOW - 1)
        self.assertTrue(self.shares.over("sha256:a", 1000))
        self.clock.advance(1)
        self.assertFalse(self.shares.over("sha256:a", 1000))
        self.shares.promise("sha256:a", 1000)
        self.assertFalse(self.shares.over("sha256:a", 1000), "the old count is gone")

    def test_empty_blobs_and_no_share(self) -> None:
        self.assertFalse(self.shares.over("sha256:e", 0))
        self.shares.promise("sha256:e", 0)
        self.assertFalse(self.shares.over("sha256:e", 0))
        unlimited = UploadShares(self.clock, fair_copies=0)
        unlimited.promise("sha256:a", 10**9)
        self.assertFalse(unlimited.over("sha256:a", 1))

    def test_bounded(self) -> None:
        for index in range(MAX_SHARED_DIGESTS + 10):
            self.shares.promise(f"sha256:{index}", 2000)
        self.assertEqual(len(self.shares._promised), MAX_SHARED_DIGESTS)
        self.assertFalse(self.shares.over("sha256:0", 1000), "the oldest went first")
        self.assertTrue(self.shares.over(f"sha256:{MAX_SHARED_DIGESTS + 9}", 1000))

    def test_deferred_once_per_asker_when_naming_none(self) -> None:
        self.shares.promise("sha256:a", 2000)
        self.assertTrue(self.shares.should_defer("sha256:a", 1000, 0, "198.18.0.2"))
        self.assertFalse(self.shares.should_defer("sha256:a", 1000, 0, "198.18.0.2"), "asked again")
        self.assertTrue(self.shares.should_defer("sha256:a", 1000, 0, "198.18.0.3"), "another asker")
        self.assertTrue(self.shares.should_defer("sha256:a", 1000, 3, "198.18.0.2"), "naming others")
        self.assertFalse(self.shares.should_defer("sha256:b", 1000, 3, "198.18.0.2"), "not over its share")
        self.assertFalse(self.shares.should_defer("sha256:a", 1000, None, "198.18.0.4"), "not saying")

    def test_parse_alternatives(self) -> None:
        self.assertEqual(parse_alternatives("3"), 3)
        self.assertEqual(parse_alternatives("0"), 0)
        for bad in (None, "", "-1", "x", " 3", "1234567"):
            with self.subTest(bad=bad):
                self.assertIsNone(parse_alternatives(bad))


class RegistryShareTests(SynchronousTestCase):
    """
    A node that has sent peers its share of a blob answers a peer that has other holders to ask
    with 429 and C{Spegel-Deferred}; one that has none once, then it is served; one that does not
    say always is.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.content = MemoryContent(self.mktemp())
        os.makedirs(self.content.tmpdir)
        self.data = os.urandom(3000)
        self.digest = self.content.add_blob(self.data)
        self.metrics = Metrics()
        self.uploads = UploadSlots(4, metrics=self.metrics)
        registry = RegistryResource(
            self.clock, self.content, RegistryFilter(frozenset({REGISTRY})), uploads=self.uploads, metrics=self.metrics
        )
        self.treq = StubTreq(registry.resource())
        self.path = f"{BASE}/v2/team/app/blobs/{self.digest}?ns={REGISTRY}"

    def get(self, alternatives: str | None = "1", peer: bool = True, **headers: str) -> Any:
        if peer:
            headers[MIRRORED_HEADER] = "true"
        if alternatives is not None:
            headers[ALTERNATIVES_HEADER] = alternatives
        d = self.treq.request("GET", self.path, headers=headers)
        self.treq.flush()
        return self.successResultOf(d)

    def deferrals(self) -> float:
        return self.metrics.registry.get_sample_value("spegel_uploads_deferred_total") or 0.0

    def test_deferred_after_its_share(self) -> None:
        for _ in range(FAIR_SHARE_COPIES):
            response = self.get()
            self.assertEqual(response.code, 200)
            self.assertEqual(self.successResultOf(response.content()), self.data)
        response = self.get()
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(DEFERRED_HEADER), ["true"])
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(self.deferrals(), 1)
        self.assertEqual(self.uploads.active, 0, "a deferral gives its slot back")

    def test_a_peer_with_no_other_holder_is_deferred_once(self) -> None:
        """
        Over its share, a node defers a request that names no other holder once: the asker looks
        for holders afresh, and the peers served so far are holders by then. The same host
        asking again within DEFERRED_ASKER_FOR (it found none) is served.
        """
        for _ in range(FAIR_SHARE_COPIES):
            self.assertEqual(self.get(alternatives="0").code, 200)
        # A client that does not say (another version, curl) is never deferred.
        self.assertEqual(self.get(alternatives=None).code, 200)
        response = self.get(alternatives="0")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(DEFERRED_HEADER), ["true"])
        for _ in range(2):
            self.assertEqual(self.get(alternatives="0").code, 200)
            self.assertEqual(self.get(alternatives="garbage").code, 200)
        # A request naming other holders is left to them, as before.
        self.assertEqual(self.get(alternatives="2").code, 429)
        self.assertEqual(self.get(alternatives="0").code, 200)
        self.clock.advance(DEFERRED_ASKER_FOR)
        self.assertEqual(self.get(alternatives="0").code, 429)

    def test_containerd_is_never_deferred(self) -> None:
        for _ in range(FAIR_SHARE_COPIES):
            self.get()
        response = self.get(peer=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), self.data)
        self.assertEqual(self.deferrals(), 0)

    def test_ranges_count_by_their_length(self) -> None:
        half = len(self.data) // 2
        for _ in range(2 * FAIR_SHARE_COPIES - 1):
            self.assertEqual(self.get(Range=f"bytes=0-{half - 1}").code, 206)
        self.assertEqual(self.get(Range=f"bytes={half}-").code, 206)
        self.assertEqual(self.get(Range="bytes=0-0").code, 429)

    def test_served_again_after_the_window(self) -> None:
        for _ in range(FAIR_SHARE_COPIES):
            self.get()
        self.assertEqual(self.get().code, 429)
        self.clock.advance(SHARE_WINDOW)
        self.assertEqual(self.get().code, 200)
