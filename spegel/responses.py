# -*- test-case-name: tests.unit.test_registry -*-
"""
Writing the registry's responses: blob headers, OCI error bodies, answers from the mirror, and
cutting short a body that cannot be completed.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from spegel.bodies import BodyInterrupted
from spegel.interfaces import Upstream
from spegel.oci import ByteRange, OCIError, RangeNotSatisfiable, whole_blob_headers

_log = Logger()


def request_header(request: Request, name: str) -> str | None:
    """
    The first value of the request's header C{name}, as text.
    """
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def set_blob_headers(
    request: Request, digest: str, size: int, byte_range: ByteRange | None
) -> None:
    for name, value in whole_blob_headers(digest, size):
        request.setHeader(name, value)
    if byte_range is not None:
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader("Content-Range", byte_range.content_range)
        request.setHeader("Content-Length", str(byte_range.length))


def write_oci_error(request: IRequest, error: OCIError) -> bytes:
    """
    Turn C{error} into the response: status, JSON body, and for a 416 the size of the content.
    """
    body = error.to_json()
    request.setResponseCode(error.status)
    # Headers of a response that was being prepared must not survive into the error.
    for name in (b"content-range", b"accept-ranges", b"docker-content-digest", b"etag"):
        request.responseHeaders.removeHeader(name)
    if isinstance(error, RangeNotSatisfiable) and error.size is not None:
        request.setHeader("Content-Range", f"bytes */{error.size}")
    request.setHeader("Content-Type", "application/json")
    request.setHeader("Content-Length", str(len(body)))
    return body


def abort_response(request: Request) -> None:
    """
    End a response whose body cannot be completed. Closing the connection before the
    announced length is the only way HTTP/1.1 has to tell the client the body is not whole.

    The close is orderly (FIN), after the bytes already written: the client reads an unexpected
    EOF, and containerd then asks its hosts again for the rest with a C{Range} request, this node
    first (C{httpReadSeeker}, 1.6 and 2.x). A reset would fail its pull instead: it retries on
    C{io.ErrUnexpectedEOF} only.
    """
    channel = request.channel
    if getattr(channel, "transport", None) is None:
        return
    cut_short = getattr(channel, "cut_short", None)  # the registry's channel: L{OCIHTTPChannel}
    if cut_short is not None:
        cut_short()
    else:
        channel.loseConnection()


async def write_upstream(request: Request, upstream: Upstream) -> bytes | None:
    """
    Answer C{request} with C{upstream}: its status and headers, then its body.

    @return: the body when it is bytes (Klein writes it), else L{None} once it was written, or
        cut short when it could not be completed.
    """
    request.setResponseCode(upstream.code)
    for name, value in upstream.headers:
        request.setHeader(name, value)
    if isinstance(upstream.body, bytes):
        return upstream.body
    try:
        await upstream.body.write_to(request)
    except BodyInterrupted as e:
        _log.info("response to {uri} interrupted: {e}", uri=request.uri, e=e)
        abort_response(request)
    return None
