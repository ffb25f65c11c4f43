# -*- test-case-name: tests.test_dht_bootstrap -*-
"""
Bootstrap: how a node that knows nobody finds its first peers.

Kademlia (Maymounkov & Mazières, section 2.3) joins a network from "some node w that is already
participating": the joining node inserts w into its k-bucket, then looks up its own id. This
module only supplies the candidates for w and keeps trying until the join works:

  - a L{Bootstrapper} yields candidate peer addresses, which may include this node itself:
    L{StaticBootstrapper} (a fixed list), L{DNSBootstrapper} (the A/AAAA records of a Kubernetes
    headless Service) and L{HTTPBootstrapper} (a peer's L{HTTPBootstrapServer});
  - L{Bootstrapping} is the service that calls a bootstrapper and then the node's C{join},
    retrying with jittered exponential backoff while nobody is found and bootstrapping again
    every C{rejoin_interval}, so a node that lost every peer finds them again.

The node (L{spegel.dht.service}) supplies C{join}: it PINGs the candidates, skips the one that
turns out to be itself, fills its routing table and reports a L{JoinResult}.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import typing
from collections.abc import Callable, Iterable, Sequence

import treq
from attrs import evolve, frozen
from treq.client import HTTPClient
from hyperlink import DecodedURL
from twisted.application.service import Service
from twisted.internet import error as netError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError as DeferredTimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from spegel.addresses import (  # noqa: F401 - parse_host_port is imported from here too
    InvalidAddress,
    check_port,
    ip_literal as _ip_literal,
    is_hostname as _is_hostname,
    parse_host_port,
)

Address = tuple[str, int]
"""A router's UDP address: (IP literal, port)."""

NODE_ID_BYTES = 32
"""Node ids are 256 bits (issue 3); the HTTP bootstrap document carries them as hex."""

MAX_BOOTSTRAP_DOCUMENT = 4096
"""The HTTP bootstrap document is about 120 bytes; anything far larger is not one."""

DEFAULT_DNS_TIMEOUT = (1, 3)
"""Per-try DNS timeouts (seconds): short, because L{Bootstrapping} retries anyway."""

DEFAULT_HTTP_TIMEOUT = 5.0
"""Seconds an HTTP bootstrap request (headers and body) may take."""

_log = Logger()


# --- errors ----------------------------------------------------------------------------------


class BootstrapError(Exception):
    """
    A bootstrap attempt found no peer to join. Expected in normal operation (the first node
    of a cluster, a Service with no endpoints yet), so L{Bootstrapping} logs it as a warning
    without a traceback and retries.
    """


class NoCandidates(BootstrapError):
    """The bootstrapper returned no candidate address."""


class NobodyAnswered(BootstrapError):
    """The node's join found no other node and was not answered by itself either."""


class BootstrapDNSError(BootstrapError):
    """Neither the A nor the AAAA lookup of a bootstrap domain could be answered."""


