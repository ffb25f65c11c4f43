# -*- test-case-name: tests.unit.test_mirror -*-
"""
Which peer to ask, and when to ask another.

  - What this node knows of each peer (latency, put aside, load) is in L{spegel.peerhealth}.
  - L{lookup}: a DHT lookup whose providers arrive in a L{ProviderQueue} as they are found.
  - L{PeerClient}: asks one peer within the response-header deadline, and records how it did;
    L{spegel.hedging} races several.
  - L{PeerSession}: the providers of one request, for a copy that resumes elsewhere.

Every failed peer is counted in C{spegel_mirror_peer_failures_total} by its reason (the reasons
are in L{spegel.peerresponse}).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from attrs import Factory, define, field
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel.metrics import Metrics
from spegel.dht.ids import Provider
from spegel.interfaces import MIRRORED_HEADER, IRouter
from spegel.oci import OCIError
from spegel.peerhealth import LatencyTracker, PeerLoad, PutAside
from spegel.peerresponse import HEADER_DEADLINE, HTTPClient, PeerFailed, peer_url, response_header, starting
from spegel.uploads import ALTERNATIVES_HEADER, UPLOADS_HEADER, parse_uploads_header

_log = Logger()


class ProviderQueue:
    """
    Providers as the DHT lookup finds them, less the ones put aside and duplicates.
    L{next} waits for the next one; it fires L{None} when the lookup has ended and none is left.
    """

    def __init__(
        self,
        put_aside: PutAside,
        pick: Callable[[int], int],
        load: Callable[[Provider], float] = lambda provider: 0.0,
        clock: IReactorTime | None = None,
    ):
        self._put_aside = put_aside
        self._pick = pick
        self._load = load
        self._clock = clock
        self._ready: list[Provider] = []
        # Holders that deferred this request to the others (they served their share of the
        # blob): asked again later, naming no alternative, so that they serve.
        self._deferred_by: set[tuple[str, int]] = set()
        self._seen: set[tuple[str, int]] = set()
        self._waiting: list[Deferred[Provider | None]] = []
        # Busy or deferring providers to be offered again, by the call that will.
        self._requeues: dict[IDelayedCall, Provider] = {}
        # Providers whose last answer was "about to download it, nothing written yet": no
        # alternative to a holder that has bytes (L{alternatives}).
        self._starting: set[tuple[str, int]] = set()
        self._busy_since: float | None = None
        # Whether a holder with bytes answered busy (serving peers at its limit), not only nodes
        # with nothing yet: the request then waits longer (L{SERVING_PATIENCE}).
        self._holder_serving = False
        # Set by L{lookup}: looks the key up again (through the DHT's short cache), adding what
        # it finds.  A busy answer calls it: holders that appeared since the first lookup (a
        # rollout makes new ones every second) are then offered before the busy one returns.
        self.look_again: Callable[[], Deferred[Any]] | None = None
        self._looked_again_at: float | None = None
        self._lookups_again: list[Deferred[Any]] = []
        self.finished = False
        self.skipped_aside = 0
        self.found_any = Deferred[None]()

    @property
    def requeued(self) -> int:
        """Busy or deferring providers to be offered again shortly (L{requeue}, L{defer})."""
        return len(self._requeues)

    def exhausted(self) -> bool:
        """Nothing at hand, nothing to come: the lookup ended and no busy peer will be back."""
        return self.finished and not self._ready and not self._requeues

    def alternatives(self, provider: Provider) -> int:
        """
        The holders this request may still ask besides C{provider}, at hand or busy for a
        moment: what it tells C{provider} (L{spegel.uploads.ALTERNATIVES_HEADER}), so that a
        holder that has served its share of the blob leaves the request to them.

        Not counted are the holders that said they have none of the blob yet, and those that
        deferred this request: they are over their share too, no alternative to another holder
        over its share.  So a holder that deferred the request, asked again, defers it again
        while a holder under its share is at hand or busy for a moment (the request waits for
        that one, within its patience: in a rollout the first holder of a layer would otherwise
        serve every request it deferred, a few seconds later); once every holder left deferred
        it, it is told of none, and serves.
        """
        excluded = self._starting | self._deferred_by | {(provider.host, provider.registry_port)}
        return sum(
            (other.host, other.registry_port) not in excluded
            for other in (*self._ready, *self._requeues.values())
        )

    def defer(self, provider: Provider, delay: float) -> bool:
        """
        C{provider} has served its share of the blob and leaves this request to the others:
        offer it again after C{delay} seconds, when the others at hand have been asked and the
        busy ones asked again.  It spends none of the request's L{BUSY_PATIENCE}.

        Deferring again is honoured while the request still has a holder under its share to
        wait for (L{alternatives}); a busy one spends the patience, and once the last is given
        up, this one is told of none, and serves.

        @return: L{False} when it deferred this request before and there is no other holder
            left (a node of another version, or a liar, defers anyway): not a deferral the
            request honours; the caller takes it as busy, so the request does not go round
            forever.
        """
        key = (provider.host, provider.registry_port)
        if key in self._deferred_by and not self.alternatives(provider):
            return False
        self._deferred_by.add(key)
        if self._clock is None:
            self._offer(provider)
        else:
            self._offer_later(provider, delay, self._clock.seconds())
        return True

    def requeue(self, provider: Provider, delay: float, starting: bool = False) -> bool:
        """
        Offer C{provider}, which answered busy, again after C{delay} seconds, as long as this
        request has not waited out its patience on busy peers: L{SERVING_PATIENCE} once a holder
        serving peers answered busy, L{BUSY_PATIENCE} while only nodes with nothing yet did.
        C{starting}: it is about to download the blob and has none of it yet
        (L{spegel.peerresponse.starting}).

        @return: L{False} when patience is spent (the busy answer is then a loss).
        """
        key = (provider.host, provider.registry_port)
        if starting:
            self._starting.add(key)
        else:
            self._starting.discard(key)
        if self._clock is None:
            return False  # a queue without a clock cannot wait: the busy answer is a loss
        now = self._clock.seconds()
        if self._busy_since is None:
            self._busy_since = now
        self._holder_serving = self._holder_serving or not starting
        patience = SERVING_PATIENCE if self._holder_serving else BUSY_PATIENCE
        if now + delay - self._busy_since > patience:
            return False
        self._offer_later(provider, delay, now)
        return True

    def _offer_later(self, provider: Provider, delay: float, now: float) -> None:
        assert self._clock is not None

        def back() -> None:
            del self._requeues[call]
            self._offer(provider)
            if self.finished and not self._requeues:
                self.finish()  # whoever still waits: nothing more is coming

        call = self._clock.callLater(delay, back)
        self._requeues[call] = provider
        if self.look_again is not None and (
            self._looked_again_at is None or now - self._looked_again_at >= LOOK_AGAIN_INTERVAL
        ):
            self._looked_again_at = now
            again = self.look_again()
            self._lookups_again.append(again)
            again.addBoth(self._looked_again, again)

    def _looked_again(self, result: object, again: Deferred[Any]) -> None:
        self._lookups_again.remove(again)
        if isinstance(result, Failure) and not result.check(CancelledError):
            _log.failure("Looking for more providers failed", result)

    def close(self) -> None:
        """The request is over: no more providers, and busy ones are not offered again."""
        for call in self._requeues:
            if call.active():
                call.cancel()
        self._requeues = {}
        for again in list(self._lookups_again):
            again.cancel()
        self.finish()

    def has_ready(self) -> bool:
        return bool(self._ready)

    def add(self, provider: Provider) -> None:
        key = (provider.host, provider.registry_port)
        if key in self._seen:
            return
        if self._put_aside.is_aside(provider):
            self.skipped_aside += 1
            return
        self._seen.add(key)
        if not self.found_any.called:
            self.found_any.callback(None)
        self._offer(provider)

    def _offer(self, provider: Provider) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(provider)
        else:
            self._ready.append(provider)

    def finish(self) -> None:
        """The lookup has ended: no more providers will be found."""
        self.finished = True
        if self._requeues:
            return  # waiters wait for the busy peers' return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def next(self) -> Deferred[Provider | None]:
        if self._ready:
            # Of the providers at hand, the least loaded as far as this node knows (what they
            # reported, what they answered busy); among equals any one, so holders of popular
            # content share the load.
            loads = [self._load(provider) for provider in self._ready]
            least = min(loads)
            candidates = [i for i, load in enumerate(loads) if load == least]
            return succeed(self._ready.pop(candidates[self._pick(len(candidates))]))
        if self.finished and not self._requeues:
            return succeed(None)
        d: Deferred[Provider | None] = Deferred(self._forget)
        self._waiting.append(d)
        return d

    def _forget(self, d: Deferred[Provider | None]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)


@define
class Budget:
    """
    How many more peers one request may ask.
    """

    left: int


def cancel_then_pass(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


# A peer that answers busy (429, at its --max-uploads) is offered again after its Retry-After,
# capped at this and jittered, so the nodes it turned away do not all come back at once.
BUSY_RETRY_CAP = 2.0


def retry_after(response: Any) -> float:
    """A busy peer's C{Retry-After} in seconds (1 when absent or not a small number)."""
    value = response_header(response.headers, b"retry-after")
    if value is None or not value.isdigit() or len(value) > 4:
        return 1.0
    return float(value)


