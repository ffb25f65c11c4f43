"""
Tests for L{spegel.bodies}: streaming bodies stay whole, bounded in memory, and stop cleanly.

The first classes are socket-free; L{SendfileOverLoopbackTests} serves over a real loopback TCP
connection, because sendfile only exists on a real socket.
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
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
        producer = ChunkedReadProducer(request, self.read, 100, 5000, chunk_size=1000)
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
        producer = ChunkedReadProducer(request, self.read, 0, 5000, chunk_size=1000)
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assertEqual(self.cancelled, [0])
        self.assertIsNone(request.producer)

    def test_short_source(self) -> None:
        request = ProducerRequest()
        producer = ChunkedReadProducer(request, lambda o, s: succeed(b""), 0, 10)
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
        producer = FileBodyProducer(request, fd, 1000, 900_000)
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

        request.write = write  # type: ignore[method-assign]
        producer = FileBodyProducer(request, self.make_file(data), 0, len(data))
        done = producer.start()
        self.assertEqual(len(writes), 1)
        self.assertNoResult(done)
        producer.resumeProducing()
        self.assertEqual(len(writes), 2)
        producer.stopProducing()
        self.failureResultOf(done, BodyInterrupted)

    def test_truncated_file(self) -> None:
        request = ProducerRequest()
        producer = FileBodyProducer(request, self.make_file(b"abc"), 0, 10)
        self.failureResultOf(producer.start(), BodyInterrupted)


class _FileResource(Resource):
    isLeaf = True

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path, self.size = path, size
        self.producers: list[FileBodyProducer] = []
        self.max_buffered = 0

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-length", b"%d" % self.size)
        producer = FileBodyProducer(request, os.open(self.path, os.O_RDONLY), 0, self.size)
        self.producers.append(producer)
        transport = request.channel.transport
        original_write = transport.write

        def write(data: bytes) -> None:
            original_write(data)
            self.max_buffered = max(self.max_buffered, transport._tempDataLen)

        transport.write = write
        producer.start().addBoth(lambda _: request.finish())
        return NOT_DONE_YET


class SendfileOverLoopbackTests(TestCase):
    """
    A real TCP connection on 127.0.0.1: the body leaves by sendfile, whole and in order after
    the headers, and Twisted's write buffer never holds more than about one chunk.
    """

    size = 48 * 1024 * 1024

    def setUp(self) -> None:
        self.path = self.mktemp()
        block = os.urandom(1024 * 1024)
        with open(self.path, "wb") as f:
            for i in range(self.size // len(block)):
                f.write(bytes([i % 256]) + block[1:])
        with open(self.path, "rb") as f:
            self.expected = hashlib.file_digest(f, "sha256").hexdigest()
        self.resource = _FileResource(self.path, self.size)
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def fetch(self, slow: bool) -> tuple[bytes, str, int]:
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = bytearray()
        body = hashlib.sha256()
        header_end = -1
        total = 0
        while True:
            chunk = sock.recv(256 * 1024 if not slow else 16 * 1024)
            if not chunk:
                break
            if header_end < 0:
                received += chunk
                header_end = received.find(b"\r\n\r\n")
                if header_end >= 0:
                    rest = bytes(received[header_end + 4 :])
                    body.update(rest)
                    total += len(rest)
                    headers = bytes(received[:header_end])
            else:
                body.update(chunk)
                total += len(chunk)
            if slow:
                import time

                time.sleep(0.0005)
        sock.close()
        return headers, body.hexdigest(), total

    async def test_whole_and_by_sendfile(self) -> None:
        headers, digest, total = await deferToThread(self.fetch, False)
        self.assertTrue(headers.startswith(b"HTTP/1.1 200"), headers[:200])
        self.assertEqual(total, self.size)
        self.assertEqual(digest, self.expected)
        (producer,) = self.resource.producers
        self.assertGreater(producer.bytes_by_sendfile, self.size * 0.8)

    async def test_slow_client_keeps_memory_flat(self) -> None:
        self.size = 8 * 1024 * 1024
        self.resource.size = self.size
        with open(self.path, "rb") as f:
            self.expected = hashlib.sha256(f.read(self.size)).hexdigest()
        headers, digest, total = await deferToThread(self.fetch, True)
        self.assertEqual((total, digest), (self.size, self.expected))
        # One "kick" chunk (a little over the transport's 64 KiB buffer) at most.
        self.assertLess(self.resource.max_buffered, 600 * 1024)
