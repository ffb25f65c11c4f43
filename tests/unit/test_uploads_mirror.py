"""
Tests for the mirror's side of upload limits and load: a peer answering 429 (busy, at its
C{--max-uploads}) is neither a failure nor put aside; another holder is asked at once, or the
same one again shortly; holders that report fewer uploads are asked first.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from spegel.oci import BlobUnknown
from spegel.selection import BUSY_PATIENCE
from tests.unit.test_mirror import ClientRequest, MirrorTestCase, provider


class BusyPeerTests(MirrorTestCase):
    def test_busy_peer_another_holder_is_asked_at_once(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        self.assertEqual(len(self.http.requests), 1)
        self.http.answer(0, 429, 0, retry_after="1")
        self.assertEqual(len(self.http.requests), 2, "the other holder was not asked at once")
        self.assertIn(provider(2).host, self.http.requests[1][1])
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)))
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), 1)

    def test_the_only_holder_busy_is_asked_again(self) -> None:
        """
        No 404 while the only holder is busy, though its return outlasts the resolve timeout:
        a 404 would send containerd upstream for the whole blob.
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.http.answer(0, 429, 0, retry_after="1")
        self.clock.advance(0.4)
        self.assertNoResult(d)
        self.assertEqual(len(self.http.requests), 1)
        self.clock.advance(1.2)  # Retry-After 1 s, jittered to 0.5-1.5 s
        self.assertEqual(len(self.http.requests), 2)
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_a_busy_answer_looks_for_new_holders(self) -> None:
        """
        In a rollout new holders appear every second: while the only holder found is busy, the
        key is looked up again and a holder found since is asked at once.
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        lookups = len(self.router.lookups)
        self.http.answer(0, 429, 0, retry_after="1")
        self.assertEqual(len(self.router.lookups), lookups + 1, "no second lookup")
        self.router.announce(provider(2), end=True)
        self.assertEqual(len(self.http.requests), 2)
        self.assertIn(provider(2).host, self.http.requests[1][1])
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_looking_again_at_most_once_a_second(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), provider(3), end=True)
        lookups = len(self.router.lookups)
        for index in range(3):  # three busy answers within the same second
            self.http.answer(index, 429, 0, retry_after="1")
        self.assertEqual(len(self.router.lookups), lookups + 1)
        d.cancel()  # containerd gave up: the request ends
        self.failureResultOf(d)

    def test_a_copy_resumes_past_a_busy_holder(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), provider(3))
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:40_000])
        first.end(Failure(ConnectionLost()))
        self.http.answer(1, 429, 0, retry_after="1")  # the resume's first choice is busy
        self.assertEqual(len(self.http.requests), 3)
        self.serve_rest(2, 40_000)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(2)), "a busy peer is not a broken one")

    def test_a_resume_waits_out_a_busy_only_holder(self) -> None:
        """
        The only holder left is busy more times than a copy may resume: it is asked again
        shortly each time, as a first request would, rather than the client's copy being cut.
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:40_000])
        first.end(Failure(ConnectionLost()))  # provider 1 is put aside: only provider 2 is left
        for attempt in range(1, 6):  # more than the 3 resumes
            self.http.answer(attempt, 429, 0, retry_after="1")
            self.clock.advance(1.6)
        self.assertEqual(len(self.http.requests), 7)
        self.serve_rest(6, 40_000)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_busy_answers_do_not_spend_the_retry_budget(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        for attempt in range(5):  # more than the 3 retries
            self.http.answer(attempt, 429, 0, retry_after="1")
            self.clock.advance(1.6)
        self.serve_whole(5)
        self.successResultOf(d)

    def test_busy_for_too_long_is_a_404(self) -> None:
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        answered = 0
        while not d.called and self.clock.seconds() < BUSY_PATIENCE + 5:
            while answered < len(self.http.requests):
                self.http.answer(answered, 429, 0, retry_after="1")
                answered += 1
            self.clock.advance(0.25)
        self.failureResultOf(d, BlobUnknown)
        self.assertLessEqual(self.clock.seconds(), BUSY_PATIENCE + 0.5)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)), "a busy peer is not a broken one")

    def test_the_least_loaded_holder_is_asked_first(self) -> None:
        # pick always takes the first of the candidates: without load, provider 1.
        self.mirror._peers.load.reported(provider(1), 5)
        self.mirror._peers.load.reported(provider(2), 0)
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        self.assertIn(provider(2).host, self.http.requests[0][1])
        self.serve_whole(0)
        self.successResultOf(d)

    def test_reported_load_is_read_from_answers_and_forgotten(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        response = self.http.answer(0, 200, len(self.data), spegel_uploads="3/4")
        response.send(self.data)
        response.end()
        self.successResultOf(d)
        load = self.mirror._peers.load
        self.assertEqual(load.score(provider(1)), 3)
        self.clock.advance(10)
        self.assertEqual(load.score(provider(1)), 0)

    def test_a_peer_that_just_said_busy_comes_last(self) -> None:
        load = self.mirror._peers.load
        load.reported(provider(2), 50)
        load.busy(provider(1), 1.0)
        self.assertGreater(load.score(provider(1)), load.score(provider(2)))
        self.clock.advance(1.0)
        self.assertLess(load.score(provider(1)), load.score(provider(2)))