def busy_delay(response: Any, jitter: Callable[[], float]) -> float:
    """
    When to offer again a peer that answered C{response} (429, busy): its Retry-After, capped
    and jittered, so the nodes it turned away do not all come back at once.
    """
    return min(retry_after(response), BUSY_RETRY_CAP) * (0.5 + jitter())


def deferral_delay(jitter: Callable[[], float]) -> float:
    """
    When to offer again a holder that deferred a request to the others (it served its share):
    after the busy ones come back (L{busy_delay}, at most 1.5 s for the usual Retry-After 1),
    so that they are asked first; jittered like them.
    """
    return BUSY_RETRY_CAP * (0.75 + 0.5 * jitter())


# One request waits out busy peers this long in all; after that a busy answer is a loss (and
# without another provider the request ends in a 404: containerd goes upstream).  A busy peer
# is alive and has the blob; the 404 costs the whole layer over the upstream link, which in a
# rollout every node shares.  In a 50-node cold rollout on this machine, with 10 s 110-252
# requests gave up on busy holders and 34-81 of them ended in a 404 (1-2 GB upstream); with
# 30 s none did.  containerd 2.4 waits 30 s for response headers (see SERVING_PATIENCE).
BUSY_PATIENCE = 30.0
# As long, once a holder that is serving peers answered busy: it has the blob and streams it, and
# frees a slot when an upload ends, which for a large layer in a rollout takes as long as the
# first node's download of it.  In a 20-node cold rollout of a 1 GB image (a 400 MB layer), 30 s
# sent 75 requests upstream, 6.5 copies of the image.  It stays under five minutes, containerd's
# bound on a pull that reads nothing (its CRI image_pull_progress_timeout cancels the pull, which
# then fails rather than going upstream), with a minute to spare for the wait before the first
# busy answer.  containerd 2.4 gives up on a registry host after 30 s without response headers
# (ResponseHeaderTimeout in its remotes/docker DefaultHTTPTransport): a layer of a peer's image
# gets them early (L{spegel.latebody}), so it waits as long as 1.6 and 2.1 do.
SERVING_PATIENCE = 240.0
# While peers answer busy, a request looks for new holders at most this often.
LOOK_AGAIN_INTERVAL = 1.0
# How long a peer that sent response headers counts as proven alive: it gets the patient
# response-header deadline (LatencyTracker.proven_header_deadline) for this long after.
PROVEN_FOR = 60.0
MAX_PROVEN_PEERS = 4096


