# -*- test-case-name: tests.unit.test_mirror -*-
"""
A peer's response as the mirror reads it: why a peer failed (L{PeerFailed}, counted by reason),
which bytes an answer carries (L{span}), the headers a client gets (L{forwarded_headers}), and
bodies small enough to read whole before a byte is sent:

  - L{read_capped}: a manifest, with a byte cap and an idle timer;
  - L{spool}: a small blob, read to an unlinked file and checked against its digest, then sent
    by L{SpooledBody}.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Protocol as TypingProtocol
from urllib.parse import quote

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from werkzeug.http import parse_content_range_header
from zope.interface import implementer

from spegel.metrics import Metrics
from spegel.bodies import FileBodyProducer
from spegel.dht.ids import Provider
from spegel.interfaces import IResponseBody
from spegel.uploads import DEFERRED_HEADER, PARTIAL_HEADER, PARTIAL_STARTING
from spegel.oci import Reference, hashed_digest, new_hasher

# Why a peer failed, as spegel_mirror_peer_failures_total counts it.
HEADER_DEADLINE = "header_deadline"  # no response headers before the deadline
CONNECT = "connect"  # refused, unreachable, or the connection failed before the headers
STATUS = "status"  # an answer other than the 200/206 asked for, or one without a usable length
BODY = "body"  # the body stalled, was short, too long, or cut mid-way
DIGEST = "digest"  # the bytes (or the digest the peer announced) do not match
PEER_FAILURE_REASONS = (HEADER_DEADLINE, CONNECT, STATUS, BODY, DIGEST)

# Headers of a peer's answer that the client gets as they are.
FORWARDED_HEADERS = (
    b"content-type",
    b"content-length",
    b"content-range",
    b"accept-ranges",
    b"docker-content-digest",
    b"etag",
)


class PeerFailed(Exception):
    """
    A peer could not serve the request: refused, failed or sent the wrong thing.

    @ivar reason: one of L{PEER_FAILURE_REASONS}.
    """

    def __init__(self, why: str, reason: str = BODY):
        super().__init__(why)
        self.reason = reason


@frozen
class PeerResponse:
    """
    A peer's response whose headers are in, its body not yet read.
    """

    provider: Provider
    response: Any


def describe(provider: Provider) -> str:
    return f"{provider.host}:{provider.registry_port}"


def response_header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def deferred(response: Any) -> bool:
    """
    Whether C{response}, a 429, says the peer has served its share of the blob and defers to
    the other holders (L{spegel.uploads.UploadShares}), rather than being busy.
    """
    return response_header(response.headers, DEFERRED_HEADER.encode()) == "true"


def starting(response: Any) -> bool:
    """
    Whether C{response}, a 429, says the peer is about to download the blob and has none of it
    yet (L{spegel.ingest.NotYet}): a holder soon, no alternative to one with bytes now.
    """
    return response_header(response.headers, PARTIAL_HEADER.encode()) == PARTIAL_STARTING


def forwarded_headers(headers: Headers, content_length: int | None = None) -> tuple[tuple[bytes, bytes], ...]:
    """
    The headers of a peer's answer the client gets, with C{content_length} in place of the
    peer's when given.
    """
    pairs = []
    for name in FORWARDED_HEADERS:
        values = headers.getRawHeaders(name)
        if values:
            pairs.append((name, values[0]))
    if content_length is not None:
        pairs.append((b"content-length", str(content_length).encode("ascii")))
    return tuple(pairs)


class _Discard(Protocol):
    # A response body's transport is the response's producer (deliverBody connects it first).
    transport: IPushProducer  # type: ignore[assignment]  # a producer, not a connection

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def discard(response: Any) -> None:
    """
    Drop a peer's response we will not read, closing its connection.
    """
    try:
        response.deliverBody(_Discard())
    except Exception:
        pass


def span(response: Any) -> tuple[int, int, int]:
    """
    (first, last, size) of the bytes a 200 or 206 response carries.

    @raise PeerFailed: the response says nothing usable about its length.
    """
    content_range = response_header(response.headers, b"content-range")
    if response.code == 206 and content_range:
        parsed = parse_content_range_header(content_range)
        if parsed is None or parsed.units != "bytes" or parsed.start is None or parsed.stop is None:
            raise PeerFailed(f"unreadable Content-Range {content_range!r}", STATUS)
        first, last = parsed.start, parsed.stop - 1
        size = parsed.length if parsed.length is not None else last + 1
        if not 0 <= first <= last < size:
            raise PeerFailed(f"unreadable Content-Range {content_range!r}", STATUS)
        return first, last, size
    # Twisted's UNKNOWN_LENGTH (no Content-Length: a chunked body) is a string, not a number.
    if not isinstance(response.length, int) or response.length < 0:
        raise PeerFailed("the peer sent no Content-Length", STATUS)
    return 0, response.length - 1, response.length


def has_span(response: Any) -> bool:
    try:
        span(response)
    except PeerFailed:
        return False
    return True


class HTTPClient(TypingProtocol):
    """
    What the mirror needs of treq: C{treq.HTTPClient} and C{StubTreq} both fit.
    """

    def request(self, method: str, url: str, *, headers: Any = ..., unbuffered: bool = ...) -> Deferred[Any]: ...


def peer_path(reference: Reference, kind: str, what: str) -> str:
    """
    The path on a peer's registry of C{reference}'s manifest or blob C{what}.
    """
    path = f"/v2/{reference.repository}/{kind}/{what}"
    if reference.registry is not None:
        path += "?ns=" + quote(reference.registry, safe="")
    return path


def peer_url(provider: Provider, path: str) -> str:
    host = f"[{provider.host}]" if ":" in provider.host else provider.host
    return f"http://{host}:{provider.registry_port}{path}"


# Small bodies --------------------------------------------------------------------------------


class _CappedReader(Protocol, TimeoutMixin):
    """
    Collects a body of at most C{limit} bytes; fails when it is larger, cut, or silent for
    C{idle_timeout} (when a clock is given).
    """

    # A response body's transport is the response's producer (deliverBody connects it first).
    transport: IPushProducer  # type: ignore[assignment]  # a producer, not a connection

    def __init__(self, limit: int, what: str, clock: IReactorTime | None, idle_timeout: float | None):
        self._limit = limit
        self._what = what
        self._clock = clock
        self._idle_timeout = idle_timeout if clock is not None else None
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.setTimeout(self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.resetTimeout()
        self._size += len(data)
        if self._size > self._limit:
            self._fail(PeerFailed(f"{self._what} too large", BODY))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(PeerFailed(f"{self._what} body failed: {reason.getErrorMessage()}", BODY))

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        assert self._clock is not None
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self._fail(PeerFailed(f"{self._what} body: the peer went silent", BODY))

    def _fail(self, error: PeerFailed) -> None:
        self.setTimeout(None)
        self.transport.stopProducing()
        if not self.done.called:
            self.done.errback(error)


def read_capped(
    response: Any,
    limit: int,
    *,
    what: str = "body",
    clock: IReactorTime | None = None,
    idle_timeout: float | None = None,
) -> Deferred[bytes]:
    """
    Read a small body whole: at most C{limit} bytes, and (with a C{clock}) no pause longer than
    C{idle_timeout} between chunks.

    @param what: names the body in errors ("manifest too large").
    @return: a L{Deferred} of the bytes, failing with L{PeerFailed}.
    """
    reader = _CappedReader(limit, what, clock, idle_timeout)
    response.deliverBody(reader)
    return reader.done


class _SpoolWriter(Protocol):
    """
    Writes a body to a file while hashing it, refusing more than C{expected} bytes.
    """

    # A response body's transport is the response's producer (deliverBody connects it first).
    transport: IPushProducer  # type: ignore[assignment]  # a producer, not a connection

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
            self.done.errback(PeerFailed("the peer sent more bytes than announced", BODY))
            return
        self._hasher.update(data)
        self._spool.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._received != self._expected:
            self.done.errback(PeerFailed(
                f"the peer stopped after {self._received} of {self._expected} bytes: "
                f"{reason.getErrorMessage()}",
                BODY,
            ))
            return
        self._spool.flush()
        self.done.callback(hashed_digest(self._hasher))


async def spool(response: Any, digest: str, spool_dir: str | None, *, metrics: Metrics) -> int:
    """
    Read a small blob whole into an unlinked file on disk, and check it before a byte is
    sent: a wrong copy is then retried on another peer without the client noticing.

    @return: a file descriptor positioned anywhere (the reader uses offsets).
    @raise PeerFailed: the body was cut, too long, or did not match C{digest}.
    """
    spooled = tempfile.TemporaryFile(dir=spool_dir)
    try:
        writer = _SpoolWriter(spooled, new_hasher(digest), response.length)
        response.deliverBody(writer)
        if await writer.done != digest:
            metrics.digest_mismatches_total.inc()
            raise PeerFailed(f"bytes do not match {digest}", DIGEST)
        return os.dup(spooled.fileno())
    finally:
        spooled.close()


@implementer(IResponseBody)
class SpooledBody:
    """
    A small blob checked whole, sent from its spool file (which it owns and closes).
    """

    def __init__(self, fd: int, length: int, on_complete: Callable[[], None], *, metrics: Metrics):
        self._fd = fd
        self.length = length
        self._on_complete = on_complete
        self._metrics = metrics

    def write_to(self, request: Request) -> Deferred[None]:
        body = FileBodyProducer(
            request, self._fd, 0, self.length, on_bytes=self._metrics.served_bytes_total.labels("peer").inc
        )
        return body.start().addCallback(lambda _: self._on_complete())
