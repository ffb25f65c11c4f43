"""
Tests for L{spegel.dht.wire}.
"""

import random

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import wire
from spegel.dht.ids import Contact, Provider
from tests.unit.test_dht_protocol import body_as

rng = random.Random(1)
TXID = rng.randbytes(8)
SENDER = rng.randbytes(32)


def contact(i: int, host: str = "10.0.0.1") -> Contact:
    return Contact(bytes([i]) * 32, host, 5001 + i)


EXAMPLES: list[wire.Body] = [
    wire.Ping(),
    wire.Pong(),
    wire.FindNode(b"t" * 32),
    wire.Nodes(tuple(contact(i) for i in range(20))),
    wire.Nodes(tuple(contact(i, "2001:db8::1") for i in range(20))),
    wire.AddProvider(5000, tuple(bytes([i]) * 32 for i in range(32))),
    wire.AddProviderAck(32),
    wire.GetProviders(b"k" * 32),
    wire.Providers((Provider(b"p" * 32, "10.1.2.3", 30020),), (contact(3),)),
]


class RoundTripTests(SynchronousTestCase):
    def test_every_message_round_trips_under_the_mtu(self) -> None:
        for secret in (None, b"cluster key"):
            for body in EXAMPLES:
                message = wire.Message(TXID, SENDER, body)
                data = wire.encode(message, secret)
                self.assertLessEqual(len(data), wire.MAX_DATAGRAM_SIZE)
                self.assertEqual(wire.decode(data, secret), message)

    def test_rotation_accepts_either_key(self) -> None:
        """
        During a key rotation a node signs with its first key and accepts both: nodes still on
        the old key and nodes already on the new one understand each other; a third key does
        not get in.
        """
        message = wire.Message(TXID, SENDER, wire.Ping())
        old, new, other = b"old cluster key!", b"new cluster key!", b"not the cluster"
        for signed_with in (old, new):
            self.assertEqual(wire.decode(wire.encode(message, signed_with), new, (old,)), message)
        e = self.assertRaises(wire.MalformedDatagram, wire.decode, wire.encode(message, other), new, (old,))
        self.assertEqual(e.reason, "bad_mac")
        self.assertRaises(wire.MalformedDatagram, wire.decode, wire.encode(message, old), new)

    def test_request_kinds(self) -> None:
        self.assertTrue(wire.Message(TXID, SENDER, wire.Ping()).is_request)
        self.assertFalse(wire.Message(TXID, SENDER, wire.Pong()).is_request)

    def test_oversized_refused(self) -> None:
        keys = tuple(bytes([i]) * 32 for i in range(40))
        self.assertRaises(
            wire.OversizedMessage, wire.encode, wire.Message(TXID, SENDER, wire.AddProvider(1, keys))
        )

    def test_fit_trims(self) -> None:
        contacts = tuple(contact(i, "2001:db8::1") for i in range(32))
        data = wire.fit(
            lambda n: wire.Message(TXID, SENDER, wire.Nodes(contacts[:n])), 32, b"secret"
        )
        decoded = body_as(wire.Nodes, wire.decode(data, b"secret").body)
        self.assertLess(len(decoded.contacts), 32)
        self.assertGreaterEqual(len(decoded.contacts), 20)

    def test_ipv4_mapped_normalized(self) -> None:
        self.assertEqual(wire.normalize_host("::ffff:10.0.0.1"), "10.0.0.1")
        self.assertEqual(wire.normalize_host("2001:DB8::1"), "2001:db8::1")


