# -*- test-case-name: tests.unit.test_dht_wire -*-
"""
The DHT's wire format: one msgpack array per datagram, optionally followed by an HMAC.

A datagram is C{payload} or, with a cluster key, C{payload || mac} where C{mac} is the first
16 bytes of HMAC-SHA256(key, payload) (truncation to half the hash length is allowed by
RFC 2104, and keeps room under the MTU).  The payload is::

    [version, kind, txid, sender_id, body]

C{version} is L{VERSION}; C{kind} a L{Kind}; C{txid} 8 random bytes chosen by the requester
and echoed in the reply; C{sender_id} the sender's 256-bit node id; C{body} an array whose
shape depends on C{kind} (see the message classes below).  Addresses travel as packed IP
bytes (4 or 16) plus a port.

Every field is checked (types, lengths, counts, ranges) by L{decode}, which raises
L{MalformedDatagram} with a short machine-readable C{reason} for anything unexpected: the
protocol counts the reason in a metric and drops the datagram.  L{encode} refuses to produce
a datagram over L{MAX_DATAGRAM_SIZE}; replies that could grow (contacts, providers) are
trimmed to fit by L{fit}.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from enum import IntEnum
from collections.abc import Sequence
from typing import Any, Callable, Union

import msgpack
from attrs import frozen

from spegel.dht.ids import ID_BYTES, Contact, Provider

VERSION = 1
MAX_DATAGRAM_SIZE = 1200
MAC_BYTES = 16
TXID_BYTES = 8
MAX_CONTACTS = 32
MAX_PROVIDERS = 32
MAX_KEYS = 64


class Kind(IntEnum):
    PING = 1
    PONG = 2
    FIND_NODE = 3
    NODES = 4
    ADD_PROVIDER = 5
    ADD_PROVIDER_ACK = 6
    GET_PROVIDERS = 7
    PROVIDERS = 8


REQUEST_KINDS = frozenset({Kind.PING, Kind.FIND_NODE, Kind.ADD_PROVIDER, Kind.GET_PROVIDERS})


class MalformedDatagram(ValueError):
    """
    A datagram could not be decoded; C{reason} names why (used as a metric label).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class OversizedMessage(ValueError):
    """
    A message would not fit in one datagram.
    """


@frozen
class Ping:
    kind = Kind.PING


@frozen
class Pong:
    kind = Kind.PONG


@frozen
class FindNode:
    target: bytes
    kind = Kind.FIND_NODE


@frozen
class Nodes:
    contacts: tuple[Contact, ...]
    kind = Kind.NODES


@frozen
class AddProvider:
    """
    "I provide these keys; fetch them from my IP at C{registry_port}."  Many keys per
    message: announcements are batched per destination.
    """

    registry_port: int
    keys: tuple[bytes, ...]
    kind = Kind.ADD_PROVIDER


@frozen
class AddProviderAck:
    stored: int
    kind = Kind.ADD_PROVIDER_ACK


@frozen
class GetProviders:
    key: bytes
    kind = Kind.GET_PROVIDERS


@frozen
class Providers:
    providers: tuple[Provider, ...]
    contacts: tuple[Contact, ...]
    kind = Kind.PROVIDERS


Body = Union[Ping, Pong, FindNode, Nodes, AddProvider, AddProviderAck, GetProviders, Providers]


@frozen
class Message:
    """
    One decoded datagram.
    """

    txid: bytes
    sender_id: bytes
    body: Body

    @property
    def kind(self) -> Kind:
        return self.body.kind

    @property
    def is_request(self) -> bool:
        return self.body.kind in REQUEST_KINDS


@functools.lru_cache(maxsize=4096)
def _pack_ip(host: str) -> bytes:
    return ipaddress.ip_address(host).packed


@functools.lru_cache(maxsize=4096)
def _ip_text(packed: bytes) -> str:
    return normalize_host(str(ipaddress.ip_address(packed)))


