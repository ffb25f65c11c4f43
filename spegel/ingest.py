# -*- test-case-name: tests.unit.test_ingest -*-
"""
Blobs this node's containerd is still downloading, served to peers as their bytes arrive.

containerd writes a blob it pulls (from a peer through this node's mirror, or from the upstream
registry after the mirror's 404) into an ingest of its content store,
C{<content root>/ingest/<hash of its ref>/data}, from the first byte on, and renames that file into
C{blobs/} once it is whole and verified. Before, a node became a holder of a layer only then: in a
rollout every node asked the first holder at once when it finished, or went upstream itself while
it was still downloading (a 50-node rollout of a 100 MB image sent 25 copies upstream).

Now the node says it holds a blob the moment its own containerd asks for it (L{PartialPulls.started}),
and answers a peer's request from the ingest: headers at once (the ingest knows the blob's size),
each body byte as soon as containerd has written it (L{GrowingFile}). The nodes of a rollout fetch
from each other while the first is still downloading: a pipeline, not a queue.

Nothing is verified here: the asking mirror hashes the whole blob as it does for any peer, so a torn
or wrong ingest costs it a retry elsewhere, never a wrong blob. The reader keeps the data file open,
so the rename at commit changes nothing for it; an ingest that stops growing (a failed pull) ends the
response after C{stall_timeout}, and the asking mirror resumes from another holder.
"""

from __future__ import annotations

import os
import time
from typing import Awaitable, Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.containerd.client import content_path_for
from spegel.interfaces import IAnnouncer
from spegel.metrics import Metrics

# A containerd ref names the blob last: "layer-sha256:…", "k8s.io-12-config-sha256:…", "name@sha256:…".
_REF_READ_LIMIT = 4096


@frozen
class Ingest:
    """
    @ivar data_path: the file containerd writes the blob into, from its first byte on.
    @ivar total: the blob's size, as containerd was told when the download started.
    @ivar written: how many bytes it held when looked at.
    @ivar written_at: when containerd last wrote to it (wall clock, seconds).
    """

    data_path: str
    total: int
    written: int = 0
    written_at: float = 0.0


class IngestStalled(Exception):
    """The ingest stopped growing before the bytes asked for: containerd's pull failed or stalled."""


class NotYet(Exception):
    """
    This node's containerd asked for the blob a moment ago and has not started writing it yet,
    or its download is not moving: a peer should ask another holder, or this one again shortly.
    """


# An ingest not written to for this long is not moving: its own source is waiting, or failed.
# Served anyway, it would hold the asking node's copy still until that node gave up on it.
STILL_FOR = 2.0


def find_ingest(content_root: str, digest: str) -> Ingest | None:
    """
    The ingest in which containerd is downloading C{digest} now, if any (blocking: run it in a thread).

    containerd names an ingest's directory by a hash of its ref, which holds a number only it
    knows, so the refs are read, not computed. Of several ingests of one blob (one per namespace)
    the one furthest along is chosen.

    @raise ValueError: C{digest} is not a sha256 or sha512 digest (no path outside the store).
    """
    content_path_for(content_root, digest)
    root = os.path.join(content_root, "ingest")
    try:
        names = os.listdir(root)
    except OSError:
        return None
    best: tuple[int, Ingest] | None = None
    for name in names:
        directory = os.path.join(root, name)
        try:
            with open(os.path.join(directory, "ref"), "rb") as f:
                ref = f.read(_REF_READ_LIMIT)
            if not ref.endswith(digest.encode("ascii")):
                continue
            with open(os.path.join(directory, "total"), "rb") as f:
                total = int(f.read(64))
            data_path = os.path.join(directory, "data")
            status = os.stat(data_path)
        except (OSError, ValueError):
            # Committed or aborted while we looked, or no size was given: not servable.
            continue
        if total <= 0:
            continue
        if best is None or status.st_size > best[0]:
            best = (status.st_size, Ingest(data_path, total, status.st_size, status.st_mtime))
    return best[1] if best is not None else None


