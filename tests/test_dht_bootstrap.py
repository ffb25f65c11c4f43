# -*- test-case-name: tests.test_dht_bootstrap -*-
"""
Tests for L{spegel.dht.bootstrap}.

Everything but L{LoopbackDNSTests} and L{LoopbackHTTPTests} is socket-free: a L{Clock}, fake
resolvers and joins, and L{StubTreq} over the real bootstrap resource. Those two classes talk
to a DNS server and an HTTP server started on 127.0.0.1 by the test itself.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import LogLevel, capturedLogs
from twisted.names import authority, client, common, dns, server
from twisted.names import error as dnsError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from spegel.dht.bootstrap import (
    JITTER,
    MAX_BOOTSTRAP_DOCUMENT,
    BootstrapDNSError,
    BootstrapHTTPError,
    BootstrapInfo,
    BootstrapInfoResource,
    Bootstrapping,
    BootstrapResponseInvalid,
    DNSBootstrapper,
    HTTPBootstrapper,
    HTTPBootstrapServer,
    JoinResult,
    NoCandidates,
    NobodyAnswered,
    StaticBootstrapper,
    bootstrapper_from_config,
    parse_bootstrap_document,
    parse_host_port,
)

NODE_ID = bytes(range(32))
URL = "http://10.0.0.9:5002/"


# --- fakes -------------------------------------------------------------------------------------


class FakeResolver(common.ResolverBase):
    """
    An IResolver answering from a table: C{answers[(name, type)]} is a list of record
    payloads, an exception to fail with, or a Deferred to return. Unknown names: NXDOMAIN.
    """

    def __init__(self, answers: dict[tuple[str, int], Any] | None = None) -> None:
        super().__init__()
        self.answers = dict(answers or {})
        self.queries: list[tuple[str, int, Any]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        text = name.decode("ascii")
        self.queries.append((text, type, timeout))
        answer = self.answers.get((text, type))
        if answer is None:
            return fail(dnsError.DNSNameError(text))
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        records = [dns.RRHeader(name, payload.TYPE, dns.IN, 30, payload) for payload in answer]
        return succeed((records, [], []))


@frozen
class FakeRouterConfig:
    """The fields of L{spegel.dht.config.RouterConfig} that bootstrap reads."""

    bootstrap_kind: str | None = None
    listen_port: int = 5001
    static_peers: tuple[tuple[str, int], ...] = ()
    dns_domain: str | None = None
    dns_resolver: Any = None
    http_bootstrap_url: str | None = None


@define
class ScriptedBootstrapper:
    """
    Answers C{peers()} with the next item of C{script}: an address list, an exception to
    fail with, or a Deferred. An exhausted script repeats its last item.
    """

    script: list[Any]
    calls: int = 0

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        self.calls += 1
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Deferred):
            return item
        if isinstance(item, BaseException):
            return fail(item)
        return succeed(list(item))


@define
class ScriptedJoin:
    """A node's join: records its argument, answers like L{ScriptedBootstrapper}."""

    script: list[Any]
    calls: list[list[tuple[str, int]]] = field(factory=list)

    def __call__(self, addresses: list[tuple[str, int]]) -> Deferred[JoinResult]:
        self.calls.append(addresses)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Deferred):
            return item
        if isinstance(item, BaseException):
            return fail(item)
        return succeed(item)


FOUND = JoinResult(peers_found=3, only_self=False)
NOBODY = JoinResult(peers_found=0, only_self=False)
ALONE = JoinResult(peers_found=0, only_self=True)
PEERS = [("10.0.0.1", 5001), ("10.0.0.2", 5001)]


