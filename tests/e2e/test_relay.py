"""
Tests for L{spegel.relay}: blobs relayed from a peer's socket to a client's by splice, over
real TCP connections on 127.0.0.1 (splice needs real sockets), with the mirror in front.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from spegel import relay
from spegel.bodies import FileBodyProducer
from spegel.dht.ids import Provider
from spegel.interfaces import IRouter
from spegel.metrics import Metrics
from spegel.mirror import Mirror, SpliceRelaying
from spegel.peers import peer_client
from spegel.httpserver import make_site
from spegel.registry import RegistryFilter, RegistryResource
from spegel_testing.ports import port_number
from tests.unit.test_registry import MemoryContent

MiB = 1 << 20
REPO = "team/app"


class _Peer(Resource):
    """
    A peer serving one file as every blob, like a node's registry (by sendfile, one byte range
    when asked), optionally cutting the connection after C{cut_after} bytes of the body.
    """

    isLeaf = True

    def __init__(self, path: str, size: int, cut_after: int | None = None, then_hang: bool = False):
        super().__init__()
        self.path, self.size, self.cut_after, self.then_hang = path, size, cut_after, then_hang
        self.ranges: list[str | None] = []

    def render_GET(self, request: Request) -> Any:
        first, last = 0, self.size - 1
        asked = request.getHeader(b"range")
        self.ranges.append(asked.decode() if asked else None)
        if asked:
            match = re.fullmatch(rb"bytes=(\d+)-(\d*)", asked)
            assert match, asked
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) else last
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, self.size))
        length = last - first + 1
        request.setHeader(b"content-length", b"%d" % length)
        if self.cut_after is not None and self.cut_after < length:
            length = self.cut_after
        body = FileBodyProducer(request, os.open(self.path, os.O_RDONLY), first, length)

        def sent(result: object) -> None:
            if self.then_hang:
                return
            if self.cut_after is not None:
                assert request.channel.transport is not None
                request.channel.transport.loseConnection()
            else:
                request.finish()

        body.start().addBoth(sent)
        return NOT_DONE_YET


@implementer(IRouter)
class _Router:
    """
    A DHT that knows the providers at once.
    """

    def __init__(self, providers: list[Provider]):
        self.providers = providers

    def find_providers(self, key: str, *, on_provider: Callable[[Provider], None] | None = None, limit: int = 20,
                       use_cache: bool = True) -> Deferred[list[Provider]]:
        for provider in self.providers:
            if on_provider is not None:
                on_provider(provider)
        return succeed(list(self.providers))


def _fetch(port: int, path: str, headers: str = "", pause: float = 0.0) -> tuple[bytes, str, int]:
    """
    GET C{path} from 127.0.0.1:C{port} with a plain socket; the response's head, the SHA-256 of
    its body and the body's length (up to the connection's end: the server closes it). With
    C{pause}, a slow client: a small receive buffer, read 64 KiB at a time with a pause between.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    if pause:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n{headers}\r\n".encode())
    received = bytearray()
    body = hashlib.sha256()
    head = b""
    total = 0
    while True:
        try:
            chunk = sock.recv(1 << 20 if not pause else 64 * 1024)
            if pause:
                time.sleep(pause)
        except ConnectionResetError:
            break
        if not chunk:
            break
        if not head:
            received += chunk
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(received[:end])
                rest = bytes(received[end + 4 :])
                body.update(rest)
                total += len(rest)
        else:
            body.update(chunk)
            total += len(chunk)
    sock.close()
    return head, body.hexdigest(), total


class RelayTestCase(TestCase):
    size = 24 * MiB

    def setUp(self) -> None:
        self.data = os.urandom(self.size)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.good = self._file(self.data)

    def _file(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def peer(self, path: str, cut_after: int | None = None, then_hang: bool = False) -> tuple[Provider, _Peer]:
        resource = _Peer(path, self.size, cut_after, then_hang)
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted annotates a generic ServerFactory
        self.addCleanup(port.stopListening)
        number = port_number(port) % 250 + 1
        return Provider(bytes([number]) * 32, "127.0.0.1", port_number(port)), resource

    def node(self, providers: list[Provider], splice: bool = True, idle_timeout: float = 5.0) -> int:
        hashing = relay.HashingPool(reactor)
        hashing.startService()
        self.addCleanup(hashing.stopService)
        client = peer_client(reactor)
        self.addCleanup(client._agent._pool.closeCachedConnections)  # type: ignore[attr-defined]  # peer_client's pool
        self.metrics = Metrics()
        mirror = Mirror(
            reactor, _Router(providers), client, resolve_timeout=1.0, idle_timeout=idle_timeout,
            pick=lambda n: 0, splice=SpliceRelaying(reactor, hashing.run) if splice else None, metrics=self.metrics,
        )
        registry = RegistryResource(reactor, MemoryContent(self.mktemp()), RegistryFilter(), mirror=mirror, metrics=self.metrics)
        site = make_site(registry.resource())
        # What the access log would say each response's size was.
        self.logged_sizes: list[int] = []
        site.log = lambda request: self.logged_sizes.append(request.sentLength)  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted annotates a generic ServerFactory
        self.addCleanup(port.stopListening)
        return port_number(port)

    def blob_path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.digest}?ns=registry.example"

    def spliced(self) -> float:
        return self.metrics.registry.get_sample_value("spegel_spliced_bytes_total") or 0.0


