# -*- test-case-name: tests.unit.test_advertiser -*-
"""
Walking an image in containerd's content store, for the L{spegel.advertiser.Advertiser}: from a
root (index or manifest) through the manifests of every platform present to their config and
layers, finding which digests are present (committed) and which are referenced but missing.

Manifests are immutable (their digest names their bytes), so the L{ManifestWalker} keeps what
each one refers to, and a resync reads no manifest twice; it still asks containerd which blobs
are present, since content comes and goes under the same digests.  A L{WalkMemo} shares the
answers of one resync (or event) between the images it walks.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.metrics import Metrics
from spegel.containerd.client import ContainerdClient, ContainerdError, ContainerdUnavailable, ContentInfo, ContentNotFound
from spegel.oci import (
    MAX_MANIFEST_SIZE,
    InvalidManifest,
    ManifestReferences,
    digest_matches,
    is_digest,
    manifest_references,
)

_T = TypeVar("_T")

_log = Logger()

#: Indexes nested deeper than this are not followed.  Content addressing rules out cycles, but a
#: crafted chain of indexes should not make a walk arbitrarily long.
MAX_INDEX_DEPTH = 4


class ContentChanged(ValueError):
    """
    Bytes read for a digest did not hash to it: the content is being rewritten or removed.
    """


@frozen
class Walk:
    """
    The digests found under an image's root: C{present} in the content store, or referenced
    but C{missing} from it (a platform never pulled, a layer not yet fetched).

    @ivar complete: image manifests present with their config and every layer.
    """

    present: frozenset[str] = frozenset()
    missing: frozenset[str] = frozenset()
    complete: int = 0

    @classmethod
    def union(cls, walks: Iterable[Walk]) -> Walk:
        present: set[str] = set()
        missing: set[str] = set()
        complete = 0
        for walk in walks:
            present |= walk.present
            missing |= walk.missing
            complete += walk.complete
        return cls(frozenset(present), frozenset(missing), complete)


@define
class WalkMemo:
    """
    Answers gathered during one resync or event walk: images often share manifests and layers
    (the CRI plugin names each image by tag and by digest), and each is asked about once.
    """

    infos: dict[str, ContentInfo | None] = field(factory=dict)
    subtrees: dict[str, Walk] = field(factory=dict)
    manifests_visited: set[str] = field(factory=set)


async def gather(coroutines: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """
    Run C{coroutines} concurrently; their results in order, or the first error, unwrapped.

    Not C{gatherResults}: it fails at the first error while the other walks still run, and a
    resync must be done with containerd before the next one starts.
    """
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    results = await DeferredList(deferreds, consumeErrors=True)
    values = []
    for _ok, value in results:
        if isinstance(value, Failure):
            value.raiseException()
        values.append(value)
    return values


class ManifestWalker:
    """
    Walks manifests and indexes in containerd's content store, remembering what each verified
    manifest refers to.
    """

    def __init__(self, client: ContainerdClient, metrics: Metrics) -> None:
        """
        @param client: this node's containerd; only its C{content_info} and C{read_content} are
            used.
        @param metrics: where containerd's errors are counted.
        """
        self._client = client
        self._metrics = metrics
        # Verified manifests never change, so what they refer to (or that they are unreadable)
        # is kept; each resync keeps only the entries it reached.
        self._manifests: dict[str, ManifestReferences | InvalidManifest] = {}

    def keep_only(self, digests: Iterable[str]) -> None:
        """
        Forget every remembered manifest but C{digests} (those a full resync reached).
        """
        keep = frozenset(digests)
        self._manifests = {d: m for d, m in self._manifests.items() if d in keep}

    async def subtree(self, digest: str, media_type: str | None, memo: WalkMemo, depth: int) -> Walk:
        walk = memo.subtrees.get(digest)
        if walk is None:
            walk = memo.subtrees[digest] = await self._walk_manifest(digest, media_type, memo, depth)
        return walk

    async def _walk_manifest(self, digest: str, media_type: str | None, memo: WalkMemo, depth: int) -> Walk:
        if not is_digest(digest):
            _log.warn("Not walking {digest!r}: not a digest", digest=digest)
            return Walk()
        info = await self.info(digest, memo)
        if info is None:
            return Walk(missing=frozenset({digest}))
        memo.manifests_visited.add(digest)
        try:
            references = await self._references(info, media_type)
        except (InvalidManifest, ContentChanged) as e:
            # Nothing under it can be found, and a peer asking for it would get a 404 from us.
            _log.debug("Not advertising {digest} and what it refers to: {reason}", digest=digest, reason=str(e))
            return Walk()
        parts = [Walk(present=frozenset({digest}))]
        if references.manifests:
            if depth >= MAX_INDEX_DEPTH:
                _log.warn("Not following index {digest}: nested more than {depth} deep", digest=digest, depth=depth)
            else:
                parts += await gather(
                    self.subtree(child, child_type, memo, depth + 1) for child, child_type in references.manifests
                )
        if references.blobs:
            infos = await gather(self.info(blob, memo) for blob in references.blobs)
            missing = frozenset(b for b, i in zip(references.blobs, infos) if i is None)
            parts.append(
                Walk(
                    present=frozenset(b for b, i in zip(references.blobs, infos) if i is not None),
                    missing=missing,
                    complete=0 if missing else 1,
                )
            )
        return Walk.union(parts)

    async def info(self, digest: str, memo: WalkMemo) -> ContentInfo | None:
        """
        What containerd knows of a committed blob, or L{None} when it has none: containerd's
        Info reports committed content only, so a blob still being written is not advertised.

        @raise ContainerdUnavailable: so a walk stops rather than take everything for absent.
        """
        if digest in memo.infos:
            return memo.infos[digest]
        try:
            info: ContentInfo | None = await self._client.content_info(digest)
        except ContentNotFound:
            info = None
        except ContainerdUnavailable:
            raise
        except ContainerdError as e:
            self._metrics.containerd_errors_total.inc()
            _log.warn("Not advertising {digest}: containerd failed its info: {error}", digest=digest, error=e)
            info = None
        memo.infos[digest] = info
        return info

    async def _references(self, info: ContentInfo, media_type: str | None) -> ManifestReferences:
        """
        What the manifest or index C{info} describes refers to, from the cache or read and
        verified.

        @raise InvalidManifest: it is not one (remembered: its bytes cannot change).
        @raise ContentChanged: what was read is not the content (not remembered).
        """
        digest = info.digest
        cached = self._manifests.get(digest)
        if cached is None:
            cached = self._manifests[digest] = await self._read_references(info, media_type)
        if isinstance(cached, InvalidManifest):
            raise cached
        return cached

    async def _read_references(self, info: ContentInfo, media_type: str | None) -> ManifestReferences | InvalidManifest:
        digest = info.digest
        if info.size > MAX_MANIFEST_SIZE:
            return InvalidManifest(f"{info.size} bytes is too large for a manifest")
        data = await self._client.read_content(digest, 0, info.size)
        if len(data) != info.size or not digest_matches(digest, data):
            raise ContentChanged(f"the bytes read do not match {digest}")
        try:
            references = manifest_references(data, media_type)
        except InvalidManifest as e:
            _log.warn("Content {digest} is not a manifest spegel can read: {reason}", digest=digest, reason=str(e))
            return e
        if references.skipped:
            _log.warn(
                "Manifest {digest}: skipped {count} descriptors without a valid digest",
                digest=digest,
                count=references.skipped,
            )
        return references
