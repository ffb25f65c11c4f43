"""
Tests for L{spegel.dht.protocol}: requests, replies, timeouts and dropped datagrams, without
sockets.
"""

import random
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import wire
from spegel.dht.ids import Contact
from spegel.dht.metrics import DHTMetrics
from spegel.dht.protocol import AMPLIFICATION_LIMIT, VERIFYING_AT_ONCE, DHTProtocol, DHTSendError, DHTTimeout
from spegel.dht.wire import Message

PEER = ("10.0.0.2", 5001)
PEER_ID = b"p" * 32
OWN_ID = b"o" * 32

_Kind = TypeVar("_Kind")


def body_as(kind: type[_Kind], body: wire.Body) -> _Kind:
    """
    C{body}, checked to be a C{kind}: which reply comes depends on the request.
    """
    if not isinstance(body, kind):
        raise AssertionError(f"expected {kind.__name__}, got {body!r}")
    return body


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.fail_with: Exception | None = None

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.written.append((data, address))


class RecordingHandler:
    def __init__(self) -> None:
        self.seen: list[tuple[Message, tuple[str, int]]] = []
        self.reply: wire.Body = wire.Pong()
        self.explode = False

    def message_received(self, message: Message, address: tuple[str, int]) -> None:
        self.seen.append((message, address))

    def handle_request(self, message: Message, address: tuple[str, int]) -> wire.Body:
        if self.explode:
            raise RuntimeError("bug")
        return self.reply


