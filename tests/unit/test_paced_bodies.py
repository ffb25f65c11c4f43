"""
Tests for the body producers of L{spegel.bodies} under an upload cap (L{spegel.pacing}), on a
fake clock: they send no faster than the bucket allows, wait for tokens without sleeping or
buffering, take turns with the transport's own pauses, and an upload stopped while it waits
leaves no timer behind.
"""

from __future__ import annotations

import os

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from spegel.bodies import READ_CHUNK, BodyInterrupted, ChunkedReadProducer, FileBodyProducer
from spegel.metrics import Metrics
from spegel.pacing import TokenBucket
from tests.unit.test_bodies import ProducerRequest

MiB = 1024 * 1024


class PacedFileBodyTests(SynchronousTestCase):
    """
    L{FileBodyProducer} without a socket (reads and writes); the sendfile path is paced by the
    same calls and is exercised over loopback in L{tests.e2e.test_upload_cap}.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        self.data = os.urandom(3 * MiB)

    def producer(self, request: ProducerRequest, offset: int = 0, length: int | None = None) -> FileBodyProducer:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(self.data)
        length = len(self.data) - offset if length is None else length
        return FileBodyProducer(request, os.open(path, os.O_RDONLY), offset, length, pacer=self.bucket.upload())  # type: ignore[arg-type]  # a DummyRequest

    def written(self, request: ProducerRequest) -> int:
        return sum(len(chunk) for chunk in request.written)

    def test_rate(self) -> None:
        """
        The burst goes at once, then the rate; the body is whole and ends when the bucket
        allows its last byte, not before.
        """
        request = ProducerRequest()
        done = self.producer(request).start()
        self.assertEqual(self.written(request), self.bucket.burst)
        while not done.called:
            self.clock.advance(0.05)
            allowed = self.bucket.burst + self.bucket.rate * self.clock.seconds()
            self.assertLessEqual(self.written(request), allowed + 1)
            self.assertTrue(all(len(chunk) <= READ_CHUNK for chunk in request.written))
        self.successResultOf(done)
        needed = (len(self.data) - self.bucket.burst) / self.bucket.rate
        self.assertGreaterEqual(self.clock.seconds(), needed - 1e-6)  # (the clock sums floats)
        self.assertLess(self.clock.seconds(), needed + 0.1)
        self.assertEqual(b"".join(request.written), self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_range(self) -> None:
        request = ProducerRequest()
        done = self.producer(request, offset=1000, length=MiB).start()
        while not done.called:
            self.clock.advance(0.05)
        self.assertEqual(b"".join(request.written), self.data[1000 : 1000 + MiB])

    def test_two_bodies_share_the_cap(self) -> None:
        requests = [ProducerRequest(), ProducerRequest()]
        done = [self.producer(request).start() for request in requests]
        for _ in range(40):
            self.clock.advance(0.05)
            total = sum(self.written(request) for request in requests)
            self.assertLessEqual(total, self.bucket.burst + self.bucket.rate * self.clock.seconds() + 1)
        # Two seconds after the burst (which the first took), each has had about half.
        first, second = (self.written(request) for request in requests)
        self.assertLessEqual(abs((first - self.bucket.burst) - second), 2 * self.bucket.quantum)
        self.assertGreater(second, 0.9 * MiB)
        for d in done:
            self.assertNoResult(d)

    def test_transport_pause_while_waiting_for_tokens(self) -> None:
        """
        Woken by the bucket while the transport has paused it, the producer writes nothing;
        the transport's resume starts it again.
        """
        request = ProducerRequest()
        producer = self.producer(request)
        done = producer.start()
        producer.pauseProducing()
        before = self.written(request)
        self.clock.advance(1)
        self.assertEqual(self.written(request), before)
        self.assertEqual(self.bucket.waiting, 0, "woken, it left the line")
        producer.resumeProducing()
        self.assertGreater(self.written(request), before)
        # And the transport resuming a producer that waits for tokens does not bypass them.
        after = self.written(request)
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual(self.written(request), after)
        self.assertEqual(self.bucket.waiting, 1)
        while not done.called:
            self.clock.advance(0.05)
        self.assertEqual(b"".join(request.written), self.data)

    def test_client_goes_away_while_waiting(self) -> None:
        """
        stopProducing (the client's connection was lost) while the producer waits for tokens:
        the body fails, its file is closed, and no timer is left.
        """
        request = ProducerRequest()
        producer = self.producer(request)
        done = producer.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        fd = producer._fd
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.bucket.waiting, 0)
        self.assertRaises(OSError, os.fstat, fd)

    def test_headers_wait_for_tokens_too(self) -> None:
        """
        A body that starts while the bucket is empty writes nothing (not even the response
        headers, which go with the first write) until tokens come.
        """
        self.bucket.upload().take(int(self.bucket.burst))
        request = ProducerRequest()
        done = self.producer(request).start()
        self.assertEqual(request.written, [])
        self.assertFalse(request.startedWriting)
        self.clock.advance(self.bucket.quantum / self.bucket.rate)
        self.assertTrue(request.startedWriting)
        while not done.called:
            self.clock.advance(0.05)
        self.assertEqual(b"".join(request.written), self.data)


class PacedChunkedReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        self.data = os.urandom(2 * MiB)
        self.pending: list[tuple[int, int, Deferred[bytes]]] = []

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.pending.append((offset, size, d))
        return d

    def answer(self) -> None:
        offset, size, d = self.pending.pop(0)
        d.callback(self.data[offset : offset + size])

    def test_reads_are_sized_and_timed_by_the_cap(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, len(self.data), pacer=self.bucket.upload())  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        # The first read is the burst (less than a 1 MiB chunk), reserved before it starts.
        self.assertEqual([size for _, size, _ in self.pending], [self.bucket.burst])
        self.answer()
        self.assertEqual(self.pending, [], "no read while waiting for tokens")
        while not done.called:
            self.clock.advance(0.05)
            while self.pending:
                self.answer()
            allowed = self.bucket.burst + self.bucket.rate * self.clock.seconds()
            self.assertLessEqual(sum(len(chunk) for chunk in request.written), allowed + 1)
        self.assertEqual(b"".join(request.written), self.data)
        self.assertGreaterEqual(self.clock.seconds(), (len(self.data) - self.bucket.burst) / self.bucket.rate - 1e-6)

    def test_short_read_gives_tokens_back(self) -> None:
        upload = self.bucket.upload()
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, len(self.data), pacer=upload)  # type: ignore[arg-type]  # a DummyRequest
        producer.start()
        offset, size, d = self.pending.pop(0)
        d.callback(self.data[:1000])
        # 1000 bytes sent; the rest of the reservation went back, and the next read takes it.
        self.assertEqual([size for _, size, _ in self.pending], [self.bucket.burst - 1000])

    def test_client_goes_away_while_waiting(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, len(self.data), pacer=self.bucket.upload())  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        self.answer()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.pending, [])

    def test_client_goes_away_during_a_read(self) -> None:
        """
        The read in flight is cancelled and its reserved tokens return to the bucket.
        """
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, len(self.data), pacer=self.bucket.upload())  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assertEqual(self.bucket.upload().take(MiB), self.bucket.burst)
