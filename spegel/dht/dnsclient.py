# -*- test-case-name: tests.unit.test_dht_dnsclient, tests.e2e.test_dht_dnsclient_real -*-
"""
The DNS client of DNS bootstrap, built for a headless Service with hundreds of nodes.

The answer for the bootstrap name lists every spegel pod: 16 bytes and more per address, so 29
addresses already overflow the 512 bytes of a plain DNS datagram.  Twisted's resolver sends no
EDNS0, so its queries were answered truncated and retried over TCP, on a connection it keeps
open and reuses; with a server that allows few TCP connections (dnsmasq: 20), a third of a
30-node cluster never resolved its peers.  This client:

- asks over UDP with an EDNS0 OPT record offering a 4,096-byte payload (about 250 addresses in
  one datagram), from a fresh port per query;
- falls back to TCP only when the answer comes back truncated, on a connection of its own that
  it closes once the answer is in; a retry opens a new one;
- takes the servers from resolv.conf (the pod's: the cluster DNS), tried in turn for each of the
  timeouts given, as a stub resolver does.

It offers the two lookups the bootstrap uses (C{lookupAddress}, C{lookupIPV6Address}) with the
results and errors of Twisted's resolvers, so L{spegel.dht.bootstrap} can use either.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnsError

from spegel.addresses import ip_literal

EDNS_PAYLOAD = 4096
DEFAULT_TIMEOUTS = (1, 3, 5)
_log = Logger()

Result = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


def nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """
    The C{nameserver} addresses of C{resolv_conf} (port 53), in order; C{127.0.0.1} when it
    names none or cannot be read, as the C library does.
    """
    servers = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    address = ip_literal(words[1].split("%")[0])
                    if address is not None:
                        servers.append((address, 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


def _query_bytes(name: str, record_type: int, query_id: int) -> bytes:
    message = dns._EDNSMessage(id=query_id, recDes=True, maxSize=EDNS_PAYLOAD)
    message.queries = [dns.Query(name, record_type, dns.IN)]
    data: bytes = message.toStr()
    return data


def _parse(data: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(data)
    return message


class _UDPQuery(DatagramProtocol):
    def __init__(self, server: tuple[str, int], query_id: int) -> None:
        self.server = server
        self.query_id = query_id
        self.answer: defer.Deferred[dns.Message] = defer.Deferred()

    def datagramReceived(self, data: bytes, address: Any) -> None:
        # Only the server asked, with our id, answers this query (anything else is dropped).
        if (address[0], address[1]) != self.server or self.answer.called:
            return
        try:
            message = _parse(data)
        except Exception:
            return
        if message.id == self.query_id and message.answer:
            self.answer.callback(message)


class _TCPQuery(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buffer = b""
        self.answer: defer.Deferred[dns.Message] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack("!H", len(self.data)) + self.data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) >= 2 + length and not self.answer.called:
                assert self.transport is not None
                self.transport.loseConnection()
                try:
                    self.answer.callback(_parse(self.buffer[2 : 2 + length]))
                except Exception as e:
                    self.answer.errback(dnsError.DNSFormatError(str(e)))

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answer.called:
            self.answer.errback(dnsError.DNSQueryTimeoutError("connection closed before the answer"))


class BootstrapResolver:
    """
    @param reactor: the reactor (UDP, TCP and time).
    @param servers: DNS servers to ask; those of C{resolv_conf} when not given.
    """

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]] | None = None,
        resolv_conf: str = "/etc/resolv.conf",
    ) -> None:
        self._reactor = reactor
        self._servers = list(servers) if servers is not None else None
        self._resolv_conf = resolv_conf

    def lookupAddress(self, name: str, timeout: Sequence[float] | None = None) -> defer.Deferred[Result]:
        return defer.Deferred.fromCoroutine(self._lookup(name, dns.A, timeout))

    def lookupIPV6Address(self, name: str, timeout: Sequence[float] | None = None) -> defer.Deferred[Result]:
        return defer.Deferred.fromCoroutine(self._lookup(name, dns.AAAA, timeout))

    async def _lookup(self, name: str, record_type: int, timeout: Sequence[float] | None) -> Result:
        # Read on every lookup: a pod's resolv.conf can change while it runs.
        servers = self._servers if self._servers is not None else nameservers(self._resolv_conf)
        last: Exception = dnsError.DNSQueryTimeoutError(name)
        for seconds in timeout or DEFAULT_TIMEOUTS:
            for server in servers:
                try:
                    message = await self._ask(server, name, record_type, seconds)
                except (defer.TimeoutError, OSError, dnsError.DNSQueryTimeoutError, dnsError.DNSFormatError) as e:
                    last = e
                    continue
                if message.rCode == dns.ENAME:
                    raise dnsError.DNSNameError(message)
                if message.rCode != dns.OK:
                    last = dnsError.DNSServerError(message)
                    continue
                return message.answers, message.authority, message.additional
        if isinstance(last, dnsError.DNSServerError):
            raise last
        raise dnsError.DNSQueryTimeoutError(name)

    async def _ask(self, server: tuple[str, int], name: str, record_type: int, seconds: float) -> dns.Message:
        query_id = secrets.randbelow(1 << 16)
        data = _query_bytes(name, record_type, query_id)
        protocol = _UDPQuery(server, query_id)
        version = ipaddress.ip_address(server[0]).version
        port = self._reactor.listenUDP(0, protocol, interface="::" if version == 6 else "0.0.0.0")
        try:
            port.write(data, server)
            message: dns.Message = await protocol.answer.addTimeout(seconds, self._reactor)
        finally:
            port.stopListening()
        if not message.trunc:
            return message
        # Too large for a datagram even with EDNS0: the same question over TCP, on a
        # connection of its own, closed once the answer is in.
        endpoint_type = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
        endpoint = endpoint_type(self._reactor, server[0], server[1], timeout=seconds)
        tcp = _TCPQuery(_query_bytes(name, record_type, query_id))
        connected = await connectProtocol(endpoint, tcp).addTimeout(seconds, self._reactor)
        try:
            return await tcp.answer.addTimeout(seconds, self._reactor)
        finally:
            connected.transport.loseConnection()
