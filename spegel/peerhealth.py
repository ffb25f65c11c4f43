# -*- test-case-name: tests.unit.test_mirror -*-
"""
What this node knows about each peer it has asked, on the reactor's clock (L{spegel.selection}
decides with it whom to ask):

  - L{LatencyTracker}: how long peers take to send response headers; from that, when to hedge
    with a second peer and when a silent one has failed (the response-header deadline).
  - L{PutAside}: peers that failed or lied, not asked for a while.
  - L{PeerLoad}: how busy each peer said it was, and whether it just turned this node away.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from spegel.dht.ids import Provider


@define
class LatencyTracker:
    """
    Learns how long peers take to answer (time to response headers) and from that how long to
    wait before hedging with a second peer: a generous percentile of what was seen, clamped.
    """

    window: deque[float] = field(factory=lambda: deque(maxlen=200))
    percentile: float = 0.95
    factor: float = 1.5
    minimum: float = 0.005
    maximum: float = 2.0
    initial: float = 0.1

    # How long to wait for a peer's response headers: a multiple of what peers usually take,
    # never less than half a second (a busy peer in a rollout) nor more than a few (containerd
    # is waiting, and a 404 sends it upstream at once).
    header_deadline_factor: float = 4.0
    header_deadline_minimum: float = 0.5
    header_deadline_maximum: float = 3.0
    header_deadline_initial: float = 2.0
    # The deadline for a peer that answered this node within the last PROVEN_FOR seconds: the
    # same patience as for a peer silent mid-body (the idle timeout).  Such a peer is busy, not a
    # tarpit, and giving up on it costs a whole layer from upstream: measured in rollouts on
    # the multi-host rig (benchmarks/README.md, rollout.py), every provider failure was a busy
    # first holder missing the short deadline, and one such miss put a 400 MB layer on the
    # upstream link (45 s).  Hedging still asks another provider meanwhile, when there is one.
    proven_header_deadline: float = 10.0

    def observe(self, seconds: float) -> None:
        self.window.append(seconds)

    def header_deadline(self) -> float:
        """
        How long a peer may take to send response headers before it counts as failed: a peer
        that accepts the connection and then says nothing (a tarpit, a wedged process) costs
        this, not the minutes of a TCP timeout.
        """
        if len(self.window) < 5:
            return self.header_deadline_initial
        ordered = sorted(self.window)
        seen = ordered[min(len(ordered) - 1, int(len(ordered) * self.percentile))]
        return min(self.header_deadline_maximum, max(self.header_deadline_minimum, seen * self.header_deadline_factor))

    def hedge_delay(self) -> float:
        if len(self.window) < 5:
            return self.initial
        ordered = sorted(self.window)
        seen = ordered[min(len(ordered) - 1, int(len(ordered) * self.percentile))]
        return min(self.maximum, max(self.minimum, seen * self.factor))


@define
class PutAside:
    """
    Peers not to ask for a while, after they failed or lied.
    """

    clock: IReactorTime
    duration: float = 60.0
    _until: dict[tuple[str, int], float] = field(factory=dict)

    def put_aside(self, provider: Provider) -> None:
        self._until[(provider.host, provider.registry_port)] = self.clock.seconds() + self.duration

    def lift(self, host: str, registry_port: int | None = None) -> None:
        """
        The peer at C{host} (at C{registry_port}, or any port) showed it is back: it announced
        content or pinged us as a (re)starting node does.  Ask it again at once.
        """
        if registry_port is not None:
            self._until.pop((host, registry_port), None)
            return
        for key in [key for key in self._until if key[0] == host]:
            del self._until[key]

    def listing(self) -> list[tuple[str, int, float]]:
        """
        The peers put aside now, as (host, registry port, seconds left), soonest back first.
        Read-only: expired entries are left for L{is_aside} to drop.
        """
        now = self.clock.seconds()
        aside = [(host, port, until - now) for (host, port), until in self._until.items() if until > now]
        return sorted(aside, key=lambda entry: entry[2])

    def is_aside(self, provider: Provider) -> bool:
        key = (provider.host, provider.registry_port)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._until[key]
            return False
        return True


# A peer's reported load (its Spegel-Uploads header) is believed this long.
REPORTED_LOAD_FRESH = 5.0
MAX_TRACKED_PEERS = 4096


@define(eq=False)
class PeerLoad:
    """
    How busy each peer is, as this node last heard: the uploads it said it was serving (the
    C{Spegel-Uploads} header on its answers) and whether it answered busy.  Used to offer the
    least loaded holder first (L{ProviderQueue.next}); only advice, so a peer lying about it can
    attract or repel requests, nothing more.
    """

    clock: IReactorTime
    _reported: dict[tuple[str, int], tuple[int, float]] = field(factory=dict)
    _busy_until: dict[tuple[str, int], float] = field(factory=dict)

    def reported(self, provider: Provider, active: int) -> None:
        _bounded(self._reported)
        self._reported[(provider.host, provider.registry_port)] = (active, self.clock.seconds())

    def busy(self, provider: Provider, seconds: float) -> None:
        _bounded(self._busy_until)
        self._busy_until[(provider.host, provider.registry_port)] = self.clock.seconds() + seconds

    def score(self, provider: Provider) -> float:
        key = (provider.host, provider.registry_port)
        now = self.clock.seconds()
        score = 0.0
        reported = self._reported.get(key)
        if reported is not None and now - reported[1] < REPORTED_LOAD_FRESH:
            score += reported[0]
        if self._busy_until.get(key, 0.0) > now:
            score += 1_000_000  # after every holder that did not just turn us away
        return score


def _bounded(table: dict[Any, Any]) -> None:
    if len(table) >= MAX_TRACKED_PEERS:
        table.clear()  # rare (thousands of peers answered): forgetting loads is harmless


