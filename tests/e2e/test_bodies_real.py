"""
Tests for L{spegel.bodies} over a real loopback TCP connection, because sendfile only exists on
a real socket (the socket-free ones are L{tests.unit.test_bodies}).
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from spegel.bodies import FileBodyProducer
from spegel_testing.ports import port_number


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
        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted annotates a generic ServerFactory
        self.addCleanup(self.port.stopListening)

    def fetch(self, slow: bool) -> tuple[bytes, str, int]:
        sock = socket.create_connection(("127.0.0.1", port_number(self.port)))
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
