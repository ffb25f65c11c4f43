"""
Tests for L{spegel.peers}: connections to peers read large chunks, and the client works against
a real server on loopback.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.resource import Resource
from twisted.web.server import Site

from spegel.peers import PEER_READ_SIZE, LargeReadsEndpoint, PeerEndpoints, peer_client


class FakeEndpoint:
    def __init__(self) -> None:
        self.protocol = Protocol()
        self.protocol.makeConnection(StringTransport())

    def connect(self, factory):  # type: ignore[no-untyped-def]
        return succeed(self.protocol)


class LargeReadsTests(SynchronousTestCase):
    def test_connected_transport_reads_large_chunks(self) -> None:
        inner = FakeEndpoint()
        protocol = self.successResultOf(LargeReadsEndpoint(inner, 12345).connect(None))  # type: ignore[arg-type]
        self.assertEqual(protocol.transport.bufferSize, 12345)

    def test_endpoint_for_peer_uri(self) -> None:
        endpoint = PeerEndpoints(reactor, 2).endpointForURI(URI.fromBytes(b"http://127.0.0.1:5000/v2/"))
        self.assertIsInstance(endpoint, LargeReadsEndpoint)

    def test_ip_peers_connect_directly(self) -> None:
        """
        Peers are IP addresses: plain TCP endpoints, which fail at once when refused (a
        HostnameEndpoint reports it only 300 ms later); a name still resolves.
        """
        factory = PeerEndpoints(reactor, 2)
        for uri, kind in [
            (b"http://10.0.0.5:5000/v2/", TCP4ClientEndpoint),
            (b"http://[fd00::5]:5000/v2/", TCP6ClientEndpoint),
            (b"http://peer.example:5000/v2/", HostnameEndpoint),
        ]:
            self.assertIsInstance(factory.endpointForURI(URI.fromBytes(uri))._endpoint, kind, uri)


class _Blob(Resource):
    isLeaf = True

    def __init__(self, data: bytes):
        super().__init__()
        self.data = data

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        return self.data


class LoopbackTests(TestCase):
    async def test_large_body_over_loopback(self) -> None:
        data = os.urandom(8 * 1024 * 1024)
        port = reactor.listenTCP(0, Site(_Blob(data)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = peer_client(reactor)
        self.addCleanup(client._agent._pool.closeCachedConnections)
        chunks: list[int] = []

        class Collect(Protocol):
            def dataReceived(self, chunk: bytes) -> None:
                chunks.append(len(chunk))

            def connectionLost(self, reason):  # type: ignore[no-untyped-def]
                done.callback(None)

        done: Deferred[None] = Deferred()
        response = await client.get(f"http://127.0.0.1:{port.getHost().port}/", unbuffered=True)
        response.deliverBody(Collect())
        await done
        self.assertEqual(sum(chunks), len(data))
        # Chunks larger than Twisted's default 64 KiB read prove the larger reads are in effect.
        self.assertGreater(max(chunks), 64 * 1024)
        self.assertLessEqual(max(chunks), PEER_READ_SIZE)
