# -*- test-case-name: tests.unit.test_dht_bootstrap -*-
"""
Tests for L{spegel.dht.bootstrap}: the wiring from the node's configuration, and the fakes the
tests of its parts share (L{tests.unit.test_dht_bootstrap_sources}, L{tests.unit.test_dht_bootstrap_server},
L{tests.unit.test_dht_bootstrap_service}). Socket-free.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import common, dns
from twisted.names import error as dnsError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from spegel.dht.bootstrap import (
    DNSBootstrapper,
    HTTPBootstrapper,
    JoinResult,
    StaticBootstrapper,
    bootstrapper_from_config,
    parse_host_port,
)

NODE_ID = bytes(range(32))
URL = "http://10.0.0.9:5002/"
DOMAIN = "spegel.kube-system.svc.cluster.local"


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



class ImportPathTests(SynchronousTestCase):
    def test_shared_parser(self) -> None:
        """
        spegel.dht.bootstrap keeps the names its importers use; the parser is the shared one.
        """
        from spegel import addresses

        self.assertIs(parse_host_port, addresses.parse_host_port)


# --- bootstrapper_from_config ------------------------------------------------------------------


class FromConfigTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertIsNone(bootstrapper_from_config(Clock(), FakeRouterConfig()))

    def test_static(self) -> None:
        config = FakeRouterConfig(bootstrap_kind="static", static_peers=tuple(PEERS))
        bootstrapper = bootstrapper_from_config(Clock(), config)
        assert isinstance(bootstrapper, StaticBootstrapper)
        self.assertEqual(self.successResultOf(bootstrapper.peers()), PEERS)

    def test_static_hostnames_use_configured_resolver(self) -> None:
        resolver = FakeResolver({("peer.example", dns.A): [dns.Record_A("10.0.0.7")]})
        config = FakeRouterConfig(
            bootstrap_kind="static", static_peers=(("peer.example", 5001),), dns_resolver=resolver
        )
        bootstrapper = bootstrapper_from_config(Clock(), config)
        assert bootstrapper is not None
        self.assertEqual(self.successResultOf(bootstrapper.peers()), [("10.0.0.7", 5001)])

    def test_dns(self) -> None:
        resolver = FakeResolver({(DOMAIN, dns.A): [dns.Record_A("10.0.0.1")]})
        config = FakeRouterConfig(
            bootstrap_kind="dns", dns_domain=DOMAIN, dns_resolver=resolver, listen_port=6001
        )
        bootstrapper = bootstrapper_from_config(Clock(), config)
        assert isinstance(bootstrapper, DNSBootstrapper)
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

