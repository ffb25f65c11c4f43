# -*- test-case-name: tests.unit.test_addresses -*-
"""
Tests for L{spegel.addresses}, the one grammar for hosts, ports and URLs, and that every entry
point that reads one (the node's flags, C{spegel configuration}, C{spegel cleanup},
C{spegel cleanup-wait}, the DHT bootstrap) answers the same text the same way.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from spegel import addresses, flags, hostsconfig
from spegel.addresses import InvalidAddress, ListenAddress, RegistryURL, parse_host_port
from spegel.dht import bootstrap


class RegistryURLTests(SynchronousTestCase):
    def test_normalised(self) -> None:
        cases = {
            "https://docker.io": ("https", "docker.io"),
            "HTTPS://Registry.Example.COM:443": ("https", "registry.example.com:443"),
            "http://[FD00:0::1]:30020": ("http", "[fd00::1]:30020"),
            "http://my_registry.local": ("http", "my_registry.local"),
        }
        for text, (scheme, netloc) in cases.items():
            self.assertEqual(addresses.parse_registry_url(text), RegistryURL(scheme, netloc), text)

    def test_explicit_default_port_kept(self) -> None:
        """
        containerd reads registry.example.com:443/hosts.toml for images named with the port,
        registry.example.com/hosts.toml for the others: the two are different registries.
        """
        self.assertEqual(str(addresses.parse_registry_url("https://r.example:443")), "https://r.example:443")
        self.assertEqual(str(addresses.parse_registry_url("https://r.example")), "https://r.example")

    def test_mistyped_ipv4_is_not_a_host_name(self) -> None:
        e = self.assertRaises(InvalidAddress, addresses.parse_registry_url, "http://10.0.0.256:5000")
        self.assertIn("neither an IP address nor a valid host name", str(e))


class NetlocTests(SynchronousTestCase):
    def test_same_as_a_registry_url(self) -> None:
        for netloc in ("docker.io", "Registry.Example:443", "127.0.0.1:5000", "[FD00::1]:5000", "[::1]"):
            self.assertEqual(
                addresses.parse_netloc(netloc), addresses.parse_registry_url(f"http://{netloc}").netloc
            )

    def test_refused(self) -> None:
        for text in ("", "docker.io:0", "docker.io/", "::1", "a b", "docker.io:"):
            self.assertRaises(InvalidAddress, addresses.parse_netloc, text)

    def test_url_refused_saying_why(self) -> None:
        for text in ("https://docker.io/", "http://127.0.0.1:5000", "docker.io/library"):
            e = self.assertRaises(InvalidAddress, addresses.parse_netloc, text)
            self.assertIn("without a scheme or a path", str(e))


class HTTPURLTests(SynchronousTestCase):
    def test_path_allowed(self) -> None:
        url = "http://spegel-bootstrap.spegel.svc:5002/"
        self.assertEqual(addresses.parse_http_url(url), url)

    def test_refused(self) -> None:
        for text, reason in (
            ("spegel:5002", "http:// or https://"),
            ("http://:5002/", "missing host"),
            ("http://u:p@peer/", "credentials"),
            ("http://peer:0/", "port"),
        ):
            e = self.assertRaises(InvalidAddress, addresses.parse_http_url, text, role="HTTP bootstrap")
            self.assertIn(reason, str(e), text)
            self.assertIn("HTTP bootstrap", str(e))


class ListenAddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(addresses.parse_listen_address(":5000"), ListenAddress("", 5000))
        self.assertEqual(addresses.parse_listen_address("[::]:5000"), ListenAddress("::", 5000))
        self.assertEqual(addresses.parse_listen_address("127.0.0.1:1"), ListenAddress("127.0.0.1", 1))
        self.assertEqual(str(ListenAddress("::1", 8080)), "[::1]:8080")
        self.assertEqual(str(ListenAddress("", 8080)), ":8080")

    def test_bad_host_refused_before_listening(self) -> None:
        """
        The host was not checked before: C{bad!host:5000} failed only when the port was bound.
        """
        e = self.assertRaises(InvalidAddress, addresses.parse_listen_address, "bad!host:5000")
        self.assertIn("[host]:port", str(e))


class HostPortPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=60))
    def test_listen_address_never_crashes(self, text: str) -> None:
        try:
            address = addresses.parse_listen_address(text)
        except InvalidAddress:
            return
        self.assertTrue(1 <= address.port <= 65535)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=60))
    def test_registry_url_never_crashes(self, text: str) -> None:
        try:
            url = addresses.parse_registry_url(text)
        except InvalidAddress:
            return
        self.assertEqual(addresses.parse_registry_url(str(url)), url)


class DriftTests(SynchronousTestCase):
    """
    The cases where the entry points used to disagree: the node took C{https://docker.io/} and
    port 0 where C{spegel configuration} and the chart's values schema refused them. Now all
    refuse them, each with one line that says why, so a value cannot pass the node and then
    fail the init container (or the other way round).
    """

    def node_error(self, *argv: str) -> str:
        from spegel.tap import Options

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            Options().parseOptions(list(argv))
        (line,) = stderr.getvalue().splitlines()
        return line

    def configuration_error(self, url: str) -> str:
        return str(self.assertRaises(hostsconfig.InvalidRegistryURL, hostsconfig.parse_registry_url, url))

    def test_trailing_slash(self) -> None:
        for error in (
            self.node_error("--mirrored-registries", "https://docker.io/"),
            self.configuration_error("https://docker.io/"),
        ):
            self.assertIn("it must not have a path, not even '/'", error)

    def test_port_zero_in_urls(self) -> None:
        for error in (
            self.node_error("--mirrored-registries", "https://docker.io:0"),
            self.configuration_error("https://docker.io:0"),
        ):
            self.assertIn("port must be an integer from 1 to 65535, got 0", error)

    def test_port_zero_in_addresses(self) -> None:
        for error in (
            self.node_error("--registry-addr", ":0"),
            self.node_error("--static-bootstrap-peers", "10.0.0.1:0"),
            str(self.assertRaises(ValueError, bootstrap.parse_host_port, "10.0.0.1:0")),
            str(self.assertRaises(ValueError, flags.parse_listen_address, "127.0.0.1:0")),
        ):
            self.assertIn("port must be an integer from 1 to 65535, got 0", error)

    def test_same_host_names(self) -> None:
        """
        Underscores were allowed in registry URLs and refused in bootstrap peers.
        """
        self.assertEqual(bootstrap.parse_host_port("my_peer.local:5001"), ("my_peer.local", 5001))
        self.assertEqual(hostsconfig.parse_registry_url("http://my_peer.local:5001").netloc, "my_peer.local:5001")
        self.assertEqual(flags.parse_listen_address("my_peer.local:5001").host, "my_peer.local")


class ParseHostPortTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1:5001"), ("10.0.0.1", 5001))

    def test_whitespace_ignored(self) -> None:
        self.assertEqual(parse_host_port(" 10.0.0.1:5001\n"), ("10.0.0.1", 5001))

    def test_bracketed_ipv6_canonicalised(self) -> None:
        self.assertEqual(parse_host_port("[::1]:5001"), ("::1", 5001))
        self.assertEqual(parse_host_port("[2001:DB8:0::1]:80"), ("2001:db8::1", 80))

    def test_hostname(self) -> None:
        self.assertEqual(
            parse_host_port("Node-1.spegel.svc.cluster.local:5001"),
            ("node-1.spegel.svc.cluster.local", 5001),
        )

    def test_default_port(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1", 5001), ("10.0.0.1", 5001))
        self.assertEqual(parse_host_port("[::1]", 7), ("::1", 7))
        self.assertEqual(parse_host_port("::1", 7), ("::1", 7))
        self.assertEqual(parse_host_port("peer", 9), ("peer", 9))

    def test_explicit_port_wins_over_default(self) -> None:
        self.assertEqual(parse_host_port("10.0.0.1:6000", 5001), ("10.0.0.1", 6000))

    def assertRejected(self, text: str, *words: str, default_port: int | None = None) -> None:
        with self.assertRaises(ValueError) as raised:
            parse_host_port(text, default_port)
        message = str(raised.exception)
        for word in words:
            self.assertIn(word, message)

    def test_missing_port(self) -> None:
        self.assertRejected("10.0.0.1", "'10.0.0.1'", "missing port")
        self.assertRejected("[::1]", "missing port")

    def test_bare_ipv6_with_port_is_ambiguous(self) -> None:
        self.assertRejected("::1", "missing port")
        self.assertRejected("fe80:1:2:5001:zz", "[address]:port")

    def test_bad_ports(self) -> None:
        for text in ("h:0", "h:65536", "h:abc", "h:", "h:-1", "h:+5", "h: 5", "h:1e3", "h:٣"):
            self.assertRejected(text, repr(text), "port")

    def test_bad_default_port(self) -> None:
        self.assertRejected("10.0.0.1", "port", default_port=0)

    def test_bad_hosts(self) -> None:
        self.assertRejected("", "empty")
        self.assertRejected(":5001", "missing host")
        self.assertRejected("bad_host!:5001", "'bad_host!'", "neither")
        self.assertRejected("1.2.3.999:5001", "neither")
        self.assertRejected("-peer:5001", "neither")

    def test_bad_brackets(self) -> None:
        self.assertRejected("[::1:5001", "missing ']'")
        self.assertRejected("[10.0.0.1]:5001", "not an IPv6 address")
        self.assertRejected("[::1]5001", "after ']'")



class ParseHostPortPropertyTests(SynchronousTestCase):
    """Whatever the input, parse_host_port answers with a value or its documented error."""

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_parse_host_port_never_crashes(self, text: str) -> None:
        try:
            host, port = parse_host_port(text)
        except ValueError:
            return
        self.assertTrue(1 <= port <= 65535)
        self.assertTrue(host)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
    def test_parse_host_port_round_trip(self, address: Any, port: int) -> None:
        text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        self.assertEqual(parse_host_port(text), (str(address), port))
