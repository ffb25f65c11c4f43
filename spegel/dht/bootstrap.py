# -*- test-case-name: tests.unit.test_dht_bootstrap -*-
"""
Bootstrap: how a node that knows nobody finds its first peers.

Kademlia (Maymounkov & Mazières, section 2.3) joins a network from "some node w that is already
participating": the joining node inserts w into its k-bucket, then looks up its own id. The
candidates for w, and the retries until the join works, are split by concern:

  - L{spegel.dht.bootstrap_sources}: the L{Bootstrapper}s (static list, DNS, HTTP) and the
    HTTP bootstrap document;
  - L{spegel.dht.bootstrap_server}: the HTTP bootstrap server (C{--http-bootstrap-addr});
  - L{spegel.dht.bootstrap_service}: L{Bootstrapping}, the service that joins with backoff and
    re-joins periodically.

This module wires them from the node's configuration (L{bootstrapper_from_config}) and keeps
the names the rest of spegel imports from here. The node (L{spegel.dht.service}) supplies
C{join}: it PINGs the candidates, skips the one that turns out to be itself, fills its routing
table and reports a L{JoinResult}.
"""

from __future__ import annotations

import typing

from treq.client import HTTPClient
from twisted.internet.interfaces import IResolver

from spegel.addresses import ip_literal, parse_host_port
from spegel.dht.bootstrap_server import BootstrapInfoResource, HTTPBootstrapServer
from spegel.dht.bootstrap_service import JITTER, Bootstrapping, JoinResult
from spegel.dht.bootstrap_sources import (
    DEFAULT_DNS_TIMEOUT,
    DEFAULT_HTTP_TIMEOUT,
    MAX_BOOTSTRAP_DOCUMENT,
    NODE_ID_BYTES,
    Address,
    BootstrapDNSError,
    BootstrapError,
    BootstrapHTTPError,
    BootstrapInfo,
    Bootstrapper,
    BootstrapResponseInvalid,
    DNSBootstrapper,
    HTTPBootstrapper,
    NoCandidates,
    NobodyAnswered,
    StaticBootstrapper,
    _answer_addresses,
    parse_bootstrap_document,
)

__all__ = [
    "DEFAULT_DNS_TIMEOUT",
    "DEFAULT_HTTP_TIMEOUT",
    "JITTER",
    "MAX_BOOTSTRAP_DOCUMENT",
    "NODE_ID_BYTES",
    "Address",
    "BootstrapDNSError",
    "BootstrapError",
    "BootstrapHTTPError",
    "BootstrapInfo",
    "BootstrapInfoResource",
    "Bootstrapper",
    "Bootstrapping",
    "BootstrapResponseInvalid",
    "DNSBootstrapper",
    "HTTPBootstrapServer",
    "HTTPBootstrapper",
    "JoinResult",
    "NoCandidates",
    "NobodyAnswered",
    "StaticBootstrapper",
    "_answer_addresses",
    "bootstrapper_from_config",
    "parse_bootstrap_document",
    "parse_host_port",
    "system_resolver",
]


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
        needs_dns = any(ip_literal(host) is None for host, _ in config.static_peers)
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
