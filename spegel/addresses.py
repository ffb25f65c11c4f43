# -*- test-case-name: tests.unit.test_addresses -*-
"""
The one grammar for hosts, ports and URLs, used by every entry point: the node's flags
(L{spegel.tap}), the C{spegel} command (L{spegel.cli}, L{spegel.hostsconfig}), the DHT
bootstrap (L{spegel.dht.bootstrap}) and the registry named in a request's C{?ns=} or an image
name (L{spegel.oci.parse_registry_host}).

  - A B{host} is an IP literal (returned in canonical form: that is how UDP transports report
    a datagram's source, so one address written two ways compares equal) or a DNS name (RFC 1123
    labels, underscores allowed as clusters and /etc/hosts use them, lowercased). A name whose
    last label is all digits is refused: it is a mistyped IPv4 address (C{1.2.3.999}).
  - A B{port} is a decimal number from 1 to 65535. Port 0 ("any free port") is refused
    everywhere: a node's ports are advertised to its peers and written into containerd's
    configuration, so they must be the ones it listens on.
  - B{host:port}: an IPv6 literal with a port is written in brackets, C{[fd00::1]:5001}.
  - A B{listen address} is C{[host]:port}, the host empty for every interface.
  - A B{registry URL} is C{http(s)://host[:port]} and nothing else, not even a trailing C{/},
    as the chart's values schema has it: C{spegel configuration} names the containerd
    directory after its C{host[:port]}, and the node compares it with C{?ns=}.

Every parser raises L{ValueError} (L{InvalidAddress}) with a message that quotes the text and
says what is wrong with it. URLs are split by hyperlink; the authority's C{host[:port]} goes
through the same parser as every other C{host:port}.
"""

from __future__ import annotations

import ipaddress
import re

from attrs import frozen
from hyperlink import URL, URLParseError

# A label of a DNS name; underscores too (Kubernetes SRV-style names, /etc/hosts entries).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_SCHEMES = ("http", "https")


class InvalidAddress(ValueError):
    """
    A host, port, address or URL does not follow the grammar; the message says why.
    """


class _Why(Exception):
    """
    What is wrong with a piece of text, before the caller says which text and what for.
    """


@frozen
class ListenAddress:
    """
    Where to listen: C{host} empty means every interface.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)

    def endpoint_description(self, kind: str = "tcp", backlog: int | None = None) -> str:
        """
        A Twisted endpoint string for this address (colons of IPv6 literals escaped), with a
        listen C{backlog} when given.
        """
        description = f"{kind}:{self.port}"
        if backlog is not None:
            description += f":backlog={backlog}"
        if self.host:
            description += ":interface=" + self.host.replace(":", r"\:")
        return description


@frozen
class RegistryURL:
    """
    A registry or mirror endpoint: scheme and C{host[:port]}, nothing else.

    @ivar scheme: C{http} or C{https}.
    @ivar netloc: the host (lowercased, or an IP literal in canonical form, brackets around
        IPv6), and the port if one was given. It is what containerd sends as C{?ns=}, and the
        directory name containerd looks up for this registry.
    """

    scheme: str
    netloc: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def ip_literal(host: str) -> str | None:
    """
    The canonical text of C{host} if it is an IPv4 or IPv6 literal (no brackets), else L{None}.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def is_hostname(host: str) -> bool:
    """
    Whether C{host} is a DNS name (see the module docstring); a trailing dot is allowed.
    """
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def join_host_port(host: str, port: int) -> str:
    """
    C{host:port}, an IPv6 literal in brackets; an empty host (every interface) as C{:port}.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(port: object) -> int:
    """
    C{port} if it is an C{int} from 1 to 65535.

    @raise InvalidAddress: otherwise (C{True} included: it is never meant as port 1).
    """
    if type(port) is not int or not 1 <= port <= 65535:
        raise InvalidAddress(f"port must be an integer from 1 to 65535, got {port!r}")
    return port


def parse_host(host: str) -> str:
    """
    The canonical form of a host (IP literal or DNS name, no brackets).

    @raise InvalidAddress: when it is neither.
    """
    try:
        return _host(host)
    except _Why as why:
        raise InvalidAddress(f"{host!r}: {why}") from None


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    Parse C{host:port}, C{[ipv6]:port}, or a bare host when C{default_port} is given.

    A bare IPv6 literal (C{::1}) is accepted only without a port, since its last group could
    not be told apart from one. Surrounding whitespace is ignored.

    @raise InvalidAddress: naming C{text} and what is wrong with it.
    """
    try:
        if not text.strip():
            raise _Why("empty address: expected host:port")
        host, port = _host_port(text.strip())
        if port is None:
            if default_port is None:
                raise _Why("missing port; expected host:port")
            port = _checked_port(default_port)
        return _host(host, empty_ok=False), port
    except _Why as why:
        if not text.strip():
            raise InvalidAddress(str(why)) from None
        raise InvalidAddress(f"{text!r}: {why}") from None


