"""
Tests for L{spegel.mirror}: finding peers, hedging, streaming with backpressure, verifying and
resuming. Socket-free: a fake router, fake peers and a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from tests.unit.stubtreq import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from spegel import oci
from spegel.dht.ids import Provider
from spegel.interfaces import IRouter
from spegel.metrics import Metrics
from spegel.mirror import LatencyTracker, Mirror
from spegel.oci import BlobUnknown, ManifestUnknown, Reference
from spegel.peerresponse import PEER_FAILURE_REASONS
from spegel.selection import PROVEN_FOR
from spegel.registry import RegistryFilter, RegistryResource, ask_mirror
from tests.unit.test_registry import MemoryContent

REGISTRY = "127.0.0.1:5000"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def provider(n: int) -> Provider:
    return Provider(bytes([n]) * 32, f"127.0.0.{n}", 5000 + n)


@implementer(IRouter)
class FakeRouter:
    """
    A DHT whose lookups the test drives; announcing providers also lets the clock's zero-delay
    calls run, as a reactor turn would.
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.used_cache: list[bool] = []
        self.lookups: list[tuple[str, Callable[[Provider], None], Deferred[list[Provider]]]] = []

    def find_providers(self, key: str, *, on_provider=None, limit=20, use_cache=True):  # type: ignore[no-untyped-def]
        d: Deferred[list[Provider]] = Deferred()
        self.lookups.append((key, on_provider, d))
        self.used_cache.append(use_cache)
        return d

    def announce(self, *providers: Provider, end: bool = False) -> None:
        key, on_provider, d = self.lookups[-1]
        for p in providers:
            on_provider(p)
        if end and not d.called:
            d.callback(list(providers))
        self.clock.advance(0)


class BodyTransport:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    def __init__(self, code: int, headers: dict[str, str], length: int | None):
        self.code = code
        self.headers = Headers({k: [v] for k, v in headers.items()})
        self.length = length
        self.protocol: Any = None
        self.transport = BodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


class FakeHTTP:
    """
    Records requests to peers; the test answers them.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Deferred[Any]]] = []

    def request(self, method: str, url: str, headers=None, unbuffered=False):  # type: ignore[no-untyped-def]
        d: Deferred[Any] = Deferred()
        self.requests.append((method, url, dict(headers or {}), d))
        return d

    def answer(self, index: int, code: int, body_length: int | None, **headers: str) -> FakeResponse:
        response = FakeResponse(code, {k.replace("_", "-"): v for k, v in headers.items()}, body_length)
        self.requests[index][3].callback(response)
        return response


class ClientRequest(DummyRequest):
    """
    The downstream request: records writes, producer registration and abort.
    """

    def __init__(self, method: bytes = b"GET", headers: dict[str, str] | None = None):
        super().__init__([b""])
        self.method = method
        for name, value in (headers or {}).items():
            self.requestHeaders.addRawHeader(name, value)
        self.producer: Any = None
        self.aborted = False
        self.startedWriting = False
        request = self

        class Transport:
            def abortConnection(self) -> None:
                request.aborted = True

        class Channel:
            transport = Transport()

            def loseConnection(self) -> None:
                # Closed before the announced length: the response was cut short.
                request.aborted = True

        self.channel = Channel()

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        super().write(data)

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


class MirrorTestCase(SynchronousTestCase):
    # Blobs of these tests are larger: they stream, unless a test case says otherwise.
    spool_max = 1000

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.router = FakeRouter(self.clock)
        self.http = FakeHTTP()
        self.latency = LatencyTracker(initial=0.05)
        self.metrics = Metrics()
        self.spool_dir = self.mktemp()
        os.makedirs(self.spool_dir)
        self.mirror = self.build_mirror()
        self.data = os.urandom(100_000)
        self.digest = digest_of(self.data)
        self.ref = Reference(REGISTRY, "team/app", digest=self.digest)

    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, metrics=self.metrics,
        )

    def counted(self, name: str, **labels: str) -> float:
        """The mirror's figure C{name} with C{labels} (0 until something was counted there)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def blob(self, request: ClientRequest) -> Deferred[Any]:
        return ensureDeferred(ask_mirror(self.mirror, request, self.ref, "blob"))  # type: ignore[arg-type]  # a DummyRequest

    def assert_put_aside_at_the_patient_deadline(self) -> None:
        """Provider 1, the only one, sends no headers: given up on and put aside at the patient deadline."""
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.proven_header_deadline - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, BlobUnknown)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def serve_whole(self, index: int) -> None:
        """Peer request C{index} is answered 200 with the whole blob."""
        response = self.http.answer(index, 200, len(self.data))
        response.send(self.data)
        response.end()

    def serve_rest(self, index: int, start: int) -> None:
        """Peer request C{index} is answered 206 with the blob from C{start} on (a resume)."""
        size = len(self.data)
        response = self.http.answer(index, 206, size - start, content_range=f"bytes {start}-{size - 1}/{size}")
        response.send(self.data[start:])
        response.end()


