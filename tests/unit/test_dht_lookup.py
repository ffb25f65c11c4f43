"""
Tests for L{spegel.dht.lookup}, with scripted replies instead of a network.
"""

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht import wire
from spegel.dht.ids import Contact
from spegel.dht.lookup import IterativeLookup
from spegel.dht.protocol import DHTTimeout

TARGET = bytes(32)


def node(distance: int) -> Contact:
    return Contact(distance.to_bytes(32, "big"), "10.0.0.1", distance)


class ScriptedNetwork:
    def __init__(self) -> None:
        self.asked: dict[Contact, list[Deferred[wire.Message]]] = {}
        self.cancelled: list[Contact] = []

    def query(self, contact: Contact) -> Deferred[wire.Message]:
        d: Deferred[wire.Message] = Deferred(lambda d: self.cancelled.append(contact))
        self.asked.setdefault(contact, []).append(d)
        return d

    def in_flight(self) -> list[Contact]:
        return [c for c, ds in self.asked.items() if ds and not ds[-1].called]

    def answer(self, contact: Contact, *contacts: Contact, sender: bytes | None = None) -> None:
        body = wire.Nodes(contacts)
        self.asked[contact][-1].callback(
            wire.Message(b"t" * 8, sender or contact.node_id, body)
        )

    def time_out(self, contact: Contact) -> None:
        self.asked[contact][-1].errback(DHTTimeout(wire.Kind.FIND_NODE, contact.address))


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = ScriptedNetwork()
        self.failures: list[Contact] = []
        self.lookup = IterativeLookup(
            TARGET, k=3, alpha=2, query=self.net.query, on_failure=self.failures.append
        )

    def test_converges_on_closest_with_alpha_in_flight(self) -> None:
        d = self.lookup.start([node(100), node(200), node(300)])
        self.assertEqual(self.net.in_flight(), [node(100), node(200)])
        self.net.answer(node(100), node(10), node(20))
        # Closer contacts are asked first; node(200) fell out of the k closest, so it no
        # longer holds one of the alpha slots.
        self.assertEqual(
            sorted(self.net.in_flight(), key=lambda c: c.port), [node(10), node(20), node(200)]
        )
        self.net.answer(node(10), node(1))
        self.assertEqual(self.net.in_flight()[-1], node(1))
        self.net.answer(node(200))
        self.net.answer(node(1))
        self.assertNoResult(d)
        self.net.answer(node(20))
        result = self.successResultOf(d)
        self.assertEqual(result.closest, (node(1), node(10), node(20)))
        # node(1) was found through node(100) then node(10): three hops.
        self.assertEqual(result.hops, 3)
        self.assertNotIn(node(300), self.net.asked)
        self.assertFalse(result.stopped_early)

    def test_timeout_retried_once_then_failed(self) -> None:
        d = self.lookup.start([node(1), node(2)])
        self.net.time_out(node(1))
        self.assertEqual(len(self.net.asked[node(1)]), 2)
        self.assertEqual(self.failures, [])
        self.net.time_out(node(1))
        self.assertEqual(self.failures, [node(1)])
        self.net.answer(node(2))
        self.assertEqual(self.successResultOf(d).closest, (node(2),))

    def test_identity_change_counts_as_failure(self) -> None:
        d = self.lookup.start([node(1)])
        self.net.answer(node(1), sender=b"z" * 32)
        self.assertEqual(self.failures, [node(1)])
        self.assertEqual(self.successResultOf(d).closest, ())

    def test_empty_seeds(self) -> None:
        self.assertEqual(self.successResultOf(self.lookup.start([])).closest, ())

    def test_excluded_never_asked(self) -> None:
        lookup = IterativeLookup(TARGET, 3, 2, self.net.query, exclude=frozenset({node(1).node_id}))
        d = lookup.start([node(1), node(2)])
        self.assertEqual(self.net.in_flight(), [node(2)])
        self.net.answer(node(2), node(1))
        self.successResultOf(d)

    def test_early_stop_cancels_the_rest(self) -> None:
        lookup = IterativeLookup(TARGET, 3, 2, self.net.query, on_reply=lambda c, m: True)
        d = lookup.start([node(1), node(2)])
        self.net.answer(node(1))
        result = self.successResultOf(d)
        self.assertTrue(result.stopped_early)
        self.assertEqual(self.net.cancelled, [node(2)])

    def test_cancel(self) -> None:
        d = self.lookup.start([node(1), node(2)])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.net.cancelled, [node(1), node(2)])
        self.assertEqual(self.failures, [])

    def test_callback_errors_are_contained(self) -> None:
        def explode(contact: Contact, message: wire.Message) -> bool:
            raise RuntimeError("bug")

        lookup = IterativeLookup(TARGET, 3, 2, self.net.query, on_reply=explode)
        d = lookup.start([node(1)])
        self.net.answer(node(1))
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SatisfiedLookupTests(SynchronousTestCase):
    """
    A lookup whose caller is satisfied ends once the C{beta} closest live contacts answered.
    """

    def setUp(self) -> None:
        self.net = ScriptedNetwork()
        self.enough = False
        self.lookup = IterativeLookup(
            TARGET, k=5, alpha=2, query=self.net.query, satisfied=lambda: self.enough, beta=2
        )

    def test_unsatisfied_walks_to_the_k_closest(self) -> None:
        d = self.lookup.start([node(1), node(2), node(3), node(4)])
        self.net.answer(node(1))
        self.net.answer(node(2))
        self.assertNoResult(d)
        self.assertEqual(sorted(self.net.in_flight(), key=lambda c: c.port), [node(3), node(4)])
        self.net.answer(node(3))
        self.net.answer(node(4))
        result = self.successResultOf(d)
        self.assertFalse(result.stopped_early)
        self.assertEqual(len(result.closest), 4)

    def test_satisfied_ends_once_the_beta_closest_answered(self) -> None:
        d = self.lookup.start([node(10), node(20), node(30), node(40)])
        self.enough = True
        # node(10) points at a closer node: it must be asked before the lookup may end.
        self.net.answer(node(10), node(1))
        self.assertNoResult(d)
        self.assertIn(node(1), self.net.in_flight())
        self.net.answer(node(1))
        # node(1) and node(10), the two closest, answered; node(20) is still in flight.
        result = self.successResultOf(d)
        self.assertTrue(result.stopped_early)
        self.assertEqual(result.closest, (node(1), node(10)))
        self.assertIn(node(20), self.net.cancelled)
        self.assertNotIn(node(40), self.net.asked)

    def test_failed_contacts_do_not_count_among_the_closest(self) -> None:
        d = self.lookup.start([node(1), node(2), node(3)])
        self.enough = True
        self.net.answer(node(2))
        self.net.time_out(node(1))
        self.net.time_out(node(1))
        self.assertNoResult(d)
        # node(1) failed: the two closest live contacts are node(2) and node(3).
        self.net.answer(node(3))
        self.assertTrue(self.successResultOf(d).stopped_early)

    def test_errors_in_satisfied_are_contained(self) -> None:
        def explode() -> bool:
            raise RuntimeError("bug")

        lookup = IterativeLookup(TARGET, 3, 2, self.net.query, satisfied=explode, beta=1)
        d = lookup.start([node(1), node(2)])
        self.net.answer(node(1))
        self.assertNoResult(d)
        self.net.answer(node(2))
        self.assertFalse(self.successResultOf(d).stopped_early)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
