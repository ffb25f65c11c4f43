# -*- test-case-name: tests.unit.test_pacing -*-
"""
The node's upload bandwidth cap (C{--max-upload-rate}): one token bucket on the reactor's clock,
shared by every blob body this node serves to peers.

A node that serves a rollout can fill its uplink with other nodes' pulls and starve its own
workloads (and the kubelet's, and the API server's) of bandwidth; C{--max-uploads} bounds how
many peers it serves, not how fast.  With a cap, the bodies sent to peers together stay under
it, while the node's own containerd (which reads from this node, not over the network) is never
held back.

How it paces: every upload asks its L{PacedUpload} how many bytes it may send now (L{take}),
sends at most that many (by C{write} or C{sendfile}: the bucket counts bytes, so zero-copy stays
zero-copy) and gives back what it could not send.  An upload that is granted nothing stops
producing and waits in line (L{wait}); a single timer on the reactor's clock wakes the first in
line once a quantum of tokens has accrued, so nothing sleeps and nothing is buffered beyond the
chunk being written.  Uploads waiting take turns in order, so several uploads share the cap
evenly instead of the quickest to ask taking it all.

Over any interval of T seconds the uploads send at most C{burst + rate * T} bytes: the burst is
what a bucket left idle has saved up, an eighth of a second of the rate (at least a read chunk,
so every upload can always send one).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from spegel.metrics import Metrics

# A bucket left idle saves up this much of its rate, so a new upload starts at once.
BURST_SECONDS = 1 / 8
# ...but never less than one read chunk of L{spegel.bodies} (READ_CHUNK), so one upload always
# gets a whole chunk.
BURST_FLOOR = 256 * 1024
# An upload that waits is woken once this much of the rate has accrued: small enough that the
# bytes flow evenly (a peer's mirror gives up on a body silent for 10 s), large enough that a
# node at a high cap wakes at most 100 times a second and sends sizeable chunks, not dribbles.
WAKE_SECONDS = 1 / 100
QUANTUM_FLOOR = 4 * 1024
# The lowest cap accepted (bytes per second): below it a handful of uploads would each wait
# seconds between chunks; see L{spegel.flags.parse_byte_rate}.
MIN_RATE = 64 * 1024
# Floating-point slack in comparing accrued tokens with a quantum: the timer fires at the
# computed moment, when the sum may be a hair below it.
_SLACK = 1e-6


class IPacer(Interface):
    """
    How fast one response body may go: what a body producer asks before it sends.
    """

    def take(wanted: int) -> int:
        """
        Reserve up to C{wanted} bytes to send now: C{wanted}, fewer, or 0 (then L{wait}).
        """

    def give_back(count: int) -> None:
        """
        Return C{count} reserved bytes that were not sent (a short read, a full socket).
        """

    def wait(resume: Callable[[], None]) -> None:
        """
        Call C{resume} once, later, when L{take} may grant bytes again.
        """

    def stop() -> None:
        """
        The body ended (done, failed or abandoned): leave the line; C{resume} is not called.
        """


@implementer(IPacer)
class _Unpaced:
    """
    No cap: everything asked for, at once.
    """

    def take(self, wanted: int) -> int:
        return max(0, wanted)

    def give_back(self, count: int) -> None:
        pass

    def wait(self, resume: Callable[[], None]) -> None:
        # Never needed (take never refuses), but a caller that waits is not left hanging.
        resume()

    def stop(self) -> None:
        pass


UNPACED: IPacer = _Unpaced()


@implementer(IPacer)
class PacedUpload:
    """
    One body's share of a L{TokenBucket}; made by L{TokenBucket.upload}.
    """

    def __init__(self, bucket: "TokenBucket") -> None:
        self._bucket = bucket
        self._resume: Callable[[], None] | None = None

    def take(self, wanted: int) -> int:
        return self._bucket._take(self, wanted)

    def give_back(self, count: int) -> None:
        self._bucket._give_back(count)

    def wait(self, resume: Callable[[], None]) -> None:
        self._resume = resume
        self._bucket._enqueue(self)

    def stop(self) -> None:
        self._resume = None
        self._bucket._leave(self)

    def _woken(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None:
            resume()


class TokenBucket:
    """
    The node's upload cap: C{rate} bytes per second with a burst, shared by its uploads.

    @ivar rate: bytes per second.
    @ivar burst: the most tokens the bucket holds (it starts full).
    @ivar quantum: tokens a waiting upload is woken for, and the least a grant holds unless the
        upload asked for less: every grant is worth a syscall.
    @ivar throttled_seconds: how long, in all, uploads have waited for tokens (the time during
        which at least one was waiting; also C{spegel_upload_throttled_seconds_total}).
    @ivar metrics: where that time is recorded.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, rate: float, burst: float | None = None, *, metrics: Metrics) -> None:
        if rate <= 0:
            raise ValueError(f"a token bucket needs a positive rate, not {rate!r}")
        self._clock = clock
        self.metrics = metrics
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate * BURST_SECONDS, BURST_FLOOR)
        self.quantum = int(min(self.burst, max(self.rate * WAKE_SECONDS, QUANTUM_FLOOR)))
        self._tokens = self.burst
        self._updated = clock.seconds()
        self._line: deque[PacedUpload] = deque()
        self._timer: IDelayedCall | None = None
        # The upload being woken: it may take tokens although others are in line.
        self._turn: PacedUpload | None = None
        # While turns are handed out the timer is set once, after them, for what is left.
        self._waking = False
        self._throttled_since: float | None = None
        self.throttled_seconds = 0.0

    def upload(self) -> PacedUpload:
        """
        The pacer for one more body sent to a peer.
        """
        return PacedUpload(self)

    @property
    def waiting(self) -> int:
        """Uploads in line for tokens."""
        return len(self._line)

    def _refill(self) -> None:
        now = self._clock.seconds()
        # A wall clock stepped back must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def _available(self) -> int:
        return int(self._tokens + _SLACK)

    def _take(self, upload: PacedUpload, wanted: int) -> int:
        if wanted <= 0:
            return 0
        if self._line and upload is not self._turn:
            # Those already waiting go first: this one joins the line when it waits.
            return 0
        self._refill()
        granted = min(wanted, self._available())
        if granted < min(wanted, self.quantum):
            return 0
        self._tokens -= granted
        return granted

    def _give_back(self, count: int) -> None:
        if count > 0:
            self._tokens = min(self.burst, self._tokens + count)

    def _enqueue(self, upload: PacedUpload) -> None:
        if upload not in self._line:
            if self._throttled_since is None:
                # (still set when the upload being woken comes back for more)
                self._throttled_since = self._clock.seconds()
            self._line.append(upload)
        self._schedule()

    def _leave(self, upload: PacedUpload) -> None:
        if upload in self._line:
            self._line.remove(upload)
            if not self._line:
                self._account()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None

    def _schedule(self) -> None:
        if self._timer is not None or not self._line or self._waking:
            return
        self._refill()
        delay = max(0.0, (self.quantum - self._tokens) / self.rate)
        self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._waking = True
        self._refill()
        # Each upload in line when the timer fired gets at most one turn: one that runs out
        # again waits at the back, behind the others.
        for _ in range(len(self._line)):
            if not self._line or self._available() < self.quantum:
                break
            upload = self._turn = self._line.popleft()
            try:
                upload._woken()
            except Exception:
                self._log.failure("resuming a paced upload failed")
            finally:
                self._turn = None
        self._waking = False
        self._account()
        self._schedule()

    def _account(self) -> None:
        """Add the time uploads have waited since the last count to L{throttled_seconds}."""
        if self._throttled_since is None:
            return
        now = self._clock.seconds()
        waited = max(0.0, now - self._throttled_since)
        self.throttled_seconds += waited
        self.metrics.upload_throttled_seconds_total.inc(waited)
        self._throttled_since = now if self._line else None
