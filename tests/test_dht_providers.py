"""
Tests for L{spegel.dht.providers}.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.ids import Provider
from spegel.dht.providers import ProviderStore

KEY = b"k" * 32


def provider(i: int) -> Provider:
    return Provider(bytes([i]) * 32, f"10.0.0.{i}", 5000)


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

    def test_reannounce_extends_and_updates(self) -> None:
        self.store.add(KEY, provider(1))
        self.clock.advance(90)
        moved = Provider(provider(1).node_id, "10.9.9.9", 6000)
        self.store.add(KEY, moved)
        self.assertEqual(len(self.store), 1)
        self.clock.advance(50)
        self.assertEqual(self.store.get(KEY, 10), [moved])

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
        self.store.remove_provider(provider(1).node_id)
        self.assertEqual(self.store.get(KEY, 10), [provider(2)])
        self.assertEqual(self.store.get(b"y" * 32, 10), [])
        self.assertEqual(len(self.store), 1)
