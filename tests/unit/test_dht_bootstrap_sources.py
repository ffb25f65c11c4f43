# -*- test-case-name: tests.unit.test_dht_bootstrap_sources -*-
"""
Tests for L{spegel.dht.bootstrap_sources}: the static, DNS and HTTP bootstrappers and the bootstrap document.

Socket-free; L{tests.e2e.test_dht_bootstrap_sources_real} talks to servers the test itself starts
on 127.0.0.1. The fakes are L{tests.unit.test_dht_bootstrap}'s.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.trial.unittest import SynchronousTestCase
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from spegel.dht.bootstrap import (
    MAX_BOOTSTRAP_DOCUMENT,
    BootstrapDNSError,
    BootstrapHTTPError,
    BootstrapInfo,
    BootstrapInfoResource,
    Bootstrapping,
    BootstrapResponseInvalid,
    DNSBootstrapper,
    HTTPBootstrapper,
    StaticBootstrapper,
    parse_bootstrap_document,
)

from tests.unit.test_dht_bootstrap import (
    FakeResolver,
    ScriptedJoin,
    FOUND,
    NODE_ID,
    URL,
    json_resource,
    DOMAIN,
)


class BootstrapDocumentPropertyTests(SynchronousTestCase):
    """Whatever the body, the parser answers with a value or its documented error."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
                lambda inner: st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["node_id", "host", "port", "other"]), inner, max_size=4
                ),
                max_leaves=8,
            ).map(lambda value: json.dumps(value).encode()),
        )
    )
    def test_bootstrap_document_never_crashes(self, body: bytes) -> None:
        try:
            info = parse_bootstrap_document(body, "10.0.0.9")
        except BootstrapResponseInvalid:
            return
        self.assertEqual(len(info.node_id), 32)

    @settings(max_examples=200, deadline=None)
    @given(
        st.binary(min_size=32, max_size=32),
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
            lambda address: not address.is_unspecified
        ),
        st.integers(1, 65535),
    )
    def test_bootstrap_document_round_trip(self, node_id: bytes, host: Any, port: int) -> None:
        info = BootstrapInfo(node_id=node_id, host=str(host), port=port)
        self.assertEqual(parse_bootstrap_document(info.to_json(), "10.0.0.9"), info)


# --- StaticBootstrapper ------------------------------------------------------------------------


class StaticBootstrapperTests(SynchronousTestCase):
    def test_peers(self) -> None:
        given = [("10.0.0.1", 5001), ("2001:DB8::1", 5001)]
        bootstrapper = StaticBootstrapper(given)
        first = self.successResultOf(bootstrapper.peers())
        self.assertEqual(first, [("10.0.0.1", 5001), ("2001:db8::1", 5001)])
        # Callers own the list they get: changing it changes nothing for the next call.
        first.clear()
        self.assertEqual(len(self.successResultOf(bootstrapper.peers())), 2)

    def test_invalid_peers_rejected(self) -> None:
        for peer in [("10.0.0.1", 0), ("10.0.0.1", "5001"), ("10.0.0.1", True), ("bad host", 1)]:
            with self.assertRaises(ValueError):
                StaticBootstrapper([peer])  # type: ignore[list-item]
        with self.assertRaises(ValueError):
            StaticBootstrapper(["10.0.0.1:5001"])  # type: ignore[list-item]

    def test_hostname_needs_resolver(self) -> None:
        with self.assertRaises(ValueError) as raised:
            StaticBootstrapper([("peer.example", 5001)])
        self.assertIn("needs a resolver", str(raised.exception))

    def test_hostnames_resolved(self) -> None:
        resolver = FakeResolver(
            {
                ("peer.example", dns.A): [dns.Record_A("10.0.0.5"), dns.Record_A("10.0.0.6")],
                ("peer.example", dns.AAAA): [dns.Record_AAAA("fd00::5")],
            }
        )
        bootstrapper = StaticBootstrapper(
            [("10.0.0.1", 5001), ("peer.example", 6000), ("gone.example", 6000)],
            resolver=resolver,
        )
        self.assertEqual(
            self.successResultOf(bootstrapper.peers()),
            [("10.0.0.1", 5001), ("10.0.0.5", 6000), ("10.0.0.6", 6000), ("fd00::5", 6000)],
        )

    def test_unresolvable_hostname_skipped(self) -> None:
        resolver = FakeResolver(
            {
                ("broken.example", dns.A): dnsError.DNSServerError("servfail"),
                ("broken.example", dns.AAAA): dnsError.DNSServerError("servfail"),
            }
        )
        bootstrapper = StaticBootstrapper(
            [("broken.example", 5001), ("10.0.0.1", 5001)], resolver=resolver
        )
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(bootstrapper.peers()), [("10.0.0.1", 5001)])
        self.assertTrue(
            any("broken.example" in str(event.get("host")) for event in events), events
        )


