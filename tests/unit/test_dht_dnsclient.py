"""
Tests for L{spegel.dht.dnsclient}, socket-free: the query it sends and the nameservers it reads.
L{tests.e2e.test_dht_dnsclient_real} runs it against a real DNS server.
"""

from __future__ import annotations

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.dnsclient import EDNS_PAYLOAD, _query_bytes, nameservers

NAME = "spegel-bootstrap.spegel.svc.cluster.local"


class QueryTests(SynchronousTestCase):
    def test_edns0_offered(self) -> None:
        message = dns._EDNSMessage._fromMessage(_parse_plain(_query_bytes(NAME, dns.A, 7)))
        self.assertEqual(message.maxSize, EDNS_PAYLOAD)
        self.assertEqual(message.queries[0].name.name.decode(), NAME)

    def test_nameservers(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\nnameserver bogus\noptions ndots:5\n")
        self.assertEqual(nameservers(path), [("10.96.0.10", 53), ("fd00::a", 53)])
        self.assertEqual(nameservers(path + ".missing"), [("127.0.0.1", 53)])


def _parse_plain(data: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(data)
    return message
