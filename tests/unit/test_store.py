"""
Tests for L{spegel.store.ContainerdContent}: containerd's answers in the registry's terms, and
every containerd failure a miss (404), never an error.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from spegel import oci
from spegel.containerd.client import (
    ContainerdUnavailable,
    ContentInfo,
    ContentNotFound,
    Descriptor,
    Image,
    ImageNotFound,
)
from spegel.metrics import Metrics
from spegel.oci import BlobUnknown, ManifestUnknown, Reference
from spegel.store import ContainerdContent


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeClient:
    def __init__(self) -> None:
        self.images: dict[str, Image] = {}
        self.content: dict[str, bytes] = {}
        self.down = False
        self.torn: set[str] = set()

    def get_image(self, name: str) -> Deferred[Image]:
        if self.down:
            return fail(ContainerdUnavailable("down"))
        if name not in self.images:
            return fail(ImageNotFound(name))
        return succeed(self.images[name])

    def content_info(self, digest: str) -> Deferred[ContentInfo]:
        if self.down:
            return fail(ContainerdUnavailable("down"))
        if digest not in self.content:
            return fail(ContentNotFound(digest))
        return succeed(ContentInfo(digest, len(self.content[digest]), {}))

    def read_content(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        data = self.content[digest][offset : offset + size]
        if digest in self.torn:
            data = data[:-1] + b"?"
        return succeed(data)


class ContainerdContentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = FakeClient()
        self.root = self.mktemp()
        os.makedirs(os.path.join(self.root, "blobs", "sha256"))
        self.metrics = Metrics()
        self.store = ContainerdContent(self.client, self.root, metrics=self.metrics)  # type: ignore[arg-type]
        self.manifest = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
        self.manifest_digest = digest_of(self.manifest)
        self.client.content[self.manifest_digest] = self.manifest
        self.client.images["r.io/team/app:v1"] = Image(
            "r.io/team/app:v1", Descriptor(oci.DOCKER_MANIFEST, self.manifest_digest, 10, {}), {}
        )

    def call(self, coroutine):  # type: ignore[no-untyped-def]
        return ensureDeferred(coroutine)

    def test_resolve_tag(self) -> None:
        target = self.successResultOf(
            self.call(self.store.resolve_tag(Reference("r.io", "team/app", tag="v1")))
        )
        self.assertEqual((target.digest, target.media_type), (self.manifest_digest, oci.DOCKER_MANIFEST))
        self.failureResultOf(
            self.call(self.store.resolve_tag(Reference("r.io", "team/app", tag="v2"))), ManifestUnknown
        )

    def test_manifest_sniffed_or_given(self) -> None:
        found = self.successResultOf(self.call(self.store.manifest(self.manifest_digest)))
        self.assertEqual((found.media_type, found.data), (oci.OCI_MANIFEST, self.manifest))
        given = self.successResultOf(self.call(self.store.manifest(self.manifest_digest, oci.DOCKER_MANIFEST)))
        self.assertEqual(given.media_type, oci.DOCKER_MANIFEST)

    def test_not_a_manifest_torn_or_huge(self) -> None:
        layer = os.urandom(100)
        self.client.content[digest_of(layer)] = layer
        self.failureResultOf(self.call(self.store.manifest(digest_of(layer))), ManifestUnknown)
        self.client.torn.add(self.manifest_digest)
        self.failureResultOf(self.call(self.store.manifest(self.manifest_digest)), ManifestUnknown)
        huge = b"{" + b" " * oci.MAX_MANIFEST_SIZE + b"}"
        self.client.content[digest_of(huge)] = huge
        self.failureResultOf(self.call(self.store.manifest(digest_of(huge))), ManifestUnknown)

    def test_blob_on_disk_or_through_containerd(self) -> None:
        data = os.urandom(1000)
        d = digest_of(data)
        self.client.content[d] = data
        # A store this process cannot see: containerd is asked, and its Read API serves.
        unseen = ContainerdContent(self.client, self.mktemp(), metrics=self.metrics)  # type: ignore[arg-type]
        found = self.successResultOf(self.call(unseen.blob(d)))
        self.assertEqual((found.size, found.path), (1000, None))
        self.failureResultOf(self.call(unseen.blob("sha256:" + "0" * 64)), BlobUnknown)
        # A store it sees: the file is the blob, and no file is no blob, without asking.
        self.failureResultOf(self.call(self.store.blob(d)), BlobUnknown)
        path = os.path.join(self.root, "blobs", "sha256", d.split(":")[1])
        with open(path, "wb") as f:
            f.write(data)
        self.assertEqual(self.successResultOf(self.call(self.store.blob(d))).path, path)

    def test_a_blob_on_disk_needs_no_call_to_containerd(self) -> None:
        data = os.urandom(1000)
        d = digest_of(data)
        path = os.path.join(self.root, "blobs", "sha256", d.split(":")[1])
        with open(path, "wb") as f:
            f.write(data)
        self.client.down = True
        found = self.successResultOf(self.call(self.store.blob(d)))
        self.assertEqual((found.size, found.path), (1000, path))
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_containerd_errors_total"), 0)

    def test_containerd_down_is_a_miss(self) -> None:
        self.client.down = True
        unseen = ContainerdContent(self.client, None, metrics=self.metrics)  # type: ignore[arg-type]
        self.failureResultOf(
            self.call(self.store.resolve_tag(Reference("r.io", "team/app", tag="v1"))), ManifestUnknown
        )
        self.failureResultOf(self.call(self.store.manifest(self.manifest_digest)), ManifestUnknown)
        self.failureResultOf(self.call(unseen.blob(self.manifest_digest)), BlobUnknown)
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_containerd_errors_total"), 3)
