# -*- test-case-name: tests.unit.test_mirror -*-
"""
A large blob from peers to a client, never all in memory, never unverified: L{BlobCopy}.

It streams the body as it arrives, with backpressure end to end; hashes a whole blob on the way
and holds its last chunk back until the digest matches; and resumes on another peer with a
C{Range} request when one fails midway. The rest of a large body may go by splice
(L{spegel.relay}) when both ends are plain TCP.

Which peer to ask is not decided here: a L{PeerSource} passed in names the next provider, opens
a range on it and hears of peers that failed (L{spegel.selection.PeerSession}).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from spegel import relay
from spegel.bodies import BodyInterrupted, client_socket
from spegel.dht.ids import Provider
from spegel.interfaces import IResponseBody
from spegel.metrics import Metrics
from spegel.oci import hashed_digest, new_hasher
from spegel.peerresponse import (
    BODY,
    CONNECT,
    DIGEST,
    STATUS,
    PeerFailed,
    PeerResponse,
    deferred,
    describe,
    discard,
    span,
)


class PeerSource(TypingProtocol):
    """
    The providers of one request, as a copy that resumes needs them (L{spegel.selection}).
    """

    def next_provider(self) -> Deferred[Provider | None]: ...

    def open_range(self, provider: Provider, first: int, last: int, others: int = 0) -> Deferred[Any]:
        """
        Ask C{provider} for bytes C{first}-C{last}; C{others}: holders the caller has at hand
        besides the queue's (fetching other pieces), named to C{provider} as alternatives.
        """

    def failed(self, provider: Provider, reason: str) -> None: ...

    def busy(self, provider: Provider) -> None:
        """C{provider} answered 429 (at its upload limit): not a failure, ask it later."""

    def retry_later(self, provider: Provider, response: Any) -> bool:
        """
        Offer C{provider}, busy by C{response}, again shortly (L{spegel.selection.busy_delay}),
        unless this request has waited on busy peers long enough; L{False} then.
        """

    def defer(self, provider: Provider) -> bool:
        """
        C{provider} served its share of the blob (L{spegel.uploads.UploadShares}): offer it
        after the other holders; L{False} if it deferred this request before (then it is busy).
        """

    def done(self) -> None:
        """
        The copy is over: nobody waits for another provider any more.
        """


@frozen
class SpliceRelaying:
    """
    How a node relays large blobs with splice (L{spegel.relay}), when the kernel allows it.

    @ivar reactor: watches the peer's socket; an C{IReactorFDSet} and C{IReactorTime}.
    @ivar hash_executor: runs the digest work off the reactor thread.
    """

    reactor: Any
    hash_executor: relay.HashExecutor


@implementer(IPushProducer, IResponseBody)
class BlobCopy:
    """
    One blob body (or range of one) streamed from peers to the client, verified, resumed across
    peers.

    @param upstream: the winning peer's response, headers in.
    @param peers: where to resume when a peer fails midway, and whom to tell of its failure.
    @param max_resumes: how many times the copy may move on to another peer.
    @param idle_timeout: a peer silent this long while we are not pausing it has failed.
    @param splice: relay the rest of a large body with splice; L{None} to relay through Python.
    @param on_complete: called once every byte was sent (and, for a whole blob, verified).
    @param metrics: where the bytes served and the mismatches are counted.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        upstream: PeerResponse,
        digest: str,
        peers: PeerSource,
        *,
        max_resumes: int,
        idle_timeout: float,
        splice: SpliceRelaying | None = None,
        on_complete: Callable[[], None] = lambda: None,
        metrics: Metrics,
    ):
        self._clock = clock
        self._metrics = metrics
        self._digest = digest
        self._peers = peers
        self._upstream = upstream
        self._max_resumes = max_resumes
        self._idle_timeout = idle_timeout
        self._splicing = splice
        self._on_complete = on_complete
        first, last, size = span(upstream.response)
        self._first, self._last = first, last
        self.length = self._expected = last - first + 1
        # Only a whole blob can be checked against its digest.
        self._hasher = new_hasher(digest) if first == 0 and last == size - 1 else None
        self._received = 0
        self._held = b""
        self._paused = False
        self._request: Request | None = None
        self._body: BodyReader | None = None
        self._relay: relay.SpliceRelay | None = None
        self._done: Deferred[None] = Deferred()
        self._resumes = 0

    def write_to(self, request: Request) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run(request))

    async def _run(self, request: Request) -> None:
        self._request = request
        request.registerProducer(self, True)
        try:
            self._read(self._upstream)
            await self._done
        except PeerFailed as e:
            self._log.warn("copy of {digest} failed: {e}", digest=self._digest, e=e)
            raise BodyInterrupted(str(e)) from None
        finally:
            if request.producer is self:
                request.unregisterProducer()
            self._peers.done()
        self._on_complete()

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

    def _read(self, upstream: PeerResponse) -> None:
        self._upstream = upstream
        body = self._body = BodyReader(self._clock, self._idle_timeout, self._data, self._ended)
        # Whatever body bytes came with the headers arrive in here, synchronously.
        upstream.response.deliverBody(body)
        if self._done.called or self._body is not body:
            return
        # Asked even while the client is paused (a resume can start then): the relay pauses too.
        splicing = self._may_splice(body)
        if self._paused or splicing:
            body.pause()

    # The rest of the body by splice (spegel.relay), when both ends are plain TCP.
    def _may_splice(self, body: BodyReader) -> bool:
        """
        Whether the rest of C{body} may go by splice; if so, the take-over is on its way.

        We are called from inside Twisted's HTTP parser, which has yet to hand over the body
        bytes that came with the headers: the socket changes hands on the next turn of the
        reactor, once they are in, with the peer paused until then so that nothing more is read.
        """
        splicing = self._splicing
        if splicing is None or self._expected - self._received < relay.RELAY_MIN:
            return False
        if self._request is None or relay.peer_socket(body.transport) is None or client_socket(self._request) is None:
            return False
        splicing.reactor.callLater(0, self._take_over, body)
        return True

    def _take_over(self, body: BodyReader) -> None:
        if self._done.called or self._body is not body:
            return
        if not self._splice(body) and not self._paused:
            body.resume()

    def _splice(self, body: BodyReader) -> bool:
        splicing = self._splicing
        assert splicing is not None and self._request is not None
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
                idle_timeout=self._idle_timeout,
                on_bytes=self._metrics.served_bytes_total.labels("peer").inc,
                on_spliced=self._metrics.spliced_bytes_total.inc,
            )
        except OSError as e:
            self._log.info("relaying through Python: {e}", e=e)
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
            self._metrics.digest_mismatches_total.inc()
            self._peers.failed(self._upstream.provider, DIGEST)
            why = f"bytes from {describe(self._upstream.provider)} do not match {self._digest}"
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
        assert self._request is not None
        self._metrics.served_bytes_total.labels("peer").inc(len(data))
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
                self._metrics.digest_mismatches_total.inc()
                self._peers.failed(self._upstream.provider, DIGEST)
                self._done.errback(PeerFailed(
                    f"bytes from {describe(self._upstream.provider)} do not match {self._digest}", DIGEST
                ))
                return
        if self._held:
            self._forward(self._held)
            self._held = b""
        self._done.callback(None)

    def _failed_peer(self, why: str, lied: bool) -> None:
        provider = self._upstream.provider
        self._log.info("peer {peer}: {why}", peer=describe(provider), why=why)
        self._peers.failed(provider, BODY)
        if self._body is not None:
            self._body.stop()
            self._body = None
        if lied:
            self._metrics.digest_mismatches_total.inc()
            # Bytes already forwarded may be wrong: only a new request can start clean.
            self._done.errback(PeerFailed(why))
            return
        Deferred.fromCoroutine(self._resume()).addErrback(self._resume_failed)

    def _resume_failed(self, failure: Failure) -> None:
        # Whatever went wrong, the client's request must end rather than wait forever.
        self._log.failure("Resuming a copy failed", failure)
        if not self._done.called:
            self._done.errback(PeerFailed(f"resuming failed: {failure.getErrorMessage()}"))

    async def _resume(self) -> None:
        """
        Continue the copy on the next provider from the first byte not yet received.
        """
        while not self._done.called and self._resumes < self._max_resumes:
            self._resumes += 1
            provider = await self._peers.next_provider()
            if provider is None:
                break
            start = self._first + self._received
            try:
                response = await self._peers.open_range(provider, start, self._last)
            except PeerFailed as e:
                self._log.info("resume on {peer} failed: {e}", peer=describe(provider), e=e)
                self._peers.failed(provider, e.reason)
                continue
            except Exception as e:
                self._log.info("resume on {peer} failed: {e}", peer=describe(provider), e=e)
                self._peers.failed(provider, CONNECT)
                continue
            if response.code == 429:
                # Busy, not broken: the next holder continues the copy, or this one shortly.
                # Not a resume spent: cut here, containerd's pull fails, and in a rollout
                # every holder of a layer may be busy for a second or two.
                discard(response)
                if deferred(response) and self._peers.defer(provider):
                    self._resumes -= 1
                    continue
                self._peers.busy(provider)
                if self._peers.retry_later(provider, response):
                    self._resumes -= 1
                continue
            try:
                answered = span(response)[:2] if response.code == 206 else None
            except PeerFailed:
                answered = None  # a Content-Range that does not parse: as wrong as other bytes
            if answered != (start, self._last):
                self._log.info(
                    "resume on {peer}: answered {code} for bytes {start}-{last}, not the bytes asked",
                    peer=describe(provider), code=response.code, start=start, last=self._last,
                )
                discard(response)
                self._peers.failed(provider, STATUS)
                continue
            if self._done.called:
                discard(response)
                return
            self._read(PeerResponse(provider, response))
            return
        if not self._done.called:
            self._done.errback(PeerFailed("no provider left to resume the copy"))


class BodyReader(Protocol, TimeoutMixin):
    """
    Receives a peer's response body for L{BlobCopy} (and each piece of a
    L{spegel.piecewise.ParallelCopy}); fails it when the peer goes silent while not paused.
    """

    # A response body's transport is the response's producer (deliverBody connects it first).
    transport: IPushProducer  # type: ignore[assignment]  # a producer, not a connection

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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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

    # TimeoutMixin, on the copy's clock.
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.stopProducing()
        if not self._ended:
            self._ended = True
            self._on_end(Failure(PeerFailed("the peer went silent")))