class ResolveTests(MirrorTestCase):
    def test_no_provider_in_time_is_unknown(self) -> None:
        d = self.blob(ClientRequest())
        self.clock.advance(0.021)
        self.failureResultOf(d, BlobUnknown)
        self.assertEqual(self.http.requests, [])

    def test_lookup_ending_empty_is_unknown_at_once(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(end=True)
        self.failureResultOf(d, BlobUnknown)

    def test_unresolved_counted_by_reason(self) -> None:
        """
        A 404 for want of a provider is counted, and says whether the resolve timeout cut the
        lookup short (a slow DHT, or a timeout too short) or the cluster has none.
        """
        d = self.blob(ClientRequest())
        self.clock.advance(0.021)
        self.failureResultOf(d, BlobUnknown)
        d = self.blob(ClientRequest())
        self.router.announce(end=True)
        self.failureResultOf(d, BlobUnknown)
        counted = {r: self.counted("spegel_mirror_unresolved_total", reason=r) for r in ("timeout", "not_found")}
        self.assertEqual(counted, {"timeout": 1, "not_found": 1})

    def test_only_peers_put_aside_asks_afresh(self) -> None:
        self.mirror.put_aside.put_aside(provider(1))
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)  # a cached answer naming only provider 1
        self.assertEqual(self.router.used_cache, [True, False])
        self.router.announce(provider(2), end=True)
        response = self.http.answer(0, 200, len(self.data))
        self.assertIn("127.0.0.2:5002", self.http.requests[0][1])
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_request_to_peer(self) -> None:
        request = ClientRequest()
        self.blob(request)
        self.assertEqual(self.router.lookups[0][0], self.digest)
        self.router.announce(provider(1))
        ((method, url, headers, _),) = self.http.requests
        self.assertEqual(method, "GET")
        self.assertEqual(url, f"http://127.0.0.1:5001/v2/team/app/blobs/{self.digest}?ns=127.0.0.1%3A5000")
        self.assertEqual(headers["X-Spegel-Mirrored"], "true")