class BootstrapHTTPError(BootstrapError):
    """
    The HTTP bootstrap request failed: no connection, a timeout, or a status other than 200.

    @ivar status: the HTTP status code when the server answered, else L{None}.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BootstrapResponseInvalid(BootstrapError):
    """The HTTP bootstrap server answered 200 with something other than the documented JSON."""


# Failures that are part of running a cluster (peers not up yet, a DNS hiccup, a refused
# connection) and are logged without a traceback; anything else is a bug and logged with one.
_EXPECTED_FAILURES = (
    BootstrapError,
    dnsError.DomainError,
    dnsError.AuthoritativeDomainError,
    dnsError.DNSQueryTimeoutError,
    DeferredTimeoutError,
    netError.ConnectError,
    netError.ConnectionLost,
    netError.TimeoutError,
)


def _check_port(port: object, what: str) -> int:
    try:
        return check_port(port)
    except InvalidAddress as e:
        raise ValueError(f"{what}: {e}") from None


def _unique(addresses: Iterable[Address]) -> list[Address]:
    """C{addresses} without repeats, first occurrence kept, so DNS order is preserved."""
    return list(dict.fromkeys(addresses))


# --- bootstrappers ---------------------------------------------------------------------------


class Bootstrapper(typing.Protocol):
    """A source of candidate peers to join."""

    def peers(self) -> Deferred[list[Address]]:
        """
        Candidate peer addresses; they may include this node itself, which the node's join
        recognises by its own id in the PING reply.
        """


def _answer_addresses(answers: Sequence[dns.RRHeader]) -> list[str]:
    """
    The IP addresses in an answer section. Only A and AAAA records count: a headless
    Service's answer may start with CNAMEs, and a resolver may add unrelated records.
    """
    found = []
    for record in answers:
        if record.type == dns.A:
            found.append(str(ipaddress.IPv4Address(record.payload.address)))
        elif record.type == dns.AAAA:
            found.append(str(ipaddress.IPv6Address(record.payload.address)))
    return found


def _is_nxdomain(failure: Failure) -> bool:
    """
    Whether a lookup failed because the name does not exist: C{DNSNameError} from a DNS
    server, C{AuthoritativeDomainError} from a local authority, or a plain C{DomainError}
    from a resolver chain that nobody could answer. Its subclasses (server failure,
    refused...) are real failures.
    """
    return bool(
        failure.check(dnsError.DNSNameError, dnsError.AuthoritativeDomainError)
        or failure.type is dnsError.DomainError
    )


async def _resolve(
    resolver: IResolver, name: str, timeout: Sequence[int] | None
) -> list[str]:
    """
    Every A and AAAA address of C{name}, IPv4 first. A family that does not exist (NXDOMAIN,
    or no records of that type) contributes nothing; one family failing (say, a DNS server
    that times out on AAAA) is logged and the other is used.

    @raise BootstrapDNSError: if both lookups failed for another reason than NXDOMAIN.
    """
    results = await DeferredList(
        [resolver.lookupAddress(name, timeout), resolver.lookupIPV6Address(name, timeout)],
        consumeErrors=True,
    )
    addresses: list[str] = []
    failures: list[Failure] = []
    for family, (succeeded, result) in zip(("A", "AAAA"), results):
        if succeeded:
            answers, _authority, _additional = result
            addresses.extend(_answer_addresses(answers))
        elif result.check(CancelledError):
            result.raiseException()
        elif _is_nxdomain(result):
            # A Service without endpoints yet has no name at all.
            continue
        else:
            failures.append(result)
            _log.warn(
                "DNS {family} lookup of {name} failed: {reason}",
                family=family,
                name=name,
                reason=result.getErrorMessage() or result.type.__name__,
            )
    if len(failures) == 2:
        raise BootstrapDNSError(
            f"DNS lookups of {name!r} failed: "
            + "; ".join(f.getErrorMessage() or f.type.__name__ for f in failures)
        )
    return list(dict.fromkeys(addresses))


class StaticBootstrapper:
    """
    A fixed list of peers (C{--static-bootstrap-peers}).

    Host names are allowed if a resolver is given: they are resolved on every call, so a
    peer that moved is found at its new address on the next bootstrap.
    """

    def __init__(
        self,
        peers: Sequence[Address],
        *,
        resolver: IResolver | None = None,
        timeout: Sequence[int] | None = DEFAULT_DNS_TIMEOUT,
    ) -> None:
        checked = []
        for peer in peers:
            if not (isinstance(peer, tuple) and len(peer) == 2 and isinstance(peer[0], str)):
                raise ValueError(f"static peer {peer!r}: expected a (host, port) tuple")
            host, port = peer
            what = f"static peer {peer!r}"
            port = _check_port(port, what)
            canonical = _ip_literal(host)
            if canonical is None:
                if not _is_hostname(host):
                    raise ValueError(f"{what}: {host!r} is neither an IP address nor a host name")
                if resolver is None:
                    raise ValueError(f"{what}: host name {host!r} needs a resolver")
                checked.append((host.lower(), port))
            else:
                checked.append((canonical, port))
        self._peers: tuple[Address, ...] = tuple(checked)
        self._resolver = resolver
        self._timeout = timeout

    def peers(self) -> Deferred[list[Address]]:
        """The configured peers, host names resolved to every address they have."""
        if all(_ip_literal(host) is not None for host, _ in self._peers):
            return succeed(list(self._peers))
        return Deferred.fromCoroutine(self._resolved_peers())

    async def _resolved_peers(self) -> list[Address]:
        assert self._resolver is not None
        found: list[Address] = []
        for host, port in self._peers:
            if _ip_literal(host) is not None:
                found.append((host, port))
                continue
            try:
                addresses = await _resolve(self._resolver, host, self._timeout)
            except BootstrapDNSError as e:
                # One unresolvable peer must not hide the others.
                _log.warn("Static bootstrap peer {host} not resolved: {e}", host=host, e=e)
                continue
            found.extend((address, port) for address in addresses)
        return _unique(found)


class DNSBootstrapper:
    """
    The A and AAAA records of a domain (C{--dns-bootstrap-domain}), typically a Kubernetes
    headless Service with C{publishNotReadyAddresses: true}, so that nodes not yet ready
    (not yet joined) can still be found. Every address gets the same router C{port}: all
    nodes of a DaemonSet listen on the same one.

    The domain is looked up as written, without resolv.conf search domains: give it fully
    qualified (C{spegel.kube-system.svc.cluster.local}).
    """

    def __init__(
        self,
        domain: str,
        port: int,
        resolver: IResolver,
        *,
        timeout: Sequence[int] | None = DEFAULT_DNS_TIMEOUT,
    ) -> None:
        if not isinstance(domain, str) or not _is_hostname(domain):
            raise ValueError(f"DNS bootstrap domain {domain!r} is not a valid domain name")
        self._domain = domain
        self._port = _check_port(port, f"DNS bootstrap domain {domain!r}")
        self._resolver = resolver
        self._timeout = timeout

    def peers(self) -> Deferred[list[Address]]:
        """Every address of the domain with the router port; empty if the domain is unknown."""
        return Deferred.fromCoroutine(self._peers())

    async def _peers(self) -> list[Address]:
        addresses = await _resolve(self._resolver, self._domain, self._timeout)
        return [(address, self._port) for address in addresses]


@frozen
class BootstrapInfo:
    """
    What a node's L{HTTPBootstrapServer} serves about it.

    @ivar node_id: the node's 256-bit id.
    @ivar host: the IP peers reach its router at.
    @ivar port: its router's UDP port.
    """

    node_id: bytes
    host: str
    port: int

    def to_json(self) -> bytes:
        return json.dumps(
            {"node_id": self.node_id.hex(), "host": self.host, "port": self.port}
        ).encode("utf-8")


def parse_bootstrap_document(body: bytes, url_host: str) -> BootstrapInfo:
    """
    Validate the JSON document of an L{HTTPBootstrapServer}.

    An unspecified host (C{0.0.0.0}, C{::}: the peer listens on every interface and did not
    say which one to use) is replaced by the host the document was fetched from, when that
    is an IP literal.

    @raise BootstrapResponseInvalid: naming the first thing wrong with C{body}.
    """
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BootstrapResponseInvalid(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise BootstrapResponseInvalid(f"expected a JSON object, got {type(document).__name__}")
    for key, kind in (("node_id", str), ("host", str), ("port", int)):
        if key not in document:
            raise BootstrapResponseInvalid(f"missing {key!r}")
        value = document[key]
        if type(value) is not kind:
            raise BootstrapResponseInvalid(
                f"{key!r} must be a JSON {'string' if kind is str else 'integer'},"
                f" got {value!r}"
            )
    node_id_text, host, port = document["node_id"], document["host"], document["port"]
    if len(node_id_text) != 2 * NODE_ID_BYTES or not re.fullmatch(r"[0-9a-fA-F]*", node_id_text):
        raise BootstrapResponseInvalid(
            f"'node_id' must be {2 * NODE_ID_BYTES} hex digits, got {node_id_text!r}"
        )
    if not 1 <= port <= 65535:
        raise BootstrapResponseInvalid(f"'port' must be from 1 to 65535, got {port}")
    canonical = _ip_literal(host)
    if canonical is None:
        raise BootstrapResponseInvalid(f"'host' must be an IP address, got {host!r}")
    if ipaddress.ip_address(canonical).is_unspecified:
        fallback = _ip_literal(url_host)
        if fallback is None:
            raise BootstrapResponseInvalid(
                f"'host' is the unspecified address {canonical!r} and the URL's host"
                f" {url_host!r} is not an IP address to use instead"
            )
        canonical = fallback
    return BootstrapInfo(node_id=bytes.fromhex(node_id_text), host=canonical, port=port)


class HTTPBootstrapper:
    """
    Reads one peer's L{BootstrapInfo} from its L{HTTPBootstrapServer}
    (C{--http-bootstrap-url}); usually a Service URL, so any ready peer answers.

    @param treq: the HTTP client, the C{treq} module or anything with its C{get} (an
        C{HTTPClient}, a C{StubTreq}).
    @param clock: times out the request (headers and body); L{None} leaves the timeout to
        treq, on the global reactor, and covering the response headers only.
    """

    def __init__(
        self,
        url: str,
        *,
        treq: typing.Any = treq,
        clock: IReactorTime | None = None,
        timeout: float = DEFAULT_HTTP_TIMEOUT,
    ) -> None:
        try:
            parsed = DecodedURL.from_text(url)
        except Exception:
            raise ValueError(f"HTTP bootstrap URL {url!r} is not a URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"HTTP bootstrap URL {url!r} must be http:// or https:// with a host")
        if timeout <= 0:
            raise ValueError(f"HTTP bootstrap timeout must be positive, got {timeout!r}")
        self._url = url
        self._host = parsed.host
        self._treq = treq
        self._clock = clock
        self._timeout = timeout

    def info(self) -> Deferred[BootstrapInfo]:
        """
        The peer's id and address.

        @raise BootstrapHTTPError: no connection, timeout, or a status other than 200.
        @raise BootstrapResponseInvalid: the body is not the documented JSON.
        """
        return Deferred.fromCoroutine(self._info())

    def peers(self) -> Deferred[list[Address]]:
        """The one peer the URL answered for."""
        return Deferred.fromCoroutine(self._peers())

    async def _peers(self) -> list[Address]:
        info = await self.info()
        return [(info.host, info.port)]

    async def _info(self) -> BootstrapInfo:
        fetch = Deferred.fromCoroutine(self._fetch())
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            fetch.cancel()

        # Our own timer rather than treq's: it covers reading the body too, and a cancelled
        # request surfaces as various wrapped errors that only this flag tells apart.
        timer = self._clock.callLater(self._timeout, expire) if self._clock else None
        try:
            body = await fetch
        except Exception as e:
            if timed_out:
                raise BootstrapHTTPError(
                    f"GET {self._url} took longer than {self._timeout}s"
                ) from None
            if isinstance(e, (BootstrapError, CancelledError)):
                raise
            raise BootstrapHTTPError(f"GET {self._url} failed: {_describe(e)}") from e
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        return parse_bootstrap_document(body, self._host)

    async def _fetch(self) -> bytes:
        kwargs = {}
        if self._clock is None:
            kwargs["timeout"] = self._timeout
        response: IResponse = await self._treq.get(
            self._url, headers={"Accept": ["application/json"]}, unbuffered=True, **kwargs
        )
        if response.code != 200:
            # The body is not read: close the connection rather than wait for it.
            response.deliverBody(_Discard())
            raise BootstrapHTTPError(
                f"GET {self._url} answered {response.code}, expected 200", status=response.code
            )
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > MAX_BOOTSTRAP_DOCUMENT:
                raise BootstrapResponseInvalid(
                    f"GET {self._url}: body larger than {MAX_BOOTSTRAP_DOCUMENT} bytes"
                )
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)


def _describe(error: BaseException) -> str:
    """
    A one-line reason for a failed request. twisted.web's ResponseFailed and friends wrap
    the real causes in a list of Failures whose repr says nothing to an operator.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(
            reason.getErrorMessage() or reason.type.__name__
            for reason in reasons
            if isinstance(reason, Failure)
        ) or type(error).__name__
    return str(error) or type(error).__name__


