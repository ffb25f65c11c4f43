# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
Minimal blocking HTTP for the test rig: one request, one connection, the raw answer.

C{http.client} rather than C{urllib} because tests need to send what a well-behaved client would
not (odd paths, huge headers, bad ranges) and see every status as data, not as an exception.
"""

from __future__ import annotations

import http.client
import json

from attrs import frozen


@frozen
class Response:
    """
    A complete HTTP response.

    @ivar headers: header name (lower-cased) to value; repeated headers joined with C{", "}.
    """

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Response:
    """
    Send one request on a fresh connection and read the whole response.

    @param path: sent as is, unencoded, so tests can send paths a URL library would normalise.
    """
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        merged: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Response(status=response.status, reason=response.reason, headers=merged, body=data)
    finally:
        connection.close()


def get_status(host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """
    The status of C{GET path}, or L{None} when nothing answers.
    """
    try:
        return request(host, port, "GET", path, timeout=timeout).status
    except (OSError, http.client.HTTPException):
        return None
