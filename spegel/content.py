# -*- test-case-name: tests.test_registry -*-
"""
The registry's view of this node's own content: tags resolved to digests, manifests with
their media types, blobs with their size and place on disk. L{spegel.store.ContainerdContent}
implements it over containerd; tests use an in-memory one.
"""

from __future__ import annotations

from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred

from spegel.oci import Reference


@frozen
class ManifestContent:
    digest: str
    media_type: str
    data: bytes


@frozen
class BlobContent:
    """
    @ivar path: where the blob lies in containerd's content store, when this process can open
        it; L{None} means it must be read through containerd's API.
    """

    digest: str
    size: int
    path: str | None


@frozen
class TagTarget:
    digest: str
    media_type: str | None


class LocalContent(Protocol):
    async def resolve_tag(self, reference: Reference) -> TagTarget:
        """
        @raise ManifestUnknown: the tag is not known here.
        """

    async def manifest(self, digest: str, media_type: str | None = None) -> ManifestContent:
        """
        @raise ManifestUnknown: no such manifest here.
        """

    async def blob(self, digest: str) -> BlobContent:
        """
        @raise BlobUnknown: no such blob here.
        """

    def read(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        """
        Read at most C{size} bytes of a blob from C{offset}, through containerd.
        """
