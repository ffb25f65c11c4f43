# -*- test-case-name: tests.unit.test_dht_bootstrap_service -*-
"""
L{Bootstrapping}: the service that keeps a node joined, calling a bootstrapper
(L{spegel.dht.bootstrap_sources}) and the node's C{join} with backoff until the join works,
and again every C{rejoin_interval}.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from attrs import frozen
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import error as netError
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.names import error as dnsError
from twisted.python.failure import Failure

from spegel.dht.bootstrap_sources import (
    Address,
    Bootstrapper,
    BootstrapError,
    NoCandidates,
    NobodyAnswered,
    _unique,
)

_log = Logger()

_EXPECTED_FAILURES = (
    BootstrapError,
    dnsError.DomainError,
    dnsError.AuthoritativeDomainError,
    dnsError.DNSQueryTimeoutError,
    DeferredTimeoutError,
    netError.ConnectError,
    netError.ConnectionLost,
    netError.TimeoutError,
)


# --- the service that keeps the node joined ----------------------------------------------------


@frozen
class JoinResult:
    """
    What the node's join reports.

    @ivar peers_found: routing table size after the join (other nodes only).
    @ivar only_self: every address that answered was this node itself: a single-node cluster.
    """

    peers_found: int
    only_self: bool


JITTER = 0.5
"""A retry waits between (1 - JITTER) and 1 times its backoff: nodes that failed together
(a DNS outage, a whole cluster starting) spread their retries instead of retrying in step."""


class Bootstrapping(Service):
    """
    Joins the cluster at start, retrying until it works, and re-joins periodically.

    While a join finds nobody (no candidates, C{peers()} or C{join} failing, nobody answering)
    the next attempt waits C{min_backoff}, then twice as long each time up to C{max_backoff},
    each wait shortened by up to L{JITTER} of itself using C{random_source}. Once joined, it
    bootstraps again every C{rejoin_interval}; a failed re-join goes back to the backoff.
    One attempt runs at a time.

    Failures are logged, never raised: L{BootstrapError}s and network/DNS errors as warnings,
    anything else (a bug) with its traceback.

    @ivar joined: True once a join found at least one other node, or was answered only by
        this node (a single-node cluster). It stays True when a later re-join fails: the
        routing table still holds what it held, and readiness should not flap with DNS.
    """

    def __init__(
        self,
        clock: IReactorTime,
        bootstrapper: Bootstrapper,
        join: Callable[[list[Address]], Deferred[JoinResult]],
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        rejoin_interval: float = 300.0,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(
                f"backoff must satisfy 0 < min_backoff <= max_backoff,"
                f" got {min_backoff!r} and {max_backoff!r}"
            )
        if not rejoin_interval > 0:
            raise ValueError(f"rejoin_interval must be positive, got {rejoin_interval!r}")
        self._clock = clock
        self._bootstrapper = bootstrapper
        self._join = join
        # Twisted's policy doubles and caps (and bounds the exponent); its jitter is added to
        # the delay, ours shortens it (below), so that none waits longer than max_backoff.
        self._backoff = backoffPolicy(min_backoff, max_backoff, factor=2, jitter=lambda: 0.0)
        self._rejoin_interval = rejoin_interval
        self._random = random_source
        self.joined = False
        self.consecutive_failures = 0
        self._next_attempt: IDelayedCall | None = None
        self._in_flight: Deferred[JoinResult] | None = None
        self._waiters: list[Deferred[None]] = []

    def when_joined(self) -> Deferred[None]:
        """Fires once L{joined} is True (at once if it already is)."""
        if self.joined:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._attempt()

    def stopService(self) -> None:
        super().stopService()
        if self._next_attempt is not None:
            self._next_attempt.cancel()
            self._next_attempt = None
        if self._in_flight is not None:
            # The attempt's own errback sees the service stopped and schedules nothing.
            self._in_flight.cancel()

    def bootstrap_now(self) -> None:
        """
        Bootstrap at once instead of at the next scheduled time, e.g. when the node's routing
        table has just emptied. Does nothing while an attempt is running or when stopped.
        """
        if not self.running or self._in_flight is not None:
            return
        if self._next_attempt is not None:
            self._next_attempt.cancel()
            self._next_attempt = None
        self._attempt()

    def backoff(self, failures: int) -> float:
        """The wait after C{failures} consecutive failed attempts (C{failures} >= 1)."""
        return self._backoff(failures - 1) * (1 - JITTER * self._random())

    def _attempt(self) -> None:
        self._next_attempt = None
        attempt = Deferred.fromCoroutine(self._bootstrap_once())
        self._in_flight = attempt
        attempt.addCallbacks(self._succeeded, self._failed)
        attempt.addErrback(lambda failure: _log.failure("Bootstrap scheduling failed", failure))

    async def _bootstrap_once(self) -> JoinResult:
        candidates = _unique(await self._bootstrapper.peers())
        if not candidates:
            raise NoCandidates("the bootstrap source returned no address")
        result = await self._join(candidates)
        if result.peers_found < 1 and not result.only_self:
            raise NobodyAnswered(f"none of {len(candidates)} candidate peers answered")
        return result

    def _succeeded(self, result: JoinResult) -> None:
        self._in_flight = None
        self.consecutive_failures = 0
        if not self.joined:
            self.joined = True
            _log.info(
                "Joined the cluster: {peers} peers{alone}",
                peers=result.peers_found,
                alone=" (only this node answered: a single-node cluster)"
                if result.only_self
                else "",
            )
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._schedule(self._rejoin_interval)

    def _failed(self, failure: Failure) -> None:
        self._in_flight = None
        if not self.running:
            # Cancelled by stopService, or finished after it: nothing to report or retry.
            return
        self.consecutive_failures += 1
        delay = self.backoff(self.consecutive_failures)
        if failure.check(*_EXPECTED_FAILURES):
            _log.warn(
                "Bootstrap attempt {n} failed: {reason}; retrying in {delay:.2f}s",
                n=self.consecutive_failures,
                reason=failure.getErrorMessage() or type(failure.value).__name__,
                delay=delay,
            )
        else:
            _log.failure(
                "Bootstrap attempt {n} failed; retrying in {delay:.2f}s",
                failure,
                n=self.consecutive_failures,
                delay=delay,
            )
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._next_attempt = self._clock.callLater(delay, self._attempt)


