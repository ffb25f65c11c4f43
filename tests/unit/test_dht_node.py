"""
Tests for L{spegel.dht.node}: request handling, routing upkeep, join and announcements,
socket-free.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import wire
from spegel.dht.config import RouterConfig
from spegel.dht.ids import Contact, Provider, common_prefix_bits, distance
from spegel.dht.metrics import DHTMetrics
from spegel.dht.node import KEYS_PER_MESSAGE, KademliaNode
from spegel_testing.dhtsim import MemoryNetwork, SimulatedClock
from spegel.dht.wire import Message
from tests.unit.test_dht_protocol import FakeTransport, body_as

CONFIG = RouterConfig(k=4, alpha=2, rpc_timeout=1.0, registry_port=5000)
PEER = ("10.0.0.2", 5001)


def peer_id(i: int) -> bytes:
    return bytes([i]) * 32


class RequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.node = KademliaNode(b"\x00" * 32, self.clock, CONFIG, randbytes=random.Random(1).randbytes, metrics=DHTMetrics())
        self.transport = FakeTransport()
        self.node.protocol.makeConnection(self.transport)  # type: ignore[arg-type]  # a fake: write() only

    def ask(self, body: wire.Body, sender: bytes = peer_id(9), address: tuple[str, int] = PEER) -> wire.Body:
        self.node.protocol.datagramReceived(wire.encode(Message(b"t" * 8, sender, body)), address)
        data, to = self.transport.written[-1]
        self.assertEqual(to, address)
        return wire.decode(data).body

    def test_ping_adds_sender(self) -> None:
        self.assertEqual(self.ask(wire.Ping()), wire.Pong())
        self.assertEqual(list(self.node.routing), [Contact(peer_id(9), *PEER)])

    def test_find_node_returns_closest_but_not_the_asker(self) -> None:
        for i in range(1, 8):
            self.node.routing.observe(Contact(peer_id(i), f"10.0.1.{i}", 5001))
        body = body_as(wire.Nodes, self.ask(wire.FindNode(peer_id(3)), sender=peer_id(2)))
        ids = [c.node_id for c in body.contacts]
        self.assertEqual(ids[0], peer_id(3))
        self.assertNotIn(peer_id(2), ids)
        self.assertEqual(len(ids), CONFIG.k)

    def test_add_and_get_providers(self) -> None:
        keys = (b"a" * 32, b"b" * 32)
        self.assertEqual(self.ask(wire.AddProvider(30020, keys)), wire.AddProviderAck(2))
        body = body_as(wire.Providers, self.ask(wire.GetProviders(b"a" * 32), sender=peer_id(5), address=("10.0.0.5", 5001)))
        self.assertEqual(body.providers, (Provider(peer_id(9), PEER[0], 30020),))
        self.assertEqual([c.node_id for c in body.contacts], [peer_id(9)])
        self.assertEqual(body_as(wire.Providers, self.ask(wire.GetProviders(b"c" * 32))).providers, ())

    def test_copied_id_from_another_address_changes_nothing(self) -> None:
        """
        A datagram with a known node's id from a new address: the old address is pinged, it
        answers with that id, and the known contact and its records stay.  The new address's
        own records (it announces under the copied id) are kept apart.
        """
        key = b"a" * 32
        self.ask(wire.AddProvider(30020, (key,)))
        real = Provider(peer_id(9), PEER[0], 30020)
        self.transport.written.clear()
        attacker = ("10.6.6.6", 5001)
        self.node.protocol.datagramReceived(
            wire.encode(Message(b"f" * 8, peer_id(9), wire.AddProvider(6666, (key,)))), attacker
        )
        pings = [(wire.decode(d), to) for d, to in self.transport.written if to == PEER]
        self.assertEqual([m.body for m, _ in pings], [wire.Ping()])
        self.node.protocol.datagramReceived(wire.encode(Message(pings[0][0].txid, peer_id(9), wire.Pong())), PEER)
        self.clock.advance(CONFIG.rpc_timeout * 2)
        self.assertEqual(self.node.routing.get(peer_id(9)), Contact(peer_id(9), *PEER))
        self.assertIn(real, self.node.store.get(key, 10))
        # Lookups still get the real record, next to the copy.
        body = body_as(wire.Providers, self.ask(wire.GetProviders(key), sender=peer_id(5), address=("10.0.0.5", 5001)))
        self.assertIn(real, body.providers)

    def test_holder_answers_with_itself(self) -> None:
        key = b"h" * 32
        self.node.provides = lambda k: k == key
        body = body_as(wire.Providers, self.ask(wire.GetProviders(key), sender=peer_id(5), address=("10.0.0.5", 5001)))
        self.assertEqual(body.providers, (Provider(self.node.node_id, "0.0.0.0", CONFIG.registry_port),))
        self.assertEqual(body_as(wire.Providers, self.ask(wire.GetProviders(b"x" * 32))).providers, ())

    def test_self_record_takes_the_address_it_answered_from(self) -> None:
        """
        The asker gives a holder's record of itself the address the reply came from; a record
        with an unspecified address naming anyone else is dropped.
        """
        key = b"h" * 32
        self.node.routing.observe(Contact(peer_id(9), *PEER))
        d = self.node.find_providers(key)
        request = next(wire.decode(data) for data, to in self.transport.written if to == PEER)
        reply = Message(request.txid, peer_id(9), wire.Providers(
            (Provider(peer_id(9), "0.0.0.0", 30020), Provider(peer_id(66), "0.0.0.0", 6666)), ()
        ))
        self.node.protocol.datagramReceived(wire.encode(reply), PEER)
        self.assertEqual(self.successResultOf(d), [Provider(peer_id(9), PEER[0], 30020)])

    def test_join_rule_hands_provided_keys_to_a_new_node(self) -> None:
        """
        A node first seen answering us gets the keys we provide near its id (all of them, in
        a network this small), in ADD_PROVIDER batches.
        """
        keys = [bytes([i]) * 32 for i in range(40)]
        self.node.provided = lambda: keys
        d = self.node.ping(PEER)
        ping = wire.decode(self.transport.written[-1][0])
        self.transport.written.clear()
        self.node.protocol.datagramReceived(wire.encode(Message(ping.txid, peer_id(9), wire.Pong())), PEER)
        self.successResultOf(d)
        sent = [wire.decode(data).body for data, to in self.transport.written if to == PEER]
        self.assertEqual([type(b) for b in sent], [wire.AddProvider, wire.AddProvider])
        self.assertEqual(sorted(k for b in sent if isinstance(b, wire.AddProvider) for k in b.keys), sorted(keys))
        # Only the first time it is seen answering.
        self.transport.written.clear()
        d = self.node.ping(PEER)
        ping = wire.decode(self.transport.written[-1][0])
        self.node.protocol.datagramReceived(wire.encode(Message(ping.txid, peer_id(9), wire.Pong())), PEER)
        self.assertEqual([wire.decode(data).body for data, _ in self.transport.written[1:]], [])

    def test_peer_alive_on_ping_and_announcement(self) -> None:
        """
        A node that pings us (as one does when it joins) or announces content is up: the
        wiring hears of it (the mirror lifts its put-aside).
        """
        alive: list[tuple[str, int | None]] = []
        self.node.on_peer_alive = lambda host, port: alive.append((host, port))
        self.ask(wire.Ping())
        self.ask(wire.AddProvider(30020, (b"a" * 32,)))
        self.ask(wire.FindNode(b"a" * 32))
        self.assertEqual(alive, [(PEER[0], None), (PEER[0], 30020)])

    def test_local_records_do_not_end_the_lookup(self) -> None:
        """
        Forged records in our own store are handed out, but the network is asked anyway and
        the real provider it knows is found too.
        """
        key = b"k" * 32
        fake = Provider(peer_id(66), "10.6.6.6", 6666)
        self.node.store.add(key, fake)
        self.node.routing.observe(Contact(peer_id(9), *PEER))
        seen: list[Provider] = []
        d = self.node.find_providers(key, on_provider=seen.append)
        self.assertEqual(seen, [fake])
        request = next(wire.decode(data) for data, to in self.transport.written if to == PEER)
        self.assertEqual(request.body, wire.GetProviders(key))
        real = Provider(peer_id(9), PEER[0], 5000)
        reply = Message(request.txid, peer_id(9), wire.Providers((real,), ()))
        self.node.protocol.datagramReceived(wire.encode(reply), PEER)
        found = self.successResultOf(d)
        self.assertEqual(set(found), {fake, real})
        self.assertEqual(seen, [fake, real])

    def test_moved_node_replaces_silent_old_address(self) -> None:
        """
        The old address does not answer: the node moved (a restarted pod keeping its id). The
        contact takes the new address and the old address's records go.
        """
        key = b"a" * 32
        self.ask(wire.AddProvider(30020, (key,)))
        moved = ("10.0.0.77", 5001)
        self.ask(wire.Ping(), address=moved)
        # Until the old address is found silent, nothing changes.
        self.assertEqual(self.node.routing.get(peer_id(9)), Contact(peer_id(9), *PEER))
        self.clock.advance(CONFIG.rpc_timeout)
        self.assertEqual(self.node.routing.get(peer_id(9)), Contact(peer_id(9), *moved))
        self.assertEqual(self.node.store.get(key, 10), [])

    def test_old_address_answering_with_another_id_is_gone(self) -> None:
        self.ask(wire.Ping())
        moved = ("10.0.0.77", 5001)
        self.transport.written.clear()
        self.ask(wire.Ping(), address=moved)
        ping = next(wire.decode(d) for d, to in self.transport.written if to == PEER)
        self.node.protocol.datagramReceived(wire.encode(Message(ping.txid, peer_id(44), wire.Pong())), PEER)
        self.assertEqual(self.node.routing.get(peer_id(9)), Contact(peer_id(9), *moved))

    def full_bucket(self) -> list[Contact]:
        # Ids starting with bit 1 all go to bucket 0 of a node whose id is all zeros.
        contacts = [Contact(bytes([0x80 + i]) * 32, f"10.0.2.{i}", 5001) for i in range(CONFIG.k)]
        for c in contacts:
            self.node.routing.observe(c)
        self.transport.written.clear()
        self.ask(wire.Ping(), sender=bytes([0xF0]) * 32, address=("10.0.3.1", 5001))
        ping, to = self.transport.written[0]
        self.assertEqual(to, contacts[0].address)
        self.assertEqual(wire.decode(ping).body, wire.Ping())
        return contacts

    def test_full_bucket_keeps_live_oldest(self) -> None:
        contacts = self.full_bucket()
        txid = wire.decode(self.transport.written[0][0]).txid
        self.node.protocol.datagramReceived(
            wire.encode(Message(txid, contacts[0].node_id, wire.Pong())), contacts[0].address
        )
        self.assertIn(contacts[0].node_id, self.node.routing)
        self.assertNotIn(bytes([0xF0]) * 32, self.node.routing)

    def test_full_bucket_replaces_silent_oldest(self) -> None:
        contacts = self.full_bucket()
        self.clock.advance(CONFIG.rpc_timeout)
        self.assertNotIn(contacts[0].node_id, self.node.routing)
        self.assertIn(bytes([0xF0]) * 32, self.node.routing)

    def test_join_refreshes_buckets_beyond_the_closest_neighbour(self) -> None:
        # Our closest neighbour shares 3 bits with us (bucket 3): buckets 0, 1 and 2 are
        # further away and each gets a lookup of a random id in its range; deeper ones do not.
        neighbour = bytes([0b00010000]) + bytes(31)
        d = self.node.join([PEER])
        data, to = self.transport.written[-1]
        self.node.protocol.datagramReceived(
            wire.encode(Message(wire.decode(data).txid, neighbour, wire.Pong())), to
        )
        targets = []
        while not d.called:
            data, to = self.transport.written[-1]
            request = wire.decode(data)
            targets.append(body_as(wire.FindNode, request.body).target)
            # The neighbour knows nobody else.
            self.node.protocol.datagramReceived(
                wire.encode(Message(request.txid, neighbour, wire.Nodes(()))), to
            )
        self.assertEqual(self.successResultOf(d).peers_found, 1)
        self.assertEqual(targets[0], self.node.node_id)
        self.assertEqual(
            [common_prefix_bits(self.node.node_id, t) for t in targets[1:]], [0, 1, 2]
        )

    def test_join_alone(self) -> None:
        d = self.node.join([("10.0.0.1", 5001)])
        data, to = self.transport.written[-1]
        request = wire.decode(data)
        # The address answers with our own id: it was us.
        self.node.protocol.datagramReceived(
            wire.encode(Message(request.txid, self.node.node_id, wire.Pong())), to
        )
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.peers_found, outcome.only_self), (0, True))

    def test_join_nobody_answers(self) -> None:
        d = self.node.join([PEER])
        self.clock.advance(CONFIG.rpc_timeout)
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.peers_found, outcome.only_self), (0, False))

    def test_join_unsendable_address(self) -> None:
        self.transport.fail_with = OSError("bad address")
        outcome = self.successResultOf(self.node.join([("not-an-ip", 1)]))
        self.assertEqual(outcome.peers_found, 0)


class NetworkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rng = random.Random(5)
        self.clock = SimulatedClock()
        self.network = MemoryNetwork(self.clock, latency=0.001)
        config = RouterConfig(k=5, alpha=3, rpc_timeout=0.5)
        self.nodes = []
        for i in range(30):
            host = f"10.0.0.{i + 1}"
            node = KademliaNode(self.rng.randbytes(32), self.clock, config, randbytes=self.rng.randbytes, metrics=DHTMetrics())
            self.network.reactor(host).listenUDP(5001, node.protocol)
            self.nodes.append(node)
        for node in self.nodes[1:]:
            d = node.join([("10.0.0.1", 5001)])
            self.clock.advance(1)
            self.assertEqual(self.successResultOf(d).only_self, False)
        for node in self.nodes:
            node.refresh()
        self.clock.advance(5)

    def test_join_fills_tables(self) -> None:
        self.assertGreaterEqual(min(len(n.routing) for n in self.nodes), 5)

    def test_find_node(self) -> None:
        target = self.rng.randbytes(32)
        d = self.nodes[3].find_node(target)
        self.clock.advance(5)
        result = self.successResultOf(d)
        truth = sorted((n.node_id for n in self.nodes if n is not self.nodes[3]), key=lambda i: distance(i, target))
        self.assertEqual([c.node_id for c in result.closest], truth[:5])

    def test_announce_batches_per_destination(self) -> None:
        announcer = self.nodes[0]
        keys = [self.rng.randbytes(32) for _ in range(200)]
        before = announcer.protocol.sent["ADD_PROVIDER"]
        d = announcer.announce(keys)
        self.clock.advance(10)
        result = self.successResultOf(d)
        self.assertEqual(result.replicas, 200 * 5)
        self.assertEqual(announcer.protocol.sent["ADD_PROVIDER"] - before, result.messages)
        self.assertEqual(result.acknowledged, result.messages)
        # No destination gets more messages than its keys need.
        destinations = {n.node_id for n in self.nodes if len(n.store)}
        self.assertLessEqual(result.messages, len(destinations) + 1000 // KEYS_PER_MESSAGE)
        finder = self.nodes[17]
        for key in keys[:20]:
            found: list[Provider] = []
            lookup = finder.find_providers(key, on_provider=found.append)
            self.clock.advance(5)
            providers = self.successResultOf(lookup)
            self.assertEqual(found, providers)
            self.assertEqual([p.node_id for p in providers], [announcer.node_id])
            self.assertEqual(providers[0].host, "10.0.0.1")

    def test_find_providers_never_returns_self_and_cancels(self) -> None:
        announcer = self.nodes[4]
        key = self.rng.randbytes(32)
        announcer.announce([key])
        self.clock.advance(5)
        d = announcer.find_providers(key)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), [])
        d = self.nodes[5].find_providers(self.rng.randbytes(32))
        self.assertNotEqual(self.nodes[5].protocol.pending, {})
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.nodes[5].protocol.pending, {})

    def test_estimated_network_size(self) -> None:
        estimates = [n.estimated_network_size() for n in self.nodes]
        average = sum(estimates) / len(estimates)
        self.assertGreater(average, 10)
        self.assertLess(average, 120)


class ProviderLookupEndTests(SynchronousTestCase):
    """
    A provider lookup that found providers ends once the beta closest nodes answered; one
    that found none still asks the k closest.
    """

    def setUp(self) -> None:
        self.rng = random.Random(8)
        self.clock = SimulatedClock()
        self.network = MemoryNetwork(self.clock, latency=0.001)
        config = RouterConfig(k=12, alpha=3, beta=3, rpc_timeout=0.5)
        self.nodes = []
        for i in range(60):
            node = KademliaNode(self.rng.randbytes(32), self.clock, config, randbytes=self.rng.randbytes, metrics=DHTMetrics())
            self.network.reactor(f"10.0.1.{i + 1}").listenUDP(5001, node.protocol)
            self.nodes.append(node)
        for node in self.nodes[1:]:
            node.join([("10.0.1.1", 5001)])
            self.clock.advance(1)
        for node in self.nodes:
            node.refresh()
        self.clock.advance(5)
        self.finder = self.nodes[11]

    def lookup(self, key: bytes) -> tuple[list[Provider], list[KademliaNode]]:
        """
        Run C{finder.find_providers(key)}; return its providers and the nodes it asked,
        nearest to C{key} first.
        """
        before = {n.node_id: n.protocol.received["GET_PROVIDERS"] for n in self.nodes}
        d = self.finder.find_providers(key)
        self.clock.advance(5)
        providers = self.successResultOf(d)
        asked = [n for n in self.nodes if n.protocol.received["GET_PROVIDERS"] > before[n.node_id]]
        return providers, sorted(asked, key=lambda n: distance(n.node_id, key))

    def closest(self, key: bytes) -> list[KademliaNode]:
        others = [n for n in self.nodes if n is not self.finder]
        return sorted(others, key=lambda n: distance(n.node_id, key))

    def test_found_ends_at_the_beta_closest(self) -> None:
        announcer = self.nodes[2]
        key = self.rng.randbytes(32)
        announcer.announce([key])
        self.clock.advance(5)
        providers, asked = self.lookup(key)
        self.assertEqual([p.node_id for p in providers], [announcer.node_id])
        # The three closest answered, and the lookup ended well before the k (12) closest.
        self.assertEqual(asked[:3], self.closest(key)[:3])
        self.assertLess(len(asked), 12)

    def test_miss_asks_the_k_closest(self) -> None:
        key = self.rng.randbytes(32)
        providers, asked = self.lookup(key)
        self.assertEqual(providers, [])
        self.assertEqual(asked[:12], self.closest(key)[:12])
