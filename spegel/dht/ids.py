# -*- test-case-name: tests.unit.test_dht_ids -*-
"""
Node ids, keys and the XOR metric of Kademlia (Maymounkov & Mazières, section 2.1).

Ids are 256-bit strings; the distance between two ids is their bitwise XOR read as an
unsigned integer.  Keys handed to the DHT are strings (``sha256:<hex>`` digests or
``registry/repo:tag``); their position in the id space is the SHA-256 of their UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Callable

from attrs import frozen
from twisted.logger import Logger

ID_BYTES = 32
ID_BITS = ID_BYTES * 8
NODE_ID_FILE = "dht-node-id"

log = Logger()


class InvalidNodeId(ValueError):
    """
    A byte string is not a 256-bit id, or a persisted id file is corrupt.
    """


def check_id(value: object) -> bytes:
    """
    Return C{value} if it is a 32-byte C{bytes} id, else raise L{InvalidNodeId}.
    """
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise InvalidNodeId(f"an id is {ID_BYTES} bytes, got {value!r:.80}")
    return value


def key_id(key: str) -> bytes:
    """
    The position of the DHT key C{key} in the id space: SHA-256 of its UTF-8 encoding.
    """
    return hashlib.sha256(key.encode("utf-8")).digest()


def random_id(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """
    A fresh random 256-bit id.
    """
    return check_id(randbytes(ID_BYTES))


def distance(a: bytes, b: bytes) -> int:
    """
    The XOR distance between two ids, as a non-negative integer.
    """
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def common_prefix_bits(a: bytes, b: bytes) -> int:
    """
    How many leading bits C{a} and C{b} share (C{ID_BITS} when they are equal).

    This is the index of the k-bucket that holds C{b} in the routing table of C{a}.
    """
    d = distance(a, b)
    return ID_BITS - d.bit_length()


def random_id_in_bucket(
    own: bytes, index: int, randbytes: Callable[[int], bytes] = secrets.token_bytes
) -> bytes:
    """
    A random id sharing exactly C{index} leading bits with C{own}: a target for refreshing
    bucket C{index}.
    """
    if not 0 <= index < ID_BITS:
        raise ValueError(f"bucket index out of range: {index}")
    own_int = int.from_bytes(own, "big")
    flip = 1 << (ID_BITS - 1 - index)
    low_mask = flip - 1
    random_low = int.from_bytes(randbytes(ID_BYTES), "big") & low_mask
    high = (own_int ^ flip) & ~low_mask & ((1 << ID_BITS) - 1)
    return (high | random_low).to_bytes(ID_BYTES, "big")


def load_or_create_node_id(
    data_dir: str | None, randbytes: Callable[[int], bytes] = secrets.token_bytes
) -> bytes:
    """
    The node's id: read from C{data_dir} when a valid one is stored there, otherwise freshly
    drawn and (with a C{data_dir}) persisted, so a restarted node keeps its identity and
    peers' routing tables stay valid.

    Runs once at start-up, before the reactor runs, hence plain blocking file I/O.
    """
    if data_dir is None:
        return random_id(randbytes)
    path = os.path.join(data_dir, NODE_ID_FILE)
    try:
        with open(path, "r", encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        pass
    else:
        try:
            return check_id(bytes.fromhex(text))
        except (ValueError, InvalidNodeId):
            log.warn("Ignoring corrupt node id file {path}; drawing a new id", path=path)
    node_id = random_id(randbytes)
    os.makedirs(data_dir, exist_ok=True)
    # Write-then-rename so a crash never leaves a half-written id behind.
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(node_id.hex() + "\n")
    os.replace(temporary, path)
    return node_id


@frozen
class Contact:
    """
    A node as seen in the routing table: its id and its router (UDP) address.
    """

    node_id: bytes
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@frozen
class Provider:
    """
    A node that holds a key: its id, the IP its datagrams came from and its registry port.
    """

    node_id: bytes
    host: str
    registry_port: int
