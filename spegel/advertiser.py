# -*- test-case-name: tests.unit.test_advertiser -*-
"""
Tell the cluster what this node's containerd holds.

The L{Advertiser} walks every image in containerd's image store (index → the manifests of every
platform present → config and layers) and hands the router the keys it may be asked for: every
digest found committed in the content store, and each image's tag key C{registry/repo:tag}.
Keys are withdrawn when no remaining image references them or their content goes away.

It learns of changes two ways.  containerd's events (L{on_event}) are applied at once, so
freshly pulled content is findable cluster-wide within the DHT's announcement batching; a full
resync (L{resync}: list, walk, diff against what is advertised) runs at start, after every
event (re)subscription (events in a gap are lost), and every C{reconcile_interval}, so whatever
an event missed is repaired.

Manifests are immutable (their digest names their bytes), so what each one refers to is cached
and a resync reads no manifest twice; it still asks containerd which blobs are present, since
content comes and goes under the same digests.

Events and resyncs overlap: a resync walks for seconds on a big node while events keep being
applied.  Every operation takes a sequence number when it starts, and a result is applied to an
image only if no operation that started later has already set that image; content deleted after
an operation started is taken out of its result.  So a slow resync never undoes a newer event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from attrs import define, evolve, field, frozen
from prometheus_client import Gauge
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel import metrics
from spegel.containerd.client import (
    ContainerdClient,
    ContainerdError,
    ContainerdUnavailable,
    ContentInfo,
    ContentNotFound,
    Descriptor,
    Image,
    ImageNotFound,
)
from spegel.containerd.events import ContentEvent, ImageEvent
from spegel.interfaces import IAnnouncer
from spegel.oci import (
    MAX_MANIFEST_SIZE,
    InvalidManifest,
    ManifestReferences,
    NameUnknown,
    OCIError,
    Reference,
    UnparseableImageName,
    digest_matches,
    is_digest,
    manifest_references,
    parse_image_name,
    parse_registry_host,
    parse_repository,
)
from spegel.registry import RegistryFilter

_T = TypeVar("_T")

_log = Logger()

advertised_image_tags = Gauge(
    "spegel_advertised_image_tags",
    "Image tags this node advertises, by registry.",
    ("registry",),
)
advertised_image_digests = Gauge(
    "spegel_advertised_image_digests",
    "Root digests (the manifest or index an image name points at) this node advertises, by registry.",
    ("registry",),
)
advertised_content_digests = Gauge(
    "spegel_advertised_content_digests",
    "Digests of every kind (indexes, manifests, configs, layers) this node advertises, by registry.",
    ("registry",),
)

#: Images walked at once during a resync.  Each walk already asks for all blobs of a manifest
#: at once; a few images in parallel hide round trips without queueing thousands of calls on
#: the containerd client's pool, where they would delay event handling and registry requests.
RESYNC_CONCURRENCY = 4

#: A blob announced by C{/content/create} (containerd 2.1+) gets its distribution source label
#: (which registry and repository it came from, needed to apply the registry filter) only once
#: the pull's handler has run after the commit: wait for it this long between looks, in seconds.
LOOSE_LABEL_WAITS = (0.0, 0.01, 0.05, 0.25, 1.0, 3.0)

#: The label prefix containerd's pulls set on content: C{<prefix><registry>=<repo>[,<repo>...]}.
DISTRIBUTION_SOURCE_LABEL = "containerd.io/distribution.source."

# Records of blobs advertised before any image refers to them are named with this prefix, which
# no image name can have.
_LOOSE = "\x00loose:"

#: Indexes nested deeper than this are not followed.  Content addressing rules out cycles, but a
#: crafted chain of indexes should not make a walk arbitrarily long.
MAX_INDEX_DEPTH = 4


class ContentChanged(ValueError):
    """
    Bytes read for a digest did not hash to it: the content is being rewritten or removed.
    """


def _without_port(registry: str) -> str:
    if registry.startswith("["):
        return registry[: registry.find("]") + 1]
    return registry.partition(":")[0]


@frozen
class _Walk:
    """
    The digests found under an image's root: C{present} in the content store, or referenced
    but C{missing} from it (a platform never pulled, a layer not yet fetched).

    @ivar complete: image manifests present with their config and every layer.
    """

    present: frozenset[str] = frozenset()
    missing: frozenset[str] = frozenset()
    complete: int = 0

    @classmethod
    def union(cls, walks: Iterable[_Walk]) -> _Walk:
        present: set[str] = set()
        missing: set[str] = set()
        complete = 0
        for walk in walks:
            present |= walk.present
            missing |= walk.missing
            complete += walk.complete
        return cls(frozenset(present), frozenset(missing), complete)


@frozen
class _ImageRecord:
    """
    One image as it is advertised.

    @ivar tag_key: the image's tag key when its name is exactly that key, so that a peer asking
        this node for the tag will find the image under it.
    @ivar servable: a client resolving the tag through this node can pull it from here: at
        least one platform's manifest is present with its config and every layer.  Otherwise
        (a pull in progress, layers discarded) the tag is not advertised, though each present
        digest is: a peer that took the tag from here would be sent upstream blob by blob.
        Other platforms' manifests may be present without their layers (containerd 2.x fetches
        them when pulling one platform), as on a node of one platform they always are.
    @ivar loose: a blob advertised on its own, before any image refers to it.
    """

    reference: Reference
    target: Descriptor
    tag_key: str | None
    present: frozenset[str]
    missing: frozenset[str]
    servable: bool = True
    loose: bool = False

    @property
    def registry(self) -> str:
        assert self.reference.registry is not None
        return self.reference.registry

    @property
    def root_advertised(self) -> bool:
        return not self.loose and self.target.digest in self.present

    @property
    def tag_advertised(self) -> bool:
        return self.tag_key is not None and self.root_advertised and self.servable

    @property
    def keys(self) -> frozenset[str]:
        if self.tag_advertised:
            assert self.tag_key is not None
            return self.present | {self.tag_key}
        return self.present

    def without(self, digests: frozenset[str]) -> _ImageRecord:
        gone = self.present & digests
        if not gone:
            return self
        # Which manifest lost a blob is not recorded; losing any makes the tag doubtful.
        return evolve(self, present=self.present - gone, missing=self.missing | gone, servable=False)


@define
class _WalkMemo:
    """
    Answers gathered during one resync or event walk: images often share manifests and layers
    (the CRI plugin names each image by tag and by digest), and each is asked about once.
    """

    infos: dict[str, ContentInfo | None] = field(factory=dict)
    subtrees: dict[str, _Walk] = field(factory=dict)
    manifests_visited: set[str] = field(factory=set)


@define
class _Counts:
    """
    How many advertised images of one registry refer to each tag key, root and digest.
    """

    tags: Counter[str] = field(factory=Counter)
    roots: Counter[str] = field(factory=Counter)
    digests: Counter[str] = field(factory=Counter)

    def empty(self) -> bool:
        return not (self.tags or self.roots or self.digests)


def _add(counter: Counter[str], keys: Iterable[str], delta: int) -> None:
    for key in keys:
        counter[key] += delta
        if counter[key] <= 0:
            del counter[key]


async def _gather(coroutines: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """
    Run C{coroutines} concurrently; their results in order, or the first error, unwrapped.
    """
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    results = await DeferredList(deferreds, consumeErrors=True)
    values = []
    for ok, value in results:
        if not ok:
            value.raiseException()
        values.append(value)
    return values


class Advertiser(Service):
    """
    Keeps the router's keys equal to what this node's containerd holds.

    Add it to the application after the containerd client and the router (so it starts after
    and stops before them), and hand L{on_event} and L{on_resubscribed} to the
    L{spegel.containerd.events.EventSubscriber}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: ContainerdClient,
        router: IAnnouncer,
        registry_filter: RegistryFilter,
        *,
        reconcile_interval: float = 300.0,
        namespace: str = "k8s.io",
    ) -> None:
        """
        @param clock: runs the reconcile loop.
        @param client: this node's containerd; only its C{list_images}, C{get_image},
            C{content_info} and C{read_content} are used.
        @param registry_filter: images it refuses (registry not mirrored, or a pattern matches
            C{registry/repo:tag}) are not advertised at all.
        @param reconcile_interval: seconds between full resyncs.
        @param namespace: the containerd namespace the client reads, for log messages.
        """
        self._clock = clock
        self._client = client
        self._router = router
        self._filter = registry_filter
        self._reconcile_interval = reconcile_interval
        self._namespace = namespace
        self._loop: LoopingCall | None = None

        self._records: dict[str, _ImageRecord] = {}
        self._refs: Counter[str] = Counter()
        self._counts: dict[str, _Counts] = {}
        # Verified manifests never change, so what they refer to (or that they are unreadable)
        # is kept; each resync keeps only the entries it reached.
        self._manifests: dict[str, ManifestReferences | InvalidManifest] = {}

        self._seq = 0
        # The sequence number of the operation that last set each image, for those set after
        # the last resync applied (whose number, _floor, stands for all older ones).
        self._stamps: dict[str, int] = {}
        self._floor = -1
        # Content deleted since the last resync applied: digest -> sequence number of deletion.
        self._deletions: dict[str, int] = {}

        self._resyncing = False
        self._resync_waiters: list[Deferred[None]] = []
        self._outage = False
        # Loose blobs waiting for their distribution source label; cancelled when stopping.
        self._loose_waits: set[Deferred[None]] = set()

    @property
    def advertised_keys(self) -> frozenset[str]:
        """
        Every key handed to the router and not withdrawn since.
        """
        return frozenset(self._refs)

    # Service

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._reconcile)
        self._loop.clock = self._clock
        # The first call, now, is the initial resync.
        self._loop.start(self._reconcile_interval, now=True).addErrback(
            lambda f: _log.failure("The reconcile loop stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for wait in list(self._loose_waits):
            wait.cancel()

    def _reconcile(self) -> None:
        # Not returning the resync's Deferred: a slow resync must not hold the loop back, and
        # serialization already folds overlapping requests into one follow-up run.
        try:
            d = self.resync()
        except Exception:
            _log.failure("Starting a resync failed")
            return
        d.addErrback(lambda f: _log.failure("Resync failed", f))

    # Entry points

    def on_event(self, event: ImageEvent | ContentEvent) -> None:
        """
        Apply one containerd event; hand this to the event subscriber.
        """
        if isinstance(event, ImageEvent):
            if event.action == "delete":
                self._image_deleted(event.name)
            else:
                self._run(self._refresh_image(event.name), "Handling {event} failed", event=event)
        elif isinstance(event, ContentEvent):
            if event.action == "delete":
                self._content_deleted(event.digest)
            elif event.action == "create":
                self._content_created(event.digest)

    def on_resubscribed(self) -> None:
        """
        Resync in full: events published while no subscription was live are lost.
        """
        self.resync().addErrback(lambda f: _log.failure("Resync after resubscribing failed", f))

    def resync(self) -> Deferred[None]:
        """
        List every image, walk them, and provide and withdraw keys to match.

        Resyncs never overlap: one asked for while another runs runs once after it, for all
        requests made meanwhile.

        @return: fires when a resync started after this call has finished.  containerd errors
            are logged and leave what is advertised unchanged; the Deferred fails only on a bug.
        """
        waiter: Deferred[None] = Deferred()
        self._resync_waiters.append(waiter)
        if not self._resyncing:
            self._start_resync()
        return waiter

    # Resync

    def _start_resync(self) -> None:
        self._resyncing = True
        waiters, self._resync_waiters = self._resync_waiters, []
        d = Deferred.fromCoroutine(self._resync_once())

        def finished(result: object) -> None:
            # The Failure reaches every waiter, so it is not returned: it is handled.
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._resync_waiters:
                self._start_resync()
            else:
                self._resyncing = False

        d.addBoth(finished)

    async def _resync_once(self) -> None:
        seq = self._next_seq()
        try:
            images = await self._client.list_images()
        except ContainerdError as e:
            self._containerd_failed(e)
            return
        self._containerd_ok()
        memo = _WalkMemo()
        results: dict[str, _ImageRecord] = {}
        accepted = iter([(image, reference) for image in images if (reference := self._accept(image.name))])

        async def walk_images() -> None:
            # Workers share one iterator, so each image is walked once.
            for image, reference in accepted:
                results[image.name] = await self._record(image, reference, memo)

        try:
            await _gather(walk_images() for _ in range(RESYNC_CONCURRENCY))
        except ContainerdError as e:
            # A walk cut short would withdraw what is still there; keep the last full picture.
            self._containerd_failed(e)
            return
        try:
            results.update(await self._loose_still_present(memo, results))
        except ContainerdError as e:
            self._containerd_failed(e)
            return
        deleted = self._deleted_after(seq)
        changes: dict[str, bool] = {}
        for name in set(self._records) | set(results):
            if self._stamps.get(name, -1) > seq:
                continue
            record = results.get(name)
            if record is not None and deleted:
                record = record.without(deleted)
            self._replace(name, record, changes)
        self._floor = seq
        self._stamps = {name: s for name, s in self._stamps.items() if s > seq}
        self._deletions = {digest: s for digest, s in self._deletions.items() if s > seq}
        self._manifests = {d: m for d, m in self._manifests.items() if d in memo.manifests_visited}
        self._commit(changes)
        _log.debug(
            "Resynced {images} images of namespace {namespace}: {keys} keys advertised",
            images=len(self._records),
            namespace=self._namespace,
            keys=len(self._refs),
        )

    # Events

    async def _refresh_image(self, name: str) -> None:
        reference = self._accept(name)
        if reference is None:
            return
        seq = self._next_seq()
        try:
            image = await self._client.get_image(name)
        except ImageNotFound:
            # Deleted again before we looked.
            self._apply(seq, name, None)
            return
        except ContainerdError as e:
            self._containerd_failed(e)
            return
        self._containerd_ok()
        await self._walk_and_apply(seq, image, reference)

    async def _walk_and_apply(self, seq: int, image: Image, reference: Reference) -> None:
        try:
            record = await self._record(image, reference, _WalkMemo())
        except ContainerdError as e:
            self._containerd_failed(e)
            return
        self._apply(seq, image.name, record.without(self._deleted_after(seq)))

    def _image_deleted(self, name: str) -> None:
        # Reference counts withdraw exactly the keys no remaining image refers to, so there is
        # no need for a full resync here.
        if self._accept(name) is not None:
            self._apply(self._next_seq(), name, None)

    async def _loose_still_present(
        self, memo: _WalkMemo, images: Mapping[str, _ImageRecord]
    ) -> dict[str, _ImageRecord]:
        """
        The loose records to keep: those whose blob is still in the store and that no image
        of C{images} holds now.
        """
        held = frozenset().union(*(record.present for record in images.values()))
        loose = [
            (name, record)
            for name, record in self._records.items()
            if record.loose and record.target.digest not in held
        ]
        infos = await _gather(self._info(record.target.digest, memo) for _, record in loose)
        return {name: record for (name, record), info in zip(loose, infos) if info is not None}

    def _content_deleted(self, digest: str) -> None:
        self._deletions[digest] = self._next_seq()
        changes: dict[str, bool] = {}
        for name, record in list(self._records.items()):
            self._replace(name, record.without(frozenset({digest})), changes)
        self._commit(changes)

    def _content_created(self, digest: str) -> None:
        self._deletions.pop(digest, None)
        # Walking again rather than providing the digest alone: a manifest that arrives may
        # bring children to check too.
        for name, record in list(self._records.items()):
            if digest in record.missing and not record.loose:
                image = Image(name=name, target=record.target)
                self._run(
                    self._walk_and_apply(self._next_seq(), image, record.reference),
                    "Walking {name} again after content arrived failed",
                    name=name,
                )
        if digest not in self._refs and is_digest(digest):
            # containerd 2.1+ says so as each blob of a pull is committed, before the image
            # exists: advertised now, a layer can be fetched by peers pulling the same image
            # at the same time (a rollout), not only once the first node has all of it.
            self._run(self._advertise_loose(digest), "Advertising {digest} failed", digest=digest)

    async def _advertise_loose(self, digest: str) -> None:
        for delay in LOOSE_LABEL_WAITS:
            if delay:
                wait = deferLater(self._clock, delay, lambda: None)
                self._loose_waits.add(wait)
                try:
                    await wait
                except CancelledError:
                    return  # stopping
                finally:
                    self._loose_waits.discard(wait)
            if digest in self._refs:
                return
            looked = self._next_seq()
            try:
                info = await self._client.content_info(digest)
            except ContentNotFound:
                return
            except ContainerdError as e:
                self._containerd_failed(e)
                return
            reference = self._source(info)
            if reference is not None:
                break
        else:
            # Not from a registry pull (an import, another client's write): its image, if
            # one comes, is advertised as a whole.
            _log.debug("Not advertising {digest} before its image: no distribution source", digest=digest)
            return
        if digest in self._refs or self._deleted_after(looked) & {digest}:
            return
        _log.debug(
            "Advertising {digest} before its image: committed, from {registry}/{repository}",
            digest=digest,
            registry=reference.registry,
            repository=reference.repository,
        )
        record = _ImageRecord(
            reference=reference,
            target=Descriptor("", digest, info.size),
            tag_key=None,
            present=frozenset({digest}),
            missing=frozenset(),
            servable=False,
            loose=True,
        )
        # A new sequence number: a resync that started while this waited for the label knows
        # nothing of this blob and must not outrank it (it keeps loose records, and the next
        # one drops this again if the blob is gone by then).
        self._apply(self._next_seq(), _LOOSE + digest, record)

    def _source(self, info: ContentInfo) -> Reference | None:
        """
        The first registry and repository of C{info}'s distribution source labels that the
        registry filter accepts, or L{None}.
        """
        for label, value in sorted(info.labels.items()):
            if not label.startswith(DISTRIBUTION_SOURCE_LABEL):
                continue
            host = label[len(DISTRIBUTION_SOURCE_LABEL) :]
            # containerd leaves the port out of the label (127.0.0.1:5000 is labelled
            # 127.0.0.1): it is the mirrored registry of that host, whatever its port.
            registries = sorted(r for r in self._filter.mirrored_registries if _without_port(r) == host)
            for registry in registries or [host]:
                for repository in value.split(","):
                    try:
                        parse_registry_host(registry)
                        parse_repository(repository)
                        reference = Reference(registry, repository)
                        self._filter.check(reference)
                    except (OCIError, NameUnknown):
                        continue
                    return reference
        return None

    def _apply(self, seq: int, name: str, record: _ImageRecord | None) -> None:
        """
        Set or remove one image's record, unless an operation started after C{seq} already did.
        """
        if seq <= max(self._floor, self._stamps.get(name, -1)):
            return
        self._stamps[name] = seq
        changes: dict[str, bool] = {}
        self._replace(name, record, changes)
        self._commit(changes)

    # Walking

    def _accept(self, name: str) -> Reference | None:
        """
        The parsed name of an image that may be advertised, or L{None}.
        """
        try:
            reference = parse_image_name(name)
        except UnparseableImageName as e:
            _log.debug("Not advertising {name}: {reason}", name=name, reason=str(e))
            return None
        try:
            self._filter.check(reference)
        except NameUnknown as e:
            _log.debug("Not advertising {name}: {reason}", name=name, reason=e.message)
            return None
        return reference

    async def _record(self, image: Image, reference: Reference, memo: _WalkMemo) -> _ImageRecord:
        walk = await self._subtree(image.target.digest, image.target.media_type or None, memo, 0)
        tag_key = reference.tag_key if reference.tag is not None and reference.tag_key == image.name else None
        servable = walk.complete > 0
        return _ImageRecord(reference, image.target, tag_key, walk.present, walk.missing, servable)

    async def _subtree(self, digest: str, media_type: str | None, memo: _WalkMemo, depth: int) -> _Walk:
        walk = memo.subtrees.get(digest)
        if walk is None:
            walk = memo.subtrees[digest] = await self._walk_manifest(digest, media_type, memo, depth)
        return walk

    async def _walk_manifest(self, digest: str, media_type: str | None, memo: _WalkMemo, depth: int) -> _Walk:
        if not is_digest(digest):
            _log.warn("Not walking {digest!r}: not a digest", digest=digest)
            return _Walk()
        info = await self._info(digest, memo)
        if info is None:
            return _Walk(missing=frozenset({digest}))
        memo.manifests_visited.add(digest)
        try:
            references = await self._references(info, media_type)
        except (InvalidManifest, ContentChanged) as e:
            # Nothing under it can be found, and a peer asking for it would get a 404 from us.
            _log.debug("Not advertising {digest} and what it refers to: {reason}", digest=digest, reason=str(e))
            return _Walk()
        parts = [_Walk(present=frozenset({digest}))]
        if references.manifests:
            if depth >= MAX_INDEX_DEPTH:
                _log.warn("Not following index {digest}: nested more than {depth} deep", digest=digest, depth=depth)
            else:
                parts += await _gather(
                    self._subtree(child, child_type, memo, depth + 1) for child, child_type in references.manifests
                )
        if references.blobs:
            infos = await _gather(self._info(blob, memo) for blob in references.blobs)
            missing = frozenset(b for b, i in zip(references.blobs, infos) if i is None)
            parts.append(
                _Walk(
                    present=frozenset(b for b, i in zip(references.blobs, infos) if i is not None),
                    missing=missing,
                    complete=0 if missing else 1,
                )
            )
        return _Walk.union(parts)

    async def _info(self, digest: str, memo: _WalkMemo) -> ContentInfo | None:
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
            metrics.containerd_errors_total.inc()
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

    # State

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _deleted_after(self, seq: int) -> frozenset[str]:
        """
        The content deleted after operation C{seq} started: its walk may have found it present.
        """
        return frozenset(digest for digest, s in self._deletions.items() if s > seq)

    def _replace(self, name: str, record: _ImageRecord | None, changes: dict[str, bool]) -> None:
        """
        Make C{record} the one for C{name}, counting references; C{changes} learns, for every
        key touched, whether it was advertised before the first touch.
        """
        old = self._records.get(name)
        if old == record:
            return
        # A key both records have may pass through zero here; _commit compares only the state
        # before the first touch with the final one, so it is neither withdrawn nor provided.
        for current, delta in ((record, 1), (old, -1)):
            if current is None:
                continue
            for key in current.keys:
                changes.setdefault(key, key in self._refs)
            _add(self._refs, current.keys, delta)
            counts = self._counts.setdefault(current.registry, _Counts())
            _add(counts.tags, [current.tag_key] if current.tag_advertised and current.tag_key else [], delta)
            _add(counts.roots, [current.target.digest] if current.root_advertised else [], delta)
            _add(counts.digests, current.present, delta)
            self._set_gauges(current.registry, counts)
        if record is None:
            del self._records[name]
        else:
            self._records[name] = record
            if not record.loose:
                # An image holds these now: it withdraws them when it goes, which a loose
                # record left behind would not (garbage collection sends no /content/delete).
                for digest in record.present:
                    if _LOOSE + digest in self._records:
                        self._replace(_LOOSE + digest, None, changes)

    def _set_gauges(self, registry: str, counts: _Counts) -> None:
        if counts.empty():
            del self._counts[registry]
            for gauge in (advertised_image_tags, advertised_image_digests, advertised_content_digests):
                try:
                    gauge.remove(registry)
                except KeyError:
                    pass
            return
        advertised_image_tags.labels(registry).set(len(counts.tags))
        advertised_image_digests.labels(registry).set(len(counts.roots))
        advertised_content_digests.labels(registry).set(len(counts.digests))

    def _commit(self, changes: Mapping[str, bool]) -> None:
        """
        Tell the router about every key whose advertisement changed.
        """
        withdrawn = sorted(key for key, was in changes.items() if was and key not in self._refs)
        provided = sorted(key for key, was in changes.items() if not was and key in self._refs)
        if withdrawn:
            self._router.withdraw(withdrawn)
        if provided:
            self._router.provide(provided)

    # containerd's health

    def _containerd_failed(self, error: ContainerdError) -> None:
        metrics.containerd_errors_total.inc()
        if not isinstance(error, ContainerdUnavailable):
            _log.warn("containerd call failed: {error}", error=error)
        elif not self._outage:
            self._outage = True
            _log.warn(
                "containerd is unavailable ({error}); keeping the {keys} advertised keys and "
                "retrying at the next resync",
                error=error,
                keys=len(self._refs),
            )

    def _containerd_ok(self) -> None:
        if self._outage:
            self._outage = False
            _log.info("containerd is reachable again")

    def _run(self, coroutine: Coroutine[Any, Any, None], failure_message: str, **fields: object) -> None:
        Deferred.fromCoroutine(coroutine).addErrback(lambda f: _log.failure(failure_message, f, **fields))
