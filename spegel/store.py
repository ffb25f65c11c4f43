# -*- test-case-name: tests.unit.test_store -*-
"""
L{spegel.interfaces.ILocalContent} over containerd: its image store for tags, its content store
(on disk, or through its Read API) for bytes.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from spegel.metrics import Metrics
from spegel.containerd.client import (
    ContainerdClient,
    ContainerdError,
    ContentNotFound,
    ImageNotFound,
    content_path_for,
)
from spegel.content import BlobContent, ManifestContent, TagTarget
from spegel.interfaces import ILocalContent
from spegel.oci import (
    MAX_MANIFEST_SIZE,
    BlobUnknown,
    ManifestUnknown,
    Reference,
    digest_matches,
    sniff_manifest_media_type,
)


@implementer(ILocalContent)
class ContainerdContent:
    """
    L{ILocalContent} over containerd: its image store for tags, its content store for bytes.

    When containerd cannot be reached, every lookup reports "not here": a 404 sends the client
    on to the next mirror or the upstream registry, whereas an error would stall the pull.
    """

    _log = Logger()

    def __init__(self, client: ContainerdClient, content_path: str | None, *, metrics: Metrics):
        self._client = client
        self._content_path = content_path
        self._metrics = metrics

    async def resolve_tag(self, reference: Reference) -> TagTarget:
        try:
            image = await self._client.get_image(reference.image_name)
        except ImageNotFound:
            raise ManifestUnknown("manifest unknown", {"tag": reference.tag_key}) from None
        except ContainerdError as e:
            self._unavailable(e)
            raise ManifestUnknown("manifest unknown: containerd is unavailable") from e
        return TagTarget(image.target.digest, image.target.media_type or None)

    async def manifest(self, digest: str, media_type: str | None = None) -> ManifestContent:
        try:
            info = await self._client.content_info(digest)
            if info.size > MAX_MANIFEST_SIZE:
                raise ManifestUnknown("manifest unknown: content too large to be a manifest")
            data = await self._client.read_content(digest, 0, info.size)
        except ContentNotFound:
            raise ManifestUnknown("manifest unknown", {"digest": digest}) from None
        except ContainerdError as e:
            self._unavailable(e)
            raise ManifestUnknown("manifest unknown: containerd is unavailable") from e
        if len(data) != info.size or not digest_matches(digest, data):
            # Content being rewritten under us; containerd never serves a torn blob knowingly.
            raise ManifestUnknown("manifest unknown: content changed while being read")
        media_type = media_type or sniff_manifest_media_type(data)
        if media_type is None:
            raise ManifestUnknown("manifest unknown: the content is not a manifest")
        return ManifestContent(digest, media_type, data)

    async def blob(self, digest: str) -> BlobContent:
        """
        Blob C{digest} from the content store's files when this process sees them, else from
        containerd (its Read API then serves the bytes).

        containerd renames a blob into C{blobs/} only once it is whole and verified, so a
        readable file there is the blob, and no file there means containerd does not hold it.
        A stat costs microseconds, where containerd's Info call, under a rollout's load on a
        busy node, took seconds and made peers give up on this node's response headers.
        """
        if self._content_path is not None:
            try:
                path = content_path_for(self._content_path, digest)
            except ValueError:
                raise BlobUnknown("blob unknown: not a sha256 or sha512 digest", {"digest": digest}) from None
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                if self._store_readable():
                    raise BlobUnknown("blob unknown", {"digest": digest}) from None
            except OSError:
                pass
            else:
                if os.access(path, os.R_OK):
                    return BlobContent(digest, size, path)
        try:
            info = await self._client.content_info(digest)
        except ContentNotFound:
            raise BlobUnknown("blob unknown", {"digest": digest}) from None
        except ContainerdError as e:
            self._unavailable(e)
            raise BlobUnknown("blob unknown: containerd is unavailable") from e
        # Here the store's file is not readable by this process: the Read API serves it.
        return BlobContent(digest, info.size, None)

    def _store_readable(self) -> bool:
        """Whether this process sees containerd's content store (its C{blobs/} directory)."""
        assert self._content_path is not None
        return os.access(os.path.join(self._content_path, "blobs"), os.R_OK | os.X_OK)

    async def holds(self, digest: str) -> bool:
        """Whether containerd holds blob C{digest} whole (committed)."""
        try:
            await self.blob(digest)
        except BlobUnknown:
            return False
        return True

    def read(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        return self._client.read_content(digest, offset, size)

    def _unavailable(self, error: Exception) -> None:
        self._metrics.containerd_errors_total.inc()
        self._log.warn("containerd call failed: {error}", error=error)

