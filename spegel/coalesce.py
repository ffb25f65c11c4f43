# -*- test-case-name: tests.unit.test_coalesce -*-
"""
Cold pulls that wait for another node's instead of all going upstream.

When an image is new to the cluster and many nodes pull it at once (a rollout), every node misses
in the DHT and every containerd fetches the image from the upstream registry: the egress, and the
registry's rate limit, are paid once per node. With coalescing on, a node that misses a manifest
(the first thing a pull asks for) says so in the DHT before its containerd goes upstream: it
provides a short-lived marker key, C{pulling:<minute>:<key>}. A node that misses the same
manifest later, while that marker is fresh, does not answer 404 at once: it waits (at most the
coalescing timeout) for the manifest to appear in the DHT, which happens when the first node's
containerd has the image, and then pulls everything from peers.

Two nodes that miss at the same moment both find no marker and both set one. So a node that set
one looks again a moment later (L{PullCoalescer.first_to_pull}): if another node's marker is there
too, the one with the lowest DHT id pulls and the other waits for it.  In 50-node rollouts on one
machine, without this two nodes took each layer upstream.

Markers are named by the minute they were set in, and a lookup asks for this minute's and the
previous one's, so a marker counts for one to two minutes whatever the DHT's record lifetime: a
pull that failed upstream holds the others back for at most the timeout, never for long. Clocks
of the nodes need to agree to well within a minute, as NTP keeps them.

A waiting node trades latency for upstream traffic: it gets the image once the first node has all
of it, then at peer speed. So coalescing is off unless C{--mirror-coalesce-timeout} is set.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from spegel.dht.ids import Provider
from spegel.metrics import Metrics
from spegel.interfaces import ICoalescingRouter

MARKER_PREFIX = "pulling"
# Markers are named by the minute (of the wall clock) they were set in.
BUCKET_SECONDS = 60.0


def marker_key(key: str, bucket: int) -> str:
    """
    The DHT key saying "a node set in minute C{bucket} is pulling C{key} from upstream".
    """
    return f"{MARKER_PREFIX}:{bucket}:{key}"


class PullCoalescer:
    """
    Marks this node's upstream pulls in the DHT, and tells whether another node is pulling.

    @param clock: the wall clock (minutes name the markers) and timers.
    @param router: finds providers of markers and provides this node's.
    @param timeout: how long a node waits for another's pull before going upstream itself.
    @param poll_interval: how often a waiting node looks for the content again.
    @param marker_lifetime: how long this node keeps a marker provided.
    @param lookup_timeout: how long a marker lookup may take; a slow cluster counts as "nobody
        is pulling", so a node never waits on a lookup it cannot finish.
    @param node_id: this node's DHT id, which settles a tie between nodes that set their markers
        at the same moment; empty: no tie-break (this node always pulls).
    @param settle: how long after setting its marker a node looks for others set at once: the
        time a marker takes to reach the nodes that store it.
    @param metrics: where this node's upstream pulls are counted.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        router: ICoalescingRouter,
        *,
        timeout: float,
        poll_interval: float = 0.25,
        marker_lifetime: float = 2 * BUCKET_SECONDS,
        lookup_timeout: float = 0.25,
        node_id: bytes = b"",
        settle: float = 0.5,
        metrics: Metrics,
    ):
        self._clock = clock
        self._metrics = metrics
        self._router = router
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._marker_lifetime = marker_lifetime
        self._lookup_timeout = lookup_timeout
        self._node_id = node_id
        self._settle = settle
        self._withdrawals: dict[str, IDelayedCall] = {}

    def _bucket(self) -> int:
        return int(self._clock.seconds() // BUCKET_SECONDS)

    async def others_pulling(self, key: str) -> bool:
        """
        Whether another node has said, within the last minute or two, that its containerd is
        pulling C{key} from upstream.
        """
        return bool(await self._markers(key, limit=1))

    async def first_to_pull(self, key: str) -> bool:
        """
        After this node set its marker for C{key} (L{mark}): whether it is the one to pull,
        looked at a moment later.  L{False} when another node set one too and has a lower id:
        that node pulls, and this one waits for it.  A lookup that does not finish in time
        counts as no other marker.
        """
        if not self._node_id:
            return True
        await deferLater(self._clock, self._settle)
        markers = await self._markers(key, limit=20)
        return not any(marker.node_id < self._node_id for marker in markers if marker.node_id != self._node_id)

    async def _markers(self, key: str, limit: int) -> list[Provider]:
        """The nodes whose markers for C{key} of this and the previous minute are found in time."""
        bucket = self._bucket()
        lookups = [
            self._router.find_providers(marker_key(key, b), limit=limit, use_cache=False)
            for b in (bucket, bucket - 1)
        ]
        timer = self._clock.callLater(self._lookup_timeout, lambda: [d.cancel() for d in lookups])
        try:
            results = await DeferredList(lookups, consumeErrors=True)
        finally:
            if timer.active():
                timer.cancel()
        found: list[Provider] = []
        for ok, providers in results:
            if ok:
                found.extend(providers)
            elif not providers.check(CancelledError):
                self._log.info("looking for a pull of {key} failed: {e}", key=key, e=providers.getErrorMessage())
        return found

    def pulling(self, key: str) -> None:
        """
        Say in the DHT that this node's containerd is about to pull C{key} from upstream.
        """
        self.mark(key)
        self.going_upstream()

    def going_upstream(self) -> None:
        """Count one upstream pull of this node's containerd (marked before, L{mark})."""
        self._metrics.pull_coalescing_total.labels("upstream").inc()

    def mark(self, key: str) -> None:
        """
        Set this node's marker for C{key}: others that miss it wait (L{others_pulling}).
        """
        marker = marker_key(key, self._bucket())
        self._router.provide([marker])
        previous = self._withdrawals.pop(marker, None)
        if previous is not None and previous.active():
            previous.cancel()
        self._withdrawals[marker] = self._clock.callLater(self._marker_lifetime, self._withdraw, marker)

    def _withdraw(self, marker: str) -> None:
        self._withdrawals.pop(marker, None)
        self._router.withdraw([marker])
