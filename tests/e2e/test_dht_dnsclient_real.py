"""
Tests for L{spegel.dht.dnsclient}: the bootstrap's DNS client against a real DNS server (the
rig's, Twisted's own server in a process of its own) on loopback, with answers of up to 500
addresses, as a headless Service of a large cluster gives.
"""

from __future__ import annotations

import ipaddress
import subprocess

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.names import error as dnsError
from twisted.trial.unittest import TestCase

from spegel.dht.bootstrap import _answer_addresses
from spegel.dht.dnsclient import BootstrapResolver
from spegel_testing.dns import DNSServer
from spegel_testing.ports import free_port

NAME = "spegel-bootstrap.spegel.svc.cluster.local"


def addresses(n: int) -> list[str]:
    return [str(ipaddress.IPv4Address("198.18.0.0") + 2 + i) for i in range(n)]


class AgainstServerTests(TestCase):
    def setUp(self) -> None:
        self.server = DNSServer(address="127.0.0.1", port=free_port(udp_too=True))
        self.addCleanup(self.server.cleanup)
        self.server.start()
        self.resolver = BootstrapResolver(reactor, servers=[("127.0.0.1", self.server.port)])

    async def resolve(self, n: int) -> list[str]:
        self.server.set_records({NAME: addresses(n)})
        answers, _, _ = await self.resolver.lookupAddress(NAME, (2,))
        return _answer_addresses(answers)

    async def test_one_datagram_then_tcp(self) -> None:
        """
        30 addresses (over 512 bytes: one EDNS0 datagram), 200 (still one), 500 (truncated:
        TCP) all come back whole.
        """
        for n in (1, 30, 200, 500):
            self.assertEqual(sorted(await self.resolve(n)), sorted(addresses(n)), n)
        # The TCP connection of the last one is closed once the answer is in, not kept: it
        # is gone well before a generous deadline (the close takes a reactor turn or two).
        deadline = reactor.seconds() + 10
        while True:
            established = subprocess.run(
                ["ss", "-tnH", "state", "established", f"( dport = :{self.server.port} )"], capture_output=True, text=True
            ).stdout
            if not established.strip() or reactor.seconds() > deadline:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(established.strip(), "")

    async def test_no_aaaa(self) -> None:
        self.server.set_records({NAME: addresses(3)})
        answers, _, _ = await self.resolver.lookupIPV6Address(NAME, (2,))
        self.assertEqual(answers, [])

    async def test_nxdomain(self) -> None:
        with self.assertRaises(dnsError.DNSNameError):
            await self.resolver.lookupAddress("other.example", (2,))

    async def test_silent_server_times_out(self) -> None:
        silent = BootstrapResolver(reactor, servers=[("127.0.0.1", free_port(udp_too=True))])
        with self.assertRaises(dnsError.DNSQueryTimeoutError):
            await silent.lookupAddress(NAME, (0.2, 0.2))

    async def test_servers_in_turn(self) -> None:
        """A dead server first (as in resolv.conf): the next one answers."""
        resolver = BootstrapResolver(reactor, servers=[("127.0.0.1", free_port(udp_too=True)), ("127.0.0.1", self.server.port)])
        self.server.set_records({NAME: addresses(2)})
        answers, _, _ = await resolver.lookupAddress(NAME, (0.3,))
        self.assertEqual(sorted(_answer_addresses(answers)), addresses(2))
