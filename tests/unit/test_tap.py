"""
Tests for L{spegel.tap} and L{spegel.flags}: the node's command line.
"""

import io
import sys

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from spegel import flags
from spegel.oci import Reference
from spegel.oci import NameUnknown
from spegel.tap import Options


class FlagParserTests(SynchronousTestCase):
    def test_listen_address(self) -> None:
        self.assertEqual(flags.parse_listen_address(":5000"), flags.ListenAddress("", 5000))
        self.assertEqual(
            flags.parse_listen_address("127.0.0.1:5001"), flags.ListenAddress("127.0.0.1", 5001)
        )
        self.assertEqual(flags.parse_listen_address("[::1]:9090"), flags.ListenAddress("::1", 9090))
        self.assertEqual(
            flags.parse_listen_address("[::1]:9090").endpoint_description(),
            r"tcp:9090:interface=\:\:1",
        )
        self.assertEqual(
            flags.parse_listen_address("127.0.0.1:5000").endpoint_description(backlog=1024),
            "tcp:5000:backlog=1024:interface=127.0.0.1",
        )
        for bad in ["5000", "host:", "host:http", ":70000", "::1:5000", ""]:
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, flags.parse_listen_address, bad)

    def test_duration(self) -> None:
        self.assertAlmostEqual(flags.parse_duration("20ms"), 0.02)
        self.assertAlmostEqual(flags.parse_duration("1.5s"), 1.5)
        self.assertAlmostEqual(flags.parse_duration("1m30s"), 90)
        self.assertAlmostEqual(flags.parse_duration("500us"), 0.0005)
        for bad in ["", "20", "ms", "20 ms", "-1s", "1x", "1s2"]:
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, flags.parse_duration, bad)

    def test_registry_url(self) -> None:
        self.assertEqual(flags.parse_registry_url("https://docker.io"), "docker.io")
        self.assertEqual(flags.parse_registry_url("http://127.0.0.1:5000"), "127.0.0.1:5000")
        self.assertEqual(flags.parse_registry_url("http://[::1]:5000"), "[::1]:5000")
        # Refused as 'spegel configuration' and the chart refuse them (tests.unit.test_addresses).
        for bad in ["docker.io", "ftp://x", "https://x/path", "https://x?q=1", "https://u:p@x",
                    "http://x:99999", "https://docker.io/", "http://x:0"]:
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, flags.parse_registry_url, bad)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults_match_the_reference(self) -> None:
        node = self.parse().node
        self.assertEqual(node.registry_addr, flags.ListenAddress("", 5000))
        self.assertEqual(node.router_addr, flags.ListenAddress("", 5001))
        self.assertEqual(node.metrics_addr, flags.ListenAddress("", 9090))
        self.assertEqual(node.containerd_sock, "/run/containerd/containerd.sock")
        self.assertEqual(node.containerd_namespace, "k8s.io")
        self.assertEqual(
            node.containerd_content_path, "/var/lib/containerd/io.containerd.content.v1.content"
        )
        self.assertAlmostEqual(node.mirror_resolve_timeout, 0.1)
        self.assertEqual(node.mirror_coalesce_timeout, 5.0)
        self.assertEqual(node.mirror_blob_headers_after, 20.0)
        self.assertEqual(node.mirror_resolve_retries, 3)
        self.assertEqual(node.mirror_parallel_min_size, 32 * 1024 * 1024)
        self.assertEqual(node.mirror_parallel_peers, 4)
        self.assertEqual(node.registry_listen_backlog, 1024)
        self.assertEqual(node.log_level, LogLevel.info)
        self.assertIsNone(node.bootstrap_kind)

    def test_values(self) -> None:
        node = self.parse(
            "--registry-addr", "127.0.0.1:30000",
            "--mirrored-registries", "https://docker.io,http://127.0.0.1:5000",
            "--registry-filters", "^docker.io/private/,:latest$",
            "--mirror-resolve-timeout", "50ms",
            "--mirror-resolve-retries", "5",
            "--mirror-coalesce-timeout", "1m30s",
            "--mirror-blob-headers-after", "0s",
            "--mirror-parallel-min-size", "1Gi",
            "--mirror-parallel-peers", "8",
            "--log-level", "debug",
            "--bootstrap-kind", "static",
            "--static-bootstrap-peers", "127.0.0.1:5001,127.0.0.2:5001",
        ).node
        self.assertEqual(node.registry_addr, flags.ListenAddress("127.0.0.1", 30000))
        self.assertEqual(
            node.registry_filter.mirrored_registries, frozenset({"docker.io", "127.0.0.1:5000"})
        )
        self.assertEqual(node.static_bootstrap_peers, (("127.0.0.1", 5001), ("127.0.0.2", 5001)))
        self.assertEqual(node.mirror_resolve_retries, 5)
        self.assertEqual(node.mirror_coalesce_timeout, 90.0)
        self.assertEqual(node.mirror_blob_headers_after, 0.0)
        self.assertEqual(node.mirror_parallel_min_size, 1 << 30)
        self.assertEqual(node.mirror_parallel_peers, 8)
        self.assertEqual(node.log_level, LogLevel.debug)
        # The filters act as configured.
        node.registry_filter.check(Reference("docker.io", "library/nginx", tag="1.25"))
        self.assertRaises(
            NameUnknown,
            node.registry_filter.check, Reference("docker.io", "private/app", tag="1"),
        )
        self.assertRaises(
            NameUnknown,
            node.registry_filter.check, Reference("docker.io", "library/nginx", tag="latest"),
        )
        self.assertRaises(
            NameUnknown, node.registry_filter.check, Reference("quay.io", "x", tag="1")
        )

    def test_router_keys(self) -> None:
        """
        One key file signs and is accepted; two (a rotation) sign with the first and accept
        both.
        """
        first, second = self.mktemp(), self.mktemp()
        with open(first, "wb") as f:
            f.write(b"first cluster key, 32 bytes long\n")
        with open(second, "wb") as f:
            f.write(b"second cluster key, also long\n")
        node = self.parse("--router-secret-file", first).node
        self.assertEqual((node.router_secret, node.router_secrets_accepted), (b"first cluster key, 32 bytes long", ()))
        node = self.parse(f"--router-secret-file={first},{second}").node
        self.assertEqual(node.router_secret, b"first cluster key, 32 bytes long")
        self.assertEqual(node.router_secrets_accepted, (b"second cluster key, also long",))
        self.assertIsNone(self.parse().node.router_secret)

    def test_bad_values_fail_with_one_line(self) -> None:
        cases = [
            (["--registry-addr", "nonsense"], "--registry-addr"),
            (["--mirror-resolve-timeout", "fast"], "--mirror-resolve-timeout"),
            (["--mirror-coalesce-timeout", "forever"], "--mirror-coalesce-timeout"),
            (["--mirror-resolve-retries", "0"], "--mirror-resolve-retries"),
            (["--mirror-parallel-min-size", "32MB"], "--mirror-parallel-min-size"),
            (["--mirror-parallel-peers", "0"], "--mirror-parallel-peers"),
            (["--mirrored-registries", "docker.io"], "--mirrored-registries"),
            (["--registry-filters", "(unclosed"], "--registry-filters"),
            (["--log-level", "loud"], "--log-level"),
            (["--bootstrap-kind", "carrier-pigeon"], "--bootstrap-kind"),
            (["--bootstrap-kind", "static"], "--static-bootstrap-peers"),
            (["--static-bootstrap-peers", "127.0.0.1"], "--static-bootstrap-peers"),
            (["--router-secret-file", "/nonexistent/key"], "--router-secret-file"),
            (["--router-secret-file", "/a,/b,/c"], "at most two"),
            (["--registry-listen-backlog", "0"], "--registry-listen-backlog"),
            (["--registry-listen-backlog", "many"], "--registry-listen-backlog"),
            (["--no-such-flag"], "no-such-flag"),
        ]
        for argv, mentioned in cases:
            with self.subTest(argv=argv):
                stderr = io.StringIO()
                self.patch(sys, "stderr", stderr)
                with self.assertRaises(SystemExit) as exited:
                    self.parse(*argv)
                self.assertEqual(exited.exception.code, 2)
                lines = stderr.getvalue().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(lines[0].startswith("spegel: error: "), lines)
                self.assertIn(mentioned, lines[0])
