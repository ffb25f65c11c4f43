# -*- test-case-name: tests.unit.test_dht_bootstrap_sources, tests.e2e.test_dht_bootstrap_sources_real -*-
"""
Where a node that knows nobody finds candidate peers (see L{spegel.dht.bootstrap}): a
L{Bootstrapper} yields addresses, which may include this node itself.

  - L{StaticBootstrapper}: a fixed list (C{--static-bootstrap-peers}), names resolved each time;
  - L{DNSBootstrapper}: the A/AAAA records of a Kubernetes headless Service;
  - L{HTTPBootstrapper}: the L{BootstrapInfo} a peer's HTTP bootstrap server
    (L{spegel.dht.bootstrap_server}) serves.

Hosts and ports follow the one grammar of L{spegel.addresses}.
"""

from __future__ import annotations

import ipaddress
import json
import re
import typing
from collections.abc import Iterable, Sequence

import treq
from attrs import frozen
from hyperlink import DecodedURL
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    succeed,
)
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from spegel.addresses import InvalidAddress, check_port, ip_literal, is_hostname, parse_host, parse_http_url
from spegel.peerresponse import PeerFailed, discard, read_capped

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
    found: list[str] = []
    for record in answers:
        # The payload's class is the record's type (dns.A, dns.AAAA).
        if isinstance(record.payload, dns.Record_A):
            found.append(str(ipaddress.IPv4Address(record.payload.address)))
        elif isinstance(record.payload, dns.Record_AAAA):
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


class AddressResolver(typing.Protocol):
    """
    The lookups L{_resolve} makes: any L{IResolver}'s, and L{spegel.dht.dnsclient.BootstrapResolver}'s.
    """

    def lookupAddress(self, name: str, timeout: Sequence[int]) -> Deferred[typing.Any]: ...

    def lookupIPV6Address(self, name: str, timeout: Sequence[int]) -> Deferred[typing.Any]: ...


async def _resolve(
    resolver: AddressResolver, name: str, timeout: Sequence[int] | None
) -> list[str]:
    """
    Every A and AAAA address of C{name}, IPv4 first. A family that does not exist (NXDOMAIN,
    or no records of that type) contributes nothing; one family failing (say, a DNS server
    that times out on AAAA) is logged and the other is used.

    @raise BootstrapDNSError: if both lookups failed for another reason than NXDOMAIN.
    """
    results = await DeferredList(
        # None is the resolvers' own default timeout, which IResolver's annotation leaves out.
        [resolver.lookupAddress(name, timeout), resolver.lookupIPV6Address(name, timeout)],  # type: ignore[arg-type]  # None: their default
        consumeErrors=True,
    )
    addresses: list[str] = []
    failures: list[Failure] = []
    for family, (_succeeded, result) in zip(("A", "AAAA"), results):
        if not isinstance(result, Failure):
            # Three sections (answers, authority, additional), each a list of records, which
            # IResolver's annotation gives as three records.
            answers, _authority, _additional = typing.cast("tuple[list[dns.RRHeader], ...]", result)
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
                reason=result.getErrorMessage() or type(result.value).__name__,
            )
    if len(failures) == 2:
        raise BootstrapDNSError(
            f"DNS lookups of {name!r} failed: "
            + "; ".join(f.getErrorMessage() or type(f.value).__name__ for f in failures)
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
            try:
                host = parse_host(host)
            except InvalidAddress as e:
                raise ValueError(f"{what}: {e}") from None
            if ip_literal(host) is None and resolver is None:
                raise ValueError(f"{what}: host name {host!r} needs a resolver")
            checked.append((host, port))
        self._peers: tuple[Address, ...] = tuple(checked)
        self._resolver = resolver
        self._timeout = timeout

    def peers(self) -> Deferred[list[Address]]:
        """The configured peers, host names resolved to every address they have."""
        if all(ip_literal(host) is not None for host, _ in self._peers):
            return succeed(list(self._peers))
        return Deferred.fromCoroutine(self._resolved_peers())

    async def _resolved_peers(self) -> list[Address]:
        assert self._resolver is not None
        found: list[Address] = []
        for host, port in self._peers:
            if ip_literal(host) is not None:
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
        resolver: AddressResolver,
        *,
        timeout: Sequence[int] | None = DEFAULT_DNS_TIMEOUT,
    ) -> None:
        if not isinstance(domain, str) or not is_hostname(domain):
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
    canonical = ip_literal(host)
    if canonical is None:
        raise BootstrapResponseInvalid(f"'host' must be an IP address, got {host!r}")
    if ipaddress.ip_address(canonical).is_unspecified:
        fallback = ip_literal(url_host)
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
            parse_http_url(url, role="HTTP bootstrap")
        except InvalidAddress as e:
            raise ValueError(str(e)) from None
        if timeout <= 0:
            raise ValueError(f"HTTP bootstrap timeout must be positive, got {timeout!r}")
        self._url = url
        self._host = DecodedURL.from_text(url).host
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
            discard(response)
            raise BootstrapHTTPError(
                f"GET {self._url} answered {response.code}, expected 200", status=response.code
            )
        try:
            # The idle timer closes the connection of a peer gone silent mid-body: the timer
            # in _info fails the request first, but cancelling the read does not stop it.
            return await read_capped(
                response,
                MAX_BOOTSTRAP_DOCUMENT,
                what="bootstrap document",
                clock=self._clock,
                idle_timeout=self._timeout,
            )
        except PeerFailed as e:
            # Too large, or cut short: either way not the document.
            raise BootstrapResponseInvalid(f"GET {self._url}: {e}") from None


def _describe(error: BaseException) -> str:
    """
    A one-line reason for a failed request. twisted.web's ResponseFailed and friends wrap
    the real causes in a list of Failures whose repr says nothing to an operator.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(
            reason.getErrorMessage() or type(reason.value).__name__
            for reason in reasons
            if isinstance(reason, Failure)
        ) or type(error).__name__
    return str(error) or type(error).__name__