class BlobStreamingTests(MirrorTestCase):
    def test_whole_blob_verified_and_last_chunk_held(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1))
        response = self.http.answer(0, 200, len(self.data), docker_content_digest=self.digest,
                                    content_type="application/octet-stream")
        self.assertEqual(request.responseHeaders.getRawHeaders("content-length"), [str(len(self.data))])
        self.assertEqual(request.responseHeaders.getRawHeaders("docker-content-digest"), [self.digest])
        response.send(self.data[:60_000])
        self.assertEqual(request.body, b"", "the latest chunk is held back")
        response.send(self.data[60_000:])
        self.assertEqual(request.body, self.data[:60_000])
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)

    def test_backpressure_reaches_the_peer(self) -> None:
        request = ClientRequest()
        self.blob(request)
        self.router.announce(provider(1))
        response = self.http.answer(0, 200, len(self.data))
        request.producer.pauseProducing()
        self.assertTrue(response.transport.paused)
        request.producer.resumeProducing()
        self.assertFalse(response.transport.paused)

    def test_corrupt_peer_never_completes_the_body(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1))
        response = self.http.answer(0, 200, len(self.data))
        bad = bytearray(self.data)
        bad[10] ^= 0xFF
        response.send(bytes(bad[:50_000]))
        response.send(bytes(bad[50_000:]))
        response.end()
        self.successResultOf(d)
        self.assertTrue(request.aborted)
        self.assertLess(len(request.body), len(self.data))
        self.assertEqual(self.counted("spegel_digest_mismatches_total"), 1)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def test_midway_failure_resumes_on_next_provider(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:30_000])
        first.send(self.data[30_000:40_000])
        first.end(Failure(ConnectionLost()))
        method, url, headers, _ = self.http.requests[-1]
        self.assertIn("127.0.0.2:5002", url)
        self.assertEqual(headers["Range"], f"bytes=40000-{len(self.data) - 1}")
        second = self.http.answer(
            len(self.http.requests) - 1, 206, len(self.data) - 40_000,
            content_range=f"bytes 40000-{len(self.data) - 1}/{len(self.data)}",
        )
        second.send(self.data[40_000:])
        second.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def test_malformed_content_range_on_resume_moves_on(self) -> None:
        """
        A peer answering the resume with a Content-Range that does not parse, or names other
        bytes, is put aside like any failing peer and the copy goes on elsewhere; the client
        request never hangs (it used to: the parse error escaped the resume unhandled).
        """
        for bad in ("bytes banana/zzz", "bytes 0-10/5", "octets 40000-{last}/{size}", "bytes 39999-{last}/{size}"):
            request = ClientRequest()
            d = self.blob(request)
            self.router.announce(provider(1), provider(2), provider(3))
            first = self.http.answer(0, 200, len(self.data))
            first.send(self.data[:40_000])
            first.end(Failure(ConnectionLost()))
            last, size = len(self.data) - 1, len(self.data)
            liar = self.http.answer(
                len(self.http.requests) - 1, 206, size - 40_000, content_range=bad.format(last=last, size=size)
            )
            # Discarded: its connection closed, the resume moved on.
            self.assertTrue(liar.transport.stopped, bad)
            honest = self.http.answer(
                len(self.http.requests) - 1, 206, size - 40_000, content_range=f"bytes 40000-{last}/{size}"
            )
            honest.send(self.data[40_000:])
            honest.end()
            self.successResultOf(d)
            self.assertEqual(request.body, self.data, bad)
            self.assertEqual(len(self.http.requests), 3, bad)
            self.http.requests.clear()
            self.clock.advance(self.mirror.put_aside.duration + 1)

    def test_silent_peer_is_left_for_the_next(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:10])
        self.clock.advance(5.1)
        self.assertTrue(first.transport.stopped)
        second = self.http.answer(
            len(self.http.requests) - 1, 206, len(self.data) - 10,
            content_range=f"bytes 10-{len(self.data) - 1}/{len(self.data)}",
        )
        second.send(self.data[10:])
        second.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_paused_peer_is_not_silent(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1))
        response = self.http.answer(0, 200, len(self.data))
        request.producer.pauseProducing()
        self.clock.advance(60)
        self.assertFalse(response.transport.stopped)
        request.producer.resumeProducing()
        response.send(self.data)
        response.end()
        self.successResultOf(d)

    def test_no_provider_to_resume_aborts(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:10])
        first.end(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertTrue(request.aborted)

    def test_client_range_is_forwarded(self) -> None:
        request = ClientRequest(headers={"Range": "bytes=100-199"})
        d = self.blob(request)
        self.router.announce(provider(1))
        self.assertEqual(self.http.requests[0][2]["Range"], "bytes=100-199")
        response = self.http.answer(0, 206, 100, content_range=f"bytes 100-199/{len(self.data)}")
        response.send(self.data[100:200])
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.responseCode, 206)
        self.assertEqual(request.body, self.data[100:200])
        self.assertEqual(
            request.responseHeaders.getRawHeaders("content-range"), [f"bytes 100-199/{len(self.data)}"]
        )

    def test_head(self) -> None:
        request = ClientRequest(method=b"HEAD")
        d = self.blob(request)
        self.router.announce(provider(1))
        response = self.http.answer(0, 200, 0, content_length=str(len(self.data)))
        self.assertEqual(self.successResultOf(d), b"")
        self.assertEqual(self.http.requests[0][0], "HEAD")
        self.assertEqual(request.responseHeaders.getRawHeaders("content-length"), [str(len(self.data))])
        self.assertTrue(response.transport.stopped)


