# -*- test-case-name: tests.unit.test_mirror -*-
"""
The hedged race: one peer asked at once, another when the first is slower than observed latency
says it should be (L{spegel.selection.LatencyTracker}); the first good answer wins and every other
attempt is cancelled.

The race has real states, so it is an automat machine (L{HedgedRace}); what it does in each is in
L{_Race}.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol as TypingProtocol

from attrs import define, field
from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.dht.ids import Provider
from spegel.peerresponse import CONNECT, STATUS, PeerFailed, PeerResponse, deferred, describe, discard, starting
from spegel.selection import Budget, PeerClient, ProviderQueue, busy_delay, cancel_then_pass, deferral_delay
from spegel.uploads import ALTERNATIVES_HEADER

_log = Logger()


class _RaceInputs(TypingProtocol):
    """
    What happens to a L{HedgedRace}; each moves it between its states (see L{HedgedRace}).
    """

    def want(self) -> None:
        "Another provider is wanted: at the start, when the hedge is due, or after a loss."

    def provider_came(self, provider: Provider) -> None:
        "The queue named the provider wanted."

    def ran_out(self) -> None:
        "The queue has no provider left: the lookup ended."

    def overdue(self) -> None:
        "The provider wanted did not come within the resolve timeout."

    def attempt_lost(self) -> None:
        "An attempt failed, or answered with something other than what was asked."

    def won(self, winner: PeerResponse) -> None:
        "An attempt answered well."

    def give_up(self) -> None:
        "No attempt is in flight, and none may be made."


@define(eq=False)
class _Race:
    """
    What a L{HedgedRace} knows and does; the machine built below decides when.
    """

    peers: PeerClient
    providers: ProviderQueue
    method: str
    path: str
    headers: dict[str, str]
    budget: Budget
    resolve_timeout: float
    acceptable: Callable[[Any], bool]
    jitter: Callable[[], float] = random.random
    pending: dict[Deferred[Any], Provider] = field(factory=dict)
    wanted: Deferred[Provider | None] | None = None
    hedge: IDelayedCall | None = None
    # Set with the result: attempts failing after it were cancelled, not the peers' fault.
    settled: bool = False
    result: Deferred[PeerResponse | None] = field(factory=Deferred)
    # The result was cancelled (the client left): it fails with CancelledError, not None.
    abandoned: bool = False

    def ask_queue(self, inputs: _RaceInputs) -> None:
        wanted = self.wanted = self.providers.next()
        if not wanted.called:
            timer = self.peers.clock.callLater(self.resolve_timeout, self._overdue, inputs, wanted)
            wanted.addBoth(cancel_then_pass, timer)

        def came(provider: Provider | None) -> None:
            self.wanted = None
            if provider is None:
                inputs.ran_out()
            else:
                inputs.provider_came(provider)

        wanted.addCallbacks(came, lambda failure: failure.trap(CancelledError))

    def _overdue(self, inputs: _RaceInputs, wanted: Deferred[Provider | None]) -> None:
        # A busy peer coming back later than the resolve timeout is waited for: it has the blob.
        if self.wanted is wanted and not self.providers.requeued:
            inputs.overdue()

    def attempt(self, inputs: _RaceInputs, provider: Provider) -> None:
        self.budget.left -= 1
        clock = self.peers.clock
        asked_at = clock.seconds()
        headers = {**self.headers, ALTERNATIVES_HEADER: str(self.providers.alternatives(provider))}
        attempt = self.peers.ask(provider, self.method, self.path, headers)
        self.pending[attempt] = provider
        if self.hedge is not None and self.hedge.active():
            self.hedge.cancel()
        if self.budget.left > 0:
            self.hedge = clock.callLater(self.peers.latency.hedge_delay(), inputs.want)

        def answered(response: Any) -> None:
            self.pending.pop(attempt, None)
            self.peers.latency.observe(clock.seconds() - asked_at)
            if response.code in (200, 206) and self.acceptable(response):
                inputs.won(PeerResponse(provider, response))
                return
            discard(response)
            if response.code == 429 and not self.settled:
                # It served its share: the others first, this one after them.
                if deferred(response) and self.providers.defer(provider, deferral_delay(self.jitter)):
                    self.budget.left += 1
                else:
                    self._busy(provider, response)
                inputs.attempt_lost()
                return
            if response.code in (404, 416):
                # A stale record, or a range it cannot serve: no reason to distrust the peer.
                self.peers.metrics.peer_failures_total.labels(STATUS).inc()
            else:
                self.peers.failed(provider, STATUS)
            inputs.attempt_lost()

        def failed(failure: Failure) -> None:
            self.pending.pop(attempt, None)
            # A cancelled attempt fails with CancelledError, ConnectingCancelledError or
            # ResponseNeverReceived([CancelledError]): none of them is the peer's fault, unless
            # it was cancelled because the peer sent no headers in time (a PeerFailed).
            if self.settled:
                return
            if failure.check(PeerFailed):
                _log.info("peer {peer} {e}", peer=describe(provider), e=failure.value)
                self.peers.failed(provider, failure.value.reason)  # type: ignore[union-attr]
            elif failure.check(CancelledError):
                return
            else:
                _log.info("peer {peer} failed: {e}", peer=describe(provider), e=failure.value)
                self.peers.failed(provider, CONNECT)
            inputs.attempt_lost()

        attempt.addCallbacks(answered, failed)

    def _busy(self, provider: Provider, response: Any) -> None:
        """
        C{provider} is serving as many peers as it allows (429): not a failure, so not put aside
        and not charged to the retry budget; it is offered again after its Retry-After (capped,
        jittered), and meanwhile the queue offers less loaded holders first.
        """
        delay = busy_delay(response, self.jitter)
        self.peers.busy(provider, delay)
        if self.providers.requeue(provider, delay, starting(response)):
            self.budget.left += 1
        else:
            _log.info("peer {peer} stayed busy: asking no more", peer=describe(provider))

    def next_step(self, inputs: _RaceInputs) -> None:
        """
        Nothing is wanted of the queue: wait for the attempts in flight, or want another
        provider, or give up.
        """
        if self.pending:
            return
        if self.budget.left <= 0 or self.providers.exhausted():
            inputs.give_up()
        else:
            inputs.want()

    def settle(self, winner: PeerResponse | None) -> None:
        # Cancelling the losers below fails them at once: they must see the race settled.
        self.settled = True
        if self.hedge is not None and self.hedge.active():
            self.hedge.cancel()
        wanted, self.wanted = self.wanted, None
        if wanted is not None and not wanted.called:
            wanted.cancel()
        for attempt in list(self.pending):
            attempt.cancel()
        if not self.abandoned:
            self.result.callback(winner)


_race = TypeMachineBuilder(_RaceInputs, _Race)
# Attempts may be in flight; no provider is wanted (the hedge timer may be armed to want one).
_asking = _race.state("asking")
# A provider was asked of the queue, maybe with attempts in flight.
_wanting = _race.state("wanting")
# Wanting, and none came within the resolve timeout: once nothing is in flight the race is
# lost (containerd goes upstream) rather than waiting for the lookup to end.
_overdue = _race.state("overdue")
# A peer won, or the race was lost; late answers are dropped.
_settled = _race.state("settled")


@_asking.upon(_RaceInputs.want).to(_wanting)
def _ask_queue(inputs: _RaceInputs, race: _Race) -> None:
    race.ask_queue(inputs)


@_wanting.upon(_RaceInputs.provider_came).to(_asking)
@_overdue.upon(_RaceInputs.provider_came).to(_asking)
def _attempt(inputs: _RaceInputs, race: _Race, provider: Provider) -> None:
    race.attempt(inputs, provider)


@_asking.upon(_RaceInputs.attempt_lost).loop()
@_wanting.upon(_RaceInputs.ran_out).to(_asking)
@_overdue.upon(_RaceInputs.ran_out).to(_asking)
def _next_step(inputs: _RaceInputs, race: _Race) -> None:
    race.next_step(inputs)


@_wanting.upon(_RaceInputs.overdue).to(_overdue)
@_overdue.upon(_RaceInputs.attempt_lost).loop()
def _give_up_if_idle(inputs: _RaceInputs, race: _Race) -> None:
    if not race.pending:
        inputs.give_up()


@_asking.upon(_RaceInputs.won).to(_settled)
@_wanting.upon(_RaceInputs.won).to(_settled)
@_overdue.upon(_RaceInputs.won).to(_settled)
def _win(inputs: _RaceInputs, race: _Race, winner: PeerResponse) -> None:
    race.settle(winner)


@_asking.upon(_RaceInputs.give_up).to(_settled)
@_wanting.upon(_RaceInputs.give_up).to(_settled)
@_overdue.upon(_RaceInputs.give_up).to(_settled)
def _lose(inputs: _RaceInputs, race: _Race) -> None:
    race.settle(None)


@_settled.upon(_RaceInputs.won).loop()
def _drop_late_winner(inputs: _RaceInputs, race: _Race, winner: PeerResponse) -> None:
    discard(winner.response)


# Wanting already, or over: a hedge falling due changes nothing.
_wanting.upon(_RaceInputs.want).loop().returns(None)
_overdue.upon(_RaceInputs.want).loop().returns(None)
_settled.upon(_RaceInputs.want).loop().returns(None)
# An attempt lost while a provider is wanted: the provider's coming decides.
_wanting.upon(_RaceInputs.attempt_lost).loop().returns(None)
# Losers cancelled at the settling, and a give-up queued behind the settling.
_settled.upon(_RaceInputs.attempt_lost).loop().returns(None)
_settled.upon(_RaceInputs.give_up).loop().returns(None)

_RaceMachine = _race.build()


class HedgedRace:
    """
    Ask providers for C{path}, hedging, until one answers 200/206 with an C{acceptable} response:
    that one wins and every other attempt is cancelled. The race is lost (L{None}) when no
    provider answered well before C{budget} ran out, or the providers did.

    An automat machine with four states: C{asking} (attempts in flight, no provider wanted; the
    hedge timer, when it falls due, wants one), C{wanting} (a provider asked of the queue),
    C{overdue} (wanted for longer than the resolve timeout: lost once nothing is in flight) and
    C{settled}.
    """

    def __init__(
        self,
        peers: PeerClient,
        providers: ProviderQueue,
        method: str,
        path: str,
        headers: dict[str, str],
        budget: Budget,
        *,
        resolve_timeout: float,
        acceptable: Callable[[Any], bool] = lambda response: True,
    ):
        self._race = _Race(
            peers, providers, method, path, headers, budget, resolve_timeout, acceptable,
            result=Deferred(lambda _: self._abandon()),
        )
        self._inputs = _RaceMachine(self._race)

    def _abandon(self) -> None:
        # Cancelled: every attempt in flight and every timer stops, so nothing is left asking
        # peers (or holding their connections) for a client that is gone.
        self._race.abandoned = True
        self._inputs.give_up()

    def run(self) -> Deferred[PeerResponse | None]:
        if self._race.budget.left > 0:
            self._inputs.want()
        else:
            self._inputs.give_up()
        return self._race.result
