"""
Tests for L{spegel.dht.providers}.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.ids import Provider
from spegel.dht.providers import PER_ADDRESS_PER_KEY, ProviderStore

KEY = b"k" * 32


def provider(i: int) -> Provider:
    return Provider(bytes([i]) * 32, f"10.0.{i // 256}.{i % 256}", 5000)


class ProviderStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list[int] = []
        self.store = ProviderStore(
            self.clock.seconds, ttl=100.0, on_change=self.changes.append, random=random.Random(3)
        )

    def test_add_get_expire(self) -> None:
        self.assertTrue(self.store.add(KEY, provider(1)))
        self.assertEqual(self.store.get(KEY, 10), [provider(1)])
        self.assertEqual(self.store.get(b"x" * 32, 10), [])
        self.clock.advance(99)
        self.assertEqual(self.store.expire(), 0)
        self.clock.advance(1)
        # Expired records are never served, even before a sweep.
        self.assertEqual(self.store.get(KEY, 10), [])
        self.assertEqual(self.store.expire(), 1)
        self.assertEqual(len(self.store), 0)
        self.assertEqual(sum(self.changes), 0)

    def test_fewer_than_asked_come_in_random_order(self) -> None:
        """
        The asking mirror asks the first provider it sees first: the first to announce must
        not come first in every answer.
        """
        for i in range(1, 6):
            self.store.add(KEY, provider(i))
        firsts = [self.store.get(KEY, 10)[0] for _ in range(50)]
        self.assertEqual(set(firsts), {provider(i) for i in range(1, 6)})
        self.assertEqual(set(self.store.get(KEY, 10)), {provider(i) for i in range(1, 6)})
        self.assertEqual(len(self.store.get(KEY, 10)), 5)

    def test_reannounce_extends_and_updates(self) -> None:
        self.store.add(KEY, provider(1))
        self.clock.advance(90)
        again = Provider(provider(1).node_id, provider(1).host, 6000)
        self.store.add(KEY, again)
        self.assertEqual(len(self.store), 1)
        self.clock.advance(50)
        self.assertEqual(self.store.get(KEY, 10), [again])

    def test_same_id_from_another_address_is_another_record(self) -> None:
        """
        A datagram reusing a real node's id from another address (a copied id, or the node
        after a move) adds its own record: the real one is neither replaced nor hidden.
        """
        self.store.add(KEY, provider(1))
        forged = Provider(provider(1).node_id, "10.6.6.6", 6666)
        self.assertTrue(self.store.add(KEY, forged))
        self.assertEqual(set(self.store.get(KEY, 10)), {provider(1), forged})
        self.assertEqual(self.store.remove_provider(forged.node_id, forged.host), 1)
        self.assertEqual(self.store.get(KEY, 10), [provider(1)])

    def test_sample_when_many(self) -> None:
        for i in range(30):
            self.store.add(KEY, provider(i))
        sample = self.store.get(KEY, 5)
        self.assertEqual(len(set(sample)), 5)
        self.assertNotEqual(sample, self.store.get(KEY, 5))

    def test_capacity(self) -> None:
        store = ProviderStore(self.clock.seconds, ttl=10.0, max_records=2)
        self.assertTrue(store.add(KEY, provider(1)))
        self.assertTrue(store.add(b"y" * 32, provider(1)))
        self.assertFalse(store.add(b"z" * 32, provider(1)))
        self.assertFalse(store.add(KEY, provider(2)))
        self.assertTrue(store.add(KEY, provider(1)))  # a refresh needs no room

    def test_remove_provider(self) -> None:
        self.store.add(KEY, provider(1))
        self.store.add(KEY, provider(2))
        self.store.add(b"y" * 32, provider(1))
        self.assertEqual(self.store.remove_provider(provider(1).node_id, provider(1).host), 2)
        self.assertEqual(self.store.get(KEY, 10), [provider(2)])
        self.assertEqual(self.store.get(b"y" * 32, 10), [])
        self.assertEqual(len(self.store), 1)
        self.assertEqual(sum(self.changes), 1)
        self.assertEqual(self.store.remove_provider(provider(1).node_id, provider(1).host), 0)

    def test_one_address_cannot_crowd_out_a_key(self) -> None:
        """
        Fresh ids from one address: at most two records of one key, so the key's real
        providers are still in every answer.
        """
        self.store.add(KEY, provider(1))
        fakes = [Provider(bytes([100 + i]) * 32, "10.6.6.6", 6666) for i in range(50)]
        stored = [self.store.add(KEY, fake) for fake in fakes]
        self.assertEqual(stored.count(True), PER_ADDRESS_PER_KEY)
        for _ in range(10):
            self.assertIn(provider(1), self.store.get(KEY, 3))

    def test_per_address_bound(self) -> None:
        store = ProviderStore(self.clock.seconds, ttl=10.0, max_per_address=3)
        flood = Provider(b"f" * 32, "10.6.6.6", 6666)
        results = [store.add(bytes([i]) * 32, flood) for i in range(10)]
        self.assertEqual(results.count(True), 3)
        # Others are not affected, and room comes back when records go.
        self.assertTrue(store.add(KEY, provider(2)))
        store.remove_provider(flood.node_id, flood.host)
        self.assertTrue(store.add(b"z" * 32, flood))

    def test_removal_touches_only_the_providers_records(self) -> None:
        """
        Forgetting a provider costs O(its records): with 100,000 records of others in the store,
        removing one provider's 10 records does not visit them (the store's own key dict is
        never iterated).
        """
        for i in range(100_000):
            self.store.add(i.to_bytes(32, "big"), provider(1 + i % 200))
        gone = Provider(b"g" * 32, "10.1.1.1", 5000)
        for i in range(10):
            self.store.add(i.to_bytes(32, "big"), gone)

        class NoIteration(dict):
            def __iter__(self):  # type: ignore[no-untyped-def]
                raise AssertionError("the whole store was scanned")

            def items(self):  # type: ignore[no-untyped-def]
                raise AssertionError("the whole store was scanned")

        self.store._records = NoIteration(self.store._records)
        self.assertEqual(self.store.remove_provider(gone.node_id, gone.host), 10)
        self.assertEqual(len(self.store), 100_000)
