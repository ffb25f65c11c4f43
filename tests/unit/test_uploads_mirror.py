"""
Tests for the mirror's side of upload limits and load: a peer answering 429 (busy, at its
C{--max-uploads}) is neither a failure nor put aside; another holder is asked at once, or the
same one again shortly; holders that report fewer uploads are asked first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from spegel.oci import BlobUnknown
from spegel.peerhealth import PutAside
from spegel.selection import BUSY_PATIENCE, SERVING_PATIENCE, ProviderQueue
from spegel.uploads import ALTERNATIVES_HEADER
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

    def busy_until_given_up(self, patience: float, **headers: str) -> float:
        """Answer every request busy (with C{headers}) until the request ends; when it did."""
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), end=True)
        answered = 0
        while not d.called and self.clock.seconds() < patience + 5:
            while answered < len(self.http.requests):
                self.http.answer(answered, 429, 0, retry_after="1", **headers)
                answered += 1
            self.clock.advance(0.25)
        self.failureResultOf(d, BlobUnknown)
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)), "a busy peer is not a broken one")
        return self.clock.seconds()

    def test_busy_for_too_long_is_a_404(self) -> None:
        """A holder serving peers is waited for up to SERVING_PATIENCE."""
        ended = self.busy_until_given_up(SERVING_PATIENCE)
        self.assertGreater(ended, SERVING_PATIENCE - 2)
        self.assertLessEqual(ended, SERVING_PATIENCE + 0.5)

    def test_nodes_with_nothing_yet_are_waited_for_less(self) -> None:
        ended = self.busy_until_given_up(SERVING_PATIENCE, spegel_partial="starting")
        self.assertGreater(ended, BUSY_PATIENCE - 2)
        self.assertLessEqual(ended, BUSY_PATIENCE + 0.5)

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


class DeferringPeerTests(MirrorTestCase):
    """
    A holder that has served its share of a blob answers 429 with C{Spegel-Deferred} to a request
    that named other holders: they are asked first, at hand at once and busy ones when they come
    back, and it again after them, then naming none (so it serves).  Deferrals cost neither
    retries nor busy patience.
    """

    def alternatives(self) -> list[str]:
        return [headers[ALTERNATIVES_HEADER] for _, _, headers, _ in self.http.requests]

    def asked(self) -> list[str]:
        return [url.split("/")[2] for _, url, _, _ in self.http.requests]

    def other_than(self, host: str) -> str:
        """Of providers 1 and 2, the one that is not C{host}."""
        return ({f"{holder.host}:{holder.registry_port}" for holder in (provider(1), provider(2))} - {host}).pop()

    def answer_until_served(self, d: Deferred[Any], policy: dict[str, list[str]]) -> None:
        """
        Answer each request as the asked holder's script says (its next entry: "deferred",
        "busy", "serve" for the whole blob, or "honest": deferred when told of another holder,
        served when not; the last entry repeats), on a clock stepping 0.1 s, until C{d} has
        fired.
        """
        asks: dict[str, int] = {}
        answered = 0
        while not d.called and self.clock.seconds() < SERVING_PATIENCE + 30:
            while answered < len(self.http.requests):
                host = self.asked()[answered]
                script = policy[host]
                step = script[min(asks.get(host, 0), len(script) - 1)]
                asks[host] = asks.get(host, 0) + 1
                if step == "honest":  # defers while told of another holder, serves when not
                    step = "serve" if self.alternatives()[answered] == "0" else "deferred"
                if step == "serve":
                    self.serve_whole(answered)
                elif step == "deferred":
                    self.http.answer(answered, 429, 0, retry_after="1", spegel_deferred="true")
                else:
                    self.http.answer(answered, 429, 0, retry_after="1")
                answered += 1
            self.clock.advance(0.1)

    def test_the_others_first_then_the_deferring_holder(self) -> None:
        """
        A holder that deferred the request is asked again after the others, naming the busy
        one: it is no alternative to a holder over its share, so the busy one is waited for.
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        self.assertEqual(self.alternatives(), ["1"])
        deferring, other = self.asked()[0], self.other_than(self.asked()[0])
        self.answer_until_served(d, {deferring: ["deferred"], other: ["busy", "busy", "busy", "busy", "serve"]})
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        asked = self.asked()
        self.assertEqual(asked[1], other, "the other holder was not asked at once")
        self.assertEqual(asked[-1], other, "the busy holder did not serve")
        by_deferring = [self.alternatives()[index] for index, host in enumerate(asked) if host == deferring]
        self.assertGreater(len(by_deferring), 1, "the deferring holder was not asked again")
        self.assertEqual(set(by_deferring), {"1"}, "the deferring holder was not told of the busy one")
        self.assertEqual(
            {self.alternatives()[index] for index, host in enumerate(asked) if host == other},
            {"0"},
            "a holder that deferred the request counts as no alternative",
        )
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), 4, "a deferral again is not a busy answer")
        self.assertFalse(self.mirror.put_aside.is_aside(provider(1)))
        self.assertFalse(self.mirror.put_aside.is_aside(provider(2)))

    def test_a_holder_busy_past_the_patience_leaves_it_to_the_deferring_one(self) -> None:
        """
        The holder waited for stays busy: once the request has waited out its patience on it,
        the holder that deferred is told of no other, and serves (not a 404, which would send
        containerd upstream).
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        deferring = self.asked()[0]
        other = self.other_than(deferring)
        self.answer_until_served(d, {deferring: ["honest"], other: ["busy"]})
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.asked()[-1], deferring)
        self.assertEqual(self.alternatives()[-1], "0")
        self.assertGreater(self.clock.seconds(), SERVING_PATIENCE - 10, "the busy holder was not waited for")

    def test_every_holder_deferring_the_first_is_left_no_choice(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), end=True)
        first, second = self.asked()[0], self.other_than(self.asked()[0])
        self.answer_until_served(d, {first: ["deferred", "serve"], second: ["deferred", "serve"]})
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        # Whichever comes back first (each is offered again 1.5-2.5 s after it deferred).
        self.assertEqual(self.asked()[:2], [first, second])
        self.assertEqual(len(self.asked()), 3)
        self.assertEqual(self.alternatives(), ["1", "0", "0"])
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), 0, "a deferral is not a busy answer")

    def test_the_only_holder_deferring_sends_the_request_looking_for_others(self) -> None:
        """
        The only holder at hand defers (it has served its share, and the peers it served hold
        the blob by now): the key is looked up again at once, and a holder found is asked.
        """
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.assertEqual(self.alternatives(), ["0"])
        lookups = len(self.router.lookups)
        self.http.answer(0, 429, 0, retry_after="1", spegel_deferred="true")
        self.assertEqual(len(self.router.lookups), lookups + 1, "no second lookup")
        self.router.announce(provider(2), end=True)
        self.assertEqual(self.asked()[1], provider(2).host + ":" + str(provider(2).registry_port))
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)

    def test_the_only_holder_deferring_is_asked_again_when_none_is_found(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), end=True)
        self.http.answer(0, 429, 0, retry_after="1", spegel_deferred="true")
        self.router.announce(end=True)  # the fresh lookup finds no one else
        self.clock.advance(1.4)
        self.assertEqual(len(self.http.requests), 1)
        self.clock.advance(1.2)  # 1.5-2.5 s after the deferral
        self.assertEqual(len(self.http.requests), 2)
        self.assertEqual(self.alternatives()[1], "0")
        self.serve_whole(1)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), 0)

    def test_deferrals_spend_no_retries(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(*[provider(index) for index in range(1, 6)], end=True)
        for index in range(4):  # more deferrals than the 3 retries
            self.http.answer(index, 429, 0, retry_after="1", spegel_deferred="true")
        self.assertEqual(self.alternatives(), ["4", "3", "2", "1", "0"], "a deferring holder counts no more")
        self.http.answer(4, 500, 0)  # the last holder fails: the deferring ones are left
        self.clock.advance(2.5)
        self.assertEqual(len(self.http.requests), 6, "a deferring holder was not asked again")
        self.assertEqual(self.alternatives()[5], "0")
        self.serve_whole(5)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), 0)

    def test_a_second_deferral_is_a_busy_answer(self) -> None:
        """
        A holder asked again naming no alternative that defers anyway (another version, or a
        liar) is taken as busy: the request does not go round forever, it runs out of patience.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(1), provider(2), end=True)
        self.http.answer(0, 429, 0, retry_after="1", spegel_deferred="true")
        self.http.answer(1, 404, 0)
        answered = 2
        while not d.called and self.clock.seconds() < SERVING_PATIENCE + 10:
            self.clock.advance(0.25)
            while answered < len(self.http.requests):
                self.http.answer(answered, 429, 0, retry_after="1", spegel_deferred="true")
                answered += 1
        self.failureResultOf(d, BlobUnknown)
        self.assertLessEqual(self.clock.seconds(), SERVING_PATIENCE + 3)
        self.assertEqual(set(self.alternatives()[2:]), {"0"})
        self.assertEqual(self.counted("spegel_mirror_peers_busy_total"), answered - 2)

    def test_a_holder_about_to_download_is_no_alternative(self) -> None:
        """
        A holder that answered "about to download it, nothing yet" is not named: a holder with
        bytes serves now rather than deferring to it.
        """
        d = self.blob(ClientRequest())
        self.router.announce(provider(2), provider(1), provider(3), end=True)
        self.http.answer(0, 429, 0, retry_after="1", spegel_partial="starting")
        self.http.answer(1, 429, 0, retry_after="1")  # busy
        self.assertEqual(self.alternatives(), ["2", "1", "1"], "the busy holder counts, the starting one not")
        self.serve_whole(2)
        self.successResultOf(d)

    def test_a_resume_asks_the_others_first(self) -> None:
        request = ClientRequest()
        d = self.blob(request)
        self.router.announce(provider(1), provider(2), provider(3), end=True)
        first = self.http.answer(0, 200, len(self.data))
        first.send(self.data[:40_000])
        first.end(Failure(ConnectionLost()))
        self.assertEqual(self.alternatives()[1], "1")
        self.http.answer(1, 429, 0, retry_after="1", spegel_deferred="true")
        self.assertEqual(len(self.http.requests), 3, "the other holder was not asked at once")
        self.assertEqual(self.alternatives()[2], "0", "the deferring holder counts no more")
        self.http.answer(2, 500, 0)
        self.assertEqual(len(self.http.requests), 3)
        self.clock.advance(2.5)
        self.assertEqual(len(self.http.requests), 4, "the deferring holder was not asked again")
        self.assertEqual(self.asked()[3], self.asked()[1])
        self.assertEqual(self.alternatives()[3], "0")
        self.serve_rest(3, 40_000)
        self.successResultOf(d)
        self.assertEqual(request.body, self.data)


class DeferredQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.queue = ProviderQueue(PutAside(self.clock), lambda n: 0, clock=self.clock)

    def test_a_deferring_holder_comes_back_and_keeps_the_queue_open(self) -> None:
        self.queue.add(provider(1))
        self.queue.finish()
        first = self.successResultOf(self.queue.next())
        assert first is not None
        self.assertEqual(self.queue.alternatives(first), 0)
        self.queue.defer(first, 2.0)
        waiting = self.queue.next()
        self.assertNoResult(waiting)
        self.assertFalse(self.queue.exhausted())
        self.assertEqual(self.queue.requeued, 1)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(waiting), first)
        self.assertTrue(self.queue.exhausted())

    def test_alternatives_count_the_busy_not_the_deferring(self) -> None:
        for index in (1, 2, 3):
            self.queue.add(provider(index))
        one = self.successResultOf(self.queue.next())
        two = self.successResultOf(self.queue.next())
        assert one is not None and two is not None
        self.assertEqual(self.queue.alternatives(two), 1)
        self.queue.requeue(one, 1.0)
        self.assertEqual(self.queue.alternatives(two), 2)
        self.queue.defer(two, 2.0)
        self.assertEqual(self.queue.alternatives(two), 2, "asked again, a deferring holder is told of the others")
        self.assertEqual(self.queue.alternatives(one), 1, "a deferring holder is no alternative")
        self.queue.defer(one, 2.0)
        self.assertEqual(self.queue.alternatives(two), 1)

    def test_a_holder_about_to_download_counts_once_it_has_bytes(self) -> None:
        asking = provider(9)
        self.queue.requeue(provider(1), 1.0, starting=True)
        self.queue.add(provider(2))
        self.assertEqual(self.queue.alternatives(asking), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.queue.alternatives(asking), 1, "back in the queue, it still has nothing")
        self.assertEqual(self.successResultOf(self.queue.next()), provider(2))
        self.assertEqual(self.successResultOf(self.queue.next()), provider(1))
        self.queue.requeue(provider(1), 1.0)  # busy now: it is serving what it has
        self.assertEqual(self.queue.alternatives(asking), 1)

    def test_a_deferral_spends_no_patience(self) -> None:
        self.assertTrue(self.queue.defer(provider(1), 2.0))
        self.clock.advance(BUSY_PATIENCE - 0.5)
        self.assertTrue(self.queue.requeue(provider(2), 1.0, starting=True), "the deferral started the busy clock")
        self.assertFalse(self.queue.defer(provider(1), 2.0), "a holder defers a request once")

    def test_closing_forgets_them(self) -> None:
        self.queue.defer(provider(1), 2.0)
        self.queue.close()
        self.assertTrue(self.queue.exhausted())
        self.clock.advance(3)
        self.assertIsNone(self.successResultOf(self.queue.next()))
