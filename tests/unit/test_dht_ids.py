"""
Tests for L{spegel.dht.ids}.
"""

import os
import random

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import ids


class DistanceTests(SynchronousTestCase):
    def test_xor_metric(self) -> None:
        a, b, c = (bytes([i]) * 32 for i in (1, 2, 7))
        self.assertEqual(ids.distance(a, a), 0)
        self.assertEqual(ids.distance(a, b), ids.distance(b, a))
        # Triangle inequality of the XOR metric.
        self.assertLessEqual(ids.distance(a, c), ids.distance(a, b) + ids.distance(b, c))

    def test_common_prefix_bits(self) -> None:
        zero = bytes(32)
        self.assertEqual(ids.common_prefix_bits(zero, zero), 256)
        self.assertEqual(ids.common_prefix_bits(zero, b"\x80" + bytes(31)), 0)
        self.assertEqual(ids.common_prefix_bits(zero, b"\x01" + bytes(31)), 7)
        self.assertEqual(ids.common_prefix_bits(zero, bytes(31) + b"\x01"), 255)

    def test_random_id_in_bucket(self) -> None:
        rng = random.Random(4)
        own = rng.randbytes(32)
        for index in (0, 1, 9, 100, 255):
            target = ids.random_id_in_bucket(own, index, rng.randbytes)
            self.assertEqual(ids.common_prefix_bits(own, target), index)
        self.assertRaises(ValueError, ids.random_id_in_bucket, own, 256)

    def test_key_id(self) -> None:
        self.assertEqual(
            ids.key_id("abc").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )

    def test_check_id(self) -> None:
        self.assertRaises(ids.InvalidNodeId, ids.check_id, b"short")
        self.assertRaises(ids.InvalidNodeId, ids.check_id, "x" * 32)
        self.assertEqual(ids.check_id(b"x" * 32), b"x" * 32)


class PersistenceTests(SynchronousTestCase):
    def test_no_data_dir_gives_fresh_ids(self) -> None:
        self.assertNotEqual(ids.load_or_create_node_id(None), ids.load_or_create_node_id(None))

    def test_id_survives_restart(self) -> None:
        data_dir = self.mktemp()
        first = ids.load_or_create_node_id(data_dir)
        self.assertEqual(ids.load_or_create_node_id(data_dir), first)
        self.assertEqual(
            FilePath(data_dir).child(ids.NODE_ID_FILE).getContent().strip(), first.hex().encode()
        )

    def test_corrupt_file_is_replaced(self) -> None:
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        FilePath(data_dir).child(ids.NODE_ID_FILE).setContent(b"not hex")
        node_id = ids.load_or_create_node_id(data_dir)
        self.assertEqual(len(node_id), 32)
        self.assertEqual(ids.load_or_create_node_id(data_dir), node_id)
        self.flushLoggedErrors()
