# -*- test-case-name: tests.unit.test_dht_bootstrap_server, tests.e2e.test_dht_bootstrap_server_real -*-
"""
The HTTP bootstrap server (C{--http-bootstrap-addr}): serves this node's L{BootstrapInfo} so
that peers configured with C{--http-bootstrap-kind http} can join through it.
"""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Callable

from attrs import evolve
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from spegel.addresses import ip_literal
from spegel.dht.bootstrap_sources import BootstrapInfo

_log = Logger()

# --- HTTP bootstrap server -------------------------------------------------------------------


class BootstrapInfoResource(Resource):
    """
    C{GET /}: this node's L{BootstrapInfo} as JSON, C{{"node_id": hex, "host": ip, "port": n}}.
    C{info} is called on every request, so a node that changes address serves the new one.
    """

    isLeaf = True

    def __init__(self, info: Callable[[], BootstrapInfo]) -> None:
        super().__init__()
        self._info = info

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", b"application/json")
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b'{"error": "not found: the bootstrap document is at /"}'
        try:
            info = self._info()
        except Exception:
            _log.failure("Could not describe this node for HTTP bootstrap")
            request.setResponseCode(503)
            return b'{"error": "this node cannot describe itself yet"}'
        return _with_reachable_host(info, request).to_json()


def _with_reachable_host(info: BootstrapInfo, request: Request) -> BootstrapInfo:
    """
    C{info}, its unspecified host (a router listening on every interface) replaced by the
    address this request arrived at: that one is reachable from the asking peer, and behind
    a Kubernetes Service it is the pod's own IP, as kube-proxy rewrites the destination.
    """
    canonical = ip_literal(info.host)
    if canonical is None or not ipaddress.ip_address(canonical).is_unspecified:
        return info
    local = ip_literal(getattr(request.getHost(), "host", "") or "")
    if local is None:
        return info
    address = ipaddress.ip_address(local)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the UDP router wants a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return evolve(info, host=str(mapped or address))


@implementer(IStreamServerEndpoint)
class _ObservedEndpoint:
    """
    An endpoint whose last C{listen} outcome is kept: L{StreamServerEndpointService} logs a
    failure to listen and keeps neither it nor the port.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.outcome: IListeningPort | Failure | None = None
        self.waiters: list[Deferred[IListeningPort]] = []

    def listen(self, factory: typing.Any) -> Deferred[IListeningPort]:
        def settle(outcome: IListeningPort | Failure) -> IListeningPort | Failure:
            self.outcome = outcome
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)
            return outcome

        return self.endpoint.listen(factory).addBoth(settle)


class HTTPBootstrapServer(StreamServerEndpointService):
    """
    Serves L{BootstrapInfoResource} (C{--http-bootstrap-addr}) on a Twisted endpoint string
    such as C{"tcp:5002:interface=127.0.0.1"}. A failure to listen is logged, not raised: the
    DHT works without this server, and peers that use it to bootstrap retry.

    @ivar resource: the resource served, for tests with C{StubTreq}.
    """

    def __init__(
        self,
        reactor: typing.Any,
        endpoint: str | IStreamServerEndpoint,
        info: Callable[[], BootstrapInfo],
    ) -> None:
        if isinstance(endpoint, str):
            try:
                parsed = serverFromString(reactor, endpoint)
            except Exception as e:
                raise ValueError(f"HTTP bootstrap address {endpoint!r} is not an endpoint: {e}") from None
        else:
            parsed = endpoint
        self.resource = BootstrapInfoResource(info)
        site = Site(self.resource)
        site.noisy = False
        self._observed = _ObservedEndpoint(parsed)
        super().__init__(self._observed, site)

    def listening_port(self) -> Deferred[IListeningPort]:
        """
        Fires with the listening port once started (for tests listening on port 0), or fails
        as listening failed.
        """
        outcome = self._observed.outcome
        if isinstance(outcome, Failure):
            return fail(outcome)
        if outcome is not None:
            return succeed(outcome)
        if not self.running:
            raise RuntimeError("HTTPBootstrapServer is not started")
        waiter: Deferred[IListeningPort] = Deferred(lambda d: self._observed.waiters.remove(d))
        self._observed.waiters.append(waiter)
        return waiter
