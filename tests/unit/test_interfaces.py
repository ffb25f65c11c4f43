"""
Tests for L{spegel.interfaces}: the real collaborators and the tests' fakes provide the
interfaces they stand for, so neither can drift from the declaration.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyClass, verifyObject

from spegel.dht.service import DHTService
from spegel.interfaces import (
    IAnnouncer,
    ICoalescingRouter,
    IDebugRouter,
    ILocalContent,
    IMirror,
    IResponseBody,
    IRouter,
)
from spegel.metrics import Metrics
from spegel.mirror import Mirror
from spegel.peerhealth import LatencyTracker, PutAside
from spegel.selection import PeerClient, PeerSession, ProviderQueue
from spegel.store import ContainerdContent
from spegel.peerresponse import PeerResponse, SpooledBody
from spegel.streaming import BlobCopy
from tests.unit.test_advertiser import RecordingRouter
from tests.unit.test_coalesce import ScriptedRouter
from tests.unit.test_debugweb import FakeRouter as DebugFakeRouter
from tests.unit.test_mirror import FakeHTTP, FakeResponse, FakeRouter, provider
from tests.unit.test_registry import MemoryContent, RecordingMirror


class RealClassesTests(SynchronousTestCase):
    def test_mirror(self) -> None:
        clock = task.Clock()
        self.assertTrue(verifyObject(IMirror, Mirror(clock, FakeRouter(clock), FakeHTTP(), metrics=Metrics())))

    def test_dht_service(self) -> None:
        # Checked as a class: an instance needs a reactor and a node.
        for interface in (IRouter, IAnnouncer, ICoalescingRouter, IDebugRouter):
            self.assertTrue(verifyClass(interface, DHTService, tentative=True))

    def test_containerd_content(self) -> None:
        self.assertTrue(verifyClass(ILocalContent, ContainerdContent, tentative=True))

    def test_bodies(self) -> None:
        self.assertTrue(verifyObject(IResponseBody, SpooledBody(-1, 0, on_complete=lambda: None, metrics=Metrics())))
        clock = task.Clock()
        put_aside = PutAside(clock)
        session = PeerSession(
            PeerClient(clock, FakeHTTP(), put_aside, LatencyTracker(), metrics=Metrics()),
            ProviderQueue(put_aside, lambda n: 0),
            "/v2/x/blobs/sha256:0",
        )
        upstream = PeerResponse(provider(1), FakeResponse(200, {}, 10))
        copy = BlobCopy(clock, upstream, "sha256:" + "0" * 64, session, max_resumes=1, idle_timeout=1.0, metrics=Metrics())
        self.assertTrue(verifyObject(IResponseBody, copy))


class FakesTests(SynchronousTestCase):
    def test_routers(self) -> None:
        clock = task.Clock()
        self.assertTrue(verifyObject(IRouter, FakeRouter(clock)))
        self.assertTrue(verifyObject(ICoalescingRouter, ScriptedRouter()))
        self.assertTrue(verifyObject(IAnnouncer, RecordingRouter(), tentative=True))
        self.assertTrue(verifyObject(IDebugRouter, DebugFakeRouter(clock, []), tentative=True))

    def test_content(self) -> None:
        self.assertTrue(verifyObject(ILocalContent, MemoryContent(self.mktemp())))

    def test_mirror(self) -> None:
        self.assertTrue(verifyObject(IMirror, RecordingMirror()))

    def test_a_drifted_fake_is_caught(self) -> None:
        class OldMirror:
            async def serve_blob(self, request: object, reference: object) -> bytes:
                return b""

        self.assertRaises(Invalid, verifyObject, IMirror, OldMirror(), tentative=True)
