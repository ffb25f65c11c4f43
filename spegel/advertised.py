# -*- test-case-name: tests.unit.test_advertiser -*-
"""
What this node advertises, for the L{spegel.advertiser.Advertiser}: one L{ImageRecord} per image
(and per blob advertised before its image exists), the keys they hold counted by reference, so a
key is withdrawn only when no record holds it any more and provided only when the first one does,
and the C{spegel_advertised_*} gauges by registry.  L{AdvertisedKeys.commit} hands the router
what one change provided and withdrew, each key at most once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from attrs import define, evolve, field, frozen

from spegel.containerd.client import Descriptor
from spegel.interfaces import IAnnouncer
from spegel.metrics import Metrics
from spegel.oci import Reference

# Records of blobs advertised before any image refers to them are named with this prefix, which
# no image name can have.
LOOSE = "\x00loose:"


@frozen
class ImageRecord:
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

    def without(self, digests: frozenset[str]) -> ImageRecord:
        gone = self.present & digests
        if not gone:
            return self
        # Which manifest lost a blob is not recorded; losing any makes the tag doubtful.
        return evolve(self, present=self.present - gone, missing=self.missing | gone, servable=False)


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


class AdvertisedKeys:
    """
    The records of every advertised image, and the keys they hold.

    @ivar records: each image's record, by image name (loose blobs by L{LOOSE} and digest).
    @ivar refs: how many records hold each advertised key.
    """

    def __init__(self, router: IAnnouncer, metrics: Metrics) -> None:
        self._router = router
        self._metrics = metrics
        self.records: dict[str, ImageRecord] = {}
        self.refs: Counter[str] = Counter()
        self._counts: dict[str, _Counts] = {}

    def replace(self, name: str, record: ImageRecord | None, changes: dict[str, bool]) -> None:
        """
        Make C{record} the one for C{name}, counting references; C{changes} learns, for every
        key touched, whether it was advertised before the first touch.
        """
        old = self.records.get(name)
        if old == record:
            return
        # A key both records have may pass through zero here; commit compares only the state
        # before the first touch with the final one, so it is neither withdrawn nor provided.
        for current, delta in ((record, 1), (old, -1)):
            if current is None:
                continue
            for key in current.keys:
                changes.setdefault(key, key in self.refs)
            _add(self.refs, current.keys, delta)
            counts = self._counts.setdefault(current.registry, _Counts())
            _add(counts.tags, [current.tag_key] if current.tag_advertised and current.tag_key else [], delta)
            _add(counts.roots, [current.target.digest] if current.root_advertised else [], delta)
            _add(counts.digests, current.present, delta)
            self._set_gauges(current.registry, counts)
        if record is None:
            del self.records[name]
        else:
            self.records[name] = record
            if not record.loose:
                # An image holds these now: it withdraws them when it goes, which a loose
                # record left behind would not (garbage collection sends no /content/delete).
                for digest in record.present:
                    if LOOSE + digest in self.records:
                        self.replace(LOOSE + digest, None, changes)

    def _set_gauges(self, registry: str, counts: _Counts) -> None:
        if counts.empty():
            del self._counts[registry]
            metrics = self._metrics
            for gauge in (
                metrics.advertised_image_tags, metrics.advertised_image_digests, metrics.advertised_content_digests
            ):
                try:
                    gauge.remove(registry)
                except KeyError:
                    pass
            return
        self._metrics.advertised_image_tags.labels(registry).set(len(counts.tags))
        self._metrics.advertised_image_digests.labels(registry).set(len(counts.roots))
        self._metrics.advertised_content_digests.labels(registry).set(len(counts.digests))

    def commit(self, changes: Mapping[str, bool]) -> None:
        """
        Tell the router about every key whose advertisement changed.
        """
        withdrawn = sorted(key for key, was in changes.items() if was and key not in self.refs)
        provided = sorted(key for key, was in changes.items() if not was and key in self.refs)
        if withdrawn:
            self._router.withdraw(withdrawn)
        if provided:
            self._router.provide(provided)