class _Discard:
    """An IProtocol for a response body nobody wants: stops the transport at once."""

    def makeConnection(self, transport: typing.Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


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
    canonical = _ip_literal(info.host)
    if canonical is None or not ipaddress.ip_address(canonical).is_unspecified:
        return info
    local = _ip_literal(getattr(request.getHost(), "host", "") or "")
    if local is None:
        return info
    address = ipaddress.ip_address(local)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the UDP router wants a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return evolve(info, host=str(mapped or address))


class HTTPBootstrapServer(Service):
    """
    Serves L{BootstrapInfoResource} (C{--http-bootstrap-addr}) on a Twisted endpoint string
    such as C{"tcp:5002:interface=127.0.0.1"}.

    @ivar resource: the resource served, for tests with C{StubTreq}.
    """

    def __init__(
        self, reactor: typing.Any, endpoint: str, info: Callable[[], BootstrapInfo]
    ) -> None:
        try:
            self._endpoint = serverFromString(reactor, endpoint)
        except Exception as e:
            raise ValueError(f"HTTP bootstrap address {endpoint!r} is not an endpoint: {e}") from None
        self._description = endpoint
        self.resource = BootstrapInfoResource(info)
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._listen_failure: Failure | None = None
        self._port_waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        self._port = self._listen_failure = None
        site = Site(self.resource)
        site.noisy = False
        self._listening = self._endpoint.listen(site)
        self._listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        self._port = port
        _log.info("HTTP bootstrap server listening on {address}", address=port.getHost())
        self._notify(port)

    def _listen_failed(self, failure: Failure) -> None:
        self._listening = None
        if not failure.check(CancelledError):
            # Logged here, not raised: the DHT works without this server, peers that use it
            # to bootstrap retry, and the log says why they find nobody.
            _log.failure(
                "HTTP bootstrap server could not listen on {endpoint}",
                failure,
                endpoint=self._description,
            )
        self._listen_failure = failure
        self._notify(failure)

    def _notify(self, outcome: IListeningPort | Failure) -> None:
        waiters, self._port_waiters = self._port_waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def listening_port(self) -> Deferred[IListeningPort]:
        """
        Fires with the listening port once started (for tests listening on port 0), or fails
        as listening failed.
        """
        if self._port is not None:
            return succeed(self._port)
        if self._listen_failure is not None:
            return fail(self._listen_failure)
        if self._listening is None:
            raise RuntimeError("HTTPBootstrapServer is not started")
        waiter: Deferred[IListeningPort] = Deferred(lambda d: self._port_waiters.remove(d))
        self._port_waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self._listening = self._listening, None
        port, self._port = self._port, None
        if listening is not None:
            listening.cancel()
        if port is None:
            return succeed(None)
        # stopListening may return a Deferred or None.
        return maybeDeferred(port.stopListening)


# --- the service that keeps the node joined ----------------------------------------------------


@frozen
class JoinResult:
    """
    What the node's join reports.

    @ivar peers_found: routing table size after the join (other nodes only).
    @ivar only_self: every address that answered was this node itself: a single-node cluster.
    """

    peers_found: int
    only_self: bool


JITTER = 0.5
"""A retry waits between (1 - JITTER) and 1 times its backoff: nodes that failed together
(a DNS outage, a whole cluster starting) spread their retries instead of retrying in step."""


class Bootstrapping(Service):
    """
    Joins the cluster at start, retrying until it works, and re-joins periodically.

    While a join finds nobody (no candidates, C{peers()} or C{join} failing, nobody answering)
    the next attempt waits C{min_backoff}, then twice as long each time up to C{max_backoff},
    each wait shortened by up to L{JITTER} of itself using C{random_source}. Once joined, it
    bootstraps again every C{rejoin_interval}; a failed re-join goes back to the backoff.
    One attempt runs at a time.

    Failures are logged, never raised: L{BootstrapError}s and network/DNS errors as warnings,
    anything else (a bug) with its traceback.

    @ivar joined: True once a join found at least one other node, or was answered only by
        this node (a single-node cluster). It stays True when a later re-join fails: the
        routing table still holds what it held, and readiness should not flap with DNS.
    """

    def __init__(
        self,
        clock: IReactorTime,
        bootstrapper: Bootstrapper,
        join: Callable[[list[Address]], Deferred[JoinResult]],
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        rejoin_interval: float = 300.0,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(
                f"backoff must satisfy 0 < min_backoff <= max_backoff,"
                f" got {min_backoff!r} and {max_backoff!r}"
            )
        if not rejoin_interval > 0:
            raise ValueError(f"rejoin_interval must be positive, got {rejoin_interval!r}")
        self._clock = clock
        self._bootstrapper = bootstrapper
        self._join = join
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._rejoin_interval = rejoin_interval
        self._random = random_source
        self.joined = False
        self.consecutive_failures = 0
        self._next_attempt: IDelayedCall | None = None
        self._in_flight: Deferred[JoinResult] | None = None
        self._waiters: list[Deferred[None]] = []

    def when_joined(self) -> Deferred[None]:
        """Fires once L{joined} is True (at once if it already is)."""
        if self.joined:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._attempt()

    def stopService(self) -> None:
        super().stopService()
        if self._next_attempt is not None:
            self._next_attempt.cancel()
            self._next_attempt = None
        if self._in_flight is not None:
            # The attempt's own errback sees the service stopped and schedules nothing.
            self._in_flight.cancel()

    def bootstrap_now(self) -> None:
        """
        Bootstrap at once instead of at the next scheduled time, e.g. when the node's routing
        table has just emptied. Does nothing while an attempt is running or when stopped.
        """
        if not self.running or self._in_flight is not None:
            return
        if self._next_attempt is not None:
            self._next_attempt.cancel()
            self._next_attempt = None
        self._attempt()

    def backoff(self, failures: int) -> float:
        """The wait after C{failures} consecutive failed attempts (C{failures} >= 1)."""
        # The exponent is bounded so that a node failing for days does not overflow a float.
        base = min(self._max_backoff, self._min_backoff * 2 ** min(failures - 1, 64))
        return base * (1 - JITTER * self._random())

    def _attempt(self) -> None:
        self._next_attempt = None
        attempt = Deferred.fromCoroutine(self._bootstrap_once())
        self._in_flight = attempt
        attempt.addCallbacks(self._succeeded, self._failed)
        attempt.addErrback(lambda failure: _log.failure("Bootstrap scheduling failed", failure))

    async def _bootstrap_once(self) -> JoinResult:
        candidates = _unique(await self._bootstrapper.peers())
        if not candidates:
            raise NoCandidates("the bootstrap source returned no address")
        result = await self._join(candidates)
        if result.peers_found < 1 and not result.only_self:
            raise NobodyAnswered(f"none of {len(candidates)} candidate peers answered")
        return result

    def _succeeded(self, result: JoinResult) -> None:
        self._in_flight = None
        self.consecutive_failures = 0
        if not self.joined:
            self.joined = True
            _log.info(
                "Joined the cluster: {peers} peers{alone}",
                peers=result.peers_found,
                alone=" (only this node answered: a single-node cluster)"
                if result.only_self
                else "",
            )
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._schedule(self._rejoin_interval)

    def _failed(self, failure: Failure) -> None:
        self._in_flight = None
        if not self.running:
            # Cancelled by stopService, or finished after it: nothing to report or retry.
            return
        self.consecutive_failures += 1
        delay = self.backoff(self.consecutive_failures)
        if failure.check(*_EXPECTED_FAILURES):
            _log.warn(
                "Bootstrap attempt {n} failed: {reason}; retrying in {delay:.2f}s",
                n=self.consecutive_failures,
                reason=failure.getErrorMessage() or failure.type.__name__,
                delay=delay,
            )
        else:
            _log.failure(
                "Bootstrap attempt {n} failed; retrying in {delay:.2f}s",
                failure,
                n=self.consecutive_failures,
                delay=delay,
            )
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._next_attempt = self._clock.callLater(delay, self._attempt)


# --- wiring from the node's configuration ------------------------------------------------------


def system_resolver(reactor: typing.Any) -> IResolver:
    """
    What C{twisted.names.client.createResolver()} builds (/etc/hosts, then the servers of
    /etc/resolv.conf), but on the given reactor instead of the global one.
    """
    from twisted.names import client, hosts, resolve

    return resolve.ResolverChain(
        [hosts.Resolver(b"/etc/hosts"), client.Resolver(b"/etc/resolv.conf", reactor=reactor)]
    )


def bootstrapper_from_config(reactor: typing.Any, config: typing.Any) -> Bootstrapper | None:
    """
    The bootstrapper C{config} (a L{spegel.dht.config.RouterConfig}) asks for, or L{None}
    when it asks for none.

    @raise ValueError: the kind is unknown or the options it needs are missing.
    """
    kind = config.bootstrap_kind
    if kind is None:
        return None
    if kind == "static":
        if not config.static_peers:
            raise ValueError("--bootstrap-kind static needs --static-bootstrap-peers")
        needs_dns = any(_ip_literal(host) is None for host, _ in config.static_peers)
        resolver = None
        if needs_dns:
            resolver = config.dns_resolver or system_resolver(reactor)
        return StaticBootstrapper(config.static_peers, resolver=resolver)
    if kind == "dns":
        if not config.dns_domain:
            raise ValueError("--bootstrap-kind dns needs --dns-bootstrap-domain")
        if not config.listen_port:
            raise ValueError(
                "--bootstrap-kind dns needs a fixed router port: peers are found at the"
                " domain's addresses on this node's own router port"
            )
        from spegel.dht.dnsclient import BootstrapResolver

        # Not Twisted's resolver: the answer lists every node, and hundreds of them need EDNS0
        # and short-lived TCP (see spegel.dht.dnsclient).
        return DNSBootstrapper(
            config.dns_domain,
            config.listen_port,
            config.dns_resolver or BootstrapResolver(reactor),
        )
    if kind == "http":
        if not config.http_bootstrap_url:
            raise ValueError("--bootstrap-kind http needs --http-bootstrap-url")
        from twisted.web.client import Agent

        return HTTPBootstrapper(
            config.http_bootstrap_url,
            treq=HTTPClient(Agent(reactor)),
            clock=reactor,
        )
    raise ValueError(f"unknown bootstrap kind {kind!r}: expected static, dns or http")
