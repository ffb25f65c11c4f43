# -*- test-case-name: tests.unit.test_cli -*-
"""
The two halves of the chart's post-delete hook, which restores every node's containerd
configuration on C{helm uninstall} and makes Helm wait until all of them are clean.

  - On each node, C{spegel cleanup --serve-addr :8080} cleans up and then answers
    C{GET /healthz} with 200 until it is stopped: L{serve_until_stopped}.
  - In one pod, C{spegel cleanup-wait --probe-endpoints <headless Service>:8080} resolves the
    Service's name again and again and asks every address for C{/healthz}; it succeeds once
    every address has answered 200 in two rounds in a row: L{wait_until_clean}.

Kubernetes gives the hook no list of the nodes (the pods have no API token), so "every node"
is "every address of the headless Service" (with C{publishNotReadyAddresses}, a pod still
cleaning is listed too). A pod that has no address yet is not listed: the second round, and
starting over when an address appears, give the DaemonSet's late pods time to show up.

The waiting side is plain blocking code (urllib, C{time.sleep}): it runs alone in its own
pod. Its clock, sleep, resolver and HTTP probe come in an L{Environment}, so tests need
neither sockets nor time.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from attrs import frozen
from hyperlink import URL
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from spegel.addresses import ListenAddress, join_host_port

HEALTHZ = b"healthz"

CLEAN_ROUNDS = 2
"""Rounds in a row in which every address must answer 200."""

PROBE_TIMEOUT = 2.0
"""Seconds one C{GET /healthz} may take; a pod that is up answers in milliseconds."""

_LISTED_AT_MOST = 20
"""Addresses named in the timeout message; a large cluster's full list is no longer one line."""

Address = tuple[str, int]


# C{host:port}, an IPv6 literal in brackets; an empty host (every interface) as C{:port}.
display = join_host_port


# --- the node's side -------------------------------------------------------------------------


class _Clean(Resource):
    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self._body


def healthz_resource(config_path: str) -> Resource:
    """
    The root resource a cleaned node serves: C{/healthz} answers 200, every other path 404.
    """
    root = Resource()
    root.putChild(HEALTHZ, _Clean(f"clean: {config_path} holds no spegel configuration\n".encode()))
    return root


def serve_until_stopped(
    reactor: Any, address: ListenAddress, resource: Resource, out: TextIO, err: TextIO
) -> int:
    """
    Serve C{resource} on C{address} and run C{reactor} until it stops (SIGTERM or SIGINT,
    which the reactor turns into a stop).

    @return: the exit status: 0 once stopped, 1 if the address cannot be listened on.
    """
    site = Site(resource)
    site.noisy = False
    where = display(address.host, address.port)
    status = 0

    def listening(port: object) -> None:
        print(f"serving /healthz on {where} until stopped", file=out, flush=True)

    def failed(failure: Failure) -> None:
        nonlocal status
        status = 1
        print(f"spegel: error: cannot serve /healthz on {where}: {failure.value}", file=err)
        reactor.stop()

    def listen() -> None:
        endpoint = serverFromString(reactor, address.endpoint_description())
        endpoint.listen(site).addCallbacks(listening, failed)

    reactor.callWhenRunning(listen)
    reactor.run()
    return status


# --- the hook's side -------------------------------------------------------------------------


class NotClean(Exception):
    """
    The wait timed out; the message says which addresses were not clean (or that none were
    found).
    """


def resolve_addresses(host: str, port: int) -> list[str]:
    """
    Every A and AAAA address of C{host} (an IP literal is its own address), in the resolver's
    order; none when the name does not resolve (a headless Service without endpoints).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# Pod addresses are never reached through a proxy, whatever the pod's environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe_healthz(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """
    Whether C{GET http://host:port/healthz} answers 200 within C{timeout} seconds.
    """
    try:
        url = URL(scheme="http", host=host, port=port, path=(HEALTHZ.decode(),)).to_text()
        with _OPENER.open(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException, ValueError):
        # Refused, reset, timed out, a 404 (HTTPError), a malformed answer or address.
        return False


@frozen
class Environment:
    """
    What L{wait_until_clean} uses of the world outside the process.
    """

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep  # noqa: TID251 - its own process, no reactor
    resolve: Callable[[str, int], Sequence[str]] = resolve_addresses
    probe: Callable[[str, int], bool] = probe_healthz


def wait_until_clean(
    endpoints: Sequence[Address],
    *,
    timeout: float,
    interval: float,
    environment: Environment,
    report: Callable[[str], None],
) -> list[Address]:
    """
    Resolve C{endpoints} and probe every address found, every C{interval} seconds, until in
    L{CLEAN_ROUNDS} rounds in a row at least one address was found and every one answered
    200. A round that finds an address the previous round did not starts the count again.

    @param endpoints: C{(name or IP literal, port)}; every address of a name gets its port.
    @param report: called with a line whenever what the rounds find changes.
    @return: the addresses of the last round.
    @raise NotClean: after C{timeout} seconds.
    """
    deadline = environment.clock() + timeout
    streak = 0
    confirmed: dict[Address, None] = {}
    last_line = None
    while True:
        addresses = {
            (address, port): None
            for name, port in endpoints
            for address in environment.resolve(name, port)
        }
        not_clean = [a for a in addresses if not environment.probe(*a)]
        if addresses and not not_clean:
            streak = streak + 1 if addresses.keys() <= confirmed.keys() else 1
            confirmed = addresses
        else:
            streak, confirmed = 0, {}
        if streak >= CLEAN_ROUNDS:
            return list(addresses)
        line = _progress(endpoints, list(addresses), not_clean)
        if line != last_line:
            report(line)
            last_line = line
        remaining = deadline - environment.clock()
        if remaining <= 0:
            raise NotClean(f"timed out after {timeout:g}s: {line}")
        environment.sleep(min(interval, remaining))


def _progress(endpoints: Sequence[Address], addresses: list[Address], not_clean: list[Address]) -> str:
    if not addresses:
        names = ", ".join(display(*e) for e in endpoints)
        return f"{names} resolved to no address"
    if not not_clean:
        return f"{count(len(addresses))} clean, waiting for a round that confirms it"
    listed = ", ".join(display(*a) for a in not_clean[:_LISTED_AT_MOST])
    if len(not_clean) > _LISTED_AT_MOST:
        listed += f" and {len(not_clean) - _LISTED_AT_MOST} more"
    return f"{len(not_clean)} of {count(len(addresses))} not clean: {listed}"


def count(addresses: int) -> str:
    return f"{addresses} address" if addresses == 1 else f"{addresses} addresses"
