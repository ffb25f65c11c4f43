# -*- test-case-name: tests.unit.test_registry -*-
"""
The registry's HTTP server: a Site whose channel answers malformed, oversized or too slow requests
with OCI error JSON, and bounds the connections one client address may hold.  Below
L{spegel.registry}: it knows HTTP, not images.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Site

from spegel.oci import HeadersTooLarge, MalformedRequest, OCIError, RequestTimeout, TooManyConnections


# How long a client may take to send a request's line and headers, from its first byte: a
# client that trickles them (slowloris) holds a connection and its buffers, and containerd sends
# them in one write.  Twisted's idle timeout does not catch it: every byte resets that.
REQUEST_HEADERS_TIMEOUT = 10.0
# Connections at once from one client address: a node's containerd and every peer's pool
# (8 per peer) stay far below it; one client that opens thousands does not starve the rest.
DEFAULT_CONNECTIONS_PER_CLIENT = 128
# A client that does not take the last bytes of a response cut short within this long is
# reset: it would hold the connection, and those bytes are all it could get.
CUT_FLUSH_TIMEOUT = 30.0


def _disarm(deadline: Any) -> None:
    """Cancel C{deadline}, a delayed call or L{None}, if it has not run."""
    if deadline is not None and deadline.active():
        deadline.cancel()


class OCIHTTPChannel(http.HTTPChannel):
    """
    An HTTP channel that answers malformed or oversized requests with an OCI error body
    rather than Twisted's bare 400, so a client (or an operator with curl) sees what was wrong.

    It also bounds what one client can hold: a request's line and headers must arrive within
    C{site.request_headers_timeout} of their first byte (408 otherwise), and a client address
    may have at most C{site.connections_per_client} connections open (429 beyond; 0: no bound).
    """

    #: Set by the site that built us (L{Site.buildProtocol}).
    site: OCISite
    _headers_deadline: Any = None
    _cut_deadline: Any = None
    _client: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        limit = getattr(self.site, "connections_per_client", 0)
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if not limit or host is None:
            return
        counts = self.site.connections_by_client
        if counts.get(host, 0) >= limit:
            self._write_error_and_disconnect(TooManyConnections(f"more than {limit} connections from {host}"))
            return
        self._client = host
        counts[host] = counts.get(host, 0) + 1

    def dataReceived(self, data: bytes) -> None:
        # Armed at the first byte of a request's line and headers (line mode, no request being
        # handled), disarmed once they are all in.
        if self._headers_deadline is None and self.line_mode and not self._handlingRequest and data:
            timeout = getattr(self.site, "request_headers_timeout", REQUEST_HEADERS_TIMEOUT)
            if timeout:
                self._headers_deadline = self.callLater(timeout, self._headers_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm_headers_deadline()
        super().allHeadersReceived()

    def _headers_too_slow(self) -> None:
        self._headers_deadline = None
        self._write_error_and_disconnect(RequestTimeout("request headers not received in time"))
        # A client that does not read either must not keep the socket: abort soon after.
        self.callLater(1.0, cast(ITCPTransport, self.transport).abortConnection)

    def _disarm_headers_deadline(self) -> None:
        _disarm(self._headers_deadline)
        self._headers_deadline = None

    def cut_short(self) -> None:
        """
        End the connection in the middle of a response, after the bytes already queued, with an
        orderly close (L{spegel.responses.abort_response} says why not a reset).
        """
        self.loseConnection()
        if self._cut_deadline is None:
            assert self.transport is not None
            self._cut_deadline = self.callLater(CUT_FLUSH_TIMEOUT, cast(ITCPTransport, self.transport).abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm_headers_deadline()
        _disarm(self._cut_deadline)
        self._cut_deadline = None
        if self._client is not None:
            counts = self.site.connections_by_client
            left = counts.get(self._client, 1) - 1
            if left > 0:
                counts[self._client] = left
            else:
                counts.pop(self._client, None)
            self._client = None
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            error: OCIError = HeadersTooLarge("request headers too large")
        else:
            error = MalformedRequest("malformed HTTP request")
        self._write_error_and_disconnect(error)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._write_error_and_disconnect(HeadersTooLarge("request line or header too long"))

    def _write_error_and_disconnect(self, error: OCIError) -> None:
        body = error.to_json()
        reason = http.RESPONSES.get(error.status, b"Request Header Fields Too Large")
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (error.status, reason, len(body), body)
        )
        self.loseConnection()


class OCISite(Site):
    """
    A L{Site} of L{OCIHTTPChannel}s, with the bounds they apply and the connections they count.
    """

    # Twisted types Site.protocol as its HTTP/1-or-2 channel factory; any HTTPChannel class
    # serves, as buildProtocol only calls it and sets the channel's site.
    protocol = OCIHTTPChannel  # type: ignore[assignment]  # a channel class is such a factory
    request_headers_timeout: float = REQUEST_HEADERS_TIMEOUT
    connections_per_client: int = DEFAULT_CONNECTIONS_PER_CLIENT
    connections_by_client: dict[str, int]


def make_site(
    resource: Any,
    *,
    reactor: Any = None,
    request_headers_timeout: float = REQUEST_HEADERS_TIMEOUT,
    connections_per_client: int = DEFAULT_CONNECTIONS_PER_CLIENT,
) -> OCISite:
    site = OCISite(resource, reactor=reactor)
    site.displayTracebacks = False
    site.request_headers_timeout = request_headers_timeout
    site.connections_per_client = connections_per_client
    site.connections_by_client = {}
    return site
