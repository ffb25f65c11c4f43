"""
Tests for L{spegel.peers}: the peer client against a real server on loopback.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from spegel.peers import PEER_READ_SIZE, peer_client
from spegel_testing.ports import port_number


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
        port = reactor.listenTCP(0, Site(_Blob(data)), interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted annotates a generic ServerFactory
        self.addCleanup(port.stopListening)
        client = peer_client(reactor)
        self.addCleanup(client._agent._pool.closeCachedConnections)  # type: ignore[attr-defined]  # peer_client's pool
        chunks: list[int] = []

        class Collect(Protocol):
            def dataReceived(self, chunk: bytes) -> None:
                chunks.append(len(chunk))

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                done.callback(None)

        done: Deferred[None] = Deferred()
        response = await client.get(f"http://127.0.0.1:{port_number(port)}/", unbuffered=True)
        response.deliverBody(Collect())
        await done
        self.assertEqual(sum(chunks), len(data))
        # Chunks larger than Twisted's default 64 KiB read prove the larger reads are in effect.
        self.assertGreater(max(chunks), 64 * 1024)
        self.assertLessEqual(max(chunks), PEER_READ_SIZE)
