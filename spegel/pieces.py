# -*- test-case-name: tests.unit.test_piecewise -*-
"""
The bookkeeping of a blob fetched in pieces from several peers at once (L{spegel.piecewise}):
which bytes each piece holds (L{Piece}), who fetches what and how fast (L{Fetcher}, L{Attempt}),
and what an idle fetcher should do next (L{choose}).

Nothing here does I/O: L{choose} is a pure function of the pieces and the fetchers' rates, so the
policy (fresh pieces in order, within a window ahead of the client; else steal the rest of a
slower peer's piece) is tested on its own.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import define, field

from spegel.dht.ids import Provider

# An idle fetcher takes over the rest of a piece only if it is at least this much faster than the
# peer fetching it: on equal links a duplicate fetch would only split the client's downlink.
STEAL_SPEEDUP = 2.0
# Not worth a request: a piece this close to done is left to its peer.
STEAL_MIN_BYTES = 256 * 1024
# A fetch younger than this has no meaningful rate yet (its first bytes include the round trip).
RATE_MIN_SECONDS = 0.25
# A peer that has sent no response headers this long after it was asked counts as moving
# nothing (a stopped process, a full accept queue): its piece may be stolen before the
# response-header deadline (seconds) gives up on it.
HEADERS_PATIENCE = 1.0


# What one copy may hold in memory ahead of its client, at most: the window is twice as many
# pieces as peers fetch at once (each peer has its next piece to go on with while the client
# reads), within this.  At the defaults (4 peers, 8 MiB pieces) that is all of it; more peers
# get no larger a window, so the pieces never need a spill file.
WINDOW_BYTES = 64 * 1024 * 1024


def window_for(parallel: int, piece_size: int) -> int:
    """Pieces fetched ahead of the client (counting the one it reads) for C{parallel} peers."""
    return max(2, min(2 * parallel, WINDOW_BYTES // piece_size))


# Why the rest of a piece was fetched again from another peer (spegel_mirror_piece_refetches_total).
BUSY = "busy"  # the peer answered 429
GONE = "gone"  # the peer answered 404/416: it no longer holds the blob
WRONG_ANSWER = "status"  # a 200 for a range, another range, another status
SHORT = "short"  # the body ended before the range did
TOO_LONG = "too_long"  # more bytes than the range asked
STALL = "stall"  # silent for the idle timeout mid-piece
FAILED_TO_ASK = "connect"  # no response headers: refused, unreachable, or past the deadline
REFETCH_REASONS = (BUSY, GONE, WRONG_ANSWER, SHORT, TOO_LONG, STALL, FAILED_TO_ASK)


class PieceDropped(Exception):
    """
    A fetcher's peer is of no more use to this copy.

    @ivar refetch: why its piece is fetched elsewhere (L{REFETCH_REASONS}).
    @ivar peer_reason: why the peer is put aside (L{spegel.peerresponse}), L{None}: it is not.
    """

    def __init__(self, why: str, refetch: str, peer_reason: str | None):
        super().__init__(why)
        self.refetch = refetch
        self.peer_reason = peer_reason


@define(eq=False)
class Piece:
    """
    Bytes C{first}..C{last} of the blob (inclusive): those received so far in order
    (C{received}, from C{first}), of which C{chunks} are not yet sent to the client.

    Several attempts may fetch the same piece (a steal); whichever is ahead extends it, the
    other's bytes for what is already held are dropped (L{take}).
    """

    index: int
    first: int
    last: int
    received: int = 0
    chunks: deque[bytes] = field(factory=deque)
    attempts: list[Attempt] = field(factory=list)
    # The providers whose bytes are in this piece: put aside if the whole blob does not verify.
    contributors: set[Provider] = field(factory=set)

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def complete(self) -> bool:
        return self.received == self.size

    @property
    def next_offset(self) -> int:
        """The first byte (blob offset) this piece still lacks."""
        return self.first + self.received

    @property
    def remaining(self) -> int:
        return self.size - self.received

    def take(self, offset: int, data: bytes, provider: Provider) -> int:
        """
        C{data}, found at blob C{offset} in one attempt's answer: keep the part this piece lacks.
        An attempt starts at the piece's first missing byte and both only move forward, so its
        bytes never begin after that byte: they either overlap it or are all held already.

        @return: how many bytes were kept.
        """
        have = self.next_offset
        if offset + len(data) <= have:
            return 0
        assert offset <= have, "an attempt's bytes never start past the piece's first missing byte"
        fresh = data[have - offset : have - offset + self.last + 1 - have]
        if fresh:
            self.chunks.append(fresh)
            self.received += len(fresh)
            self.contributors.add(provider)
        return len(fresh)


@define(eq=False)
class Fetcher:
    """
    One peer fetching pieces for the copy, one at a time, and how fast it has been.
    """

    provider: Provider
    attempt: Attempt | None = None
    bytes_fetched: int = 0
    seconds: float = 0.0

    def rate(self, now: float) -> float | None:
        """Bytes per second over its finished attempts and the current one; L{None}: unknown."""
        moved, seconds = self.bytes_fetched, self.seconds
        if self.attempt is not None and self.attempt.answered_at is not None:
            moved += self.attempt.moved
            seconds += now - self.attempt.answered_at
        if seconds < RATE_MIN_SECONDS:
            return None
        return moved / seconds


@define(eq=False)
class Attempt:
    """
    One range request for the rest of a piece (from C{start}, a blob offset) to one peer.

    @ivar position: the blob offset of the next byte its answer carries.
    @ivar thief: it was started on a piece another peer was fetching (a steal).
    """

    fetcher: Fetcher
    piece: Piece
    start: int
    thief: bool = False
    position: int = 0
    asked_at: float | None = None
    answered_at: float | None = None
    reader: Any = None
    request: Any = None

    def __attrs_post_init__(self) -> None:
        self.position = self.start

    @property
    def moved(self) -> int:
        return self.position - self.start

    def rate(self, now: float) -> float | None:
        if self.answered_at is None:
            if self.asked_at is not None and now - self.asked_at >= HEADERS_PATIENCE:
                return 0.0
            return None
        if now - self.answered_at < RATE_MIN_SECONDS:
            return None
        return self.moved / (now - self.answered_at)


def split(size: int, piece_size: int) -> list[Piece]:
    """A blob of C{size} bytes as pieces of C{piece_size} (the last one shorter)."""
    return [
        Piece(index, first, min(first + piece_size, size) - 1)
        for index, first in enumerate(range(0, size, piece_size))
    ]


def choose(
    fetcher: Fetcher, pieces: list[Piece], head: int, window: int, fetchers: list[Fetcher], now: float
) -> tuple[Piece, bool] | None:
    """
    What C{fetcher}, idle, should fetch next: (piece, is a steal), or L{None} to wait.

      - the first piece in the window (C{window} pieces from C{head}, the one the client reads)
        that nobody fetches: pieces ahead of the window would only sit in memory;
      - else the rest of the first piece in the window whose one peer would take more than
        L{STEAL_SPEEDUP} times as long to finish it as this fetcher would: a slow peer (or one
        that lies about its load) is routed around, and the client, waiting in order, is not
        held up by it.

    A fetcher with no rate of its own yet is taken to be as fast as the others' median.
    """
    in_window = pieces[head : head + window]
    for piece in in_window:
        if not piece.complete and not piece.attempts:
            return piece, False
    mine = fetcher.rate(now)
    if mine is None:
        known = sorted(rate for other in fetchers if other is not fetcher and (rate := other.rate(now)) is not None)
        if not known:
            return None
        mine = known[len(known) // 2]
    for piece in in_window:
        if piece.complete or len(piece.attempts) != 1 or piece.remaining < STEAL_MIN_BYTES:
            continue
        owner = piece.attempts[0]
        if owner.fetcher is fetcher:
            continue
        theirs = owner.rate(now)
        if theirs is not None and theirs * STEAL_SPEEDUP < mine:
            return piece, True
    return None
