"""
Tests for L{spegel.uploads} and the registry's upload limit (C{--max-uploads}): a node at its
limit answers peers at once with 429 and Retry-After; every blob answer to a peer says how busy
the node is.
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
from spegel.uploads import UPLOADS_HEADER, UploadSlots, parse_uploads_header
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
