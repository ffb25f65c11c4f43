"""
Tests for L{spegel.ingest}: blobs this node's containerd is still downloading, found in its
content store's ingests and served to peers as their bytes arrive; and for the registry's use
of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from tests.unit.stubtreq import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from spegel.ingest import GrowingFile, IngestStalled, NotYet, PartialPulls, find_ingest
from spegel.interfaces import MIRRORED_HEADER, IAnnouncer
from spegel.metrics import Metrics
from spegel.registry import RegistryFilter, RegistryResource
from spegel.uploads import PARTIAL_HEADER, PARTIAL_STARTING, UPLOADS_HEADER, UploadSlots
from tests.unit.test_registry import BASE, REGISTRY, MemoryContent


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_ingest(root: str, name: str, ref: str, data: bytes, total: int | None) -> str:
    """An ingest as containerd's local content store lays it out; the path of its data file."""
    directory = os.path.join(root, "ingest", name)
    os.makedirs(directory)
    with open(os.path.join(directory, "ref"), "w") as f:
        f.write(ref)
    if total is not None:
        with open(os.path.join(directory, "total"), "w") as f:
            f.write(str(total))
    path = os.path.join(directory, "data")
    with open(path, "wb") as f:
        f.write(data)
    return path


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def in_place(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A stand-in for deferToThread: the call runs at once (the tests' files are small)."""
    return succeed(function(*args))


class FindIngestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.digest = digest_of(b"layer")

    def test_found_by_the_digest_its_ref_ends_with(self) -> None:
        write_ingest(self.root, "a", "k8s.io-7-layer-" + digest_of(b"other"), b"xx", 10)
        path = write_ingest(self.root, "b", "k8s.io-8-layer-" + self.digest, b"abc", 5000)
        found = find_ingest(self.root, self.digest)
        assert found is not None
        self.assertEqual((found.data_path, found.total, found.written), (path, 5000, 3))
        self.assertEqual(found.written_at, os.stat(path).st_mtime)

    def test_the_furthest_of_several_is_chosen(self) -> None:
        write_ingest(self.root, "a", "moby-1-layer-" + self.digest, b"a" * 10, 5000)
        path = write_ingest(self.root, "b", "k8s.io-2-layer-" + self.digest, b"b" * 20, 5000)
        write_ingest(self.root, "c", "default-3-layer-" + self.digest, b"c" * 5, 5000)
        found = find_ingest(self.root, self.digest)
        assert found is not None
        self.assertEqual((found.data_path, found.written), (path, 20))

    def test_none_without_a_size_or_an_ingest(self) -> None:
        self.assertIsNone(find_ingest(self.root, self.digest))  # no ingest directory at all
        write_ingest(self.root, "a", "k8s.io-1-layer-" + self.digest, b"abc", None)
        write_ingest(self.root, "b", "k8s.io-2-layer-" + self.digest + "x", b"abc", 10)
        self.assertIsNone(find_ingest(self.root, self.digest))

    def test_a_malformed_digest_is_refused(self) -> None:
        for bad in ("sha256:../../etc", "md5:abc", self.digest.upper()):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, find_ingest, self.root, bad)


class GrowingFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(b"0123")
        self.file = GrowingFile(self.clock, os.open(self.path, os.O_RDONLY), 10, poll_interval=0.05, stall_timeout=1.0)
        self.addCleanup(self.file.close)

    def test_written_bytes_are_read_at_once(self) -> None:
        self.assertIsNone(self.file.wait_for(3))
        self.assertEqual(self.successResultOf(self.file.read(1, 100)), b"123")

    def test_a_read_past_the_end_waits_for_the_bytes(self) -> None:
        waiting = self.file.wait_for(4)
        assert waiting is not None
        self.clock.advance(0.5)
        self.assertNoResult(waiting)
        append(self.path, b"45")
        self.clock.advance(0.05)
        self.successResultOf(waiting)
        self.assertEqual(self.successResultOf(self.file.read(4, 100)), b"45")

    def test_growth_resets_the_stall_timer(self) -> None:
        waiting = self.file.wait_for(7)
        assert waiting is not None
        for _ in range(4):  # growing, though not yet past byte 7, for longer than the stall timeout
            self.clock.advance(0.6)
            append(self.path, b"x")
        self.assertNoResult(waiting)
        self.clock.advance(0.05)
        self.successResultOf(waiting)

    def test_a_file_that_stops_growing_fails_the_wait(self) -> None:
        waiting = self.file.wait_for(4)
        assert waiting is not None
        self.clock.advance(1.05)
        self.failureResultOf(waiting, IngestStalled)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_cancelled_wait_stops_polling(self) -> None:
        waiting = self.file.wait_for(4)
        assert waiting is not None
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


@implementer(IAnnouncer)
class RecordingAnnouncer:
    def __init__(self) -> None:
        self.provided: list[str] = []
        self.withdrawn: list[str] = []

    def provide(self, keys: Any) -> None:
        self.provided.extend(keys)

    def withdraw(self, keys: Any) -> None:
        self.withdrawn.extend(keys)


class PartialPullsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.announcer = RecordingAnnouncer()
        self.held: set[str] = set()
        self.metrics = Metrics()
        self.wall: float | None = None
        self.pulls = PartialPulls(
            self.clock, self.announcer, self.root, is_held=self.is_held, starting_for=5.0, recheck_after=120.0,
            run_blocking=in_place, wall=lambda: time.time() if self.wall is None else self.wall, metrics=self.metrics,
        )
        self.digest = digest_of(b"layer")

    async def is_held(self, digest: str) -> bool:
        return digest in self.held

    def test_a_started_pull_is_announced_once(self) -> None:
        self.pulls.started(self.digest)
        self.clock.advance(10)
        self.pulls.started(self.digest)
        self.assertEqual(self.announcer.provided, [self.digest])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_a_pull_that_never_completes_is_withdrawn(self) -> None:
        self.pulls.started(self.digest)
        self.clock.advance(120)  # containerd's request still waits on the mirror
        self.assertEqual(self.announcer.withdrawn, [])
        self.pulls.answered(self.digest)
        self.clock.advance(120)
        self.assertEqual(self.announcer.withdrawn, [self.digest])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_pull_still_going_is_looked_at_again(self) -> None:
        self.pulls.started(self.digest)
        self.pulls.answered(self.digest)
        path = write_ingest(self.root, "a", "k8s.io-1-layer-" + self.digest, b"ab", 10)
        self.clock.advance(120)
        self.assertEqual(self.announcer.withdrawn, [])
        os.unlink(path)
        self.clock.advance(120)
        self.assertEqual(self.announcer.withdrawn, [self.digest])

    def test_a_completed_pull_stays_announced(self) -> None:
        self.pulls.started(self.digest)
        self.pulls.answered(self.digest)
        self.held.add(self.digest)
        self.clock.advance(120)
        self.assertEqual(self.announcer.withdrawn, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_open_serves_the_ingest(self) -> None:
        write_ingest(self.root, "a", "k8s.io-1-layer-" + self.digest, b"abc", 10)
        growing = self.successResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)))
        assert growing is not None
        self.addCleanup(growing.close)
        self.assertEqual(growing.total, 10)
        self.assertEqual(self.successResultOf(growing.read(0, 10)), b"abc")
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_partial_uploads_total"), 1)

    def test_an_ingest_not_moving_is_not_yet(self) -> None:
        """
        Nothing written yet, or nothing for a while: the asking peer should try another holder
        rather than wait on this one. A complete ingest (about to be committed) is served.
        """
        path = write_ingest(self.root, "a", "k8s.io-1-layer-" + self.digest, b"", 10)
        self.failureResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)), NotYet)
        append(path, b"abc")
        written_at = os.stat(path).st_mtime
        self.wall = written_at + 1.9
        growing = self.successResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)))
        assert growing is not None
        growing.close()
        self.wall = written_at + 2.1
        self.failureResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)), NotYet)
        append(path, b"x" * 7)
        self.wall = os.stat(path).st_mtime + 60
        growing = self.successResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)))
        assert growing is not None
        growing.close()

    def test_just_started_is_not_yet_then_not_here(self) -> None:
        self.pulls.started(self.digest)
        self.clock.advance(30)  # containerd's request lasts (the mirror waits for a holder)
        self.failureResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)), NotYet)
        self.pulls.answered(self.digest)
        self.clock.advance(4.9)
        self.failureResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest)), NotYet)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(self.pulls.open(self.digest))))
        # Nothing was started for another digest: not here at once.
        other = digest_of(b"other")
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(self.pulls.open(other))))

    def test_stopping_cancels_the_checks(self) -> None:
        self.pulls.startService()
        self.pulls.started(self.digest)
        self.pulls.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RegistryPartialTests(SynchronousTestCase):
    """
    The registry answers a peer from what its containerd has downloaded so far, and says that its
    containerd is downloading a blob as soon as it asks for one it lacks.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.root = self.mktemp()
        self.content = MemoryContent(self.mktemp())
        os.makedirs(self.content.tmpdir)
        os.makedirs(self.root)
        self.announcer = RecordingAnnouncer()
        self.metrics = Metrics()
        self.pulls = PartialPulls(
            self.clock, self.announcer, self.root, is_held=self.is_held, run_blocking=in_place,
            stall_timeout=2.0, metrics=self.metrics,
        )
        self.uploads = UploadSlots(1, metrics=self.metrics)
        registry = RegistryResource(
            self.clock, self.content, RegistryFilter(frozenset({REGISTRY})), uploads=self.uploads,
            partials=self.pulls, metrics=self.metrics,
        )
        self.treq = StubTreq(registry.resource())
        self.data = os.urandom(5000)
        self.digest = digest_of(self.data)
        self.path = f"{BASE}/v2/team/app/blobs/{self.digest}?ns={REGISTRY}"

    async def is_held(self, digest: str) -> bool:
        return digest in self.content.blobs

    def get(self, peer: bool = True, method: str = "GET", **headers: str) -> Deferred[Any]:
        if peer:
            headers[MIRRORED_HEADER] = "true"
        return self.treq.request(method, self.path, headers=headers)

    def test_a_peer_gets_the_bytes_as_they_arrive(self) -> None:
        ingest = write_ingest(self.root, "a", "k8s.io-3-layer-" + self.digest, self.data[:1000], len(self.data))
        d = self.get()
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(self.data))
        self.assertEqual(response.headers.getRawHeaders(PARTIAL_HEADER), ["true"])
        self.assertEqual(response.headers.getRawHeaders(UPLOADS_HEADER), ["0/1"])
        body = response.content()
        for start in range(1000, len(self.data), 1500):
            self.clock.advance(0.05)
            self.treq.flush()
            self.assertNoResult(body)
            append(ingest, self.data[start : start + 1500])
        self.clock.advance(0.05)
        self.treq.flush()
        self.assertEqual(self.successResultOf(body), self.data)
        self.assertEqual(self.uploads.active, 0)
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_uploaded_bytes_total"), len(self.data))

    def test_headers_go_before_the_first_byte_is_written(self) -> None:
        ingest = write_ingest(self.root, "a", "k8s.io-3-layer-" + self.digest, self.data[:1000], len(self.data))
        d = self.get(Range="bytes=4000-4999")
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 206)
        body = response.content()
        self.assertNoResult(body)
        append(ingest, self.data[1000:])
        self.clock.advance(0.05)
        self.treq.flush()
        self.assertEqual(self.successResultOf(body), self.data[4000:])

    def test_a_range_of_it(self) -> None:
        write_ingest(self.root, "a", "k8s.io-3-layer-" + self.digest, self.data[:3000], len(self.data))
        d = self.get(Range="bytes=1000-1999")
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 206)
        self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes 1000-1999/{len(self.data)}"])
        self.assertEqual(self.successResultOf(response.content()), self.data[1000:2000])

    def test_an_ingest_that_stops_cuts_the_response(self) -> None:
        write_ingest(self.root, "a", "k8s.io-3-layer-" + self.digest, self.data[:1000], len(self.data))
        d = self.get()
        self.treq.flush()
        body = self.successResultOf(d).content()
        self.clock.advance(2.1)
        self.treq.flush()
        self.failureResultOf(body)  # a short body: the asking mirror resumes elsewhere
        self.assertEqual(self.uploads.active, 0)

    def test_containerd_asking_announces_and_peers_are_told_not_yet(self) -> None:
        own = self.successResultOf(self.get(peer=False))
        self.assertEqual(own.code, 404)
        self.assertEqual(self.announcer.provided, [self.digest])
        peer = self.successResultOf(self.get())
        self.assertEqual(peer.code, 429)
        self.assertEqual(peer.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(peer.headers.getRawHeaders(PARTIAL_HEADER), [PARTIAL_STARTING])
        self.assertEqual(json.loads(self.successResultOf(peer.content()))["errors"][0]["code"], "TOOMANYREQUESTS")
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(self.get()).code, 404)

    def test_heads_from_containerd_announce_nothing(self) -> None:
        self.assertEqual(self.successResultOf(self.get(peer=False, method="HEAD")).code, 404)
        self.assertEqual(self.announcer.provided, [])

    def test_a_peer_over_the_limit_is_refused_before_reading(self) -> None:
        write_ingest(self.root, "a", "k8s.io-3-layer-" + self.digest, self.data[:1000], len(self.data))
        first = self.get()
        self.treq.flush()
        second = self.successResultOf(self.get())
        self.assertEqual(second.code, 429)
        self.assertIsNone(second.headers.getRawHeaders(PARTIAL_HEADER))
        body = self.successResultOf(first).content()
        self.clock.advance(2.1)  # the first one's ingest never grows: it ends, and frees the slot
        self.treq.flush()
        self.failureResultOf(body)
        self.assertEqual(self.uploads.active, 0)