def json_resource(body: bytes, code: int = 200) -> Resource:
    """A resource answering every request with C{code} and C{body}."""

    class Fixed(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setResponseCode(code)
            return body

    return Fixed()


# --- parse_host_port ---------------------------------------------------------------------------


class ParseHostPortTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1:5001"), ("10.0.0.1", 5001))

    def test_whitespace_ignored(self) -> None:
        self.assertEqual(parse_host_port(" 10.0.0.1:5001\n"), ("10.0.0.1", 5001))

    def test_bracketed_ipv6_canonicalised(self) -> None:
        self.assertEqual(parse_host_port("[::1]:5001"), ("::1", 5001))
        self.assertEqual(parse_host_port("[2001:DB8:0::1]:80"), ("2001:db8::1", 80))

    def test_hostname(self) -> None:
        self.assertEqual(
            parse_host_port("Node-1.spegel.svc.cluster.local:5001"),
            ("node-1.spegel.svc.cluster.local", 5001),
        )

    def test_default_port(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1", 5001), ("10.0.0.1", 5001))
        self.assertEqual(parse_host_port("[::1]", 7), ("::1", 7))
        self.assertEqual(parse_host_port("::1", 7), ("::1", 7))
        self.assertEqual(parse_host_port("peer", 9), ("peer", 9))

    def test_explicit_port_wins_over_default(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1:6000", 5001), ("10.0.0.1", 6000))

    def assertRejected(self, text: str, *words: str, default_port: int | None = None) -> None:
        with self.assertRaises(ValueError) as raised:
            parse_host_port(text, default_port)
        message = str(raised.exception)
        for word in words:
            self.assertIn(word, message)

    def test_missing_port(self) -> None:
        self.assertRejected("10.0.0.1", "'10.0.0.1'", "missing port")
        self.assertRejected("[::1]", "missing port")

    def test_bare_ipv6_with_port_is_ambiguous(self) -> None:
        self.assertRejected("::1", "missing port")
        self.assertRejected("fe80:1:2:5001:zz", "[address]:port")

    def test_bad_ports(self) -> None:
        for text in ("h:0", "h:65536", "h:abc", "h:", "h:-1", "h:+5", "h: 5", "h:1e3", "h:٣"):
            self.assertRejected(text, repr(text), "port")

    def test_bad_default_port(self) -> None:
        self.assertRejected("10.0.0.1", "port", default_port=0)

    def test_bad_hosts(self) -> None:
        self.assertRejected("", "empty")
        self.assertRejected(":5001", "missing host")
        self.assertRejected("bad_host!:5001", "'bad_host!'", "neither")
        self.assertRejected("1.2.3.999:5001", "neither")
        self.assertRejected("-peer:5001", "neither")

    def test_bad_brackets(self) -> None:
        self.assertRejected("[::1:5001", "missing ']'")
        self.assertRejected("[10.0.0.1]:5001", "not an IPv6 address")
        self.assertRejected("[::1]5001", "after ']'")


class ParserPropertyTests(SynchronousTestCase):
    """Whatever the input, the parsers answer with a value or their documented error."""

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_parse_host_port_never_crashes(self, text: str) -> None:
        try:
            host, port = parse_host_port(text)
        except ValueError:
            return
        self.assertTrue(1 <= port <= 65535)
        self.assertTrue(host)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
    def test_parse_host_port_round_trip(self, address: Any, port: int) -> None:
        text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        self.assertEqual(parse_host_port(text), (str(address), port))

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

DOMAIN = "spegel.kube-system.svc.cluster.local"


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


class MemoryAuthority(authority.FileAuthority):
    """A zone held in memory: FileAuthority's answering logic without a zone file."""

    def loadFile(self, records: dict[bytes, list[Any]]) -> None:
        self.soa = (
            b"cluster.test",
            dns.Record_SOA(mname=b"ns.cluster.test", rname=b"root.cluster.test", ttl=5),
        )
        self.records = records


class LoopbackDNSTests(TestCase):
    """L{DNSBootstrapper} querying a real DNS server on 127.0.0.1 over UDP."""

    def setUp(self) -> None:
        zone = MemoryAuthority(
            {
                b"spegel.cluster.test": [
                    dns.Record_A("127.0.0.1"),
                    dns.Record_A("127.0.0.2"),
                    dns.Record_AAAA("::1"),
                ],
                b"v4only.cluster.test": [dns.Record_A("127.0.0.3")],
                b"no-address.cluster.test": [dns.Record_TXT(b"nothing here")],
            }
        )
        factory = server.DNSServerFactory(authorities=[zone])
        self.port = reactor.listenUDP(
            0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", self.port.getHost().port)])

    async def peers(self, domain: str) -> list[tuple[str, int]]:
        return await DNSBootstrapper(domain, 5001, self.resolver).peers()

    async def test_a_and_aaaa(self) -> None:
        self.assertEqual(
            await self.peers("spegel.cluster.test"),
            [("127.0.0.1", 5001), ("127.0.0.2", 5001), ("::1", 5001)],
        )

    async def test_ipv4_only(self) -> None:
        self.assertEqual(await self.peers("v4only.cluster.test"), [("127.0.0.3", 5001)])

    async def test_nxdomain(self) -> None:
        self.assertEqual(await self.peers("missing.cluster.test"), [])

    async def test_name_without_addresses(self) -> None:
        self.assertEqual(await self.peers("no-address.cluster.test"), [])


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
            request.getHost = lambda local=local: local  # type: ignore[method-assign]
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
        self.assertInvalid(body, "larger than")

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


class HTTPBootstrapServerTests(SynchronousTestCase):
    def test_bad_endpoint(self) -> None:
        for endpoint in ("bogus:5002", "tcp:notaport", ""):
            with self.assertRaises(ValueError):
                HTTPBootstrapServer(Clock(), endpoint, lambda: None)  # type: ignore[arg-type]

    def test_listening_port_before_start(self) -> None:
        server = HTTPBootstrapServer(Clock(), "tcp:0", lambda: None)  # type: ignore[arg-type]
        self.assertRaises(RuntimeError, server.listening_port)

    def test_listens_on_endpoint_and_stops(self) -> None:
        memory = MemoryReactor()
        info = BootstrapInfo(node_id=NODE_ID, host="10.0.0.9", port=5001)
        server = HTTPBootstrapServer(memory, "tcp:5002:interface=127.0.0.1", lambda: info)
        server.startService()
        ((port, site, _backlog, interface),) = memory.tcpServers
        self.assertEqual((port, interface), (5002, "127.0.0.1"))
        self.assertIs(site.resource, server.resource)
        self.successResultOf(server.listening_port())
        self.successResultOf(server.stopService())
        self.assertFalse(server.running)

    def test_listen_failure_logged_and_reported(self) -> None:
        failing = RaisingMemoryReactor(listenException=CannotListenError("", 5002, "in use"))
        server = HTTPBootstrapServer(failing, "tcp:5002", lambda: None)  # type: ignore[arg-type]
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

        server = HTTPBootstrapServer(Clock(), SlowEndpoint(), lambda: None)  # type: ignore[arg-type]
        server.startService()
        waiter = server.listening_port()
        self.assertNoResult(waiter)
        self.successResultOf(server.stopService())
        self.assertEqual(cancelled, [pending])
        self.failureResultOf(waiter, CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])


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
        url = f"http://127.0.0.1:{port.getHost().port}/"
        bootstrapper = HTTPBootstrapper(url, treq=HTTPClient(Agent(reactor)), clock=reactor)
        self.assertEqual(await bootstrapper.info(), info)
        # A router on every interface: the peer is told the address it connected to.
        info = BootstrapInfo(node_id=NODE_ID, host="0.0.0.0", port=5001)
        self.assertEqual(await bootstrapper.peers(), [("127.0.0.1", 5001)])
        await server.stopService()
        stopped = True
        with self.assertRaises(BootstrapHTTPError):
            await bootstrapper.info()


# --- Bootstrapping -----------------------------------------------------------------------------


class BootstrappingTests(SynchronousTestCase):
    def make(
        self,
        peers: list[Any],
        joins: list[Any],
        random_source: Callable[[], float] = lambda: 0.0,
        **kwargs: Any,
    ) -> tuple[Bootstrapping, ScriptedBootstrapper, ScriptedJoin]:
        self.clock = Clock()
        bootstrapper = ScriptedBootstrapper(peers)
        join = ScriptedJoin(joins)
        service = Bootstrapping(
            self.clock, bootstrapper, join, random_source=random_source, **kwargs
        )
        self.addCleanup(service.stopService)
        return service, bootstrapper, join

    def pending_delays(self) -> list[float]:
        return [call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls()]

    def test_joins_at_start(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [FOUND])
        joined = service.when_joined()
        self.assertNoResult(joined)
        self.assertFalse(service.joined)
        service.startService()
        self.assertTrue(service.joined)
        self.successResultOf(joined)
        self.successResultOf(service.when_joined())
        self.assertEqual(join.calls, [PEERS])
        self.assertEqual(service.consecutive_failures, 0)

    def test_single_node_cluster_is_joined(self) -> None:
        service, _, join = self.make([[("10.0.0.1", 5001)]], [ALONE])
        service.startService()
        self.assertTrue(service.joined)
        self.assertEqual(self.pending_delays(), [300.0])

    def test_duplicate_candidates_removed(self) -> None:
        service, _, join = self.make([PEERS + PEERS[:1]], [FOUND])
        service.startService()
        self.assertEqual(join.calls, [PEERS])

    def test_nobody_found_backs_off_exponentially(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [NOBODY], max_backoff=5.0)
        service.startService()
        delays = []
        for _ in range(7):
            (delay,) = self.pending_delays()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
        self.assertEqual(bootstrapper.calls, 8)
        self.assertEqual(len(join.calls), 8)
        self.assertFalse(service.joined)
        self.assertEqual(service.consecutive_failures, 8)

    def test_jitter(self) -> None:
        values = itertools.cycle([1.0, 0.5, 0.0])
        service, _, _ = self.make([PEERS], [NOBODY], random_source=lambda: next(values))
        service.startService()
        delays = []
        for _ in range(3):
            (delay,) = self.pending_delays()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [0.5 * (1 - JITTER), 1.0 * (1 - JITTER / 2), 2.0])

    def test_backoff_bounds(self) -> None:
        service, _, _ = self.make([PEERS], [NOBODY], random_source=lambda: 0.999)
        for failures in range(1, 200):
            delay = service.backoff(failures)
            self.assertGreater(delay, 0.0)
            self.assertLessEqual(delay, 30.0)
        self.assertAlmostEqual(service.backoff(1000), 30.0 * (1 - JITTER * 0.999))

    def test_empty_candidates_retried_without_join(self) -> None:
        service, bootstrapper, join = self.make([[], [], PEERS], [FOUND])
        with capturedLogs() as events:
            service.startService()
            self.clock.advance(0.5)
            self.assertEqual(join.calls, [])
            self.clock.advance(1.0)
        self.assertEqual(join.calls, [PEERS])
        self.assertTrue(service.joined)
        self.assertEqual(bootstrapper.calls, 3)
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 2)
        self.assertIn("no address", warned[0]["reason"])

    def test_peers_failing_is_retried(self) -> None:
        service, bootstrapper, join = self.make(
            [BootstrapDNSError("servfail"), dnsError.DNSNameError("x"), PEERS], [FOUND]
        )
        service.startService()
        self.assertFalse(service.joined)
        self.clock.advance(0.5)
        self.assertFalse(service.joined)
        self.clock.advance(1.0)
        self.assertTrue(service.joined)
        # Expected failures are warnings, not logged errors.
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpected_peers_failure_logged_with_traceback(self) -> None:
        service, _, _ = self.make([ZeroDivisionError("bug"), PEERS], [FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(0.5)
        self.assertTrue(service.joined)

    def test_join_failing_is_retried(self) -> None:
        service, _, join = self.make([PEERS], [RuntimeError("join broke"), NOBODY, FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(0.5)
        self.assertFalse(service.joined)
        self.clock.advance(1.0)
        self.assertTrue(service.joined)
        self.assertEqual(len(join.calls), 3)

    def test_join_returning_garbage_is_retried(self) -> None:
        service, _, _ = self.make([PEERS], [None, FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.clock.advance(0.5)
        self.assertTrue(service.joined)

    def test_rejoins_periodically(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [FOUND], rejoin_interval=60.0)
        service.startService()
        self.clock.advance(59.9)
        self.assertEqual(bootstrapper.calls, 1)
        self.clock.advance(0.1)
        self.assertEqual(bootstrapper.calls, 2)
        self.clock.advance(60.0)
        self.assertEqual(bootstrapper.calls, 3)
        self.assertEqual(len(join.calls), 3)

    def test_failed_rejoin_backs_off_then_resumes_interval(self) -> None:
        service, bootstrapper, join = self.make(
            [PEERS, NoCandidates("gone"), NoCandidates("gone"), PEERS],
            [FOUND],
            rejoin_interval=60.0,
        )
        service.startService()
        self.clock.advance(60.0)
        self.assertEqual(self.pending_delays(), [0.5])
        self.assertTrue(service.joined, "a failed re-join must not make the node unready")
        self.clock.advance(0.5)
        self.assertEqual(self.pending_delays(), [1.0])
        self.clock.advance(1.0)
        self.assertEqual(self.pending_delays(), [60.0])
        self.assertEqual(service.consecutive_failures, 0)
        self.assertEqual(bootstrapper.calls, 4)

    def test_backoff_restarts_after_success(self) -> None:
        service, _, _ = self.make([PEERS], [NOBODY, NOBODY, NOBODY, FOUND, NOBODY], rejoin_interval=10.0)
        service.startService()
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertTrue(service.joined)
        self.clock.advance(10.0)
        self.assertEqual(self.pending_delays(), [0.5])

    def test_one_attempt_at_a_time(self) -> None:
        slow: Deferred = Deferred()
        service, bootstrapper, join = self.make([slow, PEERS], [FOUND])
        service.startService()
        self.clock.advance(1000.0)
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        slow.callback(PEERS)
        self.assertTrue(service.joined)

    def test_bootstrap_now(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [FOUND])
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 0, "not running: nothing happens")
        service.startService()
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 2)
        self.assertEqual(self.pending_delays(), [300.0])

    def test_stop_cancels_scheduled_attempt(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [NOBODY])
        service.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000.0)
        self.assertEqual(bootstrapper.calls, 1)

    def test_stop_cancels_attempt_in_flight(self) -> None:
        cancelled = []
        joining: Deferred = Deferred(cancelled.append)
        service, bootstrapper, join = self.make([PEERS], [joining])
        joined = service.when_joined()
        service.startService()
        service.stopService()
        self.assertEqual(cancelled, [joining])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNoResult(joined)
        self.assertFalse(service.joined)

    def test_stop_then_start_again(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [NOBODY, FOUND])
        service.startService()
        service.stopService()
        service.startService()
        self.assertTrue(service.joined)
        self.assertEqual(bootstrapper.calls, 2)

    def test_when_joined_cancel(self) -> None:
        service, _, _ = self.make([PEERS], [FOUND])
        waiter = service.when_joined()
        other = service.when_joined()
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        service.startService()
        self.successResultOf(other)

    def test_invalid_settings(self) -> None:
        bootstrapper = ScriptedBootstrapper([PEERS])
        join = ScriptedJoin([FOUND])
        for settings in (
            {"min_backoff": 0.0},
            {"min_backoff": 5.0, "max_backoff": 1.0},
            {"rejoin_interval": 0.0},
        ):
            with self.assertRaises(ValueError):
                Bootstrapping(Clock(), bootstrapper, join, **settings)

    def test_failure_types_are_bootstrap_errors(self) -> None:
        service, _, _ = self.make([[]], [FOUND])
        with capturedLogs() as events:
            service.startService()
        (event,) = [e for e in events if "reason" in e]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertTrue(issubclass(NoCandidates, Exception))
        service2, _, _ = self.make([PEERS], [NOBODY])
        with capturedLogs() as events:
            service2.startService()
        (event,) = [e for e in events if "reason" in e]
        self.assertIn("none of 2 candidate", event["reason"])
        self.assertTrue(issubclass(NobodyAnswered, Exception))


# --- bootstrapper_from_config ------------------------------------------------------------------


class FromConfigTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertIsNone(bootstrapper_from_config(Clock(), FakeRouterConfig()))

    def test_static(self) -> None:
        config = FakeRouterConfig(bootstrap_kind="static", static_peers=tuple(PEERS))
        bootstrapper = bootstrapper_from_config(Clock(), config)
        self.assertIsInstance(bootstrapper, StaticBootstrapper)
        self.assertEqual(self.successResultOf(bootstrapper.peers()), PEERS)

    def test_static_hostnames_use_configured_resolver(self) -> None:
        resolver = FakeResolver({("peer.example", dns.A): [dns.Record_A("10.0.0.7")]})
        config = FakeRouterConfig(
            bootstrap_kind="static", static_peers=(("peer.example", 5001),), dns_resolver=resolver
        )
        bootstrapper = bootstrapper_from_config(Clock(), config)
        self.assertEqual(self.successResultOf(bootstrapper.peers()), [("10.0.0.7", 5001)])

    def test_dns(self) -> None:
        resolver = FakeResolver({(DOMAIN, dns.A): [dns.Record_A("10.0.0.1")]})
        config = FakeRouterConfig(
            bootstrap_kind="dns", dns_domain=DOMAIN, dns_resolver=resolver, listen_port=6001
        )
        bootstrapper = bootstrapper_from_config(Clock(), config)
        self.assertIsInstance(bootstrapper, DNSBootstrapper)
        self.assertEqual(self.successResultOf(bootstrapper.peers()), [("10.0.0.1", 6001)])

    def test_dns_system_resolver(self) -> None:
        config = FakeRouterConfig(bootstrap_kind="dns", dns_domain=DOMAIN)
        self.assertIsInstance(bootstrapper_from_config(Clock(), config), DNSBootstrapper)

    def test_http(self) -> None:
        config = FakeRouterConfig(bootstrap_kind="http", http_bootstrap_url=URL)
        self.assertIsInstance(bootstrapper_from_config(Clock(), config), HTTPBootstrapper)

    def test_missing_options(self) -> None:
        for config, flag in (
            (FakeRouterConfig(bootstrap_kind="static"), "--static-bootstrap-peers"),
            (FakeRouterConfig(bootstrap_kind="dns"), "--dns-bootstrap-domain"),
            (FakeRouterConfig(bootstrap_kind="http"), "--http-bootstrap-url"),
            (FakeRouterConfig(bootstrap_kind="dns", dns_domain=DOMAIN, listen_port=0), "port"),
            (FakeRouterConfig(bootstrap_kind="carrier-pigeon"), "unknown bootstrap kind"),
        ):
            with self.assertRaises(ValueError) as raised:
                bootstrapper_from_config(Clock(), config)
            self.assertIn(flag, str(raised.exception))