class RejectionTests(SynchronousTestCase):
    def reason(self, data: bytes, secret: bytes | None = None) -> str:
        e = self.assertRaises(wire.MalformedDatagram, wire.decode, data, secret)
        return e.reason

    def pack(self, *fields: object) -> bytes:
        return msgpack.packb(list(fields), use_bin_type=True)

    def test_garbage(self) -> None:
        self.assertEqual(self.reason(b"\xc1"), "malformed")
        self.assertEqual(self.reason(b""), "malformed")
        self.assertEqual(self.reason(self.pack(1, 2)), "malformed")

    def test_trailing_bytes(self) -> None:
        data = wire.encode(wire.Message(TXID, SENDER, wire.Ping()))
        self.assertEqual(self.reason(data + b"x"), "malformed")

    def test_oversized(self) -> None:
        self.assertEqual(self.reason(b"\x00" * 1201), "oversized")

    def test_version_and_kind(self) -> None:
        self.assertEqual(self.reason(self.pack(2, 1, TXID, SENDER, [])), "bad_version")
        self.assertEqual(self.reason(self.pack(1, 99, TXID, SENDER, [])), "unknown_kind")
        self.assertEqual(self.reason(self.pack(True, 1, TXID, SENDER, [])), "malformed")

    def test_bad_fields(self) -> None:
        bad = [
            (1, 1, b"short", SENDER, []),
            (1, 1, TXID, b"short", []),
            (1, 1, TXID, SENDER, [1]),
            (1, 1, TXID, SENDER, {}),
            (1, 3, TXID, SENDER, [b"short"]),
            (1, 4, TXID, SENDER, [[[SENDER, b"\x7f\x00\x00", 5]]]),
            (1, 4, TXID, SENDER, [[[SENDER, b"\x7f\x00\x00\x01", 0]]]),
            (1, 4, TXID, SENDER, [[[SENDER, b"\x7f\x00\x00\x01", 70000]]]),
            (1, 4, TXID, SENDER, [[[SENDER, b"\x7f\x00\x00\x01"]]]),
            (1, 5, TXID, SENDER, [5000, []]),
            (1, 5, TXID, SENDER, [5000, [b"short"]]),
            (1, 5, TXID, SENDER, [True, [SENDER]]),
            (1, 6, TXID, SENDER, [-1]),
            (1, 7, TXID, SENDER, [7]),
            (1, 8, TXID, SENDER, [[[SENDER, b"\x0a\x00\x00\x01", None]], []]),
            (1, 8, TXID, SENDER, [[], 3]),
        ]
        for fields in bad:
            self.assertEqual(self.reason(self.pack(*fields)), "bad_field", fields)

    def test_strings_refused(self) -> None:
        self.assertEqual(self.reason(self.pack(1, 1, "t" * 8, SENDER, [])), "malformed")

    def test_too_many_items(self) -> None:
        keys = [SENDER] * 65
        self.assertIn(self.reason(self.pack(1, 5, TXID, SENDER, [5000, keys])), ("malformed", "oversized"))

    def test_mac(self) -> None:
        data = wire.encode(wire.Message(TXID, SENDER, wire.Ping()), b"right")
        self.assertEqual(self.reason(data, b"wrong"), "bad_mac")
        self.assertEqual(self.reason(data[:-1] + bytes([data[-1] ^ 1]), b"right"), "bad_mac")
        self.assertEqual(self.reason(b"\x01" * 10, b"right"), "bad_mac")
        unsigned = wire.encode(wire.Message(TXID, SENDER, wire.Ping()))
        self.assertEqual(self.reason(unsigned, b"right"), "bad_mac")
        # A node without the key cannot parse the signed datagram either.
        self.assertEqual(self.reason(data), "malformed")


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=1300))
    def test_random_bytes_only_raise_malformed(self, data: bytes) -> None:
        try:
            wire.decode(data)
        except wire.MalformedDatagram:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutated_valid_datagrams_only_raise_malformed(self, data: st.DataObject) -> None:
        body = data.draw(st.sampled_from(EXAMPLES))
        encoded = bytearray(wire.encode(wire.Message(TXID, SENDER, body)))
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(encoded) - 1))
            encoded[position] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(encoded)))
        try:
            wire.decode(bytes(encoded[:cut]))
        except wire.MalformedDatagram:
            pass

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=5),
            lambda children: st.lists(children, max_size=6),
            max_leaves=30,
        )
    )
    def test_structured_garbage_only_raises_malformed(self, body: object) -> None:
        for kind in range(1, 10):
            data = msgpack.packb([1, kind, TXID, SENDER, body], use_bin_type=True)
            try:
                wire.decode(data)
            except wire.MalformedDatagram:
                pass
