# -*- test-case-name: tests.unit.test_registry -*-
"""
The values of the registry's view of this node's own content (L{spegel.interfaces.ILocalContent}):
tags resolved to digests, manifests with their media types, blobs with their size and place on
disk. L{spegel.store.ContainerdContent} provides them from containerd; tests use an in-memory
store.
"""

from __future__ import annotations

from attrs import frozen


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
