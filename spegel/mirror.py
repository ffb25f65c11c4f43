# -*- test-case-name: tests.test_mirror -*-
"""
The P2P mirror: what the registry does with a request this node cannot answer itself.

It finds providers of the content in the DHT, asks them with hedging (one peer at once, another
when the first is slower than observed latency says it should be), and streams the winner's
answer to the client:

  - unbuffered, with backpressure end to end: the client's transport pauses the peer's;
  - verified: a whole blob is hashed on the way and its last chunk is held back until the hash
    matches, so a client never receives every byte of wrong content; manifests are small, so
    they are read whole, checked, and only then sent;
  - resumed: when a peer fails midway, the copy continues on the next provider with a Range
    request, and the client never notices.

A peer that sends wrong bytes, or fails, is put aside for a while.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol
from urllib.parse import quote

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from spegel import metrics, relay
from spegel.bodies import BodyInterrupted, FileBodyProducer, client_socket
from spegel.dht.ids import Provider
from spegel.oci import (
    MAX_MANIFEST_SIZE,
    BlobUnknown,
    ManifestUnknown,
    OCIError,
    Reference,
    digest_matches,
    hashed_digest,
    new_hasher,
    range_to_honour,
)
from spegel.registry import MIRRORED_HEADER, abort_response

if TYPE_CHECKING:
    # Only a type here; spegel.coalesce builds on this module's Router.
    from spegel.coalesce import PullCoalescer

# Headers of a peer's answer that the client gets as they are.
_FORWARDED_HEADERS = (
    b"content-type",
    b"content-length",
    b"content-range",
    b"accept-ranges",
    b"docker-content-digest",
    b"etag",
)


class Router(TypingProtocol):
    def find_providers(
        self,
        key: str,
        *,
        on_provider: Callable[[Provider], None] | None = None,
        limit: int = 20,
        use_cache: bool = True,
    ) -> Deferred[list[Provider]]: ...


class HTTPClient(TypingProtocol):
    """
    What the mirror needs of treq: C{treq.HTTPClient} and C{StubTreq} both fit.
    """

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


class PeerFailed(Exception):
    """
    A peer could not serve the request: refused, failed or sent the wrong thing.
    """


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


@frozen
class SpliceRelaying:
    """
    How a node relays large blobs with splice (L{spegel.relay}), when the kernel allows it.

    @ivar reactor: watches the peer's socket; an C{IReactorFDSet} and C{IReactorTime}.
    @ivar hash_executor: runs the digest work off the reactor thread.
    """

    reactor: Any
    hash_executor: relay.HashExecutor


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


class _ProviderQueue:
    """
    Providers as the DHT lookup finds them, less the ones put aside and duplicates.
    L{next} waits for the next one; it fires L{None} when the lookup has ended and none is left.
    """

    def __init__(self, put_aside: PutAside, pick: Callable[[int], int]):
        self._put_aside = put_aside
        self._pick = pick
        self._ready: list[Provider] = []
        self._seen: set[tuple[str, int]] = set()
        self._waiting: list[Deferred[Provider | None]] = []
        self.finished = False
        self.skipped_aside = 0
        self.found_any = Deferred[None]()

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
        if self._waiting:
            self._waiting.pop(0).callback(provider)
        else:
            self._ready.append(provider)

    def finish(self) -> None:
        self.finished = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def next(self) -> Deferred[Provider | None]:
        if self._ready:
            # Of the providers at hand, any one: holders of popular content share the load.
            return succeed(self._ready.pop(self._pick(len(self._ready))))
        if self.finished:
            return succeed(None)
        d: Deferred[Provider | None] = Deferred(self._forget)
        self._waiting.append(d)
        return d

    def _forget(self, d: Deferred[Provider | None]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)


@define
class _Budget:
    """
    How many more peers one request may ask.
    """

    left: int


def _cancel_then_pass(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


def _has_span(response: Any) -> bool:
    try:
        _span(response)
    except PeerFailed:
        return False
    return True


@frozen
class _Upstream:
    provider: Provider
    response: Any


class Mirror:
    """
    Serves requests this node cannot answer from peers that can (L{spegel.registry.Mirror}).

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
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        router: Router,
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
    ):
        self._clock = clock
        self._router = router
        self._http = http
        self._resolve_timeout = resolve_timeout
        self._retries = retries
        self._idle_timeout = idle_timeout
        self.put_aside = put_aside or PutAside(clock)
        self.latency = latency or LatencyTracker()
        self._spool_max = spool_max
        self._pick = pick
        self._spool_dir = spool_dir
        self._splice = splice
        self._coalescer = coalescer

    # The registry's seam ------------------------------------------------------------------

    async def serve_manifest(self, request: Request, reference: Reference) -> bytes:
        key = reference.digest or reference.tag_key
        providers = await self._manifest_providers(key)
        method = request.method.decode("ascii")
        path = _peer_path(reference, "manifests", reference.digest or reference.tag)  # type: ignore[arg-type]
        budget = _Budget(self._retries)
        try:
            while budget.left > 0:
                upstream = await self._first_response(
                    providers, method, path, {"Accept": _header_text(request, "accept")}, budget
                )
                if upstream is None:
                    break
                try:
                    data = await self._manifest_body(upstream, method, reference)
                except PeerFailed as e:
                    self._log.info(
                        "peer {peer} failed a manifest: {e}", peer=_peer(upstream.provider), e=e
                    )
                    self.put_aside.put_aside(upstream.provider)
                    continue
                _copy_headers(upstream.response.headers, request)
                self._succeeded()
                if method == "HEAD":
                    return b""
                request.setHeader("Content-Length", str(len(data)))
                metrics.served_bytes_total.labels("peer").inc(len(data))
                return data
        finally:
            providers.finish()
        self._count_unserved(key)
        raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})

    async def serve_blob(self, request: Request, reference: Reference) -> bytes | None:
        digest: str = reference.digest  # type: ignore[assignment]
        providers = await self._providers(digest, BlobUnknown)
        method = request.method.decode("ascii")
        path = _peer_path(reference, "blobs", digest)
        client_range = range_to_honour(_header_text(request, "range"), _header_text(request, "if-range"), digest)
        budget = _Budget(self._retries)
        try:
            while True:
                upstream = await self._first_response(
                    providers, method, path, {"Range": client_range}, budget,
                    acceptable=_has_span if method == "GET" else lambda response: True,
                )
                if upstream is None:
                    self._count_unserved(digest)
                    raise BlobUnknown("blob unknown in the cluster", {"digest": digest})
                response = upstream.response
                if method == "HEAD":
                    request.setResponseCode(response.code)
                    _copy_headers(response.headers, request)
                    _discard(response)
                    self._succeeded()
                    return b""
                if response.code == 200 and response.length <= self._spool_max:
                    if await self._serve_spooled(request, upstream, digest):
                        return None
                    continue
                await self._serve_streamed(request, upstream, digest, path, providers)
                return None
        finally:
            providers.finish()

    async def _serve_spooled(self, request: Request, upstream: _Upstream, digest: str) -> bool:
        """
        Serve a small blob checked whole before its first byte is sent.

        @return: C{False} when the peer's copy was wrong or incomplete (nothing was sent; the
            caller asks another peer).
        """
        length = upstream.response.length
        try:
            spooled = await self._spool(upstream, digest)
        except PeerFailed as e:
            self._log.info("peer {peer}: {e}", peer=_peer(upstream.provider), e=e)
            self.put_aside.put_aside(upstream.provider)
            return False
        request.setResponseCode(200)
        _copy_headers(upstream.response.headers, request)
        request.setHeader("Content-Length", str(length))
        body = FileBodyProducer(
            request, spooled, 0, length, on_bytes=metrics.served_bytes_total.labels("peer").inc
        )
        try:
            await body.start()
        except BodyInterrupted:
            abort_response(request)
            return True
        self._succeeded()
        return True

    async def _serve_streamed(
        self,
        request: Request,
        upstream: _Upstream,
        digest: str,
        path: str,
        providers: _ProviderQueue,
    ) -> None:
        """
        Stream a blob (or a range of one) as it arrives, resuming on other peers if need be.
        """
        response = upstream.response
        request.setResponseCode(response.code)
        _copy_headers(response.headers, request)
        request.setHeader("Content-Length", str(response.length))
        copy = _BlobCopy(self, request, digest, path, providers, upstream)
        try:
            await copy.run()
        except PeerFailed as e:
            self._log.warn("copy of {digest} failed: {e}", digest=digest, e=e)
            abort_response(request)
            return
        self._succeeded()

    async def _spool(self, upstream: _Upstream, digest: str) -> int:
        """
        Read a small blob whole into an unlinked file on disk, and check it before a byte is
        sent: a wrong copy is then retried on another peer without the client noticing.

        @return: a file descriptor positioned anywhere (the caller reads with offsets).
        """
        spool = tempfile.TemporaryFile(dir=self._spool_dir)
        try:
            writer = _SpoolWriter(spool, new_hasher(digest), upstream.response.length)
            upstream.response.deliverBody(writer)
            if await writer.done != digest:
                metrics.digest_mismatches_total.inc()
                raise PeerFailed(f"bytes do not match {digest}")
            return os.dup(spool.fileno())
        finally:
            spool.close()

    # Finding and asking peers ---------------------------------------------------------------

    async def _manifest_providers(self, key: str) -> _ProviderQueue:
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
            coalescer.pulling(key)
            raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})
        self._log.info("another node is pulling {key} from upstream: waiting for it", key=key)
        deadline = self._clock.seconds() + coalescer.timeout
        while (remaining := deadline - self._clock.seconds()) > 0:
            await deferLater(self._clock, min(coalescer.poll_interval, remaining))
            try:
                providers = await self._providers(key, ManifestUnknown, fresh=True)
            except ManifestUnknown:
                continue
            metrics.pull_coalescing_total.labels("waited").inc()
            return providers
        metrics.pull_coalescing_total.labels("timeout").inc()
        # This node's containerd goes upstream now: others may wait on it in turn.
        coalescer.pulling(key)
        raise ManifestUnknown("manifest unknown in the cluster", {"reference": key})

    async def _providers(self, key: str, unknown: type[OCIError], fresh: bool = False) -> _ProviderQueue:
        """
        Start a lookup of C{key}; wait (at most the resolve timeout) for its first provider.
        C{fresh}: ask the cluster, not the cache of recent lookups (which may hold a miss).
        """
        queue = _ProviderQueue(self.put_aside, self._pick)
        started = self._clock.seconds()
        first = queue.found_any
        lookups: list[Deferred[Any]] = []

        def look(use_cache: bool) -> None:
            lookup = self._router.find_providers(
                key, on_provider=queue.add, limit=max(self._retries * 2, 5), use_cache=use_cache
            )
            lookups.append(lookup)

            def ended(result: object) -> None:
                if use_cache and not first.called and queue.skipped_aside:
                    # A cached answer may name only peers put aside since then, while
                    # another holder has appeared: ask the cluster afresh, once.
                    look(use_cache=False)
                    return
                queue.finish()
                if not first.called:
                    first.cancel()

            lookup.addBoth(ended)

        timer = self._clock.callLater(self._resolve_timeout, first.cancel)
        look(use_cache=not fresh)
        try:
            await first
        except CancelledError:
            # Before the lookup is cancelled, which finishes the queue.
            reason = "not_found" if queue.finished else "timeout"
            lookups[-1].cancel()
            metrics.unresolved_total.labels(reason).inc()
            self._log.debug(
                "No provider of {key} ({reason}, after {ms:.0f} ms)",
                key=key, reason=reason, ms=(self._clock.seconds() - started) * 1000,
            )
            raise unknown("not found in the cluster", {"key": key})
        finally:
            if timer.active():
                timer.cancel()
        metrics.resolve_duration_seconds.labels("dht").observe(self._clock.seconds() - started)
        # The first provider usually arrives with others in the same reply: let them all land
        # before choosing, or the first one listed would always be asked.
        await deferLater(self._clock, 0)
        return queue

    async def _first_response(
        self,
        providers: _ProviderQueue,
        method: str,
        path: str,
        headers: dict[str, str | None],
        budget: "_Budget",
        acceptable: Callable[[Any], bool] = lambda response: True,
    ) -> _Upstream | None:
        """
        Ask providers for C{path}, hedging, until one answers 200/206 with an C{acceptable}
        response: that one wins and every other attempt is cancelled. L{None} when no provider
        answered well before C{budget} ran out or the providers did.
        """
        result: Deferred[_Upstream | None] = Deferred()
        pending: dict[Deferred[Any], Provider] = {}
        # out_of_time: no further provider came within the resolve timeout of being wanted.
        state: dict[str, Any] = {"hedge": None, "waiting": None, "settled": False, "out_of_time": False}

        def settle(value: _Upstream | None) -> None:
            if state["settled"]:
                if value is not None:
                    _discard(value.response)
                return
            # Cancelling the losers below fails them at once: they must not settle again.
            state["settled"] = True
            hedge = state["hedge"]
            if hedge is not None and hedge.active():
                hedge.cancel()
            waiting = state["waiting"]
            if waiting is not None and not waiting.called:
                waiting.cancel()
            for d in list(pending):
                d.cancel()
            result.callback(value)

        def maybe_done() -> None:
            if pending or result.called:
                return
            waiting = state["waiting"]
            if waiting is not None:
                if state["out_of_time"]:
                    # Every attempt failed and the lookup found no one else in time: answer
                    # now (containerd goes upstream) rather than when the lookup ends.
                    state["waiting"] = None
                    waiting.cancel()
                    settle(None)
                return
            if budget.left <= 0 or (providers.finished and not providers.has_ready()):
                settle(None)
            else:
                start_next()

        def start_next() -> None:
            if result.called or budget.left <= 0 or state["waiting"] is not None:
                return
            waiting = providers.next()
            state["waiting"] = waiting
            if not waiting.called:
                state["out_of_time"] = False
                timer = self._clock.callLater(self._resolve_timeout, out_of_time, waiting)
                waiting.addBoth(_cancel_then_pass, timer)

            def got(provider: Provider | None) -> None:
                state["waiting"] = None
                if provider is None:
                    maybe_done()
                    return
                attempt(provider)

            def cancelled(failure: Failure) -> None:
                failure.trap(CancelledError)

            waiting.addCallbacks(got, cancelled)

        def out_of_time(waiting: Deferred[Provider | None]) -> None:
            if state["waiting"] is waiting:
                state["out_of_time"] = True
                maybe_done()

        def attempt(provider: Provider) -> None:
            budget.left -= 1
            asked_at = self._clock.seconds()
            d = self._http.request(
                method, _peer_url(provider, path),
                headers={MIRRORED_HEADER: "true", **{k: v for k, v in headers.items() if v}},
                unbuffered=True,
            )
            pending[d] = provider
            deadline = self._header_deadline(d)
            arm_hedge()

            def answered(response: Any) -> None:
                pending.pop(d, None)
                if deadline.active():
                    deadline.cancel()
                self.latency.observe(self._clock.seconds() - asked_at)
                if response.code in (200, 206) and acceptable(response):
                    settle(_Upstream(provider, response))
                    return
                _discard(response)
                if response.code not in (404, 416):
                    self.put_aside.put_aside(provider)
                maybe_done()

            def failed(failure: Failure) -> None:
                pending.pop(d, None)
                timed_out = not deadline.active()
                if not timed_out:
                    deadline.cancel()
                # A cancelled attempt fails with CancelledError, ConnectingCancelledError or
                # ResponseNeverReceived([CancelledError]): none of them is the peer's fault,
                # unless it was cancelled because the peer sent no headers in time.
                if state["settled"]:
                    return
                if timed_out:
                    self._log.info(
                        "peer {peer} sent no response headers in {s:.2f}s", peer=_peer(provider), s=self._clock.seconds() - asked_at
                    )
                    self.put_aside.put_aside(provider)
                    maybe_done()
                    return
                if failure.check(CancelledError):
                    return
                self._log.info("peer {peer} failed: {e}", peer=_peer(provider), e=failure.value)
                self.put_aside.put_aside(provider)
                maybe_done()

            d.addCallbacks(answered, failed)

        def arm_hedge() -> None:
            hedge = state["hedge"]
            if hedge is not None and hedge.active():
                hedge.cancel()
            if budget.left > 0:
                state["hedge"] = self._clock.callLater(self.latency.hedge_delay(), start_next)

        start_next()
        return await result

    async def _manifest_body(self, upstream: _Upstream, method: str, reference: Reference) -> bytes:
        response = upstream.response
        announced = _header(response.headers, b"docker-content-digest")
        expected = reference.digest or announced
        if expected is None:
            _discard(response)
            raise PeerFailed("the peer named no digest for a tag")
        if reference.digest is not None and announced not in (None, reference.digest):
            _discard(response)
            raise PeerFailed("the peer announced another digest")
        if method == "HEAD":
            _discard(response)
            return b""
        if response.length is not None and response.length > MAX_MANIFEST_SIZE:
            _discard(response)
            raise PeerFailed("manifest too large")
        collector = _BoundedCollector(MAX_MANIFEST_SIZE)
        response.deliverBody(collector)
        data = await collector.done
        if not digest_matches(expected, data):
            metrics.digest_mismatches_total.inc()
            raise PeerFailed("manifest bytes do not match their digest")
        return data

    def _count_unserved(self, key: str) -> None:
        # Providers were found, and none served: each failed, lied, timed out (header
        # deadline) or the retry budget ran out.  Containerd goes upstream.
        metrics.unresolved_total.labels("peers_failed").inc()
        self._log.debug("No provider of {key} served it", key=key)

    def _succeeded(self) -> None:
        metrics.mirror_last_success_timestamp_seconds.set(self._clock.seconds())

    def _open(self, provider: Provider, path: str, range_header: str) -> Deferred[Any]:
        d = self._http.request(
            "GET", _peer_url(provider, path),
            headers={MIRRORED_HEADER: "true", "Range": range_header}, unbuffered=True,
        )
        deadline = self._header_deadline(d)
        return d.addBoth(_cancel_then_pass, deadline)

    def _header_deadline(self, request: Deferred[Any]) -> IDelayedCall:
        """
        Cancel C{request} if its response headers are not in by the latency tracker's deadline;
        the returned call is no longer active once it fired.
        """
        return self._clock.callLater(self.latency.header_deadline(), request.cancel)