class ProtocolTests(SynchronousTestCase):
    secret: bytes | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = RecordingHandler()
        self.transport = FakeTransport()
        self.protocol = DHTProtocol(
            OWN_ID,
            self.clock,
            self.handler,
            secret=self.secret,
            timeout=1.0,
            randbytes=random.Random(0).randbytes,
            metrics=DHTMetrics(),
        )
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]  # a fake: write() only

    def sent(self) -> tuple[Message, tuple[str, int]]:
        data, address = self.transport.written[-1]
        self.assertLessEqual(len(data), wire.MAX_DATAGRAM_SIZE)
        return wire.decode(data, self.secret), address

    def deliver(self, body: wire.Body, txid: bytes, address: tuple = PEER, sender: bytes = PEER_ID) -> None:
        self.protocol.datagramReceived(wire.encode(Message(txid, sender, body), self.secret), address)

    def test_request_reply(self) -> None:
        exchanges: list[tuple[wire.Body, wire.Body]] = [
            (wire.Ping(), wire.Pong()),
            (wire.FindNode(b"t" * 32), wire.Nodes((Contact(b"c" * 32, "10.0.0.3", 9),))),
            (wire.AddProvider(5000, (b"k" * 32,)), wire.AddProviderAck(1)),
            (wire.GetProviders(b"k" * 32), wire.Providers((), ())),
        ]
        for request, reply in exchanges:
            d = self.protocol.request(PEER, request)
            message, address = self.sent()
            self.assertEqual((message.body, address, message.sender_id), (request, PEER, OWN_ID))
            self.assertNoResult(d)
            self.deliver(reply, message.txid)
            self.assertEqual(self.successResultOf(d).body, reply)
            self.assertEqual(self.handler.seen[-1][1], PEER)
        self.assertEqual(self.protocol.pending, {})
        self.assertEqual(sum(self.protocol.dropped.values()), 0)

    def test_transaction_ids_are_random_and_distinct(self) -> None:
        for _ in range(20):
            self.protocol.request(PEER, wire.Ping())
        self.assertEqual(len({wire.decode(d, self.secret).txid for d, _ in self.transport.written}), 20)

    def test_timeout(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        self.clock.advance(0.99)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        failure = self.failureResultOf(d, DHTTimeout)
        self.assertEqual(failure.value.address, PEER)
        self.assertEqual(self.protocol.pending, {})
        # A reply arriving after the timeout is unsolicited.
        self.deliver(wire.Pong(), self.sent()[0].txid)
        self.assertEqual(self.protocol.dropped["unsolicited"], 1)

    def test_per_request_timeout(self) -> None:
        d = self.protocol.request(PEER, wire.Ping(), timeout=0.1)
        self.clock.advance(0.1)
        self.failureResultOf(d, DHTTimeout)

    def test_cancel(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.protocol.pending, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reply_from_other_address_dropped(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        txid = self.sent()[0].txid
        self.deliver(wire.Pong(), txid, address=("10.0.0.66", 5001))
        self.deliver(wire.Pong(), txid, address=("10.0.0.2", 5002))
        self.assertNoResult(d)
        self.assertEqual(self.protocol.dropped["wrong_address"], 2)
        self.deliver(wire.Pong(), txid)
        self.successResultOf(d)

    def test_reply_of_wrong_kind_dropped(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        self.deliver(wire.Nodes(()), self.sent()[0].txid)
        self.assertNoResult(d)
        self.assertEqual(self.protocol.dropped["unexpected_kind"], 1)

    def test_ipv4_mapped_reply_accepted(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        self.deliver(wire.Pong(), self.sent()[0].txid, address=("::ffff:10.0.0.2", 5001, 0, 0))
        self.successResultOf(d)

    def test_answers_requests(self) -> None:
        self.handler.reply = wire.Nodes((Contact(b"c" * 32, "10.0.0.3", 9),))
        self.deliver(wire.FindNode(b"t" * 32), b"12345678")
        message, address = self.sent()
        self.assertEqual(
            (message.txid, message.sender_id, message.body, address),
            (b"12345678", OWN_ID, self.handler.reply, PEER),
        )
        self.assertEqual(self.handler.seen[0][0].body, wire.FindNode(b"t" * 32))

    def verify(self, address: tuple[str, int] = PEER) -> None:
        """Have C{address} answer a request of ours: it is then known to receive what we send."""
        d = self.protocol.request(address, wire.Ping())
        self.deliver(wire.Pong(), self.sent()[0].txid, address=address)
        self.successResultOf(d)

    def test_unverified_source_gets_a_small_reply_and_a_ping(self) -> None:
        """
        A request from an address never seen to answer (its source may be forged) gets a reply
        at most AMPLIFICATION_LIMIT times its size, and the address is pinged; once it answers,
        its requests get full replies.
        """
        contacts = tuple(Contact(bytes([i]) * 32, "10.0.1.1", 5001) for i in range(20))
        self.handler.reply = wire.Nodes(contacts)
        request = wire.encode(Message(b"12345678", PEER_ID, wire.FindNode(b"k" * 32)), self.secret)
        self.protocol.datagramReceived(request, PEER)
        (ping, ping_to), (reply, reply_to) = self.transport.written
        self.assertEqual((wire.decode(ping, self.secret).body, ping_to), (wire.Ping(), PEER))
        self.assertLessEqual(len(reply), AMPLIFICATION_LIMIT * len(request))
        trimmed = body_as(wire.Nodes, wire.decode(reply, self.secret).body).contacts
        self.assertGreater(len(trimmed), 0)
        self.assertLess(len(trimmed), 20)
        # A second request before the pong is answered: small again, and no second ping.
        self.protocol.datagramReceived(request, PEER)
        self.assertEqual(len(self.transport.written), 3)
        self.deliver(wire.Pong(), wire.decode(ping, self.secret).txid)
        self.protocol.datagramReceived(request, PEER)
        self.assertEqual(len(body_as(wire.Nodes, self.sent()[0].body).contacts), 20)

    def test_forged_sources_cost_bounded_pings(self) -> None:
        """
        A flood from many forged sources: one small reply each, and never more than
        VERIFYING_AT_ONCE verification pings in flight.
        """
        self.handler.reply = wire.Nodes(tuple(Contact(bytes([i]) * 32, "10.0.1.1", 5001) for i in range(20)))
        request = wire.encode(Message(b"12345678", PEER_ID, wire.FindNode(b"k" * 32)), self.secret)
        sent = 0
        for i in range(VERIFYING_AT_ONCE * 3):
            self.protocol.datagramReceived(request, (f"10.9.{i // 256}.{i % 256}", 5001))
        for data, _ in self.transport.written:
            message = wire.decode(data, self.secret)
            if message.body == wire.Ping():
                sent += 1
            else:
                self.assertLessEqual(len(data), AMPLIFICATION_LIMIT * len(request))
        self.assertEqual(sent, VERIFYING_AT_ONCE)
        # Unanswered pings time out and make room again.
        self.clock.advance(1)
        self.assertEqual(len(self.protocol.pending), 0)

    def test_large_replies_trimmed_to_fit(self) -> None:
        self.verify()
        contacts = tuple(Contact(bytes([i]) * 32, "2001:db8::1", 9) for i in range(32))
        providers = tuple(wire.Provider(bytes([i]) * 32, "2001:db8::2", 5000) for i in range(10))
        self.handler.reply = wire.Providers(providers, contacts)
        self.deliver(wire.GetProviders(b"k" * 32), b"12345678")
        body = body_as(wire.Providers, self.sent()[0].body)
        self.assertEqual(body.providers, providers)
        self.assertLess(len(body.contacts), 32)
        self.handler.reply = wire.Nodes(contacts)
        self.deliver(wire.FindNode(b"k" * 32), b"12345678")
        self.assertGreaterEqual(len(body_as(wire.Nodes, self.sent()[0].body).contacts), 20)

    def test_handler_error_is_contained(self) -> None:
        self.handler.explode = True
        self.deliver(wire.Ping(), b"12345678")
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.protocol.dropped["handler_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_send_failure(self) -> None:
        self.transport.fail_with = OSError("network unreachable")
        self.failureResultOf(self.protocol.request(PEER, wire.Ping()), DHTSendError)
        self.assertEqual(self.protocol.pending, {})
        # A failing reply is logged, not raised.
        self.deliver(wire.Ping(), b"12345678")

    def test_bad_address(self) -> None:
        self.transport.fail_with = ValueError("not an IP")
        self.failureResultOf(self.protocol.request(("no such host", 1), wire.Ping()), DHTSendError)

    def test_stop_fails_pending(self) -> None:
        d = self.protocol.request(PEER, wire.Ping())
        self.protocol.doStop()
        self.failureResultOf(d, DHTSendError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformed_dropped(self) -> None:
        self.protocol.datagramReceived(b"\xc1garbage", PEER)
        self.protocol.datagramReceived(b"x" * 1500, PEER)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.handler.seen, [])
        self.assertEqual(sum(self.protocol.dropped.values()), 2)
        self.assertIn("oversized", self.protocol.dropped)


class SecretProtocolTests(ProtocolTests):
    secret = b"cluster secret"

    def test_unsigned_dropped(self) -> None:
        unsigned = wire.encode(Message(b"12345678", PEER_ID, wire.Ping()))
        self.protocol.datagramReceived(unsigned, PEER)
        forged = wire.encode(Message(b"12345678", PEER_ID, wire.Ping()), b"guess")
        self.protocol.datagramReceived(forged, PEER)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.protocol.dropped["bad_mac"], 2)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=1300), st.sampled_from([None, b"key"]))
    def test_fuzzed_datagrams_are_counted_never_raised(self, data: bytes, secret: bytes | None) -> None:
        protocol = DHTProtocol(OWN_ID, Clock(), RecordingHandler(), secret=secret, metrics=DHTMetrics())
        protocol.makeConnection(FakeTransport())  # type: ignore[arg-type]  # a fake: write() only
        protocol.datagramReceived(data, PEER)
        # Every datagram is either dropped with a reason or accepted as a request.
        self.assertEqual(sum(protocol.dropped.values()) + sum(protocol.received.values()), 1)
        self.assertNotIn("internal_error", protocol.dropped)
