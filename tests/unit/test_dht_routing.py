"""
Tests for L{spegel.dht.routing}.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.ids import Contact, common_prefix_bits, distance
from spegel.dht.routing import RoutingTable

OWN = bytes(32)


def in_bucket(index: int, n: int) -> Contact:
    """
    The C{n}th contact of bucket C{index} of a table owned by C{OWN}.
    """
    value = (1 << (255 - index)) | n
    return Contact(value.to_bytes(32, "big"), f"10.{index}.{n // 256}.{n % 256}", 1000 + n)


class RoutingTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sizes: list[int] = []
        self.table = RoutingTable(OWN, 3, self.clock.seconds, on_size_change=self.sizes.append)

    def test_observe_adds_and_ignores_self(self) -> None:
        self.assertIsNone(self.table.observe(Contact(OWN, "10.0.0.1", 1)))
        self.assertEqual(len(self.table), 0)
        c = in_bucket(5, 1)
        self.assertIsNone(self.table.observe(c))
        self.assertEqual(len(self.table), 1)
        self.assertIn(c.node_id, self.table)
        self.assertEqual(self.table.bucket_index(c.node_id), 5)
        self.assertEqual(self.sizes, [1])

    def test_observe_moves_to_tail_and_updates_address(self) -> None:
        a, b = in_bucket(0, 1), in_bucket(0, 2)
        self.table.observe(a)
        self.table.observe(b)
        moved = Contact(a.node_id, "10.9.9.9", 7)
        self.table.observe(moved)
        self.assertEqual(self.table.bucket(0), [b, moved])

    def test_full_bucket_pings_oldest_once(self) -> None:
        first, second, third = (in_bucket(0, i) for i in range(3))
        for c in (first, second, third):
            self.assertIsNone(self.table.observe(c))
        self.assertEqual(self.table.observe(in_bucket(0, 10)), first)
        # Only one eviction ping per bucket at a time.
        self.assertIsNone(self.table.observe(in_bucket(0, 11)))
        self.assertEqual(len(self.table), 3)

    def test_oldest_answers_keeps_its_place(self) -> None:
        contacts = [in_bucket(0, i) for i in range(3)]
        for c in contacts:
            self.table.observe(c)
        newcomer = in_bucket(0, 10)
        oldest = self.table.observe(newcomer)
        assert oldest is not None
        self.table.observe(oldest)
        self.assertNotIn(newcomer.node_id, self.table)
        self.assertEqual(self.table.bucket(0), contacts[1:] + contacts[:1])
        # The bucket can ping again for the next newcomer.
        self.assertEqual(self.table.observe(in_bucket(0, 11)), contacts[1])

    def test_oldest_silent_is_replaced_by_freshest(self) -> None:
        for i in range(3):
            self.table.observe(in_bucket(0, i))
        oldest = self.table.observe(in_bucket(0, 10))
        assert oldest is not None
        self.table.observe(in_bucket(0, 11))
        self.table.evict(oldest.node_id)
        self.assertNotIn(oldest.node_id, self.table)
        self.assertIn(in_bucket(0, 11).node_id, self.table)
        self.assertEqual(len(self.table), 3)
        self.assertEqual(sum(self.sizes), 3)

    def test_failures_evict_after_max(self) -> None:
        c = in_bucket(3, 1)
        self.table.observe(c)
        self.table.failed(c.node_id)
        self.assertIn(c.node_id, self.table)
        self.table.failed(c.node_id)
        self.assertNotIn(c.node_id, self.table)
        self.assertEqual(sum(self.sizes), 0)

    def test_answer_resets_failures(self) -> None:
        c = in_bucket(3, 1)
        self.table.observe(c)
        self.table.failed(c.node_id)
        self.table.observe(c)
        self.table.failed(c.node_id)
        self.assertIn(c.node_id, self.table)

    def test_failed_unknown_and_evict_unknown_are_harmless(self) -> None:
        self.table.failed(in_bucket(1, 1).node_id)
        self.table.evict(in_bucket(1, 1).node_id)
        self.assertEqual(len(self.table), 0)

    def test_closest(self) -> None:
        contacts = [in_bucket(i, j) for i in range(0, 40, 3) for j in range(3)]
        for c in contacts:
            self.table.observe(c)
        target = in_bucket(9, 2).node_id
        best = self.table.closest(target, 4)
        expected = sorted(contacts, key=lambda c: distance(c.node_id, target))[:4]
        self.assertEqual(best, expected)
        self.assertEqual(best[0].node_id, target)
        self.assertNotIn(target, [c.node_id for c in self.table.closest(target, 4, exclude=[target])])

    def test_closest_after_evictions_and_replacements(self) -> None:
        # Full buckets, with replacement caches, then evictions that promote replacements:
        # closest() must agree with a brute-force sort of what the table now holds.
        for i in range(3):
            for j in range(12):
                self.table.observe(in_bucket(i, j))
        for j in range(0, 12, 2):
            self.table.evict(in_bucket(1, j).node_id)
        held = list(self.table)
        self.assertNotIn(in_bucket(1, 0), held)
        for target in (in_bucket(1, 3).node_id, in_bucket(0, 7).node_id, bytes(32)):
            exclude = [held[0].node_id]
            expected = sorted(
                (c for c in held if c.node_id not in exclude),
                key=lambda c: distance(c.node_id, target),
            )[:5]
            self.assertEqual(self.table.closest(target, 5, exclude=exclude), expected)

    def test_stale_buckets(self) -> None:
        self.table.observe(in_bucket(4, 1))
        self.assertEqual(self.table.stale_buckets(60), [])
        self.clock.advance(60)
        self.assertEqual(self.table.stale_buckets(60), list(range(6)))
        self.table.touch(in_bucket(2, 9).node_id)
        self.assertEqual(self.table.stale_buckets(60), [0, 1, 3, 4, 5])
        self.assertEqual(common_prefix_bits(OWN, in_bucket(2, 9).node_id), 2)


class AddressBoundTests(SynchronousTestCase):
    """
    One IP address holds at most C{max_per_address} contacts: a flood of fresh ids from one
    sender cannot fill the table (Sybil resistance); loopback is exempt (tests, benchmarks).
    """

    def setUp(self) -> None:
        self.table = RoutingTable(OWN, 3, Clock().seconds, max_per_address=2)

    def sybil(self, index: int, n: int, host: str = "10.6.6.6") -> Contact:
        return Contact(in_bucket(index, n).node_id, host, 5001)

    def test_flood_from_one_address(self) -> None:
        for index in range(1, 20):
            for n in range(3):
                self.assertIsNone(self.table.observe(self.sybil(index, n)))
        self.assertEqual(len(self.table), 2)
        # Nor do they queue as replacements: nothing of theirs is promoted later.
        honest = [in_bucket(0, n) for n in range(10, 13)]
        for c in honest:
            self.table.observe(c)
        self.assertEqual(sum(1 for c in self.table if c.host == "10.6.6.6"), 2)
        self.assertTrue(all(c.node_id in self.table for c in honest))

    def test_room_again_after_eviction(self) -> None:
        first, second, third = (self.sybil(5, n) for n in range(3))
        self.table.observe(first)
        self.table.observe(second)
        self.table.observe(third)
        self.assertNotIn(third.node_id, self.table)
        self.table.evict(first.node_id)
        self.table.observe(third)
        self.assertIn(third.node_id, self.table)

    def test_refresh_and_move_keep_the_count(self) -> None:
        a, b = self.sybil(1, 1), self.sybil(2, 2)
        self.table.observe(a)
        self.table.observe(b)
        self.table.observe(a)
        self.assertIn(a.node_id, self.table)
        # b moves away: its old address has room for another.
        self.table.observe(Contact(b.node_id, "10.7.7.7", 5001))
        self.table.observe(self.sybil(3, 3))
        self.assertIn(self.sybil(3, 3).node_id, self.table)

    def test_loopback_is_exempt(self) -> None:
        for n in range(3):
            self.table.observe(self.sybil(n + 1, n, host="127.0.0.1"))
        self.assertEqual(len(self.table), 3)