def _unpack_ip(packed: object) -> str:
    if not isinstance(packed, bytes) or len(packed) not in (4, 16):
        raise MalformedDatagram("bad_field", "ip")
    # Cached: the same few hundred addresses arrive over and over, and ipaddress is slow.
    return _ip_text(packed)


@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """
    Canonical text form of an IP literal; IPv4-mapped IPv6 addresses (from dual-stack sockets)
    become plain IPv4.

    @raise ValueError: C{host} is not an IP literal.
    """
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _body_fields(body: Body) -> list[object]:
    if isinstance(body, (Ping, Pong)):
        return []
    if isinstance(body, FindNode):
        return [body.target]
    if isinstance(body, Nodes):
        return [[_contact_fields(c) for c in body.contacts]]
    if isinstance(body, AddProvider):
        return [body.registry_port, list(body.keys)]
    if isinstance(body, AddProviderAck):
        return [body.stored]
    if isinstance(body, GetProviders):
        return [body.key]
    if isinstance(body, Providers):
        return [
            [[p.node_id, _pack_ip(p.host), p.registry_port] for p in body.providers],
            [_contact_fields(c) for c in body.contacts],
        ]
    raise TypeError(f"not a message body: {body!r}")


def _contact_fields(contact: Contact) -> list[object]:
    return [contact.node_id, _pack_ip(contact.host), contact.port]


def encode(message: Message, secret: bytes | None = None) -> bytes:
    """
    Serialize C{message}; with C{secret}, append its truncated HMAC.

    @raise OversizedMessage: the datagram would exceed L{MAX_DATAGRAM_SIZE}.
    """
    payload = msgpack.packb(
        [VERSION, int(message.kind), message.txid, message.sender_id, _body_fields(message.body)],
        use_bin_type=True,
    )
    if secret is not None:
        payload += mac(secret, payload)
    if len(payload) > MAX_DATAGRAM_SIZE:
        raise OversizedMessage(f"{message.kind.name} is {len(payload)} bytes")
    return payload


def mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_BYTES]


def fit(
    make: Callable[[int], Message], most: int, secret: bytes | None, max_size: int = MAX_DATAGRAM_SIZE
) -> bytes:
    """
    Encode C{make(n)} for the largest C{n <= most} whose datagram is at most C{max_size} bytes
    (and L{MAX_DATAGRAM_SIZE}); C{make} trims its variable-length lists to C{n} items.  The
    size grows with C{n}, so C{n} is found by bisection.
    """

    def encoded(n: int) -> bytes | None:
        try:
            data = encode(make(n), secret)
        except OversizedMessage:
            return None
        return data if len(data) <= max_size else None

    best = encoded(most)
    if best is not None:
        return best
    low, high = 0, most - 1
    while low <= high:
        middle = (low + high) // 2
        data = encoded(middle)
        if data is None:
            high = middle - 1
        else:
            best, low = data, middle + 1
    if best is None:
        raise OversizedMessage("nothing fits")
    return best


# Limits handed to msgpack so a hostile datagram cannot make it allocate much.
_UNPACK_LIMITS: dict[str, Any] = dict(
    max_bin_len=MAX_DATAGRAM_SIZE,
    max_str_len=0,
    max_array_len=MAX_KEYS,
    max_map_len=0,
    max_ext_len=0,
)