class SpoolTests(MirrorTestCase):
    """
    Small blobs are read whole and checked before the client sees a byte.
    """

    spool_max = 200_000

    def test_corrupt_small_blob_is_fetched_again_elsewhere(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        bad = self.http.answer(0, 200, len(self.data))
        bad.send(self.data[:-1] + b"!")
        self.assertEqual(request.body, b"")
        bad.end()
        self.assertEqual(len(self.http.requests), 2)
        self.assertEqual(request.body, b"", "nothing of the wrong copy reached the client")
        good = self.http.answer(1, 200, len(self.data), docker_content_digest=self.digest)
        good.send(self.data)
        good.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)
        self.assertEqual(request.responseHeaders.getRawHeaders("content-length"), [str(len(self.data))])
        self.assertEqual(self.counted("spegel_digest_mismatches_total"), 1)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))
        self.assertEqual(os.listdir(self.spool_dir), [], "spools are unlinked")

    def test_short_copy_is_fetched_again_elsewhere(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        short = self.http.answer(0, 200, len(self.data))
        short.send(self.data[:5000])
        short.end(Failure(ConnectionLost()))
        good = self.http.answer(1, 200, len(self.data))
        good.send(self.data)
        good.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_every_copy_wrong_is_unknown(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        bad = self.http.answer(0, 200, len(self.data))
        bad.send(b"x" * len(self.data))
        bad.end()
        self.failureResultOf(d, BlobUnknown)

    def test_retry_budget_spent_on_wrong_copies_is_unknown(self) -> None:
        """
        Once as many peers as the retry budget allows have sent wrong copies, the answer is a
        404 at once, though more providers are known (it once waited forever here).
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), provider(3), provider(4))
        for attempt in range(3):
            bad = self.http.answer(attempt, 200, len(self.data))
            bad.send(b"x" * len(self.data))
            bad.end()
        self.failureResultOf(d, BlobUnknown)
        self.assertEqual(len(self.http.requests), 3)


class HedgingTests(MirrorTestCase):
    def test_load_spreads_over_holders(self) -> None:
        picks: list[int] = []
        def pick(n: int) -> int:
            picks.append(n)
            return n - 1

        self.mirror = self.build_mirror(pick=pick)
        self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), provider(3))
        self.assertIn("127.0.0.3:5003", self.http.requests[0][1])
        self.assertEqual(picks, [3])

    def test_slow_peer_gets_a_hedge(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        self.assertEqual(len(self.http.requests), 1)
        self.clock.advance(0.049)
        self.assertEqual(len(self.http.requests), 1)
        self.clock.advance(0.002)
        self.assertEqual(len(self.http.requests), 2)
        response = self.http.answer(1, 200, len(self.data))
        # The slow attempt is cancelled once another won.
        self.assertTrue(self.http.requests[0][3].called)
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_refusal_tries_the_next_at_once(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        self.http.answer(0, 404, 0)
        self.assertEqual(len(self.http.requests), 2)
        self.serve_whole(1)
        self.successResultOf(d)

    def test_at_most_retries_peers(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), provider(3), provider(4))
        for i in range(3):
            self.http.answer(i, 404, 0)
        self.assertEqual(len(self.http.requests), 3)
        self.failureResultOf(d, BlobUnknown)
        # Counted apart from lookups that found no one.
        self.assertEqual(self.counted("spegel_mirror_unresolved_total", reason="peers_failed"), 1)
        self.assertEqual(self.counted("spegel_mirror_unresolved_total", reason="not_found"), 0)

    def test_learned_delay(self) -> None:
        tracker = LatencyTracker()
        for _ in range(100):
            tracker.observe(0.004)
        self.assertAlmostEqual(tracker.hedge_delay(), 0.006)
        tracker.observe(10)
        self.assertLessEqual(tracker.hedge_delay(), tracker.maximum)


class ManifestTests(MirrorTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                    "config": {}, "layers": []}).encode()
        self.manifest_digest = digest_of(self.manifest)

    def test_corrupt_manifest_is_fetched_again_elsewhere(self) -> None:
        request = ClientRequest()
        ref = Reference(REGISTRY, "team/app", digest=self.manifest_digest)
        d = ensureDeferred(ask_mirror(self.mirror, request, ref, "manifest"))  # type: ignore[arg-type]  # a DummyRequest
        self.router.announce(provider(1), provider(2))
        bad = self.http.answer(0, 200, len(self.manifest), content_type=oci.OCI_MANIFEST)
        bad.send(self.manifest.replace(b"2", b"3"))
        bad.end()
        good = self.http.answer(1, 200, len(self.manifest), content_type=oci.OCI_MANIFEST,
                                docker_content_digest=self.manifest_digest)
        good.send(self.manifest)
        good.end()
        self.assertEqual(self.successResultOf(d), self.manifest)
        self.assertEqual(request.responseHeaders.getRawHeaders("content-type"), [oci.OCI_MANIFEST])
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def test_tag_resolves_through_tag_key_and_checks_announced_digest(self) -> None:
        request = ClientRequest()
        ref = Reference(REGISTRY, "team/app", tag="v1")
        d = ensureDeferred(ask_mirror(self.mirror, request, ref, "manifest"))  # type: ignore[arg-type]  # a DummyRequest
        self.assertEqual(self.router.lookups[0][0], f"{REGISTRY}/team/app:v1")
        self.router.announce(provider(1))
        self.assertIn("/v2/team/app/manifests/v1?ns=", self.http.requests[0][1])
        response = self.http.answer(0, 200, len(self.manifest), content_type=oci.OCI_MANIFEST,
                                    docker_content_digest=self.manifest_digest)
        response.send(self.manifest)
        response.end()
        self.assertEqual(self.successResultOf(d), self.manifest)

    def test_unknown_everywhere(self) -> None:
        ref = Reference(REGISTRY, "team/app", tag="v1")
        d = ensureDeferred(ask_mirror(self.mirror, ClientRequest(), ref, "manifest"))  # type: ignore[arg-type]  # a DummyRequest
        self.router.announce(provider(1), end=True)
        self.http.answer(0, 404, 0)
        self.failureResultOf(d, ManifestUnknown)


class ThroughTreqTests(SynchronousTestCase):
    """
    The mirror in front of a real registry resource as the peer, through treq's StubTreq:
    the same streaming API as a real connection.
    """

    def test_blob_and_manifest_from_peer_registry(self) -> None:
        clock = task.Clock()
        peer_content = MemoryContent(self.mktemp())
        os.makedirs(peer_content.tmpdir)
        data = os.urandom(300_000)
        blob_digest = peer_content.add_blob(data)
        manifest = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
        peer_content.add_manifest(REGISTRY, "team/app", "v1", manifest)
        peer_metrics = Metrics()
        peer = RegistryResource(clock, peer_content, RegistryFilter(), metrics=peer_metrics)
        router = FakeRouter(clock)
        metrics = Metrics()
        mirror = Mirror(clock, router, StubTreq(peer.resource()), metrics=metrics)
        local = RegistryResource(clock, MemoryContent(self.mktemp()), RegistryFilter(), mirror=mirror, metrics=metrics)
        client = StubTreq(local.resource())

        d = client.get(f"http://node/v2/team/app/blobs/{blob_digest}?ns={REGISTRY}")
        router.announce(provider(9))
        client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), data)

        d = client.get(f"http://node/v2/team/app/manifests/v1?ns={REGISTRY}")
        router.announce(provider(9))
        client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), manifest)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [oci.OCI_MANIFEST])
        # Each node counts what it served, and where it came from.
        served = len(data) + len(manifest)
        self.assertEqual(metrics.registry.get_sample_value("spegel_served_bytes_total", {"source": "peer"}), served)
        self.assertIsNone(metrics.registry.get_sample_value("spegel_served_bytes_total", {"source": "local"}))
        self.assertEqual(peer_metrics.registry.get_sample_value("spegel_served_bytes_total", {"source": "local"}), served)


class CancellingHTTP(FakeHTTP):
    """
    Like treq over a real Agent: cancelling a request fails it with ConnectingCancelledError
    while the TCP connection is being made, and with ResponseNeverReceived([CancelledError])
    once the request was sent -- neither is a CancelledError.
    """

    def __init__(self, cancelled: Exception) -> None:
        super().__init__()
        self.cancelled = cancelled

    def request(self, method: str, url: str, headers=None, unbuffered=False):  # type: ignore[no-untyped-def]
        d: Deferred[Any] = Deferred(lambda d: d.errback(self.cancelled))
        self.requests.append((method, url, dict(headers or {}), d))
        return d


class HedgeLoserCancelledTests(MirrorTestCase):
    spool_max = 1_000_000  # the 100 kB blob is spooled, as small blobs are in real nodes

    def check(self, cancelled: Exception) -> None:
        self.http = CancellingHTTP(cancelled)
        self.mirror = self.build_mirror()
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)  # a cached lookup ends at once
        self.clock.advance(0.06)  # no answer within the hedge delay: peer 2 is asked too
        self.assertEqual(len(self.http.requests), 2)
        response = self.http.answer(0, 200, len(self.data), docker_content_digest=self.digest)
        self.assertIsNotNone(response.protocol, "peer 1's 200 was dropped: the request ended as a miss")
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)) or self.mirror.put_aside.is_aside(provider(2)))

    def test_loserStillConnecting(self) -> None:
        self.check(ConnectingCancelledError("127.0.0.1:5002"))

    def test_loserWaitingForHeaders(self) -> None:
        self.check(ResponseNeverReceived([Failure(CancelledError())]))


class ClientLeavingMidRaceTests(MirrorTestCase):
    def test_every_attempt_and_timer_stops(self) -> None:
        """
        containerd gives up while two holders are asked and none has answered: both requests
        are cancelled and no timer is left, so nothing keeps asking (or holds a holder's upload
        slot) for a client that is gone, and no peer is blamed.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), end=True)
        self.clock.advance(0.06)  # past the hedge delay: peer 2 is asked too
        self.assertEqual(len(self.http.requests), 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for _, url, _, attempt in self.http.requests:
            self.assertTrue(attempt.called, f"the request to {url} was left running")  # by its cancelling
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)) or self.mirror.put_aside.is_aside(provider(2)))
        self.assertEqual(self.counted("spegel_mirror_unresolved_total", reason="peers_failed"), 0)