class RelayTests(RelayTestCase):
    async def test_whole_blob_by_splice(self) -> None:
        provider, _ = self.peer(self.good)
        port = self.node([provider])
        head, digest, total = await deferToThread(_fetch, port, self.blob_path())
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertIn(b"Content-Length: %d" % self.size, head)
        self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))
        # Nearly every byte went by splice: only those that came with the peer's headers and
        # the chunks that wake the relay up went through Python.
        self.assertGreater(self.spliced(), self.size * 0.8)
        self.assertEqual(self.logged_sizes, [self.size])

    async def test_range_by_splice(self) -> None:
        provider, peer = self.peer(self.good)
        port = self.node([provider])
        first, last = 3 * MiB + 7, 20 * MiB
        head, digest, total = await deferToThread(
            _fetch, port, self.blob_path(), f"Range: bytes={first}-{last}\r\n"
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 206"), head)
        self.assertEqual(peer.ranges, [f"bytes={first}-{last}"])
        self.assertEqual((total, digest), (last - first + 1, hashlib.sha256(self.data[first : last + 1]).hexdigest()))

    async def test_corrupt_peer_never_completes_the_body(self) -> None:
        corrupt = bytearray(self.data)
        corrupt[self.size // 2] ^= 0xFF
        provider, _ = self.peer(self._file(bytes(corrupt)))
        port = self.node([provider])
        head, digest, total = await deferToThread(_fetch, port, self.blob_path())
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertLess(total, self.size)
        # The relay sent all but the bytes held back; the client may see less of it, as the
        # aborted connection drops what was still in the node's socket buffer.
        self.assertGreater(self.spliced(), self.size - relay.PIPE_SIZE - relay.HELD_BACK)
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_digest_mismatches_total"), 1)

    async def test_midway_failure_resumes_on_another_peer(self) -> None:
        cut = 9 * MiB + 123
        failing, failing_peer = self.peer(self.good, cut_after=cut)
        honest, honest_peer = self.peer(self.good)
        port = self.node([failing, honest])
        head, digest, total = await deferToThread(_fetch, port, self.blob_path())
        self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))
        self.assertEqual(failing_peer.ranges, [None])
        self.assertEqual(honest_peer.ranges, [f"bytes={cut}-{self.size - 1}"])

    async def test_silent_peer_is_left_for_another(self) -> None:
        cut = 5 * MiB
        silent, silent_peer = self.peer(self.good, cut_after=cut, then_hang=True)
        honest, honest_peer = self.peer(self.good)
        port = self.node([silent, honest], idle_timeout=0.3)
        head, digest, total = await deferToThread(_fetch, port, self.blob_path())
        self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))
        self.assertEqual(honest_peer.ranges, [f"bytes={cut}-{self.size - 1}"])

    async def test_slow_client_slows_the_peer(self) -> None:
        provider, _ = self.peer(self.good)
        port = self.node([provider])
        head, digest, total = await deferToThread(_fetch, port, self.blob_path(), "", 0.0005)
        self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))
        # The relay waited on the client's socket rather than reading everything through Python.
        self.assertGreater(self.spliced(), self.size * 0.5)

    async def test_concurrent_relays_keep_their_bytes_apart(self) -> None:
        """
        Several clients at once, some fast, some slow, through one node from two peers: every
        body arrives whole and right, so no relay ever touched another's pipes, sockets or
        digest.
        """
        providers = [self.peer(self.good)[0], self.peer(self.good)[0]]
        port = self.node(providers)
        fetches = [
            deferToThread(_fetch, port, self.blob_path(), "", 0.0005 if n % 2 else 0.0) for n in range(6)
        ]
        results = await gatherResults(fetches)
        for head, digest, total in results:
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))

    async def test_python_path_gives_the_same_bytes(self) -> None:
        provider, _ = self.peer(self.good)
        port = self.node([provider], splice=False)
        head, digest, total = await deferToThread(_fetch, port, self.blob_path())
        self.assertEqual((total, "sha256:" + digest), (self.size, self.digest))
        self.assertEqual(self.spliced(), 0)


class AvailabilityTests(SynchronousTestCase):
    def test_available_on_linux(self) -> None:
        # The CI machines run Linux with a C library that has tee: the fast path must be there.
        self.assertTrue(relay.available())

    def test_peer_socket_of_other_transports(self) -> None:
        self.assertIsNone(relay.peer_socket(object()))
