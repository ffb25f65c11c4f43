# -*- test-case-name: tests.unit.test_dht_bootstrap_server -*-
"""
Tests for L{spegel.dht.bootstrap_server}: the HTTP bootstrap server and its resource.

Socket-free; L{tests.e2e.test_dht_bootstrap_server_real} talks to servers the test itself starts
on 127.0.0.1. The fakes are L{tests.unit.test_dht_bootstrap}'s.
"""

from __future__ import annotations

import json
from typing import Any

from tests.unit.stubtreq import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from spegel.dht.bootstrap import BootstrapInfo, BootstrapInfoResource, HTTPBootstrapServer

from tests.unit.test_dht_bootstrap import NODE_ID, URL

#: For servers whose info is never asked for.
NO_INFO = BootstrapInfo(node_id=NODE_ID, host="10.0.0.9", port=5001)


# --- HTTP bootstrap ----------------------------------------------------------------------------


class BootstrapInfoResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.info = BootstrapInfo(node_id=NODE_ID, host="10.0.0.9", port=5001)
        self.treq = StubTreq(BootstrapInfoResource(lambda: self.info))

    def get(self, url: str = URL, method: str = "GET") -> tuple[int, bytes, Any]:
        response = self.successResultOf(self.treq.request(method, url))
        return response.code, self.successResultOf(response.content()), response.headers

    def test_document(self) -> None:
        code, body, headers = self.get()
        self.assertEqual(code, 200)
        self.assertEqual(
            json.loads(body), {"node_id": NODE_ID.hex(), "host": "10.0.0.9", "port": 5001}
        )
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_info_read_per_request(self) -> None:
        self.info = BootstrapInfo(node_id=NODE_ID, host="10.0.0.10", port=6001)
        self.assertEqual(json.loads(self.get()[1])["host"], "10.0.0.10")

    def test_unspecified_host_becomes_local_address(self) -> None:
        """A router on every interface serves the address the request came in on."""
        for unspecified in ("0.0.0.0", "::"):
            self.info = BootstrapInfo(node_id=NODE_ID, host=unspecified, port=5001)
            document = json.loads(self.get()[1])
            # StubTreq's fake connections arrive at 127.0.0.1.
            self.assertEqual(document["host"], "127.0.0.1")
            self.assertEqual(document["port"], 5001)

    def test_local_address_mapping(self) -> None:
        resource = BootstrapInfoResource(lambda: BootstrapInfo(NODE_ID, "::", 5001))
        for local, expected in (
            # A dual-stack socket reports IPv4 as IPv4-mapped IPv6; the router wants IPv4.
            (IPv6Address("TCP", "::ffff:10.0.0.4", 5002), "10.0.0.4"),
            (IPv6Address("TCP", "fd00::4", 5002), "fd00::4"),
            (IPv4Address("TCP", "10.0.0.5", 5002), "10.0.0.5"),
            # No IP to offer: served as is, and the client falls back to the URL's host.
            (UNIXAddress(b"/run/x.sock"), "::"),
        ):
            request = DummyRequest([b""])
            self.patch(request, "getHost", lambda local=local: local)
            self.assertEqual(json.loads(resource.render(request))["host"], expected)

    def test_other_paths_not_found(self) -> None:
        self.assertEqual(self.get(URL + "id")[0], 404)

    def test_other_methods_not_allowed(self) -> None:
        self.assertEqual(self.get(method="POST")[0], 405)

    def test_info_failing(self) -> None:
        def broken() -> BootstrapInfo:
            raise RuntimeError("no id yet")

        treq = StubTreq(BootstrapInfoResource(broken))
        response = self.successResultOf(treq.get(URL))
        self.assertEqual(response.code, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)



class HTTPBootstrapServerTests(SynchronousTestCase):
    def test_bad_endpoint(self) -> None:
        for endpoint in ("bogus:5002", "tcp:notaport", ""):
            with self.assertRaises(ValueError):
                HTTPBootstrapServer(Clock(), endpoint, lambda: NO_INFO)

    def test_listening_port_before_start(self) -> None:
        server = HTTPBootstrapServer(Clock(), "tcp:0", lambda: NO_INFO)
        self.assertRaises(RuntimeError, server.listening_port)

    def test_listens_on_endpoint_and_stops(self) -> None:
        memory = MemoryReactor()
        info = BootstrapInfo(node_id=NODE_ID, host="10.0.0.9", port=5001)
        server = HTTPBootstrapServer(memory, "tcp:5002:interface=127.0.0.1", lambda: info)
        server.startService()
        ((port, site, _backlog, interface),) = memory.tcpServers
        self.assertEqual((port, interface), (5002, "127.0.0.1"))
        assert isinstance(site, Site)
        self.assertIs(site.resource, server.resource)
        self.successResultOf(server.listening_port())
        self.successResultOf(server.stopService())
        self.assertFalse(server.running)

    def test_listen_failure_logged_and_reported(self) -> None:
        failing = RaisingMemoryReactor(listenException=CannotListenError("", 5002, "in use"))
        server = HTTPBootstrapServer(failing, "tcp:5002", lambda: NO_INFO)
        server.startService()
        self.failureResultOf(server.listening_port(), CannotListenError)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.successResultOf(server.stopService())

    def test_stop_while_listening_pending(self) -> None:
        cancelled: list[Deferred] = []
        pending: Deferred = Deferred(cancelled.append)

        @implementer(IStreamServerEndpoint)
        class SlowEndpoint:
            def listen(self, factory: Any) -> Deferred:
                return pending

        server = HTTPBootstrapServer(Clock(), SlowEndpoint(), lambda: NO_INFO)
        server.startService()
        waiter = server.listening_port()
        self.assertNoResult(waiter)
        self.successResultOf(server.stopService())
        self.assertEqual(cancelled, [pending])
        self.failureResultOf(waiter, CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])