# --- DNSBootstrapper ---------------------------------------------------------------------------



class DNSBootstrapperTests(SynchronousTestCase):
    def test_a_and_aaaa_records(self) -> None:
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): [dns.Record_A("10.0.0.1"), dns.Record_A("10.0.0.2")],
                (DOMAIN, dns.AAAA): [dns.Record_AAAA("fd00::1")],
            }
        )
        peers = self.successResultOf(DNSBootstrapper(DOMAIN, 5001, resolver).peers())
        self.assertEqual(peers, [("10.0.0.1", 5001), ("10.0.0.2", 5001), ("fd00::1", 5001)])
        self.assertEqual(
            sorted((name, type) for name, type, _ in resolver.queries),
            [(DOMAIN, dns.A), (DOMAIN, dns.AAAA)],
        )

    def test_timeout_passed_to_resolver(self) -> None:
        resolver = FakeResolver()
        self.successResultOf(DNSBootstrapper(DOMAIN, 5001, resolver, timeout=(2,)).peers())
        self.assertEqual({timeout for _, _, timeout in resolver.queries}, {(2,)})

    def test_only_address_records_used(self) -> None:
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): [
                    dns.Record_CNAME(b"elsewhere.example"),
                    dns.Record_A("10.0.0.1"),
                    dns.Record_TXT(b"noise"),
                    dns.Record_A("10.0.0.1"),
                ]
            }
        )
        peers = self.successResultOf(DNSBootstrapper(DOMAIN, 5001, resolver).peers())
        self.assertEqual(peers, [("10.0.0.1", 5001)])

    def test_nxdomain_is_empty(self) -> None:
        self.assertEqual(
            self.successResultOf(DNSBootstrapper(DOMAIN, 5001, FakeResolver()).peers()), []
        )

    def test_authoritative_nxdomain_is_empty(self) -> None:
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): dnsError.AuthoritativeDomainError(DOMAIN),
                (DOMAIN, dns.AAAA): dnsError.DomainError(DOMAIN),
            }
        )
        self.assertEqual(self.successResultOf(DNSBootstrapper(DOMAIN, 5001, resolver).peers()), [])

    def test_one_family_failing(self) -> None:
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): [dns.Record_A("10.0.0.1")],
                (DOMAIN, dns.AAAA): dnsError.DNSQueryTimeoutError(DOMAIN),
            }
        )
        with capturedLogs() as events:
            peers = self.successResultOf(DNSBootstrapper(DOMAIN, 5001, resolver).peers())
        self.assertEqual(peers, [("10.0.0.1", 5001)])
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual([e.get("family") for e in warnings], ["AAAA"])

    def test_both_families_failing(self) -> None:
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): dnsError.DNSServerError("servfail"),
                (DOMAIN, dns.AAAA): dnsError.DNSQueryRefusedError("refused"),
            }
        )
        failure = self.failureResultOf(
            DNSBootstrapper(DOMAIN, 5001, resolver).peers(), BootstrapDNSError
        )
        self.assertIn(DOMAIN, str(failure.value))

    def test_server_failure_is_not_nxdomain(self) -> None:
        """SERVFAIL is a DomainError subclass, but must not pass for "no such name"."""
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): dnsError.DNSServerError("servfail"),
                (DOMAIN, dns.AAAA): dnsError.DNSServerError("servfail"),
            }
        )
        self.failureResultOf(DNSBootstrapper(DOMAIN, 5001, resolver).peers(), BootstrapDNSError)

    def test_cancel(self) -> None:
        cancelled = []
        resolver = FakeResolver(
            {
                (DOMAIN, dns.A): Deferred(lambda d: cancelled.append(dns.A)),
                (DOMAIN, dns.AAAA): Deferred(lambda d: cancelled.append(dns.AAAA)),
            }
        )
        peers = DNSBootstrapper(DOMAIN, 5001, resolver).peers()
        peers.cancel()
        self.failureResultOf(peers, CancelledError)
        self.assertEqual(sorted(cancelled), [dns.A, dns.AAAA])

    def test_invalid_arguments(self) -> None:
        for domain in ("", "bad domain", "a..b", 5):
            with self.assertRaises(ValueError):
                DNSBootstrapper(domain, 5001, FakeResolver())  # type: ignore[arg-type]
        for port in (0, 70000, "5001"):
            with self.assertRaises(ValueError):
                DNSBootstrapper(DOMAIN, port, FakeResolver())  # type: ignore[arg-type]


