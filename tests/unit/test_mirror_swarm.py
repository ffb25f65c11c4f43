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


class ExpectedBlobTests(MirrorTestCase):
    def build_mirror(self, pick: Callable[[int], int] = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick, blob_wait=10.0, blob_poll_interval=1.0, metrics=self.metrics,
        )

    def fetch_manifest_naming(self, *digests: str) -> None:
        """A peer serves this node an image manifest whose layers are C{digests}."""
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"digest": digest_of(b"config"), "size": 6},
            "layers": [{"digest": d, "size": 1} for d in digests],
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