@define(eq=False)
class PeerClient:
    """
    Asks peers, each within the response-header deadline, and keeps the record of how they did:
    their latency, the ones put aside, the failures by reason.

    A peer that has sent this node response headers recently (any status: it is alive and
    answering) is given the longer C{proven_header_deadline}: in a rollout the holder everyone
    asks is slow to answer because it is busy, and a 404 for it sends containerd upstream for
    the whole layer.  A tarpit never answers, so it keeps the short deadline; one that answers
    once and then stalls costs the longer deadline once, and is put aside.

    With C{members_only} (the DHT is keyed: every provider record was signed by the cluster
    member it names) every peer gets the longer deadline: no pod outside the cluster can name a
    tarpit, a dead node fails at connect (its own timeout), and a member that accepted the
    connection is alive, only loaded (a rollout on a small machine stalls whole nodes for
    seconds).  A wedged member costs the longer deadline once, and is put aside.
    """

    clock: IReactorTime
    http: HTTPClient
    put_aside: PutAside
    latency: LatencyTracker
    metrics: Metrics = field(kw_only=True)
    load: PeerLoad = field(default=Factory(lambda self: PeerLoad(self.clock), takes_self=True))
    members_only: bool = field(default=False, kw_only=True)
    _answered_at: dict[tuple[str, int], float] = field(factory=dict)

    def deadline_for(self, provider: Provider) -> float:
        """The response-header deadline for C{provider} now."""
        short = self.latency.header_deadline()
        answered_at = self._answered_at.get((provider.host, provider.registry_port))
        if self.members_only or (answered_at is not None and self.clock.seconds() - answered_at < PROVEN_FOR):
            return max(short, self.latency.proven_header_deadline)
        return short

    def ask(self, provider: Provider, method: str, path: str, headers: dict[str, str]) -> Deferred[Any]:
        """
        Send a request to C{provider}; cancel it if its response headers are not in by its
        deadline (L{deadline_for}).

        @return: a L{Deferred} of the response (its body not read), failing with L{PeerFailed}
            (reason C{header_deadline}) when the deadline passed.
        """
        asked_at = self.clock.seconds()
        expired = False
        d = self.http.request(
            method, peer_url(provider, path), headers={MIRRORED_HEADER: "true", **headers}, unbuffered=True
        )

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        deadline: IDelayedCall

        def due() -> None:
            nonlocal deadline
            # A process the kernel did not run for a while (a loaded node) runs its due timers
            # before it reads its sockets, where the headers may already wait: in a 50-node
            # rollout on 2 cores, such a stall put live holders aside by the hundred. One more
            # turn of the reactor reads them first; they cancel this.
            deadline = self.clock.callLater(0, expire)

        deadline = self.clock.callLater(self.deadline_for(provider), due)

        def stop_deadline(result: object) -> object:
            return cancel_then_pass(result, deadline)

        def answered(response: Any) -> Any:
            now = self.clock.seconds()
            if len(self._answered_at) >= MAX_PROVEN_PEERS:
                # Bounded however many addresses answer: the stale entries go first.
                for peer in [peer for peer, at in self._answered_at.items() if now - at >= PROVEN_FOR]:
                    del self._answered_at[peer]
                if len(self._answered_at) >= MAX_PROVEN_PEERS:
                    self._answered_at.clear()
            self._answered_at[(provider.host, provider.registry_port)] = now
            reported = parse_uploads_header(response_header(response.headers, UPLOADS_HEADER.encode()))
            if reported is not None:
                self.load.reported(provider, reported[0])
            return response

        def late(failure: Failure) -> Failure:
            if expired:
                raise PeerFailed(
                    f"sent no response headers in {self.clock.seconds() - asked_at:.2f}s", HEADER_DEADLINE
                )
            return failure

        return d.addBoth(stop_deadline).addCallbacks(answered, late)

    def busy(self, provider: Provider, seconds: float) -> None:
        """
        C{provider} answered 429 (at its upload limit): count it, and offer it after less
        loaded holders for C{seconds}.  Not a failure: it is not put aside.
        """
        self.metrics.peers_busy_total.inc()
        self.load.busy(provider, seconds)

    def failed(self, provider: Provider, reason: str) -> None:
        """
        C{provider} failed for C{reason}: count it, and do not ask it again for a while.
        """
        self.metrics.peer_failures_total.labels(reason).inc()
        self.put_aside.put_aside(provider)
        # Proven no longer: asked again after the put-aside, it gets the short deadline.
        self._answered_at.pop((provider.host, provider.registry_port), None)


