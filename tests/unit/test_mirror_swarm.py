"""
Tests for the mirror in a rollout, where holders are still downloading: a blob named by a
manifest a peer served is waited for rather than fetched upstream, and a holder that is still
downloading a blob is not asked for pieces of it in parallel.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred

from spegel import oci
from spegel.mirror import Mirror
from spegel.oci import BlobUnknown, Reference
from spegel.registry import ask_mirror
from spegel.uploads import PARTIAL_HEADER
from tests.unit.test_mirror import REGISTRY, ClientRequest, MirrorTestCase, digest_of, provider


class PeersImageTestCase(MirrorTestCase):
    """A node whose peers serve it an image's manifest."""

    def fetch_manifest_naming(self, *digests: str, size: int = 1) -> None:
        """A peer serves this node an image manifest whose layers are C{digests}, of C{size} bytes."""
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"digest": digest_of(b"config"), "size": 6},
            "layers": [{"digest": d, "size": size} for d in digests],
        }).encode()
        ref = Reference(REGISTRY, "team/app", digest=digest_of(manifest))
        d = ensureDeferred(ask_mirror(self.mirror, ClientRequest(), ref, "manifest"))  # type: ignore[arg-type]  # a DummyRequest
        self.router.announce(provider(1))
        response = self.http.answer(len(self.http.requests) - 1, 200, len(manifest), content_type=oci.OCI_MANIFEST)
        response.send(manifest)
        response.end()
        self.assertEqual(self.successResultOf(d), manifest)

    def miss(self) -> None:
        """The pending lookup ends with no provider."""
        self.router.announce(end=True)


class ExpectedBlobTests(PeersImageTestCase):
    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, blob_wait=10.0, blob_poll_interval=1.0, metrics=self.metrics,
        )

    def test_a_layer_of_a_peers_image_waits_for_its_first_holder(self) -> None:
        self.fetch_manifest_naming(self.digest)
        request = ClientRequest()
        d = self.blob(request)
        self.miss()
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.miss()
        self.clock.advance(1.0)
        self.assertEqual(self.router.used_cache[-1], False)  # each look asks the cluster afresh
        self.router.announce(provider(2))
        self.serve_whole(len(self.http.requests) - 1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.counted("spegel_pull_coalescing_total", outcome="waited"), 1)
        # The looks of a wait are not 404s; a wait in vain is one.
        self.assertEqual(self.counted("spegel_mirror_unresolved_total", reason="not_found"), 0)

    def test_a_wait_in_vain_ends_in_a_404(self) -> None:
        self.fetch_manifest_naming(self.digest)
        d = self.blob(ClientRequest())
        self.miss()
        for _ in range(10):
            self.clock.advance(1.0)
            self.miss()
        self.failureResultOf(d, BlobUnknown)
        self.assertEqual(self.counted("spegel_pull_coalescing_total", outcome="timeout"), 1)
        self.assertEqual(self.counted("spegel_mirror_unresolved_total", reason="not_found"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_blobs_of_no_peers_image_are_not_waited_for(self) -> None:
        self.fetch_manifest_naming(digest_of(b"another layer"))
        d = self.blob(ClientRequest())
        self.miss()
        self.failureResultOf(d, BlobUnknown)

    def test_heads_are_not_waited_for(self) -> None:
        self.fetch_manifest_naming(self.digest)
        d = ensureDeferred(ask_mirror(self.mirror, ClientRequest(b"HEAD"), self.ref, "blob"))  # type: ignore[arg-type]  # a DummyRequest
        self.miss()
        self.failureResultOf(d, BlobUnknown)

    def test_expectations_lapse(self) -> None:
        self.fetch_manifest_naming(self.digest)
        self.clock.advance(601)
        d = self.blob(ClientRequest())
        self.miss()
        self.failureResultOf(d, BlobUnknown)


class PartialHolderTests(MirrorTestCase):
    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, parallel_min_size=50_000, piece_size=20_000,
            metrics=self.metrics,
        )

    def start(self, **headers: str) -> tuple[Deferred[Any], ClientRequest, Any]:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        response = self.http.answer(0, 200, len(self.data), **headers)
        return d, request, response

    def test_a_whole_holder_is_joined_by_others(self) -> None:
        self.start()
        ranges = [headers.get("Range") for _, _, headers, _ in self.http.requests[1:]]
        self.assertTrue(ranges and all(r is not None and r.startswith("bytes=") for r in ranges), ranges)

    def test_a_holder_still_downloading_streams_alone(self) -> None:
        d, request, response = self.start(**{PARTIAL_HEADER.replace("-", "_"): "true"})
        self.assertEqual(len(self.http.requests), 1)
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)