def parse_netloc(text: str) -> str:
    """
    Validate C{host[:port]} (a registry as containerd names it in C{?ns=} and as its
    C{hosts.toml} directory) and return it normalised as L{RegistryURL.netloc} is.

    @raise InvalidAddress: naming C{text} and what is wrong with it.
    """
    try:
        if "/" in text:
            # A URL (https://docker.io/) or a path where containerd sends the host alone.
            raise _Why("expected host[:port], without a scheme or a path")
        if text.count(":") > 1 and not text.startswith("["):
            raise _Why("write an IPv6 address in brackets, [address] or [address]:port")
        host, port = _host_port(text)
        host = _host(host, empty_ok=False)
    except _Why as why:
        raise InvalidAddress(f"{text!r}: {why}") from None
    return join_host_port(host, port) if port is not None else _bracketed(host)


def parse_listen_address(text: str) -> ListenAddress:
    """
    Parse C{:5000}, C{127.0.0.1:5000} or C{[::1]:5000}.

    @raise InvalidAddress: unless C{text} is C{[host]:port}.
    """
    try:
        host, port = _host_port(text)
        if port is None:
            raise _Why("missing port")
        return ListenAddress(_host(host, empty_ok=True), port)
    except _Why as why:
        raise InvalidAddress(f"{text!r} is not an address of the form [host]:port: {why}") from None


def parse_registry_url(text: str, *, role: str = "registry") -> RegistryURL:
    """
    Validate and normalise a registry URL, C{http(s)://host[:port]}.

    @param role: what the URL is for (C{mirrored registry}, C{mirror target}), named in the
        error so the operator knows which flag to fix.
    @raise InvalidAddress: unless C{text} is C{http(s)://host[:port]} with no credentials,
        path (not even C{/}), query or fragment.
    """
    try:
        url, authority = _split_url(text)
        if url.userinfo:
            raise _Why("it must not contain credentials")
        # Query and fragment first: hyperlink reports an empty path before them as ('',).
        if url.query or "?" in text:
            raise _Why("it must not have a query")
        if url.fragment or "#" in text:
            raise _Why("it must not have a fragment")
        if url.path:
            raise _Why("it must not have a path, not even '/'")
        host, port = _host_port(authority)
        host = _host(host, empty_ok=False)
    except _Why as why:
        raise InvalidAddress(f"invalid {role} URL {text!r}: {why}") from None
    netloc = join_host_port(host, port) if port is not None else _bracketed(host)
    return RegistryURL(scheme=url.scheme.lower(), netloc=netloc)


def parse_http_url(text: str, *, role: str = "HTTP") -> str:
    """
    Validate an C{http(s)://host[:port][/path]} URL (a path and query are allowed, credentials
    are not) and return it as given.

    @raise InvalidAddress: naming C{role}, C{text} and what is wrong.
    """
    try:
        url, authority = _split_url(text)
        if url.userinfo:
            raise _Why("it must not contain credentials")
        host, _ = _host_port(authority)
        _host(host, empty_ok=False)
    except _Why as why:
        raise InvalidAddress(f"invalid {role} URL {text!r}: {why}") from None
    return text


def _split_url(text: str) -> tuple[URL, str]:
    """
    The URL hyperlink parses from C{text}, and its authority as written: hyperlink drops an
    explicit default port (C{:443}), which names a different containerd directory.
    """
    if not text:
        raise _Why("it is empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise _Why("it contains whitespace or control characters")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _Why("it must start with http:// or https://")
    try:
        url = URL.from_text(text)
    except URLParseError as e:
        if "port" in str(e):
            raise _Why("its port is not a number from 1 to 65535") from None
        raise _Why(str(e)) from None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    if not authority:
        raise _Why("it has no host")
    return url, authority


def _host_port(text: str) -> tuple[str, int | None]:
    """
    Split C{host[:port]}: the host as written (brackets removed), the port checked if given.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Why("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Why(f"{host!r} in brackets is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _Why(f"unexpected {rest!r} after ']'; expected ':port'")
        return host, _port_text(rest[1:])
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise _Why("not host:port; write an IPv6 address with a port as [address]:port") from None
        return text, None
    host, sep, port_text = text.partition(":")
    return host, _port_text(port_text) if sep else None


def _port_text(text: str) -> int:
    if not _PORT.fullmatch(text):
        raise _Why(f"port {text!r} is not a number from 1 to 65535")
    return _checked_port(int(text))


def _checked_port(port: object) -> int:
    try:
        return check_port(port)
    except InvalidAddress as e:
        raise _Why(str(e)) from None


def _host(host: str, *, empty_ok: bool = False) -> str:
    if not host:
        if empty_ok:
            return ""
        raise _Why("missing host before the port")
    canonical = ip_literal(host)
    if canonical is not None:
        return canonical
    if is_hostname(host):
        return host.lower()
    raise _Why(f"{host!r} is neither an IP address nor a valid host name")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
