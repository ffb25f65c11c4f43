"""
The DHT under attack, with and without the cluster key: an attacker on the pod network (one
address, any ids it likes, any datagrams) floods honest nodes with fresh ids, reuses the ids of
honest nodes, announces fake providers of content the cluster holds, replays and sends garbage.
Honest content must stay findable, routing tables and stores bounded, and replies to the
attacker no larger than a small multiple of what it sent.

Socket-free and deterministic: 30 nodes on L{spegel_testing.dhtsim}'s in-memory network and
simulated clock.  benchmarks/dht_flood.py measures the same flood against a real node (reactor
stalls, memory).
"""

from __future__ import annotations

import random

from attrs import evolve
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import wire
from spegel.dht.ids import key_id
from spegel.dht.protocol import AMPLIFICATION_LIMIT
from spegel_testing.dhtsim import MemoryNetwork, SimulatedClock, SimulatedCluster
from spegel.dht.wire import Message
from tests.unit.test_dht_simulation import CONFIG, resolve

N = 30
ATTACKER = ("10.66.66.66", 5001)
FLOOD = 16_000
KEY = "sha256:" + "ab" * 32


class AttackerPort(DatagramProtocol):
    """The attacker's socket: counts what the honest nodes send back to it."""

    def __init__(self) -> None:
        self.received = 0
        self.datagrams = 0

    def datagramReceived(self, data: bytes, address: tuple[str, int]) -> None:
        self.received += len(data)
        self.datagrams += 1


