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

The walk through containerd's content (L{spegel.imagewalk}) and the reference-counted keys
handed to the router (L{spegel.advertised}) live in their own modules; this one holds when and
what to walk, and in which order results apply.

Events and resyncs overlap: a resync walks for seconds on a big node while events keep being
applied.  Every operation takes a sequence number when it starts, and a result is applied to an
image only if no operation that started later has already set that image; content deleted after
an operation started is taken out of its result.  So a slow resync never undoes a newer event.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.metrics import Metrics
from spegel.advertised import LOOSE, AdvertisedKeys, ImageRecord
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
from spegel.imagewalk import ManifestWalker, WalkMemo, gather
from spegel.interfaces import IAnnouncer
from spegel.oci import (
    NameUnknown,
    OCIError,
    Reference,
    UnparseableImageName,
    is_digest,
    parse_image_name,
    parse_registry_host,
    parse_repository,
)
from spegel.registry import RegistryFilter

_log = Logger()

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


def _without_port(registry: str) -> str:
    if registry.startswith("["):
        return registry[: registry.find("]") + 1]
    return registry.partition(":")[0]


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
        metrics: Metrics,
    ) -> None:
        """
        @param clock: runs the reconcile loop.
        @param client: this node's containerd; only its C{list_images}, C{get_image},
            C{content_info} and C{read_content} are used.
        @param registry_filter: images it refuses (registry not mirrored, or a pattern matches
            C{registry/repo:tag}) are not advertised at all.
        @param reconcile_interval: seconds between full resyncs.
        @param namespace: the containerd namespace the client reads, for log messages.
        @param metrics: where the advertised counts and containerd's errors are recorded.
        """
        self._clock = clock
        self._metrics = metrics
        self._client = client
        self._filter = registry_filter
        self._reconcile_interval = reconcile_interval
        self._namespace = namespace
        self._loop: LoopingCall | None = None

        self._keys = AdvertisedKeys(router, metrics)
        self._walker = ManifestWalker(client, metrics)

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
        return frozenset(self._keys.refs)

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
        memo = WalkMemo()
        results: dict[str, ImageRecord] = {}
        accepted = iter([(image, reference) for image in images if (reference := self._accept(image.name))])

        async def walk_images() -> None:
            # Workers share one iterator, so each image is walked once.
            for image, reference in accepted:
                results[image.name] = await self._record(image, reference, memo)

        try:
            await gather(walk_images() for _ in range(RESYNC_CONCURRENCY))
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
        for name in set(self._keys.records) | set(results):
            if self._stamps.get(name, -1) > seq:
                continue
            record = results.get(name)
            if record is not None and deleted:
                record = record.without(deleted)
            self._keys.replace(name, record, changes)
        self._floor = seq
        self._stamps = {name: s for name, s in self._stamps.items() if s > seq}
        self._deletions = {digest: s for digest, s in self._deletions.items() if s > seq}
        self._walker.keep_only(memo.manifests_visited)
        self._keys.commit(changes)
        _log.debug(
            "Resynced {images} images of namespace {namespace}: {keys} keys advertised",
            images=len(self._keys.records),
            namespace=self._namespace,
            keys=len(self._keys.refs),
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
            record = await self._record(image, reference, WalkMemo())
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
        self, memo: WalkMemo, images: Mapping[str, ImageRecord]
    ) -> dict[str, ImageRecord]:
        """
        The loose records to keep: those whose blob is still in the store and that no image
        of C{images} holds now.
        """
        held = frozenset().union(*(record.present for record in images.values()))
        loose = [
            (name, record)
            for name, record in self._keys.records.items()
            if record.loose and record.target.digest not in held
        ]
        infos = await gather(self._walker.info(record.target.digest, memo) for _, record in loose)
        return {name: record for (name, record), info in zip(loose, infos) if info is not None}

    def _content_deleted(self, digest: str) -> None:
        self._deletions[digest] = self._next_seq()
        changes: dict[str, bool] = {}
        for name, record in list(self._keys.records.items()):
            self._keys.replace(name, record.without(frozenset({digest})), changes)
        self._keys.commit(changes)

    def _content_created(self, digest: str) -> None:
        self._deletions.pop(digest, None)
        # Walking again rather than providing the digest alone: a manifest that arrives may
        # bring children to check too.
        for name, record in list(self._keys.records.items()):
            if digest in record.missing and not record.loose:
                image = Image(name=name, target=record.target)
                self._run(
                    self._walk_and_apply(self._next_seq(), image, record.reference),
                    "Walking {name} again after content arrived failed",
                    name=name,
                )
        if digest not in self._keys.refs and is_digest(digest):
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
            if digest in self._keys.refs:
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
        if digest in self._keys.refs or self._deleted_after(looked) & {digest}:
            return
        _log.debug(
            "Advertising {digest} before its image: committed, from {registry}/{repository}",
            digest=digest,
            registry=reference.registry,
            repository=reference.repository,
        )
        record = ImageRecord(
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
        self._apply(self._next_seq(), LOOSE + digest, record)

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

    def _apply(self, seq: int, name: str, record: ImageRecord | None) -> None:
        """
        Set or remove one image's record, unless an operation started after C{seq} already did.
        """
        if seq <= max(self._floor, self._stamps.get(name, -1)):
            return
        self._stamps[name] = seq
        changes: dict[str, bool] = {}
        self._keys.replace(name, record, changes)
        self._keys.commit(changes)

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

    async def _record(self, image: Image, reference: Reference, memo: WalkMemo) -> ImageRecord:
        walk = await self._walker.subtree(image.target.digest, image.target.media_type or None, memo, 0)
        tag_key = reference.tag_key if reference.tag is not None and reference.tag_key == image.name else None
        servable = walk.complete > 0
        return ImageRecord(reference, image.target, tag_key, walk.present, walk.missing, servable)

    # State

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _deleted_after(self, seq: int) -> frozenset[str]:
        """
        The content deleted after operation C{seq} started: its walk may have found it present.
        """
        return frozenset(digest for digest, s in self._deletions.items() if s > seq)

    # containerd's health

    def _containerd_failed(self, error: ContainerdError) -> None:
        self._metrics.containerd_errors_total.inc()
        if not isinstance(error, ContainerdUnavailable):
            _log.warn("containerd call failed: {error}", error=error)
        elif not self._outage:
            self._outage = True
            _log.warn(
                "containerd is unavailable ({error}); keeping the {keys} advertised keys and "
                "retrying at the next resync",
                error=error,
                keys=len(self._keys.refs),
            )

    def _containerd_ok(self) -> None:
        if self._outage:
            self._outage = False
            _log.info("containerd is reachable again")

    def _run(self, coroutine: Coroutine[Any, Any, None], failure_message: str, **fields: Any) -> None:
        Deferred.fromCoroutine(coroutine).addErrback(lambda f: _log.failure(failure_message, f, **fields))