def decode(data: bytes, secret: bytes | None = None, also_accepted: Sequence[bytes] = ()) -> Message:
    """
    Parse and validate one datagram.

    @param also_accepted: keys whose HMAC is accepted beside C{secret}'s: during a key rotation
        a node signs with the new key and still accepts the old (or the other way round).
    @raise MalformedDatagram: for anything but a well-formed message of this version (and,
        with C{secret}, a valid HMAC under it or one of C{also_accepted}).
    """
    if len(data) > MAX_DATAGRAM_SIZE:
        raise MalformedDatagram("oversized", f"{len(data)} bytes")
    if secret is not None:
        if len(data) <= MAC_BYTES:
            raise MalformedDatagram("bad_mac", "too short")
        payload, tag = data[:-MAC_BYTES], data[-MAC_BYTES:]
        # Every key is tried, so the time taken does not tell which one matched.
        matched = [hmac.compare_digest(mac(key, payload), tag) for key in (secret, *also_accepted)]
        if not any(matched):
            raise MalformedDatagram("bad_mac")
    else:
        payload = data
    try:
        fields = msgpack.unpackb(payload, raw=True, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as e:  # msgpack raises a zoo of types for bad input
        raise MalformedDatagram("malformed", type(e).__name__) from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise MalformedDatagram("malformed", "envelope")
    version, kind, txid, sender_id, body = fields
    if not _is_int(version):
        raise MalformedDatagram("malformed", "version")
    if version != VERSION:
        raise MalformedDatagram("bad_version", str(version))
    if not _is_int(kind) or kind not in Kind._value2member_map_:
        raise MalformedDatagram("unknown_kind", str(kind)[:20])
    if not isinstance(txid, bytes) or len(txid) != TXID_BYTES:
        raise MalformedDatagram("bad_field", "txid")
    _check_id(sender_id, "sender_id")
    if not isinstance(body, list):
        raise MalformedDatagram("bad_field", "body")
    return Message(txid=txid, sender_id=sender_id, body=_decode_body(Kind(kind), body))


def _is_int(value: object) -> bool:
    return type(value) is int


def _check_id(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise MalformedDatagram("bad_field", name)
    return value


def _check_port(value: object, name: str) -> int:
    if not _is_int(value) or not 1 <= value <= 65535:  # type: ignore[operator]
        raise MalformedDatagram("bad_field", name)
    return value  # type: ignore[return-value]


def _arity(body: list[object], n: int, kind: Kind) -> None:
    if len(body) != n:
        raise MalformedDatagram("bad_field", f"{kind.name} arity")


def _decode_contacts(value: object) -> tuple[Contact, ...]:
    if not isinstance(value, list) or len(value) > MAX_CONTACTS:
        raise MalformedDatagram("bad_field", "contacts")
    contacts = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise MalformedDatagram("bad_field", "contact")
        node_id, ip, port = item
        contacts.append(
            Contact(_check_id(node_id, "contact id"), _unpack_ip(ip), _check_port(port, "port"))
        )
    return tuple(contacts)


def _decode_body(kind: Kind, body: list[object]) -> Body:
    if kind in (Kind.PING, Kind.PONG):
        _arity(body, 0, kind)
        return Ping() if kind is Kind.PING else Pong()
    if kind is Kind.FIND_NODE:
        _arity(body, 1, kind)
        return FindNode(_check_id(body[0], "target"))
    if kind is Kind.NODES:
        _arity(body, 1, kind)
        return Nodes(_decode_contacts(body[0]))
    if kind is Kind.ADD_PROVIDER:
        _arity(body, 2, kind)
        port = _check_port(body[0], "registry_port")
        keys = body[1]
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS:
            raise MalformedDatagram("bad_field", "keys")
        return AddProvider(port, tuple(_check_id(k, "key") for k in keys))
    if kind is Kind.ADD_PROVIDER_ACK:
        _arity(body, 1, kind)
        stored = body[0]
        if not _is_int(stored) or not 0 <= stored <= MAX_KEYS:  # type: ignore[operator]
            raise MalformedDatagram("bad_field", "stored")
        return AddProviderAck(stored)  # type: ignore[arg-type]
    if kind is Kind.GET_PROVIDERS:
        _arity(body, 1, kind)
        return GetProviders(_check_id(body[0], "key"))
    assert kind is Kind.PROVIDERS
    _arity(body, 2, kind)
    records = body[0]
    if not isinstance(records, list) or len(records) > MAX_PROVIDERS:
        raise MalformedDatagram("bad_field", "providers")
    providers = []
    for item in records:
        if not isinstance(item, list) or len(item) != 3:
            raise MalformedDatagram("bad_field", "provider")
        node_id, ip, port = item
        providers.append(
            Provider(_check_id(node_id, "provider id"), _unpack_ip(ip), _check_port(port, "port"))
        )
    return Providers(tuple(providers), _decode_contacts(body[1]))
