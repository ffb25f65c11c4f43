# -*- test-case-name: tests.unit.test_piecewise -*-
"""
A large blob fetched from several peers at once, in pieces, and streamed to the client in order:
L{ParallelCopy}.

The mirror chooses it (L{spegel.mirror.Mirror.blob}) for a whole blob of at least
C{--mirror-parallel-min-size} when another holder is at hand besides the race's winner. Up to
C{--mirror-parallel-peers} peers each fetch one piece at a time with a C{Range} request (the
winner's own answer, the whole blob, serves the first piece and is then closed):

  - in order and bounded: pieces are fetched only within a window of pieces from the one the
    client reads (L{spegel.pieces.choose}), so memory holds at most C{window} pieces, never the
    whole blob; the client's backpressure stops new pieces, not peers mid-piece;
  - verified: the whole blob is hashed in order as it goes to the client, and its last chunk is
    held back until the digest matches, exactly as a single-peer copy (L{spegel.streaming});
  - robust: a peer that answers anything but the exact range asked (a 200, another range, a
    short or too long body), goes silent mid-piece (the idle timeout) or fails to connect is
    put aside and the rest of its piece is fetched from another; one that is busy (429) is left
    for other holders, and asked again only when none is left;
  - work-stealing: an idle peer takes over the rest of a piece from a peer at least twice as
    slow (one that says it is idle and is not, for instance); whichever finishes first wins,
    the other's connection is closed;
  - a client that goes away stops every peer fetch at once.

A digest mismatch cannot be pinned on one piece (peers send no per-piece digests), so every peer
whose bytes went into the blob is put aside and the client's response is cut short: it never
receives a complete wrong body, and its retry asks other holders.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Request
from zope.interface import implementer

from spegel.bodies import BodyInterrupted
from spegel.dht.ids import Provider
from spegel.interfaces import IResponseBody
from spegel.metrics import Metrics
from spegel.oci import hashed_digest, new_hasher
from spegel.peerresponse import BODY, CONNECT, DIGEST, STATUS, PeerFailed, PeerResponse, describe, discard, span
from spegel.pieces import (
    BUSY, FAILED_TO_ASK, GONE, SHORT, STALL, TOO_LONG, WRONG_ANSWER,
    Attempt, Fetcher, Piece, PieceDropped, choose, split,
)
from spegel.selection import BUSY_PATIENCE, BUSY_RETRY_CAP
from spegel.streaming import BodyReader, PeerSource

# An idle fetcher looks again this often for a piece to steal (rates change with no event).
STEAL_CHECK_INTERVAL = 0.25

@implementer(IPushProducer, IResponseBody)
class ParallelCopy:
    """
    A whole blob from several peers at once, streamed in order, verified.

    @param upstream: the race's winner: a 200 with the whole blob, whose first piece it serves.
    @param peers: more providers (as they are at hand), and whom to tell of failures.
    @param size: the blob's size.
    @param piece_size: bytes per range request.
    @param parallel: at most this many peers fetch at once.
    @param window: pieces fetched ahead of the client, counting the one it reads.
    @param idle_timeout: a peer silent this long mid-piece has failed.
    @param max_failures: peers that may fail before the copy gives up (a busy one is no failure).
    @param on_complete: called once every byte was sent and verified.
    @param metrics: where the pieces, the bytes served and the mismatches are counted.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        upstream: PeerResponse,
        digest: str,
        peers: PeerSource,
        *,
        size: int,
        piece_size: int,
        parallel: int,
        window: int,
        idle_timeout: float,
        max_failures: int,
        on_complete: Callable[[], None] = lambda: None,
        metrics: Metrics,
    ):
        self._clock = clock
        self._metrics = metrics
        self._upstream = upstream
        self._digest = digest
        self._peers = peers
        self.length = size
        self._parallel = parallel
        self._window = max(window, 1)
        self._idle_timeout = idle_timeout
        self._failures_left = max_failures
        self._on_complete = on_complete
        self._pieces = split(size, piece_size)
        self._head = 0  # the piece the client reads
        self._hasher = new_hasher(digest)
        self._held = b""
        self._contributors: set[Provider] = set()
        self._exhausted = False  # the providers ran out
        # Holders that answered 429: asked again if no other is left (L{_check_stranded}).
        self._busy: list[Provider] = []
        self._busy_since: float | None = None
        self._busy_retry: IDelayedCall | None = None
        self._paused = False
        self._pumping = False
        self._request: Request | None = None
        self._done: Deferred[None] = Deferred()
        self._fetchers: list[Fetcher] = []
        self._recruiting: list[Deferred[Provider | None]] = []
        self._idle: list[Deferred[None]] = []
        self._finished: dict[Attempt, Deferred[None]] = {}

    @property
    def buffered(self) -> int:
        """Bytes received and not yet sent to the client: bounded by the window."""
        return sum(len(chunk) for piece in self._pieces for chunk in piece.chunks) + len(self._held)

    def write_to(self, request: Request) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run(request))

    async def _run(self, request: Request) -> None:
        self._request = request
        request.registerProducer(self, True)
        self._metrics.mirror_parallel_copies_total.inc()
        try:
            first = Fetcher(self._upstream.provider)
            self._fetchers.append(first)
            self._start(first, self._upstream.response)
            for _ in range(self._parallel - 1):
                self._recruit()
            await self._done
        except PeerFailed as e:
            self._log.warn("parallel copy of {digest} failed: {e}", digest=self._digest, e=e)
            raise BodyInterrupted(str(e)) from None
        finally:
            self._stop_fetching()
            if request.producer is self:
                request.unregisterProducer()
            self._peers.done()
        self._on_complete()

    # IPushProducer, driven by the client's transport.  Peers are never paused: the window
    # bounds what they send ahead, and a paused peer mid-piece would only look silent.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._fail(PeerFailed("the client went away"))

    # Fetchers -----------------------------------------------------------------------------------

    def _recruit(self) -> None:
        """Ask the providers for one more peer to fetch with, if the copy may use one."""
        if self._done.called or self._failures_left <= 0 or self._exhausted:
            return
        if len(self._fetchers) + len(self._recruiting) >= self._parallel:
            return
        wanted = self._peers.next_provider()
        self._recruiting.append(wanted)

        def came(provider: Provider | None) -> None:
            self._recruiting.remove(wanted)
            if self._done.called:
                return
            if provider is None:
                self._exhausted = True
                self._check_stranded()
                return
            fetcher = Fetcher(provider)
            self._fetchers.append(fetcher)
            self._start(fetcher)

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)
            if wanted in self._recruiting:
                self._recruiting.remove(wanted)

        wanted.addCallbacks(came, cancelled)

    def _start(self, fetcher: Fetcher, answered: Any = None) -> None:
        Deferred.fromCoroutine(self._work(fetcher, answered)).addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        # Whatever went wrong, the client's request must end rather than wait forever.
        self._log.failure("A piece fetcher failed", failure)
        self._fail(PeerFailed(f"fetching pieces failed: {failure.getErrorMessage()}"))

    async def _work(self, fetcher: Fetcher, answered: Any) -> None:
        """
        One peer fetching pieces until the copy is over or the peer is of no more use.

        @param answered: the race's answer (the whole blob), for the first piece; L{None}.
        """
        try:
            if answered is not None:
                await self._fetch(fetcher, self._pieces[0], thief=False, answered=answered)
            while not self._done.called:
                choice = choose(fetcher, self._pieces, self._head, self._window, self._fetchers, self._clock.seconds())
                if choice is None:
                    await self._wait()
                    continue
                await self._fetch(fetcher, *choice)
        except PieceDropped as e:
            self._dropped(fetcher, e)
        finally:
            self._fetchers.remove(fetcher)
            self._wake()
        if not self._done.called:
            self._recruit()
            self._check_stranded()

    def _dropped(self, fetcher: Fetcher, e: PieceDropped) -> None:
        provider = fetcher.provider
        self._log.info("peer {peer}: {e} (fetching a piece)", peer=describe(provider), e=e)
        self._metrics.mirror_piece_refetches_total.labels(e.refetch).inc()
        if e.refetch == BUSY:
            # Not a failure: another holder is asked, and this one again if none is left.
            self._peers.busy(provider)
            self._busy.append(provider)
            if self._busy_since is None:
                self._busy_since = self._clock.seconds()
            return
        if e.peer_reason is not None:
            self._peers.failed(provider, e.peer_reason)
        else:
            self._metrics.peer_failures_total.labels(STATUS).inc()
        self._failures_left -= 1

    def _check_stranded(self) -> None:
        if self._done.called or self._fetchers or self._recruiting or self._busy_retry is not None:
            return
        self._recruit()
        if self._fetchers or self._recruiting:
            return
        if self._busy and self._busy_since is not None and self._clock.seconds() - self._busy_since < BUSY_PATIENCE:
            # Every holder left was busy: ask them again shortly, as a single-peer copy would.
            self._busy_retry = self._clock.callLater(BUSY_RETRY_CAP, self._retry_busy)
            return
        self._fail(PeerFailed("no provider left to fetch the rest of the blob"))

    def _retry_busy(self) -> None:
        self._busy_retry = None
        again, self._busy = self._busy[: self._parallel], self._busy[self._parallel :]
        for provider in again:
            fetcher = Fetcher(provider)
            self._fetchers.append(fetcher)
            self._start(fetcher)

    async def _wait(self) -> None:
        """Until something changes (a piece done, a peer gone, the client read), or a while."""
        woken: Deferred[None] = Deferred()
        self._idle.append(woken)
        timer = self._clock.callLater(STEAL_CHECK_INTERVAL, self._wake_one, woken)
        try:
            await woken
        finally:
            if timer.active():
                timer.cancel()

    def _wake_one(self, woken: Deferred[None]) -> None:
        if woken in self._idle:
            self._idle.remove(woken)
            woken.callback(None)

    def _wake(self) -> None:
        idle, self._idle = self._idle, []
        for woken in idle:
            woken.callback(None)

    # One range request ----------------------------------------------------------------------------

    async def _fetch(self, fetcher: Fetcher, piece: Piece, thief: bool, answered: Any = None) -> None:
        """
        Fetch the rest of C{piece} from C{fetcher}'s peer (or read it from C{answered}).

        @raise PieceDropped: the peer failed, or is busy: another fetches the rest.
        """
        attempt = Attempt(fetcher, piece, piece.next_offset, thief=thief)
        piece.attempts.append(attempt)
        fetcher.attempt = attempt
        finished = self._finished[attempt] = Deferred()
        if thief:
            self._metrics.mirror_pieces_stolen_total.labels("started").inc()
            self._log.debug(
                "peer {peer} steals the rest of piece {index} ({left} bytes)",
                peer=describe(fetcher.provider), index=piece.index, left=piece.remaining,
            )
        attempt.asked_at = self._clock.seconds()
        try:
            response = answered if answered is not None else await self._ask(attempt)
            if response is None:
                return  # the piece was done, or the copy over, while we asked
            attempt.answered_at = self._clock.seconds()
            self._read(attempt, response, 0 if answered is not None else attempt.start)
            await finished
        finally:
            del self._finished[attempt]
            piece.attempts.remove(attempt)
            fetcher.attempt = None
            if attempt.answered_at is not None:
                fetcher.bytes_fetched += attempt.moved
                fetcher.seconds += self._clock.seconds() - attempt.answered_at
            self._wake()

    async def _ask(self, attempt: Attempt) -> Any:
        """
        Ask for bytes C{attempt.start} to the piece's end; the answer if it is exactly those.
        """
        piece, provider = attempt.piece, attempt.fetcher.provider
        # The other holders fetching pieces are alternatives too: a holder that has served its
        # share of the blob leaves its pieces to them (a 429, taken as busy).
        others = sum(1 for fetcher in self._fetchers if fetcher.provider != provider)
        asked = attempt.request = self._peers.open_range(provider, attempt.start, piece.last, others)
        try:
            response = await asked
        except Exception as e:
            if self._done.called or piece.complete:
                return None
            if isinstance(e, PeerFailed):
                raise PieceDropped(str(e), FAILED_TO_ASK, e.reason) from None
            raise PieceDropped(f"failed: {e}", FAILED_TO_ASK, CONNECT) from None
        finally:
            attempt.request = None
        if self._done.called or piece.complete:
            discard(response)
            return None
        if response.code != 206:
            discard(response)
            if response.code == 429:
                raise PieceDropped("the peer is busy (429)", BUSY, None)
            if response.code in (404, 416):
                # A stale record, or a range it cannot serve: no reason to distrust the peer.
                raise PieceDropped(f"the peer answered {response.code}", GONE, None)
            raise PieceDropped(f"the peer answered {response.code} to a range request", WRONG_ANSWER, STATUS)
        try:
            first, last, size = span(response)
        except PeerFailed as e:
            discard(response)
            raise PieceDropped(str(e), WRONG_ANSWER, STATUS) from None
        if (first, last, size) != (attempt.start, piece.last, self.length):
            discard(response)
            raise PieceDropped(
                f"the peer answered bytes {first}-{last}/{size} for {attempt.start}-{piece.last}/{self.length}",
                WRONG_ANSWER, STATUS,
            )
        return response

    def _read(self, attempt: Attempt, response: Any, first: int) -> None:
        """Read C{response}, whose body starts at blob offset C{first}, into C{attempt}'s piece."""
        # The last byte the answer carries: the piece's end, or the blob's for the winner's (a
        # body of no stated length, chunked, is held to the piece's end).
        length = response.length
        last = first + length - 1 if isinstance(length, int) and length >= 0 else attempt.piece.last
        attempt.reader = BodyReader(
            self._clock, self._idle_timeout,
            lambda data: self._data(attempt, data, last),
            lambda reason: self._ended(attempt, reason, last),
        )
        response.deliverBody(attempt.reader)

    def _data(self, attempt: Attempt, data: bytes, last: int) -> None:
        finished = self._finished.get(attempt)
        if finished is None or finished.called:
            return
        offset = attempt.position
        attempt.position += len(data)
        if attempt.position > last + 1:
            self._end_attempt(attempt, PieceDropped("the peer sent more bytes than announced", TOO_LONG, BODY))
            return
        piece = attempt.piece
        kept = piece.take(offset, data, attempt.fetcher.provider)
        if piece.complete:
            # Before the client gets the bytes: sending the last ones ends the whole copy.
            self._piece_done(piece, attempt, last)
        if kept and piece.index == self._head:
            self._pump()

    def _ended(self, attempt: Attempt, reason: Failure, last: int) -> None:
        finished = self._finished.get(attempt)
        if finished is None or finished.called:
            return
        attempt.reader = None
        if attempt.position == last + 1 and reason.check(ResponseDone):
            finished.callback(None)
        elif reason.check(PeerFailed):
            self._end_attempt(attempt, PieceDropped(f"the peer went silent mid-piece ({self._idle_timeout:.0f}s)", STALL, BODY))
        else:
            self._end_attempt(attempt, PieceDropped(
                f"the peer stopped after {attempt.position - attempt.start} of {last + 1 - attempt.start} bytes: "
                f"{reason.getErrorMessage()}",
                SHORT, BODY,
            ))

    def _end_attempt(self, attempt: Attempt, outcome: PieceDropped | None) -> None:
        """Stop reading C{attempt}'s answer (its connection closes) and end it: well, or not."""
        if attempt.request is not None:
            attempt.request.cancel()
        if attempt.reader is not None:
            attempt.reader.stop()
            attempt.reader = None
        finished = self._finished.get(attempt)
        if finished is None or finished.called:
            return
        if outcome is None:
            finished.callback(None)
        else:
            finished.errback(outcome)

    def _piece_done(self, piece: Piece, winner: Attempt, last: int) -> None:
        self._metrics.mirror_pieces_fetched_total.inc()
        for attempt in list(piece.attempts):
            if attempt is not winner:
                # Slower on the same bytes: its connection goes, its peer is not to blame.
                self._metrics.mirror_pieces_stolen_total.labels("thief_won" if winner.thief else "owner_won").inc()
                self._end_attempt(attempt, None)
        if last > piece.last:
            # The race's answer goes on to the blob's end: the other pieces are others' work.
            self._end_attempt(winner, None)
        # Else its answer ends here too: its end comes next, and keeps the connection reusable.

    # To the client, in order ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the client may have next: the head piece's bytes, then the next piece's."""
        if self._pumping or self._done.called:
            return
        self._pumping = True
        try:
            while not self._paused and self._head < len(self._pieces):
                piece = self._pieces[self._head]
                while piece.chunks and not self._paused:
                    self._send(piece.chunks.popleft())
                if piece.chunks or not piece.complete:
                    break
                self._contributors |= piece.contributors
                self._head += 1
                self._wake()  # the window moved: a fetcher may start a piece
        finally:
            self._pumping = False
        if self._head == len(self._pieces) and not self._done.called:
            self._verify()

    def _send(self, data: bytes) -> None:
        self._hasher.update(data)
        # Hold the latest chunk back until the digest is known to match.
        held, self._held = self._held, data
        if held:
            self._forward(held)

    def _forward(self, data: bytes) -> None:
        assert self._request is not None
        self._metrics.served_bytes_total.labels("peer").inc(len(data))
        self._request.write(data)

    def _verify(self) -> None:
        if hashed_digest(self._hasher) != self._digest:
            self._metrics.digest_mismatches_total.inc()
            # No per-piece digests: any of the peers that sent bytes may be the liar.
            suspects = sorted(self._contributors, key=describe)
            for provider in suspects:
                self._peers.failed(provider, DIGEST)
            self._fail(PeerFailed(
                f"bytes from {', '.join(map(describe, suspects))} do not match {self._digest}", DIGEST
            ))
            return
        if self._held:
            self._forward(self._held)
            self._held = b""
        self._done.callback(None)

    # The end -----------------------------------------------------------------------------------

    def _fail(self, error: PeerFailed) -> None:
        if not self._done.called:
            self._done.errback(error)

    def _stop_fetching(self) -> None:
        if self._busy_retry is not None and self._busy_retry.active():
            self._busy_retry.cancel()
        for wanted in list(self._recruiting):
            wanted.cancel()
        for attempt in list(self._finished):
            self._end_attempt(attempt, None)
        self._wake()
        for piece in self._pieces:
            piece.chunks.clear()
