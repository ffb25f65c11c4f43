# -*- test-case-name: tests.e2e.test_dht_bootstrap_sources_real -*-
"""
Tests for L{spegel.dht.bootstrap_sources}: the static, DNS and HTTP bootstrappers and the bootstrap document.

Over loopback: the test itself starts the servers on 127.0.0.1 (the socket-free tests are
L{tests.unit.test_dht_bootstrap_sources}). The fakes are L{tests.unit.test_dht_bootstrap}'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorUDP
from twisted.names import authority, client, dns, server
from twisted.trial.unittest import TestCase

from spegel.dht.bootstrap import DNSBootstrapper
from spegel_testing.ports import port_number



class MemoryAuthority(authority.FileAuthority):
    """A zone held in memory: FileAuthority's answering logic without a zone file."""

    def loadFile(self, records: dict[bytes, list[Any]]) -> None:
        self.soa = (  # type: ignore[assignment]  # FileAuthority declares None until a zone loads
            b"cluster.test",
            dns.Record_SOA(mname=b"ns.cluster.test", rname=b"root.cluster.test", ttl=5),
        )
        self.records = records  # type: ignore[assignment]  # as soa


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
        self.port = IReactorUDP(reactor).listenUDP(
            0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1", maxPacketSize=8192
        )
        self.addCleanup(self.port.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port_number(self.port))])

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