async def lookup(
    clock: IReactorTime,
    router: IRouter,
    key: str,
    queue: ProviderQueue,
    *,
    resolve_timeout: float,
    limit: int,
    unknown: type[OCIError],
    fresh: bool = False,
    metrics: Metrics,
    count_miss: bool = True,
) -> ProviderQueue:
    """
    Start a lookup of C{key} filling C{queue}; wait (at most C{resolve_timeout}) for its first
    provider. C{fresh}: ask the cluster, not the cache of recent lookups (which may hold a miss).

    C{count_miss}: a miss is a 404 (counted in C{spegel_mirror_unresolved_total}), not one look
    of a wait that goes on.

    @raise unknown: no provider was found in time.
    """
    started = clock.seconds()
    first = queue.found_any
    lookups: list[Deferred[Any]] = []

    def look(use_cache: bool) -> None:
        found = router.find_providers(key, on_provider=queue.add, limit=limit, use_cache=use_cache)
        lookups.append(found)

        def ended(result: object) -> None:
            if use_cache and not first.called and queue.skipped_aside:
                # A cached answer may name only peers put aside since then, while another holder
                # has appeared: ask the cluster afresh, once.
                look(use_cache=False)
                return
            queue.finish()
            if not first.called:
                first.cancel()

        found.addBoth(ended)

    timer = clock.callLater(resolve_timeout, first.cancel)
    look(use_cache=not fresh)
    queue.look_again = lambda: router.find_providers(key, on_provider=queue.add, limit=limit)
    try:
        await first
    except CancelledError:
        # Before the lookup is cancelled, which finishes the queue.
        reason = "not_found" if queue.finished else "timeout"
        lookups[-1].cancel()
        if count_miss:
            metrics.unresolved_total.labels(reason).inc()
        _log.debug(
            "No provider of {key} ({reason}, after {ms:.0f} ms)",
            key=key, reason=reason, ms=(clock.seconds() - started) * 1000,
        )
        raise unknown("not found in the cluster", {"key": key}) from None
    finally:
        if timer.active():
            timer.cancel()
    metrics.resolve_duration_seconds.labels("dht").observe(clock.seconds() - started)
    # The first provider usually arrives with others in the same reply: let them all land before
    # choosing, or the first one listed would always be asked.
    await deferLater(clock, 0)
    return queue


@define(eq=False)
class PeerSession:
    """
    The providers of one request and how to reach them: what a resuming copy needs
    (L{spegel.streaming.PeerSource}).
    """

    peers: PeerClient
    providers: ProviderQueue
    path: str
    jitter: Callable[[], float] = random.random

    def next_provider(self) -> Deferred[Provider | None]:
        return self.providers.next()

    def open_range(self, provider: Provider, first: int, last: int, others: int = 0) -> Deferred[Any]:
        alternatives = self.providers.alternatives(provider) + others
        return self.peers.ask(
            provider, "GET", self.path, {"Range": f"bytes={first}-{last}", ALTERNATIVES_HEADER: str(alternatives)}
        )

    def failed(self, provider: Provider, reason: str) -> None:
        self.peers.failed(provider, reason)

    def busy(self, provider: Provider) -> None:
        self.peers.busy(provider, BUSY_RETRY_CAP)

    def retry_later(self, provider: Provider, response: Any) -> bool:
        return self.providers.requeue(provider, busy_delay(response, self.jitter), starting(response))

    def defer(self, provider: Provider) -> bool:
        return self.providers.defer(provider, deferral_delay(self.jitter))

    def done(self) -> None:
        self.providers.close()
