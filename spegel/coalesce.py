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
from twisted.logger import Logger

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
        metrics: Metrics,
    ):
        self._clock = clock
        self._metrics = metrics
        self._router = router
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._marker_lifetime = marker_lifetime
        self._lookup_timeout = lookup_timeout
        self._withdrawals: dict[str, IDelayedCall] = {}

    def _bucket(self) -> int:
        return int(self._clock.seconds() // BUCKET_SECONDS)

    async def others_pulling(self, key: str) -> bool:
        """
        Whether another node has said, within the last minute or two, that its containerd is
        pulling C{key} from upstream.
        """
        bucket = self._bucket()
        lookups = [
            self._router.find_providers(marker_key(key, b), limit=1, use_cache=False)
            for b in (bucket, bucket - 1)
        ]
        timer = self._clock.callLater(self._lookup_timeout, lambda: [d.cancel() for d in lookups])
        try:
            results = await DeferredList(lookups, consumeErrors=True)
        finally:
            if timer.active():
                timer.cancel()
        for ok, providers in results:
            if ok and providers:
                return True
            if not ok and not providers.check(CancelledError):
                self._log.info("looking for a pull of {key} failed: {e}", key=key, e=providers.getErrorMessage())
        return False

    def pulling(self, key: str) -> None:
        """
        Say in the DHT that this node's containerd is about to pull C{key} from upstream.
        """
        marker = marker_key(key, self._bucket())
        self._router.provide([marker])
        previous = self._withdrawals.pop(marker, None)
        if previous is not None and previous.active():
            previous.cancel()
        self._withdrawals[marker] = self._clock.callLater(self._marker_lifetime, self._withdraw, marker)
        self._metrics.pull_coalescing_total.labels("upstream").inc()

    def _withdraw(self, marker: str) -> None:
        self._withdrawals.pop(marker, None)
        self._router.withdraw([marker])