class HostileNetworkTests(SynchronousTestCase):
    secret: bytes | None = None

    def setUp(self) -> None:
        self.rng = random.Random(99)
        self.clock = SimulatedClock()
        self.network = MemoryNetwork(self.clock, latency=lambda: self.rng.uniform(0.0005, 0.002))
        config = evolve(CONFIG, secret=self.secret)
        self.cluster = SimulatedCluster(self.network, config, rng=self.rng)
        self.cluster.start(N)
        self.clock.advance(10)
        self.holder = self.cluster.services[7]
        self.holder.provide([KEY])
        self.clock.advance(5)
        self.attacker = AttackerPort()
        self.network.reactor(ATTACKER[0]).listenUDP(ATTACKER[1], self.attacker)
        self.sent = 0

    def send(self, destination: tuple[str, int], message: Message, secret: bytes | None = None) -> None:
        data = wire.encode(message, secret)
        self.sent += len(data)
        self.network.send(ATTACKER, destination, data)

    def txid(self) -> bytes:
        return self.rng.randbytes(wire.TXID_BYTES)

    def attack(self) -> None:
        """
        Every attack at once, FLOOD datagrams in all, spread over every honest node.
        """
        nodes = [s.address for s in self.cluster.services]
        honest_ids = [s.node.node_id for s in self.cluster.services]
        target = key_id(KEY)
        for i in range(FLOOD):
            destination = nodes[i % N]
            kind = i % 5
            if kind == 0:
                # Sybil flood: a fresh id every datagram, asking for nodes near the key.
                self.send(destination, Message(self.txid(), self.rng.randbytes(32), wire.FindNode(target)))
            elif kind == 1:
                # An honest node's id from the attacker's address.
                forged = honest_ids[i % N]
                self.send(destination, Message(self.txid(), forged, wire.Ping()))
            elif kind == 2:
                # Fake providers of the content the cluster holds (the registry port of a trap).
                body = wire.AddProvider(6666, (target,) + tuple(self.rng.randbytes(32) for _ in range(31)))
                self.send(destination, Message(self.txid(), self.rng.randbytes(32), body))
            elif kind == 3:
                # The honest holder's id, announcing the key at the attacker's address.
                self.send(destination, Message(self.txid(), self.holder.node.node_id, wire.AddProvider(6666, (target,))))
            else:
                self.send(destination, Message(self.txid(), self.rng.randbytes(32), wire.GetProviders(target)))
            if i % 500 == 0:
                garbage = self.rng.randbytes(self.rng.randrange(1, 1200))
                self.sent += len(garbage)
                self.network.send(ATTACKER, destination, garbage)
            if i % 1000 == 0:
                self.clock.advance(0.05)
        self.clock.advance(5)

    def found_by_everyone(self) -> list[int]:
        """The honest nodes whose lookup of KEY does not find the holder."""
        missing = []
        for index, service in enumerate(self.cluster.services):
            if service is self.holder:
                continue
            providers = resolve(self.clock, service.find_providers(KEY, use_cache=False))
            if not any(p.node_id == self.holder.node.node_id and p.host == self.holder.address[0] for p in providers):
                missing.append(index)
        return missing

    def test_honest_content_stays_findable(self) -> None:
        self.assertEqual(self.found_by_everyone(), [])
        self.attack()
        self.assertEqual(self.found_by_everyone(), [])
        # The holder is still known at its own address by everyone who knew it.
        for service in self.cluster.services:
            contact = service.node.routing.get(self.holder.node.node_id)
            if contact is not None:
                self.assertEqual(contact.host, self.holder.address[0])

    def test_bounded(self) -> None:
        """
        Routing tables hold at most two contacts at the attacker's address, and each store at
        most two records of one key from it.
        """
        self.attack()
        target = key_id(KEY)
        for service in self.cluster.services:
            node = service.node
            self.assertLessEqual(sum(1 for c in node.routing if c.host == ATTACKER[0]), 2)
            fakes = [p for p in node.store.get(target, 1000) if p.host == ATTACKER[0]]
            self.assertLessEqual(len(fakes), 2)
            self.assertLessEqual(len(node.store), 32 * FLOOD // N)

    def test_not_an_amplifier(self) -> None:
        self.attack()
        self.assertLessEqual(self.attacker.received, AMPLIFICATION_LIMIT * self.sent)


class KeyedHostileNetworkTests(HostileNetworkTests):
    """
    With the cluster key, the attacker (who has no key) changes nothing at all and gets
    nothing back.
    """

    secret = b"k" * 32

    def test_everything_dropped(self) -> None:
        before = [len(s.node.routing) for s in self.cluster.services]
        self.attack()
        self.assertEqual(self.attacker.received, 0)
        self.assertEqual([len(s.node.routing) for s in self.cluster.services], before)
        for service in self.cluster.services:
            self.assertFalse(any(c.host == ATTACKER[0] for c in service.node.routing))
            self.assertEqual([p for p in service.node.store.get(key_id(KEY), 1000) if p.host == ATTACKER[0]], [])
        dropped = sum(s.node.protocol.dropped["bad_mac"] for s in self.cluster.services)
        self.assertGreaterEqual(dropped, FLOOD)

    def test_replayed_datagrams_from_another_address(self) -> None:
        """
        A sniffed, correctly signed datagram of the holder, replayed from the attacker's
        address: the holder's contact and records stay where they are.
        """
        victim = self.cluster.services[3]
        replay = Message(self.txid(), self.holder.node.node_id, wire.AddProvider(6666, (key_id(KEY),)))
        for _ in range(100):
            self.send(victim.address, replay, self.secret)
        self.clock.advance(5)
        contact = victim.node.routing.get(self.holder.node.node_id)
        if contact is not None:
            self.assertEqual(contact.host, self.holder.address[0])
        self.assertEqual(self.found_by_everyone(), [])


class HolderDepartureTests(SynchronousTestCase):
    """
    Content must not depend on one other node's store: in a 2-node cluster the node holding the
    records of the other's content dies; a node that joins afterwards still finds the content,
    because the holder answers lookups with itself and hands its records to the newcomer.
    """

    def test_fresh_node_finds_the_survivors_content(self) -> None:
        rng = random.Random(5)
        clock = SimulatedClock()
        network = MemoryNetwork(clock, latency=0.001)
        cluster = SimulatedCluster(network, CONFIG, rng=rng)
        cluster.start(2)
        clock.advance(5)
        holder, store = cluster.services
        holder.provide([KEY])
        clock.advance(2)
        self.assertEqual(len(store.node.store), 1, "the other node stores the holder's record")
        self.assertEqual(len(holder.node.store), 0)
        cluster.crash(store)
        clock.advance(1)
        fresh = cluster.add_node()
        clock.advance(5)
        # The join rule: the holder handed its record to the newcomer.
        self.assertEqual([p.node_id for p in fresh.node.store.get(key_id(KEY), 10)], [holder.node.node_id])
        providers = resolve(clock, fresh.find_providers(KEY, use_cache=False))
        self.assertIn((holder.node.node_id, holder.address[0]), [(p.node_id, p.host) for p in providers])
