"""
Tests for L{spegel.piecewise} and L{spegel.pieces}: a large blob fetched in pieces from several
peers at once, in order, verified, bounded in memory, robust to bad peers, and stolen from slow
ones. Socket-free: the fake router, peers, clock and client request of L{tests.unit.test_mirror}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from spegel.dht.ids import Provider
from spegel.uploads import ALTERNATIVES_HEADER
from spegel.mirror import Mirror
from spegel.piecewise import STEAL_CHECK_INTERVAL
from spegel.pieces import STEAL_MIN_BYTES, Attempt, Fetcher, choose, split
from spegel.oci import Reference
from tests.unit.test_mirror import ClientRequest, FakeResponse, MirrorTestCase, digest_of, provider

PIECE = 10_000
WINDOW = 4


def counted(counter: Any, *labels: str) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


class PiecewiseTestCase(MirrorTestCase):
    """
    A 100 kB blob in ten pieces of 10 kB, fetched from up to three peers with a window of four.
    """

    parallel_peers = 3
    piece = PIECE

    def build_mirror(self, pick: Any = lambda n: 0) -> Mirror:
        return Mirror(
            self.clock, self.router, self.http, resolve_timeout=0.02, retries=3,
            idle_timeout=5.0, latency=self.latency, spool_max=self.spool_max,
            spool_dir=self.spool_dir, pick=pick,
            parallel_min_size=50_000, parallel_peers=self.parallel_peers, piece_size=self.piece,
            parallel_window=WINDOW, metrics=self.metrics,
        )

    def start(self, *providers: Provider) -> tuple[ClientRequest, Any, FakeResponse]:
        """
        A client asks for the blob; C{providers} hold it; the race's winner (the first) answers
        the whole blob and sends the first piece.
        """
        request = self._request = ClientRequest()
        d = self.blob(request)
        self.router.announce(*providers)
        winner = self.http.answer(0, 200, len(self.data))
        self.copy = request.producer
        winner.send(self.data[: self.piece])
        return request, d, winner

    def use_data(self, data: bytes) -> None:
        self.data = data
        self.digest = digest_of(data)
        self.ref = Reference(self.ref.registry, self.ref.repository, digest=self.digest)

    def open_requests(self) -> list[int]:
        return [i for i, (_, _, _, d) in enumerate(self.http.requests) if not d.called]

    def asked(self, index: int) -> tuple[str, int, int]:
        """(peer, first, last) of range request C{index}."""
        _, url, headers, _ = self.http.requests[index]
        first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
        return url.split("/")[2], int(first), int(last)

    def answer_range(self, index: int, **headers: str) -> FakeResponse:
        _, first, last = self.asked(index)
        return self.http.answer(
            index, 206, last - first + 1, content_range=f"bytes {first}-{last}/{len(self.data)}", **headers
        )

    def serve(self, index: int, data: bytes | None = None) -> None:
        """Range request C{index} is answered with its bytes (of C{data}: a corrupt copy)."""
        _, first, last = self.asked(index)
        response = self.answer_range(index)
        response.send((data or self.data)[first : last + 1])
        response.end()

    def serve_all(self, data: bytes | None = None, peak: list[int] | None = None) -> None:
        """Answer range requests, newest first (out of order), until none is left open."""
        while open_ := self.open_requests():
            self.serve(open_[-1], data)
            if peak is not None:
                peak.append(self.copy_buffered())

    def copy_buffered(self) -> int:
        return self.copy.buffered

    @property
    def request_producer(self) -> Any:
        return self._request.producer


class OrderTests(PiecewiseTestCase):
    def test_pieces_from_several_peers_reach_the_client_in_order(self) -> None:
        fetched = counted(self.metrics.mirror_pieces_fetched_total)
        request, d, winner = self.start(provider(1), provider(2), provider(3))
        self.assertTrue(winner.transport.stopped, "the winner's whole-blob answer is cut after its piece")
        # Each peer on a piece of its own, the winner too once its first piece is in.
        self.assertEqual(
            sorted(self.asked(i) for i in self.open_requests()),
            [("127.0.0.1:5001", 30_000, 39_999), ("127.0.0.2:5002", 10_000, 19_999), ("127.0.0.3:5003", 20_000, 29_999)],
        )
        peak: list[int] = []
        self.serve_all(peak=peak)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)
        self.assertEqual(request.responseHeaders.getRawHeaders("content-length"), [str(len(self.data))])
        # The window's pieces, and the one chunk held back until the digest is known.
        self.assertLessEqual(max(peak), (WINDOW + 1) * PIECE)
        self.assertEqual(counted(self.metrics.mirror_pieces_fetched_total) - fetched, 10)
        every = {self.asked(i)[0] for i in range(1, len(self.http.requests))}
        self.assertEqual(every, {"127.0.0.1:5001", "127.0.0.2:5002", "127.0.0.3:5003"})

    def test_each_piece_names_the_other_fetching_holders(self) -> None:
        """
        A holder that has served its share of the blob leaves its pieces to the others: every
        piece request names the holders fetching other pieces as alternatives.
        """
        request, d, winner = self.start(provider(1), provider(2), provider(3))
        alternatives = {self.asked(i)[0]: self.http.requests[i][2][ALTERNATIVES_HEADER] for i in self.open_requests()}
        self.assertEqual(alternatives, {"127.0.0.1:5001": "2", "127.0.0.2:5002": "2", "127.0.0.3:5003": "2"})
        self.serve_all()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_last_chunk_held_until_verified(self) -> None:
        request, d, winner = self.start(provider(1), provider(2))
        while len(open_ := self.open_requests()) and not (
            self.asked(open_[-1])[2] == len(self.data) - 1
        ):
            self.serve(open_[-1])
        last = self.answer_range(self.open_requests()[-1])
        last.send(self.data[90_000:99_000])
        self.assertEqual(request.body, self.data[:90_000], "the latest chunk waits for the digest")
        last.send(self.data[99_000:])
        self.assertEqual(request.body, self.data, "every byte in and verified")
        last.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_one_holder_streams_as_before(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1))
        self.serve_whole(0)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(len(self.http.requests), 1)

    def test_small_blob_streams_as_before(self) -> None:
        self.use_data(self.data[:40_000])
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2))
        self.serve_whole(0)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(len(self.http.requests), 1)


class MismatchTests(PiecewiseTestCase):
    def test_wrong_piece_never_completes_the_body_and_every_contributor_is_put_aside(self) -> None:
        mismatches = counted(self.metrics.digest_mismatches_total)
        request, d, winner = self.start(provider(1), provider(2), provider(3))
        bad = bytearray(self.data)
        bad[55_000] ^= 0xFF
        self.serve_all(bytes(bad))
        self.successResultOf(d)
        self.assertTrue(request.aborted)
        self.assertLess(len(request.body), len(self.data))
        self.assertEqual(counted(self.metrics.digest_mismatches_total) - mismatches, 1)
        for n in (1, 2, 3):
            self.assertTrue(self.mirror.put_aside.is_aside(provider(n)), n)


class FaultTests(PiecewiseTestCase):
    """
    Each bad answer costs its peer the piece: the rest of it comes from another, the client
    gets the whole blob.
    """

    def refetched(self, reason: str) -> float:
        return counted(self.metrics.mirror_piece_refetches_total, reason)

    def finish(self, request: ClientRequest, d: Any) -> None:
        self.serve_all()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)

    def bad_answer(self, answer: Any, reason: str, put_aside: bool = True) -> None:
        before = self.refetched(reason)
        request, d, winner = self.start(provider(1), provider(2), provider(3), provider(4))
        victim = self.open_requests()[0]
        peer = self.asked(victim)[0]
        answer(victim)
        self.assertEqual(self.refetched(reason) - before, 1)
        bad = next(p for p in (provider(2), provider(3)) if f"{p.host}:{p.registry_port}" == peer)
        self.assertEqual(self.mirror.put_aside.is_aside(bad), put_aside)
        self.assertNotIn(peer, {self.asked(i)[0] for i in self.open_requests()})
        self.finish(request, d)

    def test_200_instead_of_206(self) -> None:
        def answer(index: int) -> None:
            response = self.http.answer(index, 200, len(self.data))
            self.assertTrue(response.transport.stopped)

        self.bad_answer(answer, "status")

    def test_wrong_range(self) -> None:
        def answer(index: int) -> None:
            _, first, last = self.asked(index)
            self.http.answer(index, 206, last - first + 1, content_range=f"bytes {first + 1}-{last + 1}/{len(self.data)}")

        self.bad_answer(answer, "status")

    def test_short_range_is_finished_elsewhere(self) -> None:
        def answer(index: int) -> None:
            _, first, last = self.asked(index)
            response = self.answer_range(index)
            response.send(self.data[first : first + 4000])
            response.end(Failure(ConnectionLost()))
            # The rest of that piece only, from another peer.
            ranges = {self.asked(i)[1:] for i in self.open_requests()}
            self.assertIn((first + 4000, last), ranges)

        self.bad_answer(answer, "short")

    def test_too_long(self) -> None:
        def answer(index: int) -> None:
            _, first, last = self.asked(index)
            response = self.answer_range(index)
            response.send(self.data[first : last + 2])

        self.bad_answer(answer, "too_long")

    def test_stall_mid_range(self) -> None:
        def answer(index: int) -> None:
            _, first, last = self.asked(index)
            response = self.answer_range(index)
            response.send(self.data[first : first + 100])
            for other in self.open_requests():
                self.serve(other)  # the others finish; the staller sits on its piece
            self.clock.advance(5.1)
            self.assertTrue(response.transport.stopped)

        self.bad_answer(answer, "stall")

    def test_busy_peer_is_left_for_another_holder(self) -> None:
        busy = counted(self.metrics.peers_busy_total)

        def answer(index: int) -> None:
            response = self.http.answer(index, 429, 0, retry_after="1")
            self.assertTrue(response.transport.stopped)

        self.bad_answer(answer, "busy", put_aside=False)
        self.assertEqual(counted(self.metrics.peers_busy_total) - busy, 1)

    def test_range_of_unstated_length(self) -> None:
        """A chunked 206 (no Content-Length) is read up to its piece's end, and no further."""
        request, d, winner = self.start(provider(1), provider(2))
        index = self.open_requests()[0]
        _, first, last = self.asked(index)
        chunked = self.http.answer(
            index, 206, UNKNOWN_LENGTH, content_range=f"bytes {first}-{last}/{len(self.data)}"  # type: ignore[arg-type]
        )
        chunked.send(self.data[first : last + 1])
        chunked.end()
        self.finish(request, d)

    def test_stale_holder_is_not_blamed(self) -> None:
        def answer(index: int) -> None:
            self.http.answer(index, 404, 0)

        self.bad_answer(answer, "gone", put_aside=False)

    def test_winner_cut_in_its_first_piece(self) -> None:
        """The race's winner fails within the first piece: another peer fetches the rest of it."""
        short = counted(self.metrics.mirror_piece_refetches_total, "short")
        request = self._request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), provider(3))
        winner = self.http.answer(0, 200, len(self.data))
        winner.send(self.data[:3000])
        winner.end(Failure(ConnectionLost()))
        self.assertEqual(counted(self.metrics.mirror_piece_refetches_total, "short") - short, 1)
        # The first peer done with its piece goes on with the rest of the first: the most urgent.
        self.serve(self.open_requests()[0])
        self.assertEqual(self.asked(self.open_requests()[-1])[1:], (3000, PIECE - 1))
        self.assertTrue(self.mirror.put_aside.is_aside(provider(1)))
        self.finish(request, d)

    def test_busy_holders_are_asked_again_when_no_other_is_left(self) -> None:
        request = self._request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        winner = self.http.answer(0, 200, len(self.data))
        winner.send(self.data[:PIECE])
        busy, other = self.open_requests()
        self.assertEqual(self.asked(busy)[0], "127.0.0.2:5002")
        self.http.answer(busy, 429, 0, retry_after="1")
        self.http.answer(other, 500, 0)
        self.assertEqual(self.open_requests(), [], "nobody left: the busy holder is asked again later")
        self.assertFalse(d.called)
        self.clock.advance(2)
        self.assertEqual([self.asked(i)[0] for i in self.open_requests()], ["127.0.0.2:5002"])
        self.finish(request, d)

    def test_connection_refused(self) -> None:
        def answer(index: int) -> None:
            self.http.requests[index][3].errback(ConnectionRefusedError("refused"))

        self.bad_answer(answer, "connect")

    def test_no_provider_left_aborts(self) -> None:
        request = self._request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        winner = self.http.answer(0, 200, len(self.data))
        winner.send(self.data[:PIECE])
        other, _ = self.open_requests()
        self.assertEqual(self.asked(other)[0], "127.0.0.2:5002")
        self.http.answer(other, 500, 0)
        # Provider 1 keeps fetching alone; then it fails too, and nobody is left.
        index = self.open_requests()[0]
        response = self.answer_range(index)
        response.end(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertTrue(request.aborted)
        self.assertEqual(self.open_requests(), [])


class ClientTests(PiecewiseTestCase):
    def test_window_bounds_memory_while_the_client_is_paused(self) -> None:
        request, d, winner = self.start(provider(1), provider(2), provider(3))
        self.request_producer.pauseProducing()
        self.serve_all()
        asked = [self.asked(i)[2] for i in range(1, len(self.http.requests))]
        self.assertEqual(max(asked), WINDOW * PIECE + PIECE - 1, "pieces 1-4: the window from piece 1")
        self.assertLessEqual(self.copy_buffered(), (WINDOW + 1) * PIECE)
        self.assertEqual(len(request.body), 0)
        self.request_producer.resumeProducing()
        self.assertEqual(request.body, self.data[: 4 * PIECE], "pieces 0-4, less the chunk held back")
        self.serve_all()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_client_going_away_stops_every_fetch(self) -> None:
        request, d, winner = self.start(provider(1), provider(2), provider(3))
        first, waiting, _ = self.open_requests()
        trickling = self.answer_range(first)
        _, start, _ = self.asked(first)
        trickling.send(self.data[start : start + 100])
        self.request_producer.stopProducing()
        self.successResultOf(d)
        self.assertTrue(request.aborted)
        self.assertTrue(trickling.transport.stopped)
        self.assertTrue(self.http.requests[waiting][3].called, "the request in flight is cancelled")
        self.assertEqual(self.open_requests(), [])
        self.clock.advance(10)
        self.assertEqual(self.open_requests(), [])


class StealingTests(PiecewiseTestCase):
    """
    Four pieces of 600 kB, two peers: pieces large enough to be worth stealing.
    """

    parallel_peers = 2
    piece = 600_000

    def setUp(self) -> None:
        super().setUp()
        self.use_data(os.urandom(4 * self.piece))

    def test_slow_peer_that_says_it_is_idle_is_routed_around(self) -> None:
        """
        Provider 2 claims no uploads (Spegel-Uploads: 0/0) and trickles: provider 1, idle once
        the other pieces are in, takes the rest of its piece; the thief's bytes complete it and
        the slow answer is closed.
        """
        started = counted(self.metrics.mirror_pieces_stolen_total, "started")
        won = counted(self.metrics.mirror_pieces_stolen_total, "thief_won")
        request, d, winner = self.start(provider(1), provider(2))
        slow_index, fast_index = self.open_requests()
        self.assertEqual(self.asked(slow_index)[:2], ("127.0.0.2:5002", 600_000))
        slow = self.answer_range(slow_index, spegel_uploads="0/0")
        slow.send(self.data[600_000:610_000])
        fast = self.answer_range(fast_index)
        self.clock.advance(0.5)
        fast.send(self.data[1_200_000:1_800_000])
        fast.end()
        (last_index,) = self.open_requests()
        self.assertEqual(self.asked(last_index), ("127.0.0.1:5001", 1_800_000, 2_399_999))
        fast = self.answer_range(last_index)
        self.clock.advance(0.5)
        fast.send(self.data[1_800_000:])
        fast.end()
        (thief_index,) = self.open_requests()
        self.assertEqual(self.asked(thief_index), ("127.0.0.1:5001", 610_000, 1_199_999))
        self.assertEqual(counted(self.metrics.mirror_pieces_stolen_total, "started") - started, 1)
        slow.send(self.data[610_000:615_000])  # still trickling: its bytes count meanwhile
        thief = self.answer_range(thief_index)
        thief.send(self.data[610_000:1_200_000])
        self.assertTrue(slow.transport.stopped, "the slow peer's answer is closed")
        thief.end()
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(request.aborted)
        self.assertEqual(counted(self.metrics.mirror_pieces_stolen_total, "thief_won") - won, 1)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(2)), "slow is not broken")

    def test_choose_steals_from_a_slow_peer_only(self) -> None:
        pieces = split(4 * STEAL_MIN_BYTES, 2 * STEAL_MIN_BYTES)
        fast, slow = Fetcher(provider(1)), Fetcher(provider(2))
        fast.bytes_fetched, fast.seconds = 10_000_000, 1.0
        owner = Attempt(slow, pieces[1], pieces[1].first)
        owner.answered_at = 0.0
        owner.position += 100_000  # 100 kB/s at t=1: a hundredth of the idle one
        slow.attempt = owner
        pieces[1].attempts.append(owner)
        pieces[0].received = pieces[0].size
        self.assertEqual(choose(fast, pieces, 0, 2, [fast, slow], 1.0), (pieces[1], True))
        # As fast as the idle one: left alone.
        owner.position = owner.start + 5_000_000
        self.assertIsNone(choose(fast, pieces, 0, 2, [fast, slow], 1.0))
        # Nearly done: left alone however slow.
        owner.position = owner.start + 100_000
        pieces[1].received = pieces[1].size - STEAL_MIN_BYTES + 1
        self.assertIsNone(choose(fast, pieces, 0, 2, [fast, slow], 1.0))

    def test_silent_peer_piece_is_stolen_before_its_header_deadline(self) -> None:
        """
        A peer that has not even answered (a stopped process) counts as moving nothing once
        HEADERS_PATIENCE has passed: an idle peer with a rate of its own takes its piece.
        """
        request, d, winner = self.start(provider(1), provider(2))
        silent, fast_index = self.open_requests()
        self.assertEqual(self.asked(silent)[0], "127.0.0.2:5002")
        fast = self.answer_range(fast_index)
        self.clock.advance(0.5)
        fast.send(self.data[1_200_000:1_800_000])
        fast.end()
        (last_index,) = self.open_requests()[1:]
        last = self.answer_range(last_index)
        self.clock.advance(0.4)
        last.send(self.data[1_800_000:])
        last.end()
        self.assertEqual(self.open_requests(), [silent], "asked 0.9 s ago: not yet")
        self.clock.advance(STEAL_CHECK_INTERVAL)
        (thief_index,) = self.open_requests()[1:]
        self.assertEqual(self.asked(thief_index), ("127.0.0.1:5001", 600_000, 1_199_999))
        self.serve(thief_index)
        self.assertTrue(self.http.requests[silent][3].called, "the silent peer's request is cancelled")
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_choose_stays_in_the_window(self) -> None:
        pieces = split(10 * PIECE, PIECE)
        fetcher = Fetcher(provider(1))
        for piece in pieces[:3]:
            piece.received = piece.size
        self.assertEqual(choose(fetcher, pieces, 1, 3, [fetcher], 0.0), (pieces[3], False))
        pieces[3].received = pieces[3].size
        self.assertIsNone(choose(fetcher, pieces, 1, 3, [fetcher], 0.0))


class WindowTests(MirrorTestCase):
    def test_window_is_twice_the_peers_within_the_memory_bound(self) -> None:
        from spegel.pieces import WINDOW_BYTES, window_for

        self.assertEqual(window_for(4, 8 * 1024 * 1024), 8)
        self.assertEqual(window_for(64, 8 * 1024 * 1024), WINDOW_BYTES // (8 * 1024 * 1024))
        self.assertEqual(window_for(2, 1 << 30), 2, "never less than the piece read and the next")