class MisbehavingPeerTests(MirrorTestCase):
    """
    Peers that accept a request and never send response headers (a tarpit, a wedged process)
    cost the header deadline, not minutes; a peer back from the dead is asked again at once.
    """

    def test_tarpit_is_put_aside_after_the_deadline(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        deadline = self.latency.header_deadline()
        self.clock.advance(deadline - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        self.failureResultOf(d, BlobUnknown)
        self.assertTrue(self.http.requests[0][3].called, "the request was cancelled")
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def test_only_tarpits_end_in_404_within_the_deadline(self) -> None:
        """
        Every provider a tarpit: the hedges ask the retry budget's worth, and the 404 comes
        one deadline after the last of them was asked.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), provider(3), provider(4), end=True)
        self.clock.pump([0.06] * 3)
        self.assertEqual(len(self.http.requests), 3)
        deadline = self.latency.header_deadline()
        self.clock.advance(deadline - 0.1)
        self.assertNoResult(d)
        self.clock.pump([0.01] * 10)
        self.failureResultOf(d, BlobUnknown)

    def test_tarpit_then_honest_peer(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        self.clock.advance(0.06)  # the hedge asks provider 2 as well
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_tarpit_on_resume_moves_on(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), provider(3))
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:40_000])
        first.end(Failure(ConnectionLost()))
        self.assertEqual(len(self.http.requests), 2)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.assertTrue(self.http.requests[1][3].called)
        self.assertEqual(len(self.http.requests), 3)
        self.serve_rest(2, 40_000)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_deadline_follows_observed_latency(self) -> None:
        tracker = LatencyTracker()
        self.assertEqual(tracker.header_deadline(), tracker.header_deadline_initial)
        for _ in range(20):
            tracker.observe(0.01)
        self.assertEqual(tracker.header_deadline(), tracker.header_deadline_minimum)
        for _ in range(200):
            tracker.observe(0.3)
        self.assertAlmostEqual(tracker.header_deadline(), 1.2)
        for _ in range(200):
            tracker.observe(10.0)
        self.assertEqual(tracker.header_deadline(), tracker.header_deadline_maximum)

    def test_lift(self) -> None:
        aside = self.mirror.put_aside
        for p in (provider(1), Provider(b"x" * 32, provider(1).host, 6000), provider(2)):
            aside.put_aside(p)
        aside.lift(provider(1).host, provider(1).registry_port)
        self.assertFalse(aside.is_aside(provider(1)))
        self.assertTrue(aside.is_aside(Provider(b"x" * 32, provider(1).host, 6000)))
        aside.lift(provider(1).host)
        self.assertFalse(aside.is_aside(Provider(b"x" * 32, provider(1).host, 6000)))
        self.assertTrue(aside.is_aside(provider(2)))

    def test_refusing_peer_404_within_the_resolve_timeout(self) -> None:
        """
        The only provider found refuses; the lookup is still asking slow nodes: the 404 comes
        one resolve timeout later, not when the lookup ends.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1))
        self.http.requests[0][3].errback(Failure(ConnectionLost()))
        self.assertNoResult(d)
        self.clock.advance(0.021)
        self.failureResultOf(d, BlobUnknown)
        self.assertFalse(self.router.lookups[-1][2].called, "the lookup had not ended")

    def test_late_provider_within_the_resolve_timeout_is_asked(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1))
        self.http.requests[0][3].errback(Failure(ConnectionLost()))
        self.clock.advance(0.01)
        self.router.announce(provider(2))
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)


