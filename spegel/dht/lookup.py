# -*- test-case-name: tests.unit.test_dht_lookup -*-
"""
Iterative lookups (paper, section 2.3): find the k nodes closest to a target, asking up to
alpha of them at a time, each reply bringing closer contacts.

The lookup keeps every contact it has heard of, sorted by distance to the target.  It always
has up to alpha requests in flight among the k closest contacts not known to have failed, and
sends the next request as soon as any reply arrives (no lock-step rounds).  It ends when those
k closest have all answered (or nobody is left to ask).  A provider lookup is the same walk
with GET_PROVIDERS, and may stop early in two ways:

 - once it has found as many providers as it wants (C{on_reply} says so);
 - once it has found I{some} providers (C{satisfied} says so) and the C{beta} closest live
   contacts seen so far have all answered.  This is go-libp2p-kad-dht's lookup termination
   (its "resiliency", beta = 3): records are stored at the k closest nodes, so the nearest
   few that answered hold what the others would say.  Without any provider found the lookup
   still walks to the k closest, so a miss stays as thorough as before.

Each contact remembers its hop count: 1 for contacts from our own routing table, and one more
than the contact that told us about it otherwise.  The hop count of a lookup (the longest
chain of referrals among the k closest nodes reached) is what the paper bounds by
O(log n).
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Callable, Iterable

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.dht.ids import Contact
from spegel.dht.protocol import DHTTimeout
from spegel.dht.wire import Message, Nodes, Providers

log = Logger()


class _State(Enum):
    NEW = auto()
    IN_FLIGHT = auto()
    ANSWERED = auto()
    FAILED = auto()


@define(eq=False)
class _Candidate:
    contact: Contact
    distance: int
    hops: int
    state: _State = _State.NEW
    attempts: int = 0
    request: Deferred[Message] | None = None


@frozen
class LookupResult:
    """
    @ivar closest: the (at most k) closest nodes that answered, nearest first.
    @ivar hops: the longest referral chain among them.
    @ivar queried: how many requests the lookup sent.
    @ivar stopped_early: whether the lookup ended before the k closest had all answered
        (C{on_reply} asked it to, or it was satisfied once the C{beta} closest had answered).
    """

    closest: tuple[Contact, ...]
    hops: int
    queried: int
    stopped_early: bool
    seen: tuple[Contact, ...] = ()


@define(eq=False)
class IterativeLookup:
    """
    One lookup; run it with L{start}.

    @ivar query: sends the lookup's request to a contact; fires with the reply.
    @ivar on_reply: sees each reply; returns C{True} to end the lookup early.
    @ivar on_failure: told about each contact that did not answer (routing upkeep).
    @ivar satisfied: whether the caller already has what it came for; from then on the lookup
        ends as soon as the C{beta} closest live contacts have answered.
    @ivar beta: see C{satisfied}.
    @ivar exclude: ids never queried (our own).
    @ivar attempts: requests sent to a silent contact before it counts as failed: one lost
        datagram should not hide the node closest to the target.
    """

    target: bytes
    k: int
    alpha: int
    query: Callable[[Contact], Deferred[Message]]
    on_reply: Callable[[Contact, Message], bool] = lambda contact, message: False
    on_failure: Callable[[Contact], None] = lambda contact: None
    satisfied: Callable[[], bool] = lambda: False
    beta: int = 3
    exclude: frozenset[bytes] = frozenset()
    attempts: int = 2
    _target_int: int = field(init=False)
    _candidates: dict[bytes, _Candidate] = field(init=False, factory=dict)
    _done: Deferred[LookupResult] | None = field(init=False, default=None)
    _queried: int = field(init=False, default=0)
    _finished: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._target_int = int.from_bytes(self.target, "big")

    def start(self, seeds: Iterable[Contact]) -> Deferred[LookupResult]:
        """
        Begin from C{seeds} (normally the k closest contacts of our routing table).

        @return: fires with the L{LookupResult}; cancelling it cancels requests in flight.
        """
        self._done = Deferred(lambda d: self._cancel())
        self._add(seeds, hops=1)
        self._pump()
        return self._done

    def _add(self, contacts: Iterable[Contact], hops: int) -> None:
        for contact in contacts:
            if contact.node_id in self.exclude:
                continue
            known = self._candidates.get(contact.node_id)
            if known is None:
                distance = int.from_bytes(contact.node_id, "big") ^ self._target_int
                self._candidates[contact.node_id] = _Candidate(contact, distance, hops)
            elif hops < known.hops:
                known.hops = hops

    def _window(self) -> list[_Candidate]:
        live = [c for c in self._candidates.values() if c.state is not _State.FAILED]
        live.sort(key=lambda c: c.distance)
        return live[: self.k]

    def _pump(self) -> None:
        if self._finished:
            return
        window = self._window()
        if self._settled(window):
            self._finish(stopped_early=True)
            return
        in_flight = sum(1 for c in window if c.state is _State.IN_FLIGHT)
        for candidate in window:
            if in_flight >= self.alpha:
                break
            if candidate.state is _State.NEW:
                in_flight += 1
                self._send(candidate)
                if self._finished:
                    return
        if in_flight == 0 and all(c.state is _State.ANSWERED for c in self._window()):
            self._finish(stopped_early=False)

    def _settled(self, window: list[_Candidate]) -> bool:
        # Checked before asking anyone new: a reply that satisfies the caller should not
        # trigger requests that would be cancelled a moment later.
        nearest = window[: self.beta]
        if not nearest or any(c.state is not _State.ANSWERED for c in nearest):
            return False
        try:
            return bool(self.satisfied())
        except Exception:
            log.failure("Error in a lookup's satisfied callback")
            return False

    def _send(self, candidate: _Candidate) -> None:
        candidate.state = _State.IN_FLIGHT
        candidate.attempts += 1
        self._queried += 1
        d = candidate.request = self.query(candidate.contact)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(candidate,), errbackArgs=(candidate,))

    def _answered(self, message: Message, candidate: _Candidate) -> None:
        candidate.request = None
        if self._finished:
            return
        if message.sender_id != candidate.contact.node_id:
            # Another node now lives at that address: the contact we knew is gone.
            candidate.state = _State.FAILED
            self.on_failure(candidate.contact)
        else:
            candidate.state = _State.ANSWERED
        body = message.body
        if isinstance(body, (Nodes, Providers)):
            self._add(body.contacts, candidate.hops + 1)
        try:
            stop = self.on_reply(candidate.contact, message)
        except Exception:
            log.failure("Error in a lookup's reply callback")
            stop = False
        if stop:
            self._finish(stopped_early=True)
        else:
            self._pump()

    def _failed(self, failure: Failure, candidate: _Candidate) -> None:
        candidate.request = None
        if self._finished:
            return
        if failure.check(DHTTimeout) and candidate.attempts < self.attempts:
            candidate.state = _State.NEW
        else:
            candidate.state = _State.FAILED
            if not failure.check(CancelledError):
                self.on_failure(candidate.contact)
        self._pump()

    def _finish(self, stopped_early: bool) -> None:
        self._finished = True
        self._cancel_requests()
        answered = [c for c in self._window() if c.state is _State.ANSWERED]
        answered.sort(key=lambda c: c.distance)
        result = LookupResult(
            closest=tuple(c.contact for c in answered),
            hops=max((c.hops for c in answered), default=0),
            queried=self._queried,
            stopped_early=stopped_early,
            seen=tuple(
                c.contact for c in self._candidates.values() if c.state is not _State.FAILED
            ),
        )
        assert self._done is not None
        self._done.callback(result)

    def _cancel_requests(self) -> None:
        for candidate in self._candidates.values():
            request, candidate.request = candidate.request, None
            if request is not None:
                request.cancel()

    def _cancel(self) -> None:
        self._finished = True
        self._cancel_requests()