@implementer(IPushProducer)
class _BlobCopy:
    """
    One blob body streamed from peers to the client, verified, resumed across peers.
    """

    def __init__(
        self,
        mirror: Mirror,
        request: Request,
        digest: str,
        path: str,
        providers: _ProviderQueue,
        upstream: _Upstream,
    ):
        self._mirror = mirror
        self._request = request
        self._digest = digest
        self._path = path
        self._providers = providers
        self._upstream = upstream
        first, last, size = _span(upstream.response)
        self._first, self._last = first, last
        self._expected = last - first + 1
        # Only a whole blob can be checked against its digest.
        self._hasher = new_hasher(digest) if first == 0 and last == size - 1 else None
        self._received = 0
        self._held = b""
        self._paused = False
        self._body: _BodyReader | None = None
        self._relay: relay.SpliceRelay | None = None
        self._done: Deferred[None] = Deferred()
        self._resumes = 0

    async def run(self) -> None:
        self._request.registerProducer(self, True)
        try:
            self._read(self._upstream)
            await self._done
        finally:
            if self._request.producer is self:
                self._request.unregisterProducer()

    # IPushProducer, driven by the client's transport.
    def pauseProducing(self) -> None:
        self._paused = True
        if self._body is not None:
            self._body.pause()
        if self._relay is not None:
            self._relay.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._body is not None:
            self._body.resume()
        if self._relay is not None:
            self._relay.resumeProducing()

    def stopProducing(self) -> None:
        if self._body is not None:
            self._body.stop()
        if self._relay is not None:
            self._relay.stopProducing()
        if not self._done.called:
            self._done.errback(PeerFailed("the client went away"))

    def _read(self, upstream: _Upstream) -> None:
        self._upstream = upstream
        body = self._body = _BodyReader(self._mirror._clock, self._mirror._idle_timeout, self._data, self._ended)
        # Whatever body bytes came with the headers arrive in here, synchronously.
        upstream.response.deliverBody(body)
        if self._done.called or self._body is not body:
            return
        # Asked even while the client is paused (a resume can start then): the relay pauses too.
        splicing = self._may_splice(body)
        if self._paused or splicing:
            body.pause()

    # The rest of the body by splice (spegel.relay), when both ends are plain TCP.
    def _may_splice(self, body: "_BodyReader") -> bool:
        """
        Whether the rest of C{body} may go by splice; if so, the take-over is on its way.

        We are called from inside Twisted's HTTP parser, which has yet to hand over the body
        bytes that came with the headers: the socket changes hands on the next turn of the
        reactor, once they are in, with the peer paused until then so that nothing more is read.
        """
        splicing = self._mirror._splice
        if splicing is None or self._expected - self._received < relay.RELAY_MIN:
            return False
        if relay.peer_socket(body.transport) is None or client_socket(self._request) is None:
            return False
        splicing.reactor.callLater(0, self._take_over, body)
        return True

    def _take_over(self, body: "_BodyReader") -> None:
        if self._done.called or self._body is not body:
            return
        if not self._splice(body) and not self._paused:
            body.resume()

    def _splice(self, body: "_BodyReader") -> bool:
        splicing = self._mirror._splice
        assert splicing is not None
        left = self._expected - self._received
        peer = relay.peer_socket(body.transport)
        client = client_socket(self._request)
        if left < relay.RELAY_MIN or peer is None or client is None:
            return False
        try:
            spliced = relay.SpliceRelay(
                splicing.reactor, self._request, peer, client, left,
                hasher=self._hasher,
                digest=self._digest if self._hasher is not None else None,
                hash_executor=splicing.hash_executor,
                idle_timeout=self._mirror._idle_timeout,
                on_bytes=metrics.served_bytes_total.labels("peer").inc,
            )
        except OSError as e:
            self._mirror._log.info("relaying through Python: {e}", e=e)
            return False
        # From here the relay reads the peer's socket; Twisted's HTTP client must not.
        peer.stopReading()
        body.detach()
        self._body = None
        self._relay = spliced
        if self._held:
            self._forward(self._held)
            self._held = b""
        if self._paused:
            spliced.pauseProducing()
        spliced.start().addCallbacks(
            lambda result: self._relay_ended(peer, result),
            lambda failure: self._relay_failed(peer, failure),
        )
        return True

    def _relay_ended(self, peer: Any, result: relay.RelayResult) -> None:
        self._relay = None
        # The HTTP client never saw these bytes: the connection cannot serve another request.
        peer.abortConnection()
        self._received += result.moved
        if self._done.called:
            return
        if result.peer_error is not None:
            self._failed_peer(
                f"the peer stopped after {self._received} of {self._expected} bytes: {result.peer_error}", lied=False
            )
            return
        self._done.callback(None)

    def _relay_failed(self, peer: Any, failure: Failure) -> None:
        self._relay = None
        peer.abortConnection()
        if failure.check(relay.DigestMismatch):
            metrics.digest_mismatches_total.inc()
            self._mirror.put_aside.put_aside(self._upstream.provider)
            why = f"bytes from {_peer(self._upstream.provider)} do not match {self._digest}"
        else:
            why = failure.getErrorMessage()
        if not self._done.called:
            self._done.errback(PeerFailed(why))

    def _data(self, data: bytes) -> None:
        if self._done.called:
            return
        if self._received + len(data) > self._expected:
            self._failed_peer("the peer sent more bytes than announced", lied=True)
            return
        self._received += len(data)
        if self._hasher is None:
            self._forward(data)
            return
        self._hasher.update(data)
        # Hold the latest chunk back until the digest is known to match.
        held, self._held = self._held, data
        if held:
            self._forward(held)

    def _forward(self, data: bytes) -> None:
        metrics.served_bytes_total.labels("peer").inc(len(data))
        self._request.write(data)

    def _ended(self, reason: Failure) -> None:
        if self._done.called:
            return
        self._body = None
        if self._received < self._expected:
            self._failed_peer(f"the peer stopped after {self._received} of {self._expected} bytes: "
                              f"{reason.getErrorMessage()}", lied=False)
            return
        if self._hasher is not None:
            if hashed_digest(self._hasher) != self._digest:
                metrics.digest_mismatches_total.inc()
                self._mirror.put_aside.put_aside(self._upstream.provider)
                self._done.errback(PeerFailed(
                    f"bytes from {_peer(self._upstream.provider)} do not match {self._digest}"
                ))
                return
        if self._held:
            self._forward(self._held)
            self._held = b""
        self._done.callback(None)

    def _failed_peer(self, why: str, lied: bool) -> None:
        provider = self._upstream.provider
        self._mirror._log.info("peer {peer}: {why}", peer=_peer(provider), why=why)
        self._mirror.put_aside.put_aside(provider)
        if self._body is not None:
            self._body.stop()
            self._body = None
        if lied:
            metrics.digest_mismatches_total.inc()
            # Bytes already forwarded may be wrong: only a new request can start clean.
            self._done.errback(PeerFailed(why))
            return
        Deferred.fromCoroutine(self._resume()).addErrback(self._resume_failed)

    def _resume_failed(self, failure: Failure) -> None:
        # Whatever went wrong, the client's request must end rather than wait forever.
        self._mirror._log.failure("Resuming a copy failed", failure)
        if not self._done.called:
            self._done.errback(PeerFailed(f"resuming failed: {failure.getErrorMessage()}"))

    async def _resume(self) -> None:
        """
        Continue the copy on the next provider from the first byte not yet received.
        """
        while not self._done.called and self._resumes < self._mirror._retries:
            self._resumes += 1
            provider = await self._providers.next()
            if provider is None:
                break
            start = self._first + self._received
            try:
                response = await self._mirror._open(provider, self._path, f"bytes={start}-{self._last}")
            except Exception as e:
                self._mirror._log.info("resume on {peer} failed: {e}", peer=_peer(provider), e=e)
                self._mirror.put_aside.put_aside(provider)
                continue
            try:
                span = _span(response)[:2] if response.code == 206 else None
            except PeerFailed:
                span = None  # a Content-Range that does not parse: as wrong as other bytes
            if span != (start, self._last):
                self._mirror._log.info(
                    "resume on {peer}: answered {code} for bytes {start}-{last}, not the bytes asked",
                    peer=_peer(provider), code=response.code, start=start, last=self._last,
                )
                _discard(response)
                self._mirror.put_aside.put_aside(provider)
                continue
            if self._done.called:
                _discard(response)
                return
            self._read(_Upstream(provider, response))
            return
        if not self._done.called:
            self._done.errback(PeerFailed("no provider left to resume the copy"))