class BusyPeerTests(MirrorTestCase):
    """
    A peer that answered this node recently is busy when it is slow, not a tarpit: it gets the
    patient response-header deadline (a 404 would send containerd upstream for the whole layer).
    """

    def serve_once(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.serve_whole(len(self.http.requests) - 1)
        self.successResultOf(d)

    def test_a_peer_that_answered_gets_the_patient_deadline(self) -> None:
        self.serve_once()
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.5)
        self.assertNoResult(d)
        self.assertFalse(self.http.requests[1][3].called, "the busy peer's request was cancelled")
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)))

    def test_headers_waiting_when_the_deadline_comes_due_win(self) -> None:
        """
        A node the kernel did not run for a while runs its due timers before it reads its
        sockets. The deadline gives the reactor one more turn: headers read in it count.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.rightNow += self.latency.header_deadline() + 1  # a stall: nothing ran
        (due,) = [call for call in self.clock.calls if getattr(call.func, "__name__", "") == "due"]
        self.clock.calls.remove(due)
        due.func(*due.args, **due.kw)  # the timer pass, as the reactor runs it
        self.serve_whole(0)  # the I/O pass: the headers were in the socket
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)))
        # Nothing in the socket at the next turn: the deadline stands.
        d = self.blob(ClientRequest())
        self.router.announce(provider(2), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.failureResultOf(d, BlobUnknown)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(2)))

    def test_silent_past_the_patient_deadline_it_fails(self) -> None:
        self.serve_once()
        self.assert_put_aside_at_the_patient_deadline()
        # Back after the put-aside, it has to prove itself again: the short deadline.
        self.mirror.put_aside.lift(provider(1).host)
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.failureResultOf(d, BlobUnknown)

    def test_a_404_proves_the_peer_alive_too(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.http.answer(0, 404, 0)
        self.failureResultOf(d, BlobUnknown)
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.5)
        self.assertNoResult(d)
        self.clock.advance(self.latency.proven_header_deadline)
        self.failureResultOf(d, BlobUnknown)

    def test_the_proof_lapses(self) -> None:
        self.serve_once()
        self.clock.advance(PROVEN_FOR)
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.failureResultOf(d, BlobUnknown)

    def test_a_tarpit_never_gets_it(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.failureResultOf(d, BlobUnknown)


class MembersOnlyTests(MirrorTestCase):
    """
    With a keyed DHT (C{members_only}) every provider is a cluster member: one never heard from
    gets the patient deadline too; one silent past it is put aside.
    """

    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, members_only=True, metrics=self.metrics,
        )

    def test_a_member_never_heard_from_gets_the_patient_deadline(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.5)
        self.assertNoResult(d)
        self.serve_whole(0)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_a_silent_member_fails_at_the_patient_deadline(self) -> None:
        self.assert_put_aside_at_the_patient_deadline()


class PeerFailureReasonTests(MirrorTestCase):
    """
    Every peer that fails is counted in spegel_mirror_peer_failures_total by why, once.
    """

    def counts(self) -> dict[str, float]:
        return {
            reason: self.counted("spegel_mirror_peer_failures_total", reason=reason)
            for reason in PEER_FAILURE_REASONS
        }

    def assertCounted(self, before: dict[str, float], reason: str) -> None:
        after = self.counts()
        expected = {r: 1 if r == reason else 0 for r in PEER_FAILURE_REASONS}
        self.assertEqual({r: after[r] - before[r] for r in after}, expected)

    def test_header_deadline(self) -> None:
        before = self.counts()
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.clock.advance(self.latency.header_deadline() + 0.01)
        self.failureResultOf(d, BlobUnknown)
        self.assertCounted(before, "header_deadline")

    def test_connect(self) -> None:
        before = self.counts()
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.http.requests[0][3].errback(ConnectionRefusedError("refused"))
        self.failureResultOf(d, BlobUnknown)
        self.assertCounted(before, "connect")

    def test_status(self) -> None:
        before = self.counts()
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        self.http.answer(0, 500, 0)
        self.failureResultOf(d, BlobUnknown)
        self.assertCounted(before, "status")
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))

    def test_body(self) -> None:
        before = self.counts()
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:10])
        self.clock.advance(5.1)  # the idle timeout: the peer went silent
        second = self.http.answer(
            len(self.http.requests) - 1, 206, len(self.data) - 10,
            content_range=f"bytes 10-{len(self.data) - 1}/{len(self.data)}",
        )
        second.send(self.data[10:])
        second.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertCounted(before, "body")

    def test_digest(self) -> None:
        before = self.counts()
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        response = self.http.answer(0, 200, len(self.data))
        response.send(self.data[:-1] + b"!")
        response.end()
        self.successResultOf(d)
        self.assertTrue(request.aborted)
        self.assertCounted(before, "digest")
