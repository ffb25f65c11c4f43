# -*- test-case-name: tests.e2e.test_dht_bootstrap_server_real -*-
"""
Tests for L{spegel.dht.bootstrap_server}: the HTTP bootstrap server and its resource.

Over loopback: the test itself starts the servers on 127.0.0.1 (the socket-free tests are
L{tests.unit.test_dht_bootstrap_server}). The fakes are L{tests.unit.test_dht_bootstrap}'s.
"""

from __future__ import annotations


from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from spegel.dht.bootstrap import BootstrapHTTPError, BootstrapInfo, HTTPBootstrapper, HTTPBootstrapServer

from spegel_testing.ports import port_number
from tests.unit.test_dht_bootstrap import NODE_ID


# --- HTTP bootstrap ----------------------------------------------------------------------------


class LoopbackHTTPTests(TestCase):
    """L{HTTPBootstrapServer} on 127.0.0.1 read by L{HTTPBootstrapper} over real TCP."""

    async def test_serve_and_read(self) -> None:
        info = BootstrapInfo(node_id=NODE_ID, host="127.0.0.1", port=5001)
        server = HTTPBootstrapServer(reactor, "tcp:0:interface=127.0.0.1", lambda: info)
        server.startService()
        stopped = False

        async def stop() -> None:
            if not stopped:
                await server.stopService()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        port = await server.listening_port()
        url = f"http://127.0.0.1:{port_number(port)}/"
        bootstrapper = HTTPBootstrapper(url, treq=HTTPClient(Agent(reactor)), clock=reactor)
        self.assertEqual(await bootstrapper.info(), info)
        # A router on every interface: the peer is told the address it connected to.
        info = BootstrapInfo(node_id=NODE_ID, host="0.0.0.0", port=5001)
        self.assertEqual(await bootstrapper.peers(), [("127.0.0.1", 5001)])
        await server.stopService()
        stopped = True
        with self.assertRaises(BootstrapHTTPError):
            await bootstrapper.info()
