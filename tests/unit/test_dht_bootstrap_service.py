# -*- test-case-name: tests.unit.test_dht_bootstrap_service -*-
"""
Tests for L{spegel.dht.bootstrap_service}: the Bootstrapping service (join, backoff, re-join).

Socket-free: a L{Clock}, and scripted bootstrappers and joins (L{tests.unit.test_dht_bootstrap}'s).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.names import error as dnsError
from twisted.trial.unittest import SynchronousTestCase

from spegel.dht.bootstrap import (
    JITTER,
    BootstrapDNSError,
    Bootstrapping,
    NoCandidates,
    NobodyAnswered,
)

from tests.unit.test_dht_bootstrap import (
    ScriptedBootstrapper,
    ScriptedJoin,
    FOUND,
    NOBODY,
    ALONE,
    PEERS,
)


# --- Bootstrapping -----------------------------------------------------------------------------


class BootstrappingTests(SynchronousTestCase):
    def make(
        self,
        peers: list[Any],
        joins: list[Any],
        random_source: Callable[[], float] = lambda: 0.0,
        **kwargs: Any,
    ) -> tuple[Bootstrapping, ScriptedBootstrapper, ScriptedJoin]:
        self.clock = Clock()
        bootstrapper = ScriptedBootstrapper(peers)
        join = ScriptedJoin(joins)
        service = Bootstrapping(
            self.clock, bootstrapper, join, random_source=random_source, **kwargs
        )
        self.addCleanup(service.stopService)
        return service, bootstrapper, join

    def pending_delays(self) -> list[float]:
        return [call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls()]

    def test_joins_at_start(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [FOUND])
        joined = service.when_joined()
        self.assertNoResult(joined)
        self.assertFalse(service.joined)
        service.startService()
        self.assertTrue(service.joined)
        self.successResultOf(joined)
        self.successResultOf(service.when_joined())
        self.assertEqual(join.calls, [PEERS])
        self.assertEqual(service.consecutive_failures, 0)

    def test_single_node_cluster_is_joined(self) -> None:
        service, _, join = self.make([[("10.0.0.1", 5001)]], [ALONE])
        service.startService()
        self.assertTrue(service.joined)
        self.assertEqual(self.pending_delays(), [300.0])

    def test_duplicate_candidates_removed(self) -> None:
        service, _, join = self.make([PEERS + PEERS[:1]], [FOUND])
        service.startService()
        self.assertEqual(join.calls, [PEERS])

    def test_nobody_found_backs_off_exponentially(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [NOBODY], max_backoff=5.0)
        service.startService()
        delays = []
        for _ in range(7):
            (delay,) = self.pending_delays()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
        self.assertEqual(bootstrapper.calls, 8)
        self.assertEqual(len(join.calls), 8)
        self.assertFalse(service.joined)
        self.assertEqual(service.consecutive_failures, 8)

    def test_jitter(self) -> None:
        values = itertools.cycle([1.0, 0.5, 0.0])
        service, _, _ = self.make([PEERS], [NOBODY], random_source=lambda: next(values))
        service.startService()
        delays = []
        for _ in range(3):
            (delay,) = self.pending_delays()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [0.5 * (1 - JITTER), 1.0 * (1 - JITTER / 2), 2.0])

    def test_backoff_bounds(self) -> None:
        service, _, _ = self.make([PEERS], [NOBODY], random_source=lambda: 0.999)
        for failures in range(1, 200):
            delay = service.backoff(failures)
            self.assertGreater(delay, 0.0)
            self.assertLessEqual(delay, 30.0)
        self.assertAlmostEqual(service.backoff(1000), 30.0 * (1 - JITTER * 0.999))

    def test_empty_candidates_retried_without_join(self) -> None:
        service, bootstrapper, join = self.make([[], [], PEERS], [FOUND])
        with capturedLogs() as events:
            service.startService()
            self.clock.advance(0.5)
            self.assertEqual(join.calls, [])
            self.clock.advance(1.0)
        self.assertEqual(join.calls, [PEERS])
        self.assertTrue(service.joined)
        self.assertEqual(bootstrapper.calls, 3)
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 2)
        self.assertIn("no address", warned[0]["reason"])

    def test_peers_failing_is_retried(self) -> None:
        service, bootstrapper, join = self.make(
            [BootstrapDNSError("servfail"), dnsError.DNSNameError("x"), PEERS], [FOUND]
        )
        service.startService()
        self.assertFalse(service.joined)
        self.clock.advance(0.5)
        self.assertFalse(service.joined)
        self.clock.advance(1.0)
        self.assertTrue(service.joined)
        # Expected failures are warnings, not logged errors.
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpected_peers_failure_logged_with_traceback(self) -> None:
        service, _, _ = self.make([ZeroDivisionError("bug"), PEERS], [FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(0.5)
        self.assertTrue(service.joined)

    def test_join_failing_is_retried(self) -> None:
        service, _, join = self.make([PEERS], [RuntimeError("join broke"), NOBODY, FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(0.5)
        self.assertFalse(service.joined)
        self.clock.advance(1.0)
        self.assertTrue(service.joined)
        self.assertEqual(len(join.calls), 3)

    def test_join_returning_garbage_is_retried(self) -> None:
        service, _, _ = self.make([PEERS], [None, FOUND])
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.clock.advance(0.5)
        self.assertTrue(service.joined)

    def test_rejoins_periodically(self) -> None:
        service, bootstrapper, join = self.make([PEERS], [FOUND], rejoin_interval=60.0)
        service.startService()
        self.clock.advance(59.9)
        self.assertEqual(bootstrapper.calls, 1)
        self.clock.advance(0.1)
        self.assertEqual(bootstrapper.calls, 2)
        self.clock.advance(60.0)
        self.assertEqual(bootstrapper.calls, 3)
        self.assertEqual(len(join.calls), 3)

    def test_failed_rejoin_backs_off_then_resumes_interval(self) -> None:
        service, bootstrapper, join = self.make(
            [PEERS, NoCandidates("gone"), NoCandidates("gone"), PEERS],
            [FOUND],
            rejoin_interval=60.0,
        )
        service.startService()
        self.clock.advance(60.0)
        self.assertEqual(self.pending_delays(), [0.5])
        self.assertTrue(service.joined, "a failed re-join must not make the node unready")
        self.clock.advance(0.5)
        self.assertEqual(self.pending_delays(), [1.0])
        self.clock.advance(1.0)
        self.assertEqual(self.pending_delays(), [60.0])
        self.assertEqual(service.consecutive_failures, 0)
        self.assertEqual(bootstrapper.calls, 4)

    def test_backoff_restarts_after_success(self) -> None:
        service, _, _ = self.make([PEERS], [NOBODY, NOBODY, NOBODY, FOUND, NOBODY], rejoin_interval=10.0)
        service.startService()
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertTrue(service.joined)
        self.clock.advance(10.0)
        self.assertEqual(self.pending_delays(), [0.5])

    def test_one_attempt_at_a_time(self) -> None:
        slow: Deferred = Deferred()
        service, bootstrapper, join = self.make([slow, PEERS], [FOUND])
        service.startService()
        self.clock.advance(1000.0)
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        slow.callback(PEERS)
        self.assertTrue(service.joined)

    def test_bootstrap_now(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [FOUND])
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 0, "not running: nothing happens")
        service.startService()
        service.bootstrap_now()
        self.assertEqual(bootstrapper.calls, 2)
        self.assertEqual(self.pending_delays(), [300.0])

    def test_stop_cancels_scheduled_attempt(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [NOBODY])
        service.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000.0)
        self.assertEqual(bootstrapper.calls, 1)

    def test_stop_cancels_attempt_in_flight(self) -> None:
        cancelled: list[Deferred[Any]] = []
        joining: Deferred[Any] = Deferred(cancelled.append)
        service, bootstrapper, join = self.make([PEERS], [joining])
        joined = service.when_joined()
        service.startService()
        service.stopService()
        self.assertEqual(cancelled, [joining])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNoResult(joined)
        self.assertFalse(service.joined)

    def test_stop_then_start_again(self) -> None:
        service, bootstrapper, _ = self.make([PEERS], [NOBODY, FOUND])
        service.startService()
        service.stopService()
        service.startService()
        self.assertTrue(service.joined)
        self.assertEqual(bootstrapper.calls, 2)

    def test_when_joined_cancel(self) -> None:
        service, _, _ = self.make([PEERS], [FOUND])
        waiter = service.when_joined()
        other = service.when_joined()
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        service.startService()
        self.successResultOf(other)

    def test_invalid_settings(self) -> None:
        bootstrapper = ScriptedBootstrapper([PEERS])
        join = ScriptedJoin([FOUND])
        invalid: list[dict[str, Any]] = [
            {"min_backoff": 0.0},
            {"min_backoff": 5.0, "max_backoff": 1.0},
            {"rejoin_interval": 0.0},
        ]
        for settings in invalid:
            with self.assertRaises(ValueError):
                Bootstrapping(Clock(), bootstrapper, join, **settings)

    def test_failure_types_are_bootstrap_errors(self) -> None:
        service, _, _ = self.make([[]], [FOUND])
        with capturedLogs() as events:
            service.startService()
        (event,) = [e for e in events if "reason" in e]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertTrue(issubclass(NoCandidates, Exception))
        service2, _, _ = self.make([PEERS], [NOBODY])
        with capturedLogs() as events:
            service2.startService()
        (event,) = [e for e in events if "reason" in e]
        self.assertIn("none of 2 candidate", event["reason"])
        self.assertTrue(issubclass(NobodyAnswered, Exception))