class _BodyReader(Protocol, TimeoutMixin):
    """
    Receives a peer's response body for L{_BlobCopy}; fails it when the peer goes silent while
    not paused.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        on_data: Callable[[bytes], None],
        on_end: Callable[[Failure], None],
    ):
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_data = on_data
        self._on_end = on_end
        self._ended = False
        self._paused = False

    def connectionMade(self) -> None:
        self._arm()
        if self._paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        self._on_data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._disarm()
        if not self._ended:
            self._ended = True
            self._on_end(reason)

    def pause(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()
        self._arm()

    def stop(self) -> None:
        self._ended = True
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()

    def detach(self) -> None:
        """
        Hear nothing more: someone else reads the rest of the body.
        """
        self._ended = True
        self._disarm()

    def _arm(self) -> None:
        self.setTimeout(None if self._paused or self._ended else self._idle_timeout)

    def _disarm(self) -> None:
        self.setTimeout(None)

    # TimeoutMixin, on the mirror's clock.
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.stopProducing()
        if not self._ended:
            self._ended = True
            self._on_end(Failure(PeerFailed("the peer went silent")))


class _BoundedCollector(Protocol):
    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(PeerFailed("manifest too large"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(PeerFailed(f"manifest body failed: {reason.getErrorMessage()}"))


class _SpoolWriter(Protocol):
    """
    Writes a body to a file while hashing it, refusing more than C{expected} bytes.
    """

    def __init__(self, spool: Any, hasher: Any, expected: int):
        self._spool = spool
        self._hasher = hasher
        self._expected = expected
        self._received = 0
        self.done: Deferred[str] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._received > self._expected:
            self.transport.stopProducing()
            self.done.errback(PeerFailed("the peer sent more bytes than announced"))
            return
        self._hasher.update(data)
        self._spool.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.done.called:
            return
        if self._received != self._expected:
            self.done.errback(PeerFailed(
                f"the peer stopped after {self._received} of {self._expected} bytes: "
                f"{reason.getErrorMessage()}"
            ))
            return
        self._spool.flush()
        self.done.callback(hashed_digest(self._hasher))


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _discard(response: Any) -> None:
    """
    Drop a peer's response we will not read, closing its connection.
    """
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


def _span(response: Any) -> tuple[int, int, int]:
    """
    (first, last, size) of the bytes a 200 or 206 response carries.
    """
    content_range = _header(response.headers, b"content-range")
    if response.code == 206 and content_range:
        unit, _, rest = content_range.partition(" ")
        span, _, size_text = rest.partition("/")
        first_text, _, last_text = span.partition("-")
        try:
            first, last = int(first_text), int(last_text)
            size = int(size_text) if size_text != "*" else last + 1
        except ValueError:
            raise PeerFailed(f"unreadable Content-Range {content_range!r}")
        if unit != "bytes" or not 0 <= first <= last < size:
            raise PeerFailed(f"unreadable Content-Range {content_range!r}")
        return first, last, size
    if response.length is None or response.length < 0:
        raise PeerFailed("the peer sent no Content-Length")
    return 0, response.length - 1, response.length


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _header_text(request: Request, name: str) -> str | None:
    value = request.getHeader(name)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _copy_headers(headers: Headers, request: Request) -> None:
    for name in _FORWARDED_HEADERS:
        values = headers.getRawHeaders(name)
        if values:
            request.setHeader(name, values[0])


def _peer_path(reference: Reference, kind: str, what: str) -> str:
    path = f"/v2/{reference.repository}/{kind}/{what}"
    if reference.registry is not None:
        path += "?ns=" + quote(reference.registry, safe="")
    return path


def _peer_url(provider: Provider, path: str) -> str:
    host = f"[{provider.host}]" if ":" in provider.host else provider.host
    return f"http://{host}:{provider.registry_port}{path}"


def _peer(provider: Provider) -> str:
    return f"{provider.host}:{provider.registry_port}"

