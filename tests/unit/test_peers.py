"""
Tests for L{spegel.peers}: connections to peers read large chunks. L{tests.e2e.test_peers_real}
runs the client against a real server on loopback.
"""

from __future__ import annotations


from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from spegel.peers import LargeReadsEndpoint, PeerEndpoints


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
            endpoint = factory.endpointForURI(URI.fromBytes(uri))
            self.assertIsInstance(endpoint._endpoint, kind, uri)  # type: ignore[attr-defined]  # the wrapped one
