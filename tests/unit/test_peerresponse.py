"""
Tests for L{spegel.peerresponse}: the capped reader of small peer bodies, and the reading of a
peer's Content-Range.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.trial.unittest import SynchronousTestCase

from spegel.peerresponse import BODY, STATUS, PeerFailed, read_capped, span
from tests.unit.test_mirror import FakeResponse


class ReadCappedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.response = FakeResponse(200, {}, None)

    def read(self, limit: int = 10):  # type: ignore[no-untyped-def]
        return read_capped(self.response, limit, what="manifest", clock=self.clock, idle_timeout=5.0)

    def test_whole_body(self) -> None:
        d = self.read()
        self.response.send(b"12345")
        self.response.send(b"67890")
        self.response.end()
        self.assertEqual(self.successResultOf(d), b"1234567890")

    def test_over_the_cap_stops_the_peer(self) -> None:
        d = self.read()
        self.response.send(b"12345")
        self.response.send(b"678901")
        failure = self.failureResultOf(d, PeerFailed)
        self.assertEqual((str(failure.value), failure.value.reason), ("manifest too large", BODY))
        self.assertTrue(self.response.transport.stopped)

    def test_cut_body(self) -> None:
        d = self.read()
        self.response.send(b"123")
        self.response.end(Failure(ConnectionLost("gone")))
        failure = self.failureResultOf(d, PeerFailed)
        self.assertIn("manifest body failed", str(failure.value))

    def test_silence_is_timed_from_the_last_chunk(self) -> None:
        d = self.read()
        self.clock.advance(4.0)
        self.response.send(b"123")
        self.clock.advance(4.0)
        self.assertNoResult(d)
        self.clock.advance(1.1)
        failure = self.failureResultOf(d, PeerFailed)
        self.assertEqual(failure.value.reason, BODY)
        self.assertTrue(self.response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_left_behind(self) -> None:
        d = self.read()
        self.response.send(b"1")
        self.response.end()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SpanTests(SynchronousTestCase):
    def test_whole(self) -> None:
        self.assertEqual(span(FakeResponse(200, {}, 10)), (0, 9, 10))

    def test_range(self) -> None:
        self.assertEqual(span(FakeResponse(206, {"content-range": "bytes 5-9/10"}, 5)), (5, 9, 10))
        self.assertEqual(span(FakeResponse(206, {"content-range": "bytes 5-9/*"}, 5)), (5, 9, 10))

    def test_unusable(self) -> None:
        for response in (
            FakeResponse(200, {}, None),
            # What Twisted's client gives for a chunked body: a string, not a number.
            FakeResponse(200, {}, UNKNOWN_LENGTH),  # type: ignore[arg-type]
            FakeResponse(206, {"content-range": "bytes 9-5/10"}, 5),
            FakeResponse(206, {"content-range": "items 0-1/2"}, 2),
            FakeResponse(206, {"content-range": "bytes x-1/2"}, 2),
        ):
            error = self.assertRaises(PeerFailed, span, response)
            self.assertEqual(error.reason, STATUS)
