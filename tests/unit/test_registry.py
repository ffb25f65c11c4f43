"""
Tests for L{spegel.registry}: the registry resource over in-memory content, through StubTreq.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from tests.unit.stubtreq import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from spegel import oci
from spegel.metrics import Metrics
from spegel.content import BlobContent, ManifestContent, TagTarget
from spegel.interfaces import ILocalContent, IMirror, Upstream
from spegel.oci import BlobUnknown, ManifestUnknown, Reference
from spegel.httpserver import CUT_FLUSH_TIMEOUT, OCIHTTPChannel, make_site
from spegel.registry import RegistryFilter, RegistryResource

REGISTRY = "127.0.0.1:5000"
BASE = "http://spegel.test"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@implementer(ILocalContent)
class MemoryContent:
    """
    L{spegel.interfaces.ILocalContent} in memory; blobs optionally backed by files on disk.
    """

    def __init__(self, tmpdir: str):
        self.tmpdir = tmpdir
        self.tags: dict[str, str] = {}
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.on_disk: set[str] = set()
        self.reads: list[tuple[str, int, int]] = []

    def add_manifest(self, registry: str, repo: str, tag: str, data: bytes) -> str:
        d = digest_of(data)
        self.manifests[d] = data
        self.tags[f"{registry}/{repo}:{tag}"] = d
        return d

    def add_blob(self, data: bytes, on_disk: bool = True) -> str:
        d = digest_of(data)
        self.blobs[d] = data
        if on_disk:
            self.on_disk.add(d)
            with open(os.path.join(self.tmpdir, d.split(":")[1]), "wb") as f:
                f.write(data)
        return d

    async def resolve_tag(self, reference: Reference) -> TagTarget:
        try:
            return TagTarget(self.tags[reference.tag_key], None)
        except KeyError:
            raise ManifestUnknown("manifest unknown") from None

    async def manifest(self, digest: str, media_type: str | None = None) -> ManifestContent:
        data = self.manifests.get(digest)
        if data is None:
            raise ManifestUnknown("manifest unknown")
        sniffed = media_type or oci.sniff_manifest_media_type(data)
        if sniffed is None:
            raise ManifestUnknown("not a manifest")
        return ManifestContent(digest, sniffed, data)

    async def blob(self, digest: str) -> BlobContent:
        data = self.blobs.get(digest)
        if data is None:
            raise BlobUnknown("blob unknown")
        path = os.path.join(self.tmpdir, digest.split(":")[1]) if digest in self.on_disk else None
        return BlobContent(digest, len(data), path)

    def read(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        self.reads.append((digest, offset, size))
        if digest not in self.blobs:
            return fail(BlobUnknown("gone"))
        return succeed(self.blobs[digest][offset : offset + size])


@implementer(IMirror)
class RecordingMirror:
    def __init__(self) -> None:
        self.asked: list[tuple[str, Reference]] = []

    async def manifest(self, reference: Reference, *, method: str, accept: str | None) -> Upstream:
        self.asked.append(("manifest", reference))
        raise ManifestUnknown("nobody has it")

    async def blob(self, reference: Reference, *, method: str, byte_range: str | None) -> Upstream:
        self.asked.append(("blob", reference))
        return Upstream(200, ((b"content-length", b"4"),), b"peer")


class RegistryTestsMixin:
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.content = MemoryContent(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.content.tmpdir)
        self.manifest_data = json.dumps(
            {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": {}, "layers": []}
        ).encode()
        self.manifest_digest = self.content.add_manifest(REGISTRY, "team/app", "v1", self.manifest_data)
        self.blob_data = os.urandom(3000)
        self.blob_digest = self.content.add_blob(self.blob_data)
        self.ready = True
        self.mirror: RecordingMirror | None = None
        self.filter = RegistryFilter(frozenset({REGISTRY}), (re.compile(r"/blocked/"),))
        self.metrics = Metrics()

    def client(self) -> StubTreq:
        registry = RegistryResource(
            self.clock, self.content, self.filter, ready=lambda: self.ready, mirror=self.mirror, metrics=self.metrics
        )
        return StubTreq(registry.resource())

    def request(self, method: str, path: str, headers: dict | None = None) -> tuple[Any, bytes]:
        treq = self.client()
        response = self.successResultOf(  # type: ignore[attr-defined]
            treq.request(method, BASE + path, headers=headers)
        )
        body = self.successResultOf(response.content())  # type: ignore[attr-defined]
        return response, body

    def assertOCIError(self, response: Any, body: bytes, status: int, code: str) -> None:
        self.assertEqual(response.code, status, body)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        self.assertEqual(json.loads(body)["errors"][0]["code"], code)  # type: ignore[attr-defined]


class BasicEndpointTests(RegistryTestsMixin, SynchronousTestCase):
    def test_v2(self) -> None:
        for path in ["/v2/", "/v2"]:
            response, body = self.request("GET", path)
            self.assertEqual(response.code, 200)
            self.assertEqual(body, b"")
            self.assertEqual(
                response.headers.getRawHeaders("docker-distribution-api-version"), ["registry/2.0"]
            )

    def test_livez_readyz(self) -> None:
        self.assertEqual(self.request("GET", "/livez")[0].code, 200)
        self.assertEqual(self.request("GET", "/readyz")[0].code, 200)
        self.ready = False
        self.assertEqual(self.request("GET", "/readyz")[0].code, 503)
        self.assertEqual(self.request("GET", "/livez")[0].code, 200)

    def test_push_is_unsupported(self) -> None:
        for method in ["PUT", "POST", "DELETE", "PATCH"]:
            response, body = self.request(method, "/v2/team/app/manifests/v1")
            self.assertOCIError(response, body, 405, "UNSUPPORTED")

    def test_unknown_path(self) -> None:
        for path in ["/nope", "/v2//blobs/sha256:" + "a" * 64, "/v2///blobs/sha256:" + "a" * 64,
                     "/v2/a/blobs/", "/v2/a/manifests/",
                     "/v2/a/tags/list"]:
            with self.subTest(path=path):
                response, body = self.request("GET", path)
                self.assertOCIError(response, body, 404, "NAME_UNKNOWN")


class ManifestTests(RegistryTestsMixin, SynchronousTestCase):
    def test_by_tag(self) -> None:
        response, body = self.request("GET", f"/v2/team/app/manifests/v1?ns={REGISTRY}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.manifest_data)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [oci.OCI_MANIFEST])
        self.assertEqual(
            response.headers.getRawHeaders("docker-content-digest"), [self.manifest_digest]
        )
        # Twisted's client moves Content-Length from the headers to .length.
        self.assertEqual(response.length, len(self.manifest_data))

    def test_by_digest_url_encoded_ns(self) -> None:
        response, body = self.request(
            "GET", f"/v2/team/app/manifests/{self.manifest_digest}?ns=127.0.0.1%3A5000"
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.manifest_data)

    def test_head(self) -> None:
        response, body = self.request("HEAD", f"/v2/team/app/manifests/v1?ns={REGISTRY}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(
            response.headers.getRawHeaders("docker-content-digest"), [self.manifest_digest]
        )
        self.assertEqual(
            response.headers.getRawHeaders("content-length"), [str(len(self.manifest_data))]
        )

    def test_docker_media_type_and_sniffed_index(self) -> None:
        docker = json.dumps({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST_LIST,
                             "manifests": []}).encode()
        plain_index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        for data, expected in [(docker, oci.DOCKER_MANIFEST_LIST), (plain_index, oci.OCI_INDEX)]:
            d = self.content.add_manifest(REGISTRY, "team/app", "x", data)
            response, _ = self.request("GET", f"/v2/team/app/manifests/{d}?ns={REGISTRY}")
            self.assertEqual(response.headers.getRawHeaders("content-type"), [expected])

    def test_unknown(self) -> None:
        response, body = self.request("GET", f"/v2/team/app/manifests/v2?ns={REGISTRY}")
        self.assertOCIError(response, body, 404, "MANIFEST_UNKNOWN")
        response, body = self.request(
            "GET", f"/v2/team/app/manifests/sha256:{'0' * 64}?ns={REGISTRY}"
        )
        self.assertOCIError(response, body, 404, "MANIFEST_UNKNOWN")

    def test_blob_asked_as_manifest(self) -> None:
        self.content.manifests[self.blob_digest] = self.blob_data
        response, body = self.request("GET", f"/v2/team/app/manifests/{self.blob_digest}")
        self.assertOCIError(response, body, 404, "MANIFEST_UNKNOWN")

    def test_tag_without_ns(self) -> None:
        response, body = self.request("GET", "/v2/team/app/manifests/v1")
        self.assertOCIError(response, body, 404, "MANIFEST_UNKNOWN")

    def test_hit_and_miss_counted(self) -> None:
        self.request("GET", f"/v2/team/app/manifests/v1?ns={REGISTRY}")
        self.request("GET", f"/v2/team/app/manifests/nope?ns={REGISTRY}")
        counted = {
            cache: self.metrics.registry.get_sample_value("spegel_mirror_requests_total", {"registry": REGISTRY, "cache": cache})
            for cache in ("hit", "miss")
        }
        self.assertEqual(counted, {"hit": 1, "miss": 1})


class BlobTests(RegistryTestsMixin, SynchronousTestCase):
    def blob_path(self) -> str:
        return f"/v2/team/app/blobs/{self.blob_digest}?ns={REGISTRY}"

    def test_whole_from_disk(self) -> None:
        response, body = self.request("GET", self.blob_path())
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.blob_data)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("accept-ranges"), ["bytes"])
        self.assertEqual(response.length, len(self.blob_data))
        self.assertEqual(headers.getRawHeaders("docker-content-digest"), [self.blob_digest])
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/octet-stream"])
        self.assertEqual(self.content.reads, [])

    def test_whole_through_containerd(self) -> None:
        self.content.on_disk.discard(self.blob_digest)
        response, body = self.request("GET", self.blob_path())
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.blob_data)
        self.assertEqual(self.content.reads, [(self.blob_digest, 0, len(self.blob_data))])

    def test_ranges(self) -> None:
        n = len(self.blob_data)
        for on_disk in [True, False]:
            if not on_disk:
                self.content.on_disk.discard(self.blob_digest)
            for header, first, last in [
                ("bytes=0-9", 0, 9), ("bytes=100-", 100, n - 1), ("bytes=-50", n - 50, n - 1),
                ("bytes=10-999999", 10, n - 1),
            ]:
                with self.subTest(header=header, on_disk=on_disk):
                    response, body = self.request("GET", self.blob_path(), {"Range": header})
                    self.assertEqual(response.code, 206)
                    self.assertEqual(body, self.blob_data[first : last + 1])
                    self.assertEqual(
                        response.headers.getRawHeaders("content-range"), [f"bytes {first}-{last}/{n}"]
                    )

    def test_bad_ranges(self) -> None:
        n = len(self.blob_data)
        for header in [f"bytes={n}-", "bytes=5-1", "bytes=0-1,4-5", "bytes=x", "lines=1-2"]:
            with self.subTest(header=header):
                response, body = self.request("GET", self.blob_path(), {"Range": header})
                self.assertOCIError(response, body, 416, "RANGE_INVALID")
                self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes */{n}"])

    def test_if_range(self) -> None:
        """
        RFC 9110's If-Range: the range is served only when the validator is this blob's
        ETag; another ETag, a weak one or a date gets the whole blob with 200.
        """
        etag = f'"{self.blob_digest}"'
        response, body = self.request("GET", self.blob_path(), {"Range": "bytes=0-9", "If-Range": etag})
        self.assertEqual((response.code, body), (206, self.blob_data[:10]))
        for other in ['"sha256:' + "0" * 64 + '"', "W/" + etag, "Tue, 01 Dec 2026 10:00:00 GMT"]:
            with self.subTest(if_range=other):
                response, body = self.request("GET", self.blob_path(), {"Range": "bytes=0-9", "If-Range": other})
                self.assertEqual((response.code, body), (200, self.blob_data))
                self.assertIsNone(response.headers.getRawHeaders("content-range"))

    def test_head(self) -> None:
        response, body = self.request("HEAD", self.blob_path())
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(len(self.blob_data))])

    def test_unknown(self) -> None:
        response, body = self.request("GET", f"/v2/team/app/blobs/sha256:{'1' * 64}?ns={REGISTRY}")
        self.assertOCIError(response, body, 404, "BLOB_UNKNOWN")

    def test_empty_blob(self) -> None:
        d = self.content.add_blob(b"")
        response, body = self.request("GET", f"/v2/team/app/blobs/{d}")
        self.assertEqual((response.code, body), (200, b""))


class BadInputTests(RegistryTestsMixin, SynchronousTestCase):
    def test_non_utf8_path_or_query(self) -> None:
        """
        A path or query that is not UTF-8 gets the OCI error JSON (400 NAME_INVALID), not a
        logged traceback and plain text; nothing is asked of content or the mirror.
        """
        for path in (
            "/v2/%ff%fe/manifests/v1",
            "/v2/team/app/blobs/sha256:%ff",
            "/v2/%C3%28/manifests/v1",
            "/v2/team/app/manifests/v1?ns=%ff",
            "/v2/team/app/manifests/v1?%fe=x",
        ):
            response, body = self.request("GET", path)
            self.assertOCIError(response, body, 400, "NAME_INVALID")
            self.assertEqual(self.flushLoggedErrors(), [], path)

    def test_bad_names_and_digests(self) -> None:
        cases = [
            ("/v2/../../etc/passwd/blobs/" + "sha256:" + "a" * 64, (400, 404)),
            ("/v2/a/%2e%2e/b/blobs/sha256:" + "a" * 64, (400,)),
            ("/v2/UPPER/blobs/sha256:" + "a" * 64, (400,)),
            ("/v2/a/blobs/sha256:xyz", (400,)),
            ("/v2/a/blobs/md5:abc", (400,)),
            ("/v2/a/manifests/bad%20tag", (400,)),
            ("/v2/a/manifests/sha256:" + "a" * 10, (400,)),
            ("/v2/a/blobs/sha256:" + "a" * 64 + "?ns=../../x", (400,)),
            ("/v2/a/blobs/sha256:" + "a" * 64 + "?ns=%ff%fe", (400,)),
        ]
        for path, statuses in cases:
            with self.subTest(path=path):
                response, body = self.request("GET", path)
                self.assertIn(response.code, statuses, body)
                self.assertIn("errors", json.loads(body))

    def test_ns_port_zero_or_url_refused(self) -> None:
        """
        The registry in C{?ns=} follows the grammar of the flags and C{spegel configuration}:
        port 0 and a URL get 400 NAME_INVALID saying why.
        """
        for ns, reason in (("127.0.0.1%3A0", "from 1 to 65535"), ("https%3A%2F%2Fdocker.io%2F", "without a scheme")):
            with self.subTest(ns=ns):
                response, body = self.request("GET", f"/v2/team/app/blobs/{self.blob_digest}?ns={ns}")
                self.assertOCIError(response, body, 400, "NAME_INVALID")
                self.assertIn(reason, json.loads(body)["errors"][0]["message"])

    def test_unknown_ns_is_filtered(self) -> None:
        response, body = self.request("GET", f"{'/v2/team/app/blobs/'}{self.blob_digest}?ns=quay.io")
        self.assertOCIError(response, body, 404, "NAME_UNKNOWN")

    def test_regex_filter(self) -> None:
        self.content.add_manifest(REGISTRY, "blocked/app", "v1", self.manifest_data)
        response, body = self.request("GET", f"/v2/blocked/app/manifests/v1?ns={REGISTRY}")
        self.assertOCIError(response, body, 404, "NAME_UNKNOWN")


class MirrorSeamTests(RegistryTestsMixin, SynchronousTestCase):
    def test_miss_goes_to_mirror(self) -> None:
        self.mirror = RecordingMirror()
        missing = "sha256:" + "2" * 64
        response, body = self.request("GET", f"/v2/team/app/blobs/{missing}?ns={REGISTRY}")
        self.assertEqual((response.code, body), (200, b"peer"))
        response, body = self.request("GET", f"/v2/team/app/manifests/v9?ns={REGISTRY}")
        self.assertOCIError(response, body, 404, "MANIFEST_UNKNOWN")
        self.assertEqual([kind for kind, _ in self.mirror.asked], ["blob", "manifest"])

    def test_loop_guard(self) -> None:
        self.mirror = RecordingMirror()
        missing = "sha256:" + "2" * 64
        response, body = self.request(
            "GET", f"/v2/team/app/blobs/{missing}?ns={REGISTRY}", {"X-Spegel-Mirrored": "true"}
        )
        self.assertOCIError(response, body, 404, "BLOB_UNKNOWN")
        self.assertEqual(self.mirror.asked, [])

    def test_hit_does_not_ask(self) -> None:
        self.mirror = RecordingMirror()
        self.request("GET", f"/v2/team/app/blobs/{self.blob_digest}?ns={REGISTRY}")
        self.assertEqual(self.mirror.asked, [])


class ChannelTests(SynchronousTestCase):
    """
    Requests Twisted's parser rejects still get an OCI error body.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.site = make_site(Resource(), reactor=self.clock, request_headers_timeout=10.0, connections_per_client=2)

    def connect(self, host: str = "10.0.0.9") -> tuple[OCIHTTPChannel, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def feed(self, data: bytes) -> bytes:
        channel, transport = self.connect()
        channel.dataReceived(data)
        return transport.value()

    def test_slow_headers_get_408(self) -> None:
        """
        A client that trickles its request's headers, a byte a second so that the idle
        timeout never fires, is answered 408 once the headers deadline passes, and cut off.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nX-Slow: ")
        while not transport.value() and self.clock.seconds() < 20:
            self.clock.advance(0.5)
            channel.dataReceived(b"a")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out[:100])
        self.assertIn(b'"errors"', out)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.seconds(), 10.0)

    def test_a_cut_response_ends_in_an_orderly_close(self) -> None:
        """
        A response cut short is closed with a FIN after the bytes already queued: containerd
        asks again for the rest on an unexpected EOF, and fails its pull on a reset.
        """
        channel, transport = self.connect()
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        channel.cut_short()
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(aborted, [])

    def test_a_client_not_taking_the_last_bytes_is_reset(self) -> None:
        channel, transport = self.connect()
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        channel.cut_short()
        self.clock.advance(CUT_FLUSH_TIMEOUT - 1)
        self.assertEqual(aborted, [])
        self.clock.advance(1)
        self.assertEqual(aborted, [True])

    def test_headers_in_time_disarm_the_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        self.assertIsNotNone(channel._headers_deadline)
        channel.dataReceived(b"\r\n")
        self.assertIsNone(channel._headers_deadline)
        self.clock.advance(11)
        self.assertNotIn(b"408", transport.value())

    def test_connections_per_client(self) -> None:
        first, _ = self.connect()
        self.connect()
        third, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 "), transport.value()[:100])
        self.assertTrue(transport.disconnecting)
        third.connectionLost(Failure(ConnectionDone()))
        # Another address is not affected, and a closed connection makes room.
        _, other = self.connect("10.0.0.10")
        self.assertEqual(other.value(), b"")
        first.connectionLost(Failure(ConnectionDone()))
        _, again = self.connect()
        self.assertEqual(again.value(), b"")
        self.assertEqual(self.site.connections_by_client, {"10.0.0.9": 2, "10.0.0.10": 1})

    def test_oversized_header(self) -> None:
        out = self.feed(b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:100])
        self.assertEqual(json.loads(out.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"], "UNSUPPORTED")

    def test_many_headers(self) -> None:
        headers = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(200))
        out = self.feed(b"GET /v2/ HTTP/1.1\r\n" + headers + b"\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:100])

    def test_garbage_request_line(self) -> None:
        out = self.feed(b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:100])
        self.assertIn(b'"errors"', out)
