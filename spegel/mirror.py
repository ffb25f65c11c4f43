# -*- test-case-name: tests.unit.test_mirror -*-
"""
The P2P mirror: what the registry does with a request this node cannot answer itself.

It finds providers of the content in the DHT and asks them, hedging (L{spegel.selection}, L{spegel.hedging}); the
winner's answer goes back to the registry as an L{Upstream} (status, headers, and a body that
verifies itself as it goes: L{spegel.peerresponse} for small ones, L{spegel.streaming} for large
ones), which the registry writes. The mirror never sees the client's request:

  - unbuffered, with backpressure end to end: the client's transport pauses the peer's;
  - verified: a whole blob is hashed on the way and its last chunk is held back until the hash
    matches, so a client never receives every byte of wrong content; manifests are small, so
    they are read whole, checked, and only then handed over;
  - resumed: when a peer fails midway, the copy continues on the next provider with a Range
    request, and the client never notices;
  - parallel: a large blob with several holders at hand is fetched in pieces from several of
    them at once (L{spegel.piecewise}), in order, verified the same way.

A peer that sends wrong bytes, or fails, is put aside for a while.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable

from cachetools import TTLCache
from twisted.internet.interfaces import IReactorTime
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from spegel.interfaces import IMirror, IRouter, Upstream
from spegel.metrics import Metrics
from spegel.oci import (
    MAX_MANIFEST_SIZE,
    BlobUnknown,
    InvalidManifest,
    ManifestUnknown,
    OCIError,
    Reference,
    digest_matches,
    manifest_references,
    whole_blob_headers,
)
from spegel.peerresponse import (
    BODY,
    DIGEST,
    STATUS,
    HTTPClient,
    PeerFailed,
    PeerResponse,
    SpooledBody,
    describe,
    discard,
    forwarded_headers,
    has_span,
    peer_path,
    read_capped,
    response_header,
    spool,
)
from spegel.hedging import HedgedRace
from spegel.latebody import LateBody
from spegel.piecewise import ParallelCopy
from spegel.pieces import window_for
from spegel.peerhealth import LatencyTracker, PutAside
from spegel.selection import (
    Budget,
    PeerClient,
    PeerSession,
    ProviderQueue,
    lookup,
)
from spegel.streaming import BlobCopy, SpliceRelaying
from spegel.uploads import PARTIAL_HEADER

# Blobs named by manifests from peers are expected for this long, this many at most.
EXPECTED_BLOBS_FOR = 600.0
EXPECTED_BLOBS_MAX = 4096
# After early headers went unserved, containerd asks again within a moment: its retry is
# answered with a 404 for this long.
UNSERVED_AFTER_HEADERS_FOR = 30.0

if TYPE_CHECKING:
    # Only a type here; spegel.coalesce builds on the router interface alone.
    from spegel.coalesce import PullCoalescer

# Importers of these from here predate the split.
__all__ = ["LatencyTracker", "Mirror", "PutAside", "SpliceRelaying"]


def _acceptable_answer(method: str, size: int | None) -> Callable[[Any], bool]:
    """
    Which of a holder's 200/206 answers to a blob request will do.

    @param size: the whole blob's size, when the client has its headers already.
    """
    if size is not None:
        return lambda response: bool(response.code == 200 and response.length == size)
    if method == "GET":
        return has_span
    return lambda response: True


@implementer(IMirror)
class Mirror:
    """
    Serves requests this node cannot answer from peers that can.

    @param clock: for timeouts and latency.
    @param router: finds providers of a key.
    @param http: a treq-like client for talking to peers.
    @param resolve_timeout: how long to wait for a first provider before answering 404.
    @param retries: at most this many peers are asked for one request.
    @param idle_timeout: a peer silent this long while we are not pausing it has failed.
    @param spool_max: whole blobs up to this size are read to disk and checked before they are
        sent, so a peer with wrong bytes costs nothing but a retry elsewhere. Larger ones
        stream (a spool would delay their first byte), their last chunk held back until the
        digest matches.
    @param spool_dir: where those spools live (unlinked files), L{None} for the system default.
    @param pick: chooses among C{n} providers at hand (an index); random by default.
    @param splice: relay large blobs between plain TCP sockets with splice; L{None} to relay
        every byte through Python.
    @param coalescer: on a manifest miss, waits for another node's upstream pull of it, or says
        that this node's containerd is about to pull it (L{spegel.coalesce}); L{None}: off.
    @param parallel_min_size: whole blobs this large or larger are fetched in pieces from up to
        C{parallel_peers} holders at once, when more than one is at hand; 0: never.
    @param parallel_peers: at most this many peers fetch pieces of one blob at once.
    @param piece_size: bytes per piece.
    @param parallel_window: pieces fetched ahead of the client (so in memory at most); L{None}:
        twice C{parallel_peers}, within L{spegel.pieces.WINDOW_BYTES}.
    @param blob_wait: a blob named by a manifest this node got from a peer, and not in the DHT yet,
        is waited for this long (polled every C{blob_poll_interval}) before a 404: the image is
        being pulled in the cluster, and its other holder says it holds the blob as soon as its
        containerd asks for it (L{spegel.ingest}), not all at once. 0: never wait.
    @param blob_headers_after: a whole blob of known size (a manifest a peer served gives it)
        that no holder has answered for this long gets its headers now and its bytes when a
        holder answers (L{spegel.latebody}): containerd 2.4 waits 30 s for headers, then goes
        upstream for the whole blob. 0: headers only with a holder's answer.
    @param members_only: every provider the router names is a cluster member (the DHT is keyed),
        so each gets the patient response-header deadline (L{spegel.selection.PeerClient}).
    @param metrics: where the node's figures are recorded.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        router: IRouter,
        http: HTTPClient,
        *,
        resolve_timeout: float = 0.02,
        retries: int = 3,
        idle_timeout: float = 10.0,
        put_aside: PutAside | None = None,
        latency: LatencyTracker | None = None,
        spool_max: int = 4 * 1024 * 1024,
        spool_dir: str | None = None,
        pick: Callable[[int], int] = random.randrange,
        splice: SpliceRelaying | None = None,
        coalescer: PullCoalescer | None = None,
        parallel_min_size: int = 32 * 1024 * 1024,
        parallel_peers: int = 4,
        piece_size: int = 8 * 1024 * 1024,
        parallel_window: int | None = None,
        blob_wait: float = 0.0,
        blob_poll_interval: float = 1.0,
        blob_headers_after: float = 0.0,
        members_only: bool = False,
        metrics: Metrics,
    ):
        self._clock = clock
        self._metrics = metrics
        self._router = router
        self._resolve_timeout = resolve_timeout
        self._retries = retries
        self._idle_timeout = idle_timeout
        self.put_aside = put_aside or PutAside(clock)
        self.latency = latency or LatencyTracker()
        self._peers = PeerClient(clock, http, self.put_aside, self.latency, members_only=members_only, metrics=metrics)
        self._spool_max = spool_max
        self._pick = pick
        self._spool_dir = spool_dir
        self._splice = splice
        self._coalescer = coalescer
        self._parallel_min_size = parallel_min_size
        self._parallel_peers = parallel_peers
        self._piece_size = piece_size
        self._parallel_window = parallel_window or window_for(parallel_peers, piece_size)
        self._blob_wait = blob_wait
        self._blob_poll_interval = blob_poll_interval
        # Blobs named by manifests peers served lately, with their sizes where the manifest gave
        # one: the cluster is pulling their image.
        self._expected_blobs: TTLCache[str, int | None] = TTLCache(
            maxsize=EXPECTED_BLOBS_MAX, ttl=EXPECTED_BLOBS_FOR, timer=clock.seconds
        )
        self._blob_headers_after = blob_headers_after
        # Blobs whose early headers no holder followed with bytes: containerd's next request
        # for one is its last before upstream, and is answered at once.
        self._unserved_after_headers: TTLCache[str, bool] = TTLCache(
            maxsize=EXPECTED_BLOBS_MAX, ttl=UNSERVED_AFTER_HEADERS_FOR, timer=clock.seconds
        )

    # IMirror ---------------------------------------------------------------------------------

    async def manifest(self, reference: Reference, *, method: str, accept: str | None) -> Upstream:
        key = reference.digest or reference.tag_key
        providers = await self._manifest_providers(key)
        path = peer_path(reference, "manifests", reference.digest or reference.tag)  # type: ignore[arg-type]
        budget = Budget(self._retries)
        try:
            while budget.left > 0:
                upstream = await self._race(providers, method, path, {"Accept": accept}, budget)
                if upstream is None:
                    break
                try:
                    data = await self._manifest_body(upstream, method, reference)
                except PeerFailed as e:
                    self._log.info("peer {peer} failed a manifest: {e}", peer=describe(upstream.provider), e=e)
                    self._peers.failed(upstream.provider, e.reason)
                    continue
                self._succeeded()
                if self._blob_wait > 0 or self._blob_headers_after > 0:
                    self._expect_blobs_of(data)
                headers = upstream.response.headers
                if method == "HEAD":
                    return Upstream(200, forwarded_headers(headers), b"")
                self._metrics.served_bytes_total.labels("peer").inc(len(data))
                return Upstream(200, forwarded_headers(headers, len(data)), data)
        finally:
            providers.close()
        self._count_unserved(key)
        raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})

    async def blob(self, reference: Reference, *, method: str, byte_range: str | None) -> Upstream:
        digest: str = reference.digest  # type: ignore[assignment]
        if digest in self._unserved_after_headers:
            # containerd asks again after a cut (L{spegel.latebody}): it has waited enough.
            self._log.info("{digest} was waited for in vain a moment ago: 404", digest=digest)
            raise BlobUnknown("blob unknown in the cluster", {"digest": digest})
        size = self._expected_blobs.get(digest)
        if method != "GET" or byte_range is not None or not size or self._blob_headers_after <= 0:
            return await self._blob(reference, method, byte_range, None)
        return await self._blob_with_early_headers(reference, size)

    async def _blob_with_early_headers(self, reference: Reference, size: int) -> Upstream:
        """
        The whole blob C{reference} of C{size} bytes; if no holder answers within
        C{blob_headers_after}, an answer whose headers leave now and whose bytes follow
        (L{spegel.latebody}).
        """
        digest: str = reference.digest  # type: ignore[assignment]
        answer = Deferred.fromCoroutine(self._blob(reference, "GET", None, size))
        # Fires when the answer came (kept in came_in_time) or the time is up; cancelling it
        # (the client left) cancels the answer.
        settled: Deferred[None] = Deferred(lambda _: answer.cancel())
        timer = self._clock.callLater(self._blob_headers_after, settled.callback, None)
        came_in_time: list[Upstream | Failure] = []

        def came(result: Upstream | Failure) -> Upstream | Failure | None:
            if not timer.active():
                return result  # the headers are out: the late body takes it
            timer.cancel()
            came_in_time.append(result)
            settled.callback(None)
            return None

        answer.addBoth(came)
        await settled
        if came_in_time:
            (result,) = came_in_time
            if isinstance(result, Failure):
                result.raiseException()
            return result
        self._log.info(
            "no holder of {digest} answered in {seconds:.0f} s: headers sent, bytes to follow",
            digest=digest, seconds=self._blob_headers_after,
        )
        return Upstream(
            200, whole_blob_headers(digest, size),
            LateBody(answer, digest, size, on_unserved=lambda: self._went_unserved(digest), metrics=self._metrics),
        )

    def _went_unserved(self, digest: str) -> None:
        self._unserved_after_headers[digest] = True

    async def _blob(self, reference: Reference, method: str, byte_range: str | None, size: int | None) -> Upstream:
        """
        @param size: the whole blob's size, when the client has its headers already: only a
            holder's whole answer of this size will do.
        """
        digest: str = reference.digest  # type: ignore[assignment]
        providers = await self._blob_providers(digest, method)
        path = peer_path(reference, "blobs", digest)
        budget = Budget(self._retries)
        acceptable = _acceptable_answer(method, size)
        # A streamed copy may resume on providers the lookup finds later: it finishes the queue.
        handed_over = False
        try:
            while True:
                upstream = await self._race(providers, method, path, {"Range": byte_range}, budget, acceptable)
                if upstream is None:
                    self._count_unserved(digest)
                    raise BlobUnknown("blob unknown in the cluster", {"digest": digest})
                response = upstream.response
                if method == "HEAD":
                    discard(response)
                    self._succeeded()
                    return Upstream(response.code, forwarded_headers(response.headers), b"")
                if response.code == 200 and response.length <= self._spool_max:
                    body = await self._spooled(upstream, digest)
                    if body is None:
                        continue
                    return Upstream(200, forwarded_headers(response.headers, response.length), body)
                if self._parallel(response, byte_range, providers):
                    pieces = ParallelCopy(
                        self._clock, upstream, digest, PeerSession(self._peers, providers, path),
                        size=response.length, piece_size=self._piece_size, parallel=self._parallel_peers,
                        window=self._parallel_window, idle_timeout=self._idle_timeout,
                        max_failures=self._retries + self._parallel_peers, on_complete=self._succeeded, metrics=self._metrics,
                    )
                    handed_over = True
                    return Upstream(200, forwarded_headers(response.headers, pieces.length), pieces)
                copy = BlobCopy(
                    self._clock, upstream, digest, PeerSession(self._peers, providers, path),
                    max_resumes=self._retries, idle_timeout=self._idle_timeout, splice=self._splice,
                    on_complete=self._succeeded, metrics=self._metrics,
                )
                handed_over = True
                return Upstream(response.code, forwarded_headers(response.headers, copy.length), copy)
        finally:
            if not handed_over:
                providers.close()

    def _parallel(self, response: Any, byte_range: str | None, providers: ProviderQueue) -> bool:
        """
        Whether to fetch this answer's blob in pieces from several holders: a whole blob (the
        client asked for no range), large enough, with another holder at hand besides the winner.
        """
        return (
            self._parallel_min_size > 0
            and self._parallel_peers > 1
            and byte_range is None
            and response.code == 200
            and response.length is not None
            and response.length >= self._parallel_min_size
            and providers.has_ready()
            # A holder still downloading it sends it as fast as it gets it: pieces from it
            # would only wait.
            and response_header(response.headers, PARTIAL_HEADER.lower().encode()) is None
        )

    # Bodies ----------------------------------------------------------------------------------

    async def _spooled(self, upstream: PeerResponse, digest: str) -> SpooledBody | None:
        """
        A small blob checked whole before its first byte is sent.

        @return: L{None} when the peer's copy was wrong or incomplete (the caller asks another).
        """
        try:
            fd = await spool(upstream.response, digest, self._spool_dir, metrics=self._metrics)
        except PeerFailed as e:
            self._log.info("peer {peer}: {e}", peer=describe(upstream.provider), e=e)
            self._peers.failed(upstream.provider, e.reason)
            return None
        return SpooledBody(fd, upstream.response.length, on_complete=self._succeeded, metrics=self._metrics)

    async def _manifest_body(self, upstream: PeerResponse, method: str, reference: Reference) -> bytes:
        response = upstream.response
        announced = response_header(response.headers, b"docker-content-digest")
        expected = reference.digest or announced
        if expected is None:
            discard(response)
            raise PeerFailed("the peer named no digest for a tag", STATUS)
        if reference.digest is not None and announced not in (None, reference.digest):
            discard(response)
            raise PeerFailed("the peer announced another digest", DIGEST)
        if method == "HEAD":
            discard(response)
            return b""
        if response.length is not None and response.length > MAX_MANIFEST_SIZE:
            discard(response)
            raise PeerFailed("manifest too large", BODY)
        data = await read_capped(
            response, MAX_MANIFEST_SIZE, what="manifest", clock=self._clock, idle_timeout=self._idle_timeout
        )
        if not digest_matches(expected, data):
            self._metrics.digest_mismatches_total.inc()
            raise PeerFailed("manifest bytes do not match their digest", DIGEST)
        return data

    # Finding and asking peers ------------------------------------------------------------------

    async def _manifest_providers(self, key: str) -> ProviderQueue:
        """
        The providers of a manifest; on a miss with coalescing on, those that appear while
        another node pulls it from upstream (see L{spegel.coalesce}).
        """
        coalescer = self._coalescer
        try:
            return await self._providers(key, ManifestUnknown)
        except ManifestUnknown:
            if coalescer is None:
                raise
        if not await coalescer.others_pulling(key):
            coalescer.mark(key)
            if await coalescer.first_to_pull(key):
                coalescer.going_upstream()
                raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})
            # Another node set its marker at the same moment, and pulls: wait for it.
        self._log.info("another node is pulling {key} from upstream: waiting for it", key=key)
        providers = await self._wait_for_providers(key, ManifestUnknown, coalescer.timeout, coalescer.poll_interval)
        if providers is not None:
            return providers
        # This node's containerd goes upstream now: others may wait on it in turn.
        coalescer.pulling(key)
        raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})

    async def _blob_providers(self, digest: str, method: str) -> ProviderQueue:
        """
        The providers of a blob; on a miss of a blob named by a manifest a peer served lately,
        those that appear within C{blob_wait}.
        """
        will_wait = method == "GET" and self._blob_wait > 0 and digest in self._expected_blobs
        try:
            # A miss that is waited on is no 404 (yet).
            return await self._providers(digest, BlobUnknown, count_miss=not will_wait)
        except BlobUnknown:
            if not will_wait:
                raise
        self._log.info("{digest}, of an image in the cluster, has no holder yet: waiting for one", digest=digest)
        providers = await self._wait_for_providers(digest, BlobUnknown, self._blob_wait, self._blob_poll_interval)
        if providers is None:
            self._metrics.unresolved_total.labels("not_found").inc()
            raise BlobUnknown("blob unknown in the cluster", {"digest": digest})
        return providers

    async def _wait_for_providers(
        self, key: str, unknown: type[OCIError], timeout: float, poll_interval: float
    ) -> ProviderQueue | None:
        """
        The providers of C{key} that appear within C{timeout}, looked for afresh every
        C{poll_interval}; L{None} if none did.
        """
        deadline = self._clock.seconds() + timeout
        while (remaining := deadline - self._clock.seconds()) > 0:
            await deferLater(self._clock, min(poll_interval, remaining))
            try:
                providers = await self._providers(key, unknown, fresh=True, poll=poll_interval)
            except unknown:
                continue
            self._metrics.pull_coalescing_total.labels("waited").inc()
            return providers
        self._metrics.pull_coalescing_total.labels("timeout").inc()
        return None

    def _expect_blobs_of(self, data: bytes) -> None:
        """
        Remember the config and layers an image manifest names: a peer served it, so the cluster
        is pulling or holds that image, and a miss of one of them is worth a wait.
        """
        try:
            references = manifest_references(data, None)
        except InvalidManifest:
            return
        for digest, size in zip(references.blobs, references.blob_sizes):
            self._expected_blobs[digest] = size

    async def _providers(
        self, key: str, unknown: type[OCIError], fresh: bool = False, poll: float | None = None, count_miss: bool = True
    ) -> ProviderQueue:
        """
        @param poll: this lookup is one look of a coalesced wait, made every C{poll} seconds: it
            may take that long (a loaded cluster's lookups outlast the resolve timeout, and cut
            at it a wait would never see the content appear), and finding nothing is no 404.
        @param count_miss: finding nothing is a 404 (counted in C{spegel_mirror_unresolved_total}).
        """
        return await lookup(
            self._clock, self._router, key, ProviderQueue(self.put_aside, self._pick, self._peers.load.score, self._clock),
            resolve_timeout=self._resolve_timeout if poll is None else max(poll, self._resolve_timeout),
            limit=max(self._retries * 2, 5), unknown=unknown, fresh=fresh, metrics=self._metrics,
            count_miss=count_miss and poll is None,
        )

    async def _race(
        self,
        providers: ProviderQueue,
        method: str,
        path: str,
        headers: dict[str, str | None],
        budget: Budget,
        acceptable: Callable[[Any], bool] = lambda response: True,
    ) -> PeerResponse | None:
        race = HedgedRace(
            self._peers, providers, method, path,
            {name: value for name, value in headers.items() if value},
            budget, resolve_timeout=self._resolve_timeout, acceptable=acceptable,
        )
        return await race.run()

    def _count_unserved(self, key: str) -> None:
        # Providers were found, and none served: each failed, lied, timed out (header
        # deadline) or the retry budget ran out.  Containerd goes upstream.
        self._metrics.unresolved_total.labels("peers_failed").inc()
        self._log.debug("No provider of {key} served it", key=key)

    def _succeeded(self) -> None:
        self._metrics.mirror_last_success_timestamp_seconds.set(self._clock.seconds())