class EarlyHeadersTests(PeersImageTestCase):
    """
    A layer of a peer's image whose holders are all busy gets its headers after
    C{blob_headers_after}, before containerd 2.4's 30 s are up, and its bytes when a holder is
    free; if none serves it, the connection is cut and containerd's next request is a 404.
    """

    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, blob_wait=60.0, blob_poll_interval=1.0,
            blob_headers_after=20.0, metrics=self.metrics,
        )

    def keep_busy(self, seconds: float) -> None:
        """Every holder asked in the next C{seconds} answers 429."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            for index, (_, _, _, answer) in enumerate(self.http.requests):
                if not answer.called:
                    self.http.answer(index, 429, 0, retry_after="1")
            self.clock.advance(0.25)

    def serve_next(self) -> None:
        """The holder is free: the next request for the blob (after a Retry-After) is served."""
        while all(answer.called for _, _, _, answer in self.http.requests):
            self.clock.advance(0.25)
        self.serve_whole(len(self.http.requests) - 1)

    def start_busy(self, request: ClientRequest) -> Deferred[Any]:
        """containerd asks for the layer; its only holder is busy."""
        self.fetch_manifest_naming(self.digest, size=len(self.data))
        d = self.blob(request)
        self.router.announce(provider(2), end=True)
        return d

    def test_headers_then_bytes_from_the_holder_once_free(self) -> None:
        request = ClientRequest()
        d = self.start_busy(request)
        self.keep_busy(19.5)
        self.assertFalse(request.startedWriting)
        self.keep_busy(1.0)
        self.assertTrue(request.startedWriting, "no headers at 20 s")
        self.assertEqual(request.responseHeaders.getRawHeaders("content-length"), [str(len(self.data))])
        self.assertEqual(request.responseHeaders.getRawHeaders("docker-content-digest"), [self.digest])
        self.assertEqual(request.body, b"")
        self.assertNoResult(d)
        self.keep_busy(30.0)  # longer than containerd would have waited for headers
        self.serve_next()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)
        self.assertEqual(self.counted("spegel_mirror_early_headers_total", outcome="served"), 1)

    def test_a_holder_answering_in_time_sets_the_headers(self) -> None:
        request = ClientRequest()
        d = self.start_busy(request)
        self.keep_busy(5.0)
        while all(answer.called for _, _, _, answer in self.http.requests):
            self.clock.advance(0.25)
        response = self.http.answer(len(self.http.requests) - 1, 200, len(self.data), etag="from-the-holder")
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        self.assertEqual(request.responseHeaders.getRawHeaders("etag"), ["from-the-holder"])
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.counted("spegel_mirror_early_headers_total", outcome="served"), 0)

    def test_after_the_headers_only_the_whole_blob_will_do(self) -> None:
        """A holder answering with another length than the manifest's is a failed holder."""
        request = ClientRequest()
        d = self.start_busy(request)
        self.keep_busy(21.0)
        self.router.announce(provider(3), end=True)
        wrong = len(self.http.requests) - 1
        self.http.answer(wrong, 200, len(self.data) - 1)
        self.assertTrue(self.mirror.put_aside.is_aside(provider(int(self.http.requests[wrong][1].split(".")[3].split(":")[0]))))
        self.keep_busy(2.0)
        self.serve_next()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_no_holder_in_the_end_cuts_and_the_retry_is_a_404(self) -> None:
        self.fetch_manifest_naming(self.digest, size=len(self.data))
        request = ClientRequest()
        d = self.blob(request)
        for _ in range(20):
            self.miss()
            self.clock.advance(1.0)
        self.assertTrue(request.startedWriting, "no headers at 20 s")
        for _ in range(38):
            self.miss()
            self.clock.advance(1.0)
        self.assertFalse(request.aborted)
        for _ in range(3):
            self.miss()
            self.clock.advance(1.0)
        self.successResultOf(d)
        self.assertTrue(request.aborted, "a body that never came was not cut short")
        self.assertEqual(request.body, b"")
        self.assertEqual(self.counted("spegel_mirror_early_headers_total", outcome="cut"), 1)
        # containerd asks again for the rest (all of it): a 404 at once, no lookup.
        lookups = len(self.router.lookups)
        self.failureResultOf(self.blob(ClientRequest()), BlobUnknown)
        self.assertEqual(len(self.router.lookups), lookups)
        # Later requests wait for holders again.
        self.clock.advance(31.0)
        d = self.blob(ClientRequest())
        self.miss()
        self.clock.advance(1.0)
        self.assertNoResult(d)
        self.router.announce(provider(2))
        self.serve_whole(len(self.http.requests) - 1)
        self.successResultOf(d)

    def assert_the_client_leaving_stops_the_wait(self, headers_sent: bool) -> None:
        request = ClientRequest()
        d = self.start_busy(request)
        self.keep_busy(25.0 if headers_sent else 5.0)
        self.assertEqual(request.startedWriting, headers_sent)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_client_leaving_before_the_headers_stops_the_wait(self) -> None:
        self.assert_the_client_leaving_stops_the_wait(headers_sent=False)

    def test_the_client_leaving_after_the_headers_stops_the_wait(self) -> None:
        self.assert_the_client_leaving_stops_the_wait(headers_sent=True)

    def test_ranges_heads_and_sizes_unknown_get_no_early_headers(self) -> None:
        for method, headers, size in [
            (b"GET", {"Range": "bytes=10-"}, len(self.data)),
            (b"HEAD", {}, len(self.data)),
            (b"GET", {}, None),
        ]:
            with self.subTest(method=method, headers=headers, size=size):
                self.fetch_manifest_naming(self.digest, size=size)  # type: ignore[arg-type]  # None: no size
                request = ClientRequest(method, headers)
                d = ensureDeferred(ask_mirror(self.mirror, request, self.ref, "blob"))  # type: ignore[arg-type]  # a DummyRequest
                self.router.announce(provider(2), end=True)
                self.keep_busy(25.0)
                self.assertFalse(request.startedWriting)
                d.cancel()
                self.failureResultOf(d)