class GrowingFile:
    """
    Reads of a file another process is still appending to, each waiting for its bytes.

    @param clock: polls the file's size while it waits.
    @param fd: the open file; closed by L{close}.
    @param total: the size the file grows to.
    @param poll_interval: how often a waiting read looks at the file's size.
    @param stall_timeout: a read that sees no growth for this long fails with L{IngestStalled}.
    """

    def __init__(
        self, clock: IReactorTime, fd: int, total: int, *, poll_interval: float = 0.05, stall_timeout: float = 15.0
    ):
        self._clock = clock
        self._fd = fd
        self.total = total
        self._poll_interval = poll_interval
        self._stall_timeout = stall_timeout

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def wait_for(self, offset: int) -> Deferred[None] | None:
        """
        L{None} when the byte at C{offset} is in the file; else a L{Deferred} firing once it is
        (failing with L{IngestStalled} if the file stops growing first). Cancelling it stops the wait.
        """
        size = self._size()
        if size > offset:
            return None
        call: IDelayedCall | None = None

        def cancel(d: Deferred[None]) -> None:
            if call is not None and call.active():
                call.cancel()

        waiting: Deferred[None] = Deferred(cancel)
        state = {"size": size, "since": self._clock.seconds()}

        def poll() -> None:
            nonlocal call
            call = None
            try:
                now_size = self._size()
            except OSError as e:
                waiting.errback(Failure(IngestStalled(f"the ingest cannot be read: {e}")))
                return
            if now_size > offset:
                waiting.callback(None)
                return
            now = self._clock.seconds()
            if now_size != state["size"]:
                state["size"], state["since"] = now_size, now
            elif now - state["since"] >= self._stall_timeout:
                waiting.errback(Failure(IngestStalled(f"the ingest stopped growing at {now_size} bytes")))
                return
            call = self._clock.callLater(self._poll_interval, poll)

        call = self._clock.callLater(self._poll_interval, poll)
        return waiting

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        """At most C{size} bytes at C{offset}, of those written so far (none if none are)."""
        available = max(0, self._size() - offset)
        return succeed(os.pread(self._fd, min(size, available), offset))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PartialPulls(Service):
    """
    The blobs this node's containerd is downloading: said in the DHT at once, served from their
    ingests to peers.

    @param clock: for the checks that withdraw a pull that never completed.
    @param announcer: the DHT announcer this node provides keys with.
    @param content_root: containerd's content store directory, as this process sees it.
    @param is_held: whether containerd holds a blob whole (a L{Deferred} of a bool).
    @param starting_for: how long after containerd's request for a blob ended a peer is told "not
        yet" (429) rather than "not here" (404) while no ingest has appeared; while the request
        lasts (the mirror is looking for the blob, or waiting for a holder), always "not yet".
    @param recheck_after: how long after containerd asked a pull is looked at again: complete
        (the advertiser keeps announcing it), still going (looked at later), or gone (withdrawn).
    @param run_blocking: runs a blocking call off the reactor.
    @param locate: L{find_ingest}, or a stand-in.
    @param open_file: opens an ingest's data file (a file descriptor).
    @param wall: the wall clock, which file times are on.
    @param metrics: where served and refused partial uploads are counted.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        announcer: IAnnouncer,
        content_root: str,
        *,
        is_held: Callable[[str], Awaitable[bool]],
        starting_for: float = 5.0,
        recheck_after: float = 120.0,
        poll_interval: float = 0.05,
        stall_timeout: float = 15.0,
        run_blocking: Callable[..., Deferred[object]] = deferToThread,
        locate: Callable[[str, str], Ingest | None] = find_ingest,
        open_file: Callable[[str], int] = lambda path: os.open(path, os.O_RDONLY | os.O_CLOEXEC),
        wall: Callable[[], float] = time.time,
        metrics: Metrics,
    ):
        self._wall = wall
        self._clock = clock
        self._announcer = announcer
        self._content_root = content_root
        self._is_held = is_held
        self._starting_for = starting_for
        self._recheck_after = recheck_after
        self._poll_interval = poll_interval
        self._stall_timeout = stall_timeout
        self._run_blocking = run_blocking
        self._locate = locate
        self._open_file = open_file
        self._metrics = metrics
        # digest -> when containerd last asked for it, and the check that may withdraw it.
        self._started: dict[str, tuple[float, IDelayedCall]] = {}
        # digest -> containerd's requests for it that are still going on.
        self._asking: dict[str, int] = {}

    def started(self, digest: str) -> None:
        """
        This node's containerd asked for C{digest} and does not hold it: it is about to download
        it (from a peer through the mirror, or upstream). Say so in the DHT now.

        Call L{answered} when that request ends.
        """
        self._asking[digest] = self._asking.get(digest, 0) + 1
        previous = self._started.pop(digest, None)
        if previous is not None and previous[1].active():
            previous[1].cancel()
        else:
            self._announcer.provide([digest])
        self._started[digest] = (self._clock.seconds(), self._clock.callLater(self._recheck_after, self._recheck, digest))

    def answered(self, digest: str) -> None:
        """
        containerd's request for C{digest} ended: it has the blob from a peer, or goes upstream
        for it now, and writes it either way.
        """
        left = self._asking.get(digest, 0) - 1
        if left > 0:
            self._asking[digest] = left
        else:
            self._asking.pop(digest, None)
        started = self._started.get(digest)
        if started is not None:
            self._started[digest] = (self._clock.seconds(), started[1])

    def _recheck(self, digest: str) -> None:
        d = ensureDeferred(self._run_check(digest))
        d.addErrback(lambda f: self._log.failure("checking the pull of {digest}", f, digest=digest))

    async def _run_check(self, digest: str) -> None:
        held = await self._is_held(digest)
        if digest not in self._started:
            return
        if held:
            # Whole now: the advertiser announces it for as long as containerd keeps it.
            del self._started[digest]
            return
        ingest = await self._run_blocking(self._locate, self._content_root, digest)
        if digest not in self._started:
            return
        if ingest is not None or digest in self._asking:
            asked_at = self._started[digest][0]
            self._started[digest] = (asked_at, self._clock.callLater(self._recheck_after, self._recheck, digest))
            return
        # The pull failed or was given up: peers must not keep asking this node for it.
        del self._started[digest]
        self._announcer.withdraw([digest])

    def stopService(self) -> Deferred[None] | None:
        # Pending checks go; what was provided goes with the DHT service.
        for _, call in self._started.values():
            if call.active():
                call.cancel()
        self._started.clear()
        self._asking.clear()
        return super().stopService()

    async def open(self, digest: str) -> GrowingFile | None:
        """
        The ingest of C{digest} as a L{GrowingFile}, for a peer that asked for it.

        @return: L{None} when containerd is not downloading it.
        @raise NotYet: containerd asked for it a moment ago and has not started writing it, has
            written nothing yet, or has written nothing for L{STILL_FOR} seconds.
        """
        ingest = await self._run_blocking(self._locate, self._content_root, digest)
        if ingest is None:
            started = self._started.get(digest)
            if digest in self._asking or (
                started is not None and self._clock.seconds() - started[0] < self._starting_for
            ):
                raise NotYet(digest)
            return None
        assert isinstance(ingest, Ingest)
        if ingest.written == 0 or (ingest.written < ingest.total and self._wall() - ingest.written_at > STILL_FOR):
            raise NotYet(digest)
        try:
            fd = self._open_file(ingest.data_path)
        except OSError:
            # Committed or aborted between the look and the open: the caller looks again, or 404s.
            return None
        self._metrics.partial_uploads_total.inc()
        return GrowingFile(self._clock, fd, ingest.total, poll_interval=self._poll_interval, stall_timeout=self._stall_timeout)