class HTTPBootstrapperTests(SynchronousTestCase):
    def bootstrapper(self, resource: Resource, url: str = URL, **kwargs: Any) -> HTTPBootstrapper:
        return HTTPBootstrapper(url, treq=StubTreq(resource), **kwargs)

    def test_round_trip_with_server_resource(self) -> None:
        info = BootstrapInfo(node_id=NODE_ID, host="fd00::9", port=5001)
        bootstrapper = self.bootstrapper(BootstrapInfoResource(lambda: info))
        self.assertEqual(self.successResultOf(bootstrapper.info()), info)
        self.assertEqual(self.successResultOf(bootstrapper.peers()), [("fd00::9", 5001)])

    def document(self, **changes: Any) -> bytes:
        document = {"node_id": NODE_ID.hex(), "host": "10.0.0.9", "port": 5001}
        document.update(changes)
        return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()

    def assertInvalid(self, body: bytes, *words: str, url: str = URL) -> None:
        failure = self.failureResultOf(
            self.bootstrapper(json_resource(body), url).peers(), BootstrapResponseInvalid
        )
        for word in words:
            self.assertIn(word, str(failure.value))

    def test_not_200(self) -> None:
        for code in (404, 500, 503):
            failure = self.failureResultOf(
                self.bootstrapper(json_resource(self.document(), code)).peers(),
                BootstrapHTTPError,
            )
            self.assertEqual(failure.value.status, code)
            self.assertIn(str(code), str(failure.value))

    def test_not_json(self) -> None:
        self.assertInvalid(b"<html>hello</html>", "not JSON")
        self.assertInvalid(b"\xff\xfe", "not JSON")
        self.assertInvalid(b"", "not JSON")

    def test_not_an_object(self) -> None:
        self.assertInvalid(b'["10.0.0.9", 5001]', "JSON object")

    def test_missing_fields(self) -> None:
        for key in ("node_id", "host", "port"):
            self.assertInvalid(self.document(**{key: ...}), repr(key), "missing")

    def test_wrong_types(self) -> None:
        self.assertInvalid(self.document(port="5001"), "'port'", "integer")
        self.assertInvalid(self.document(port=True), "'port'", "integer")
        self.assertInvalid(self.document(port=5001.0), "'port'", "integer")
        self.assertInvalid(self.document(host=None), "'host'", "string")
        self.assertInvalid(self.document(node_id=list(NODE_ID)), "'node_id'", "string")

    def test_bad_values(self) -> None:
        self.assertInvalid(self.document(port=0), "'port'")
        self.assertInvalid(self.document(port=65536), "'port'")
        self.assertInvalid(self.document(node_id="ab"), "'node_id'", "64 hex digits")
        self.assertInvalid(self.document(node_id="zz" * 32), "'node_id'")
        self.assertInvalid(self.document(host="peer.example"), "'host'", "IP address")

    def test_unspecified_host_replaced_by_url_host(self) -> None:
        body = self.document(host="0.0.0.0")
        peers = self.successResultOf(self.bootstrapper(json_resource(body)).peers())
        self.assertEqual(peers, [("10.0.0.9", 5001)])
        self.assertInvalid(body, "unspecified", url="http://spegel-bootstrap:5002/")

    def test_oversized_body(self) -> None:
        body = self.document(padding="x" * MAX_BOOTSTRAP_DOCUMENT)
        self.assertInvalid(body, "bootstrap document too large")

    def test_cut_body(self) -> None:
        """
        A body cut short is not the document: the reader says how it failed.
        """
        document = self.document()

        class CutResponse:
            code = 200

            def deliverBody(self, protocol: Any) -> None:
                protocol.makeConnection(StringTransport())
                protocol.dataReceived(document[:10])
                protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost("reset"))])))

        class Cutting:
            def get(self, url: str, **kwargs: Any) -> Deferred:
                return succeed(CutResponse())

        failure = self.failureResultOf(HTTPBootstrapper(URL, treq=Cutting()).peers(), BootstrapResponseInvalid)
        self.assertIn("body failed", str(failure.value))

    def test_extra_fields_ignored(self) -> None:
        body = self.document(version=2)
        self.assertEqual(
            self.successResultOf(self.bootstrapper(json_resource(body)).peers()),
            [("10.0.0.9", 5001)],
        )

    def test_timeout(self) -> None:
        class Silent(Resource):
            isLeaf = True

            def render(self, request: Any) -> object:
                return NOT_DONE_YET

        clock = Clock()
        peers = self.bootstrapper(Silent(), clock=clock, timeout=2.0).peers()
        self.assertNoResult(peers)
        clock.advance(2.0)
        failure = self.failureResultOf(peers, BootstrapHTTPError)
        self.assertIn("longer than 2.0s", str(failure.value))
        self.assertIsNone(failure.value.status)

    def test_silent_body_connection_closed(self) -> None:
        """
        A peer that sends the headers and then nothing fails the request at the timeout, and
        its connection is closed rather than left open for as long as the peer likes.
        """
        transport = StringTransport()

        class SilentBody:
            code = 200

            def deliverBody(self, protocol: Any) -> None:
                protocol.makeConnection(transport)

        headers: Deferred[SilentBody] = Deferred()

        class Answering:
            def get(self, url: str, **kwargs: Any) -> Deferred:
                return headers

        clock = Clock()
        peers = HTTPBootstrapper(URL, treq=Answering(), clock=clock, timeout=2.0).peers()
        clock.advance(0.5)
        headers.callback(SilentBody())
        self.assertEqual(transport.producerState, "producing")
        clock.advance(1.5)
        failure = self.failureResultOf(peers, BootstrapHTTPError)
        self.assertIn("longer than 2.0s", str(failure.value))
        # Closed by now at the latest: the reader's idle timer.
        clock.advance(0.5)
        self.assertEqual(transport.producerState, "stopped")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timer_cancelled_after_answer(self) -> None:
        clock = Clock()
        info = BootstrapInfo(node_id=NODE_ID, host="10.0.0.9", port=5001)
        bootstrapper = self.bootstrapper(BootstrapInfoResource(lambda: info), clock=clock)
        self.assertEqual(self.successResultOf(bootstrapper.info()), info)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stopping_bootstrapping_cancels_request(self) -> None:
        requests = []

        class Silent(Resource):
            isLeaf = True

            def render(self, request: Any) -> object:
                requests.append(request)
                return NOT_DONE_YET

        clock = Clock()
        service = Bootstrapping(
            clock, self.bootstrapper(Silent(), clock=clock), ScriptedJoin([FOUND])
        )
        service.startService()
        self.assertEqual(len(requests), 1)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertFalse(service.joined)

    def test_connection_failure(self) -> None:
        class Refusing:
            def get(self, url: str, **kwargs: Any) -> Deferred:
                return fail(ConnectionRefusedError("nobody home"))

        bootstrapper = HTTPBootstrapper(URL, treq=Refusing())
        failure = self.failureResultOf(bootstrapper.peers(), BootstrapHTTPError)
        self.assertIn("nobody home", str(failure.value))

    def test_wrapped_failure_described(self) -> None:
        class Failing:
            def get(self, url: str, **kwargs: Any) -> Deferred:
                return fail(ResponseNeverReceived([Failure(ConnectionLost("peer went away"))]))

        failure = self.failureResultOf(
            HTTPBootstrapper(URL, treq=Failing()).peers(), BootstrapHTTPError
        )
        self.assertIn("peer went away", str(failure.value))
        self.assertNotIn("<twisted.python.failure", str(failure.value))

    def test_invalid_urls(self) -> None:
        for url in ("", "ftp://peer/", "peer:5002", "http:///nohost"):
            with self.assertRaises(ValueError):
                HTTPBootstrapper(url)
        with self.assertRaises(ValueError):
            HTTPBootstrapper(URL, timeout=0)

    def test_bootstrapping_retries_after_http_errors(self) -> None:
        """A peer answering 503, then garbage, then its document: joined on the third try."""
        answers = [(503, b"starting"), (200, b"{"), (200, self.document())]

        class Flaky(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                code, body = answers.pop(0) if len(answers) > 1 else answers[0]
                request.setResponseCode(code)
                return body

        clock = Clock()
        join = ScriptedJoin([FOUND])
        service = Bootstrapping(
            clock, self.bootstrapper(Flaky()), join, random_source=lambda: 0.0
        )
        with capturedLogs() as events:
            service.startService()
            clock.advance(0.5)
            self.assertFalse(service.joined)
            clock.advance(1.0)
        self.assertTrue(service.joined)
        self.assertEqual(join.calls, [[("10.0.0.9", 5001)]])
        reasons = [e["reason"] for e in events if "reason" in e and "n" in e]
        self.assertEqual(len(reasons), 2)
        self.assertIn("503", reasons[0])
        self.assertIn("not JSON", reasons[1])
        service.stopService()
