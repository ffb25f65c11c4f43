"""
Tests for L{spegel.bodies}: streaming bodies stay whole, bounded in memory, and stop cleanly.

Socket-free; L{tests.e2e.test_bodies_real} serves over a real loopback TCP connection, because
sendfile only exists on a real socket.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from spegel.bodies import BodyInterrupted, ChunkedReadProducer, FileBodyProducer


class ProducerRequest(DummyRequest):
    """
    A DummyRequest that keeps the producer registered on it, as twisted.web's does.
    """

    def __init__(self) -> None:
        super().__init__([b""])
        self.producer = None
        self.startedWriting = False

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        super().write(data)

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class ChunkedReadProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(10_000)
        self.pending: list[tuple[int, int, Deferred[bytes]]] = []
        self.cancelled: list[int] = []

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred(lambda d: self.cancelled.append(offset))
        self.pending.append((offset, size, d))
        return d

    def answer(self) -> None:
        offset, size, d = self.pending.pop(0)
        d.callback(self.data[offset : offset + size])

    def test_one_read_at_a_time_and_pauses(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 100, 5000, chunk_size=1000)  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        self.assertEqual(len(self.pending), 1)
        producer.pauseProducing()
        self.answer()
        self.assertEqual(self.pending, [], "no read starts while paused")
        producer.resumeProducing()
        while self.pending:
            self.answer()
        self.successResultOf(done)
        self.assertEqual(b"".join(request.written), self.data[100:5100])
        self.assertIsNone(request.producer)

    def test_stop_cancels_the_read(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, 5000, chunk_size=1000)  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assertEqual(self.cancelled, [0])
        self.assertIsNone(request.producer)

    def test_a_client_taking_nothing_for_the_stall_timeout_loses_the_body(self) -> None:
        clock = Clock()
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, 5000, chunk_size=1000, clock=clock, stall_timeout=60)  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        self.answer()
        producer.pauseProducing()
        clock.advance(59)
        producer.resumeProducing()  # it took something: the clock starts again at the next pause
        self.answer()
        producer.pauseProducing()
        clock.advance(59)
        self.assertNoResult(done)
        clock.advance(1)
        self.assertIn("took nothing for 60 s", str(self.failureResultOf(done, BodyInterrupted).value))
        self.assertIsNone(request.producer)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_source_that_waits_is_no_stall(self) -> None:
        """Only the client's pause counts: a growing source may keep it waiting any time."""
        clock = Clock()
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, self.read, 0, 2000, chunk_size=1000, clock=clock, stall_timeout=60)  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        clock.advance(600)
        while self.pending:
            self.answer()
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_short_source(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, lambda o, s: succeed(b""), 0, 10)  # type: ignore[arg-type]  # a DummyRequest
        self.failureResultOf(producer.start(), BodyInterrupted)


class FileBodyProducerTests(SynchronousTestCase):
    """
    Without a real socket the producer falls back to reads and writes.
    """

    def make_file(self, data: bytes) -> int:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return os.open(path, os.O_RDONLY)

    def test_range_via_writes(self) -> None:
        data = os.urandom(1_000_000)
        request = ProducerRequest()
        fd = self.make_file(data)
        producer = FileBodyProducer(request, fd, 1000, 900_000)  # type: ignore[arg-type]  # a DummyRequest
        self.successResultOf(producer.start())
        self.assertEqual(b"".join(request.written), data[1000:901_000])
        self.assertEqual(producer.bytes_by_sendfile, 0)
        self.assertRaises(OSError, os.fstat, fd)  # closed when done

    def test_pause_stops_reading(self) -> None:
        data = os.urandom(1_000_000)
        request = ProducerRequest()
        writes: list[int] = []

        def write(chunk: bytes) -> None:
            writes.append(len(chunk))
            producer.pauseProducing()

        self.patch(request, "write", write)
        producer = FileBodyProducer(request, self.make_file(data), 0, len(data))  # type: ignore[arg-type]  # a DummyRequest
        done = producer.start()
        self.assertEqual(len(writes), 1)
        self.assertNoResult(done)
        producer.resumeProducing()
        self.assertEqual(len(writes), 2)
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)

    def test_a_client_taking_nothing_for_the_stall_timeout_loses_the_body(self) -> None:
        data = os.urandom(1_000_000)
        clock = Clock()
        request = ProducerRequest()
        producers: list[FileBodyProducer] = []
        self.patch(request, "write", lambda chunk: producers[0].pauseProducing())  # a client that reads nothing
        fd = self.make_file(data)
        producer = FileBodyProducer(request, fd, 0, len(data), clock=clock, stall_timeout=60)  # type: ignore[arg-type]  # a DummyRequest
        producers.append(producer)
        done = producer.start()
        clock.advance(59)
        self.assertNoResult(done)
        clock.advance(1)
        self.failureResultOf(done, BodyInterrupted)
        self.assertRaises(OSError, os.fstat, fd)  # closed
        self.assertIsNone(request.producer)

    def test_no_stall_timeout_without_one(self) -> None:
        clock = Clock()
        request = ProducerRequest()
        producers: list[FileBodyProducer] = []
        self.patch(request, "write", lambda chunk: producers[0].pauseProducing())
        producer = FileBodyProducer(request, self.make_file(b"x" * 1_000_000), 0, 1_000_000, clock=clock)  # type: ignore[arg-type]  # a DummyRequest
        producers.append(producer)
        done = producer.start()
        self.assertEqual(clock.getDelayedCalls(), [])
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)

    def test_truncated_file(self) -> None:
        request = ProducerRequest()
        producer = FileBodyProducer(request, self.make_file(b"abc"), 0, 10)  # type: ignore[arg-type]  # a DummyRequest
        self.failureResultOf(producer.start(), BodyInterrupted)
