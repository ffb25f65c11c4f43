# -*- test-case-name: tests.unit.test_cli -*-
"""
Tests for L{spegel.cli}: the ``spegel`` console script, called as C{main([...])} on temporary
directories and compared with the golden trees in tests/unit/golden/; and for L{spegel.cleanuphook},
the two halves of the post-delete hook (C{cleanup --serve-addr}, C{cleanup-wait}), served on a
L{MemoryReactor} and read with L{StubTreq}, or waited for with a fake clock, resolver and probe.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tests.unit.stubtreq import StubTreq
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

import spegel
from spegel import cleanuphook
from spegel.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, parse_command_line
from tests.unit.test_hostsconfig import GOLDEN, GoldenTestMixin, snapshot


class CommandLineTestMixin(GoldenTestMixin):
    def spegel(self, *argv: str, **injected: Any) -> tuple[int, str, str]:
        if argv[:1] == ("configuration",) and not any(
            a.startswith("--containerd-config-file") for a in argv
        ):
            # Not this machine's own /etc/containerd/config.toml: a file that is not there,
            # which the preflight skips.
            argv += (f"--containerd-config-file={self.mktemp()}",)  # type: ignore[attr-defined]
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), stdout=out, stderr=err, **injected)
        return status, out.getvalue(), err.getvalue()

    def configured(self) -> Path:
        """
        A config path that "configuration" has written to, over the original in the golden
        case backup-then-cleanup.
        """
        root = self.config_path("backup-then-cleanup")
        status, _, err = self.spegel(
            "configuration",
            f"--containerd-registry-config-path={root}",
            "--mirrored-registries=https://docker.io",
            "--mirror-targets=http://10.0.0.5:30020",
            "--prepend-existing",
        )
        self.assertEqual((status, err), (EXIT_OK, ""))  # type: ignore[attr-defined]
        return root

    def configure(self, case: str, *argv: str) -> Path:
        root = self.config_path(case)
        status, out, err = self.spegel(
            "configuration", f"--containerd-registry-config-path={root}", *argv
        )
        self.assertEqual((status, err), (EXIT_OK, ""))  # type: ignore[attr-defined]
        self.assertMatchesGolden(root, GOLDEN / case / "expected")
        return root


class VersionTests(CommandLineTestMixin, SynchronousTestCase):
    def test_version_command(self) -> None:
        self.assertEqual(self.spegel("version"), (EXIT_OK, spegel.__version__ + "\n", ""))

    def test_version_flag(self) -> None:
        self.assertEqual(self.spegel("--version"), (EXIT_OK, spegel.__version__ + "\n", ""))

    def test_help(self) -> None:
        status, out, err = self.spegel("configuration", "--help")
        self.assertEqual((status, err), (EXIT_OK, ""))
        for flag in (
            "--mirrored-registries",
            "--mirror-targets",
            "--resolve-tags",
            "--prepend-existing",
        ):
            self.assertIn(flag, out)


class ConfigurationTests(CommandLineTestMixin, SynchronousTestCase):
    def test_equals_form(self) -> None:
        root = self.configure(
            "docker-and-local",
            "--mirrored-registries=https://docker.io,http://127.0.0.1:5000",
            "--mirror-targets=http://10.0.0.5:30020,http://10.0.0.5:30021",
        )
        self.assertTrue((root / "docker.io" / "hosts.toml").is_file())

    def test_separate_words_and_repeats(self) -> None:
        """
        Lists may also come as several words, repeated flags, and with spaces after commas.
        """
        self.configure(
            "docker-and-local",
            "--mirrored-registries",
            "https://docker.io",
            "http://127.0.0.1:5000",
            "--mirror-targets",
            "http://10.0.0.5:30020, ",
            "--mirror-targets",
            " http://10.0.0.5:30021",
        )

    def test_resolve_tags_false(self) -> None:
        for spelling in (
            ["--resolve-tags=false"],
            ["--resolve-tags", "False"],
            ["--resolve-tags=0"],
        ):
            self.configure(
                "resolve-tags-off",
                "--mirrored-registries=https://docker.io,https://ghcr.io",
                "--mirror-targets=http://10.0.0.5:30020",
                *spelling,
            )

    def test_resolve_tags_true(self) -> None:
        self.configure(
            "empty-list-default", "--mirror-targets=http://10.0.0.5:30020", "--resolve-tags"
        )
        self.configure(
            "empty-list-default", "--mirror-targets=http://10.0.0.5:30020", "--resolve-tags=true"
        )

    def test_empty_registry_list(self) -> None:
        """
        No registries, given as nothing or as an empty value, means _default.
        """
        self.configure("empty-list-default", "--mirror-targets", "http://10.0.0.5:30020")
        self.configure(
            "empty-list-default", "--mirrored-registries=", "--mirror-targets=http://10.0.0.5:30020"
        )

    def test_prepend_existing(self) -> None:
        for spelling in (["--prepend-existing"], ["--prepend-existing=true"]):
            self.configure(
                "prepend-existing",
                "--mirrored-registries=https://docker.io,http://127.0.0.1:5000",
                "--mirror-targets=http://10.0.0.5:30020",
                *spelling,
            )

    def test_prepend_existing_false(self) -> None:
        self.configure(
            "replace-existing",
            "--mirrored-registries=https://docker.io",
            "--mirror-targets=http://10.0.0.5:30020",
            "--prepend-existing=false",
        )

    def test_reports_what_it_did(self) -> None:
        root = self.config_path("replace-existing")
        status, out, err = self.spegel(
            "configuration",
            "--containerd-registry-config-path",
            str(root),
            "--mirrored-registries=https://docker.io",
            "--mirror-targets=http://10.0.0.5:30020",
        )
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertEqual(
            out.splitlines(),
            [
                f"backed up {root}/docker.io to {root}/_backup/docker.io",
                f"wrote {root}/docker.io/hosts.toml",
            ],
        )

    def test_second_run(self) -> None:
        root = self.config_path("second-run-keeps-backup")
        for argv in (
            ["--mirrored-registries=https://docker.io,https://ghcr.io"],
            ["--mirrored-registries=https://docker.io", "--resolve-tags=false"],
        ):
            target = "http://10.0.0.5:30020" if len(argv) == 1 else "http://10.0.0.5:30021"
            status, _, err = self.spegel(
                "configuration",
                f"--containerd-registry-config-path={root}",
                f"--mirror-targets={target}",
                *argv,
            )
            self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertMatchesGolden(root, GOLDEN / "second-run-keeps-backup" / "expected")


class CleanupTests(CommandLineTestMixin, SynchronousTestCase):
    def test_restores(self) -> None:
        root = self.configured()
        status, out, err = self.spegel("cleanup", "--containerd-registry-config-path", str(root))
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertEqual(
            out.splitlines(), [f"removed {root}/docker.io", f"restored {root}/docker.io"]
        )
        self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")

    def test_nothing_to_do(self) -> None:
        root = self.config_path("backup-then-cleanup")
        status, out, err = self.spegel("cleanup", f"--containerd-registry-config-path={root}")
        self.assertEqual((status, out, err), (EXIT_OK, f"nothing to clean up in {root}\n", ""))
        self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")


class TakenPortReactor(MemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class CleanupServeTests(CommandLineTestMixin, SynchronousTestCase):
    """
    C{cleanup --serve-addr}: clean up as without it, then serve /healthz until the reactor
    stops. A L{MemoryReactor}'s C{run} returns at once, as the real one does on SIGTERM.
    """

    def serve(self, root: Path, address: str, reactor: Any) -> tuple[int, list[str], str]:
        status, out, err = self.spegel(
            "cleanup", f"--containerd-registry-config-path={root}", f"--serve-addr={address}",
            reactor=reactor,
        )
        return status, out.splitlines(), err

    def test_cleans_then_serves(self) -> None:
        root = self.configured()
        reactor = MemoryReactor()
        status, lines, err = self.serve(root, "127.0.0.1:8080", reactor)
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertEqual(
            lines,
            [
                f"removed {root}/docker.io",
                f"restored {root}/docker.io",
                "serving /healthz on 127.0.0.1:8080 until stopped",
            ],
        )
        self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")
        self.assertTrue(reactor.hasRun)
        ((port, site, _, interface),) = reactor.tcpServers
        self.assertEqual((port, interface), (8080, "127.0.0.1"))
        assert isinstance(site, Site)
        treq = StubTreq(site.resource)
        response = self.successResultOf(treq.get("http://node/healthz"))
        self.assertEqual(response.code, 200)
        self.assertIn(str(root), self.successResultOf(treq.text_content(response)))

    def test_every_interface_and_ipv6(self) -> None:
        root = self.config_path()
        for address, interface, shown in (
            (":8080", "", ":8080"),
            ("[::]:8081", "::", "[::]:8081"),
            ("0.0.0.0:8082", "0.0.0.0", "0.0.0.0:8082"),
        ):
            reactor = MemoryReactor()
            status, lines, _ = self.serve(root, address, reactor)
            self.assertEqual(status, EXIT_OK)
            self.assertEqual(lines[-1], f"serving /healthz on {shown} until stopped")
            ((port, _, _, bound),) = reactor.tcpServers
            self.assertEqual((port, bound), (int(address.rpartition(":")[2]), interface))

    def test_cannot_listen(self) -> None:
        """
        Cleaned, but the port is taken: status 1 and one line, so the pod is not ready.
        """
        root = self.configured()
        reactor = TakenPortReactor()
        status, lines, err = self.serve(root, ":8080", reactor)
        self.assertEqual(status, EXIT_FAILED)
        self.assertEqual(lines, [f"removed {root}/docker.io", f"restored {root}/docker.io"])
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("spegel: error: cannot serve /healthz on :8080: "), err)
        self.assertIn("Address already in use", err)
        self.assertTrue(reactor.hasStopped)

    def test_failed_cleanup_does_not_serve(self) -> None:
        """
        A node that could not be cleaned never answers /healthz, so the hook keeps waiting.
        """
        root = self.configured()
        # Someone else's file where the original is to be restored.
        (root / "docker.io" / "hosts.toml").write_text("server = 'https://example.com'\n")
        reactor = MemoryReactor()
        status, lines, err = self.serve(root, ":8080", reactor)
        self.assertEqual((status, lines), (EXIT_FAILED, []))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("spegel: error: kept "), err)
        self.assertFalse(reactor.hasRun)
        self.assertEqual(reactor.tcpServers, [])

    def test_bad_address_cleans_nothing(self) -> None:
        for address in ("8080", "::1:8080", "host:99999", "[::1]", ""):
            root = self.configured()
            before = snapshot(root)
            reactor = MemoryReactor()
            status, lines, err = self.serve(root, address, reactor)
            self.assertEqual((status, lines), (EXIT_USAGE, []), address)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith("spegel: error: --serve-addr: "), err)
            self.assertEqual(snapshot(root), before)
            self.assertFalse(reactor.hasRun)


class HealthzResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.treq = StubTreq(cleanuphook.healthz_resource("/etc/containerd/certs.d"))

    def get(self, path: str, method: str = "GET") -> tuple[int, str]:
        response = self.successResultOf(self.treq.request(method, "http://node" + path))
        return response.code, self.successResultOf(self.treq.text_content(response))

    def test_healthz(self) -> None:
        code, body = self.get("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(body, "clean: /etc/containerd/certs.d holds no spegel configuration\n")

    def test_head(self) -> None:
        self.assertEqual(self.get("/healthz", "HEAD"), (200, ""))

    def test_anything_else_is_not_found(self) -> None:
        for path in ("/", "/healthz/", "/healthz/x", "/readyz", "/v2/"):
            self.assertEqual(self.get(path)[0], 404, path)

    def test_other_methods_not_allowed(self) -> None:
        self.assertEqual(self.get("/healthz", "POST")[0], 405)


NAME = "spegel-cleanup.spegel.svc.cluster.local"


class FakeCluster:
    """
    The world L{cleanuphook.wait_until_clean} sees: a clock that only moves when it sleeps,
    and per round, the addresses each name resolves to and those that answer /healthz with 200.

    @ivar rounds: one C{(addresses by name, clean addresses)} per round; the last one repeats.
        A round ends with a sleep, so the round is the number of sleeps so far.
    """

    def __init__(self, rounds: list[tuple[dict[str, list[str]], set[str]]]) -> None:
        self.rounds = rounds
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.probed: list[tuple[str, int]] = []

    @property
    def round(self) -> int:
        return len(self.sleeps)

    def environment(self) -> cleanuphook.Environment:
        return cleanuphook.Environment(
            clock=lambda: self.now, sleep=self.sleep, resolve=self.resolve, probe=self.probe
        )

    def current(self) -> tuple[dict[str, list[str]], set[str]]:
        return self.rounds[min(self.round, len(self.rounds) - 1)]

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def resolve(self, name: str, port: int) -> list[str]:
        return list(self.current()[0].get(name, []))

    def probe(self, host: str, port: int) -> bool:
        self.probed.append((host, port))
        return host in self.current()[1]


class CleanupWaitTests(CommandLineTestMixin, SynchronousTestCase):
    def wait(self, cluster: FakeCluster, *argv: str) -> tuple[int, list[str], str]:
        status, out, err = self.spegel(
            "cleanup-wait",
            *(argv or (f"--probe-endpoints={NAME}:8080",)),
            "--timeout=1m",
            "--interval=2s",
            environment=cluster.environment(),
        )
        return status, out.splitlines(), err

    def test_all_clean_twice(self) -> None:
        cluster = FakeCluster([({NAME: ["10.0.0.5", "fd00::6"]}, {"10.0.0.5", "fd00::6"})])
        status, lines, err = self.wait(cluster)
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertEqual(cluster.round, 1)
        self.assertEqual(cluster.sleeps, [2.0])
        self.assertEqual(
            cluster.probed, [("10.0.0.5", 8080), ("fd00::6", 8080)] * 2
        )
        self.assertEqual(
            lines,
            [
                "2 addresses clean, waiting for a round that confirms it",
                "every node is clean: 2 addresses answered /healthz in 2 rounds in a row",
            ],
        )

    def test_one_address_never_clean(self) -> None:
        cluster = FakeCluster([({NAME: ["10.0.0.5", "10.0.0.6", "fd00::7"]}, {"10.0.0.5"})])
        status, lines, err = self.wait(cluster)
        self.assertEqual((status, lines), (EXIT_FAILED, ["2 of 3 addresses not clean: 10.0.0.6:8080, [fd00::7]:8080"]))
        self.assertEqual(
            err,
            "spegel: error: timed out after 60s: "
            "2 of 3 addresses not clean: 10.0.0.6:8080, [fd00::7]:8080\n",
        )
        self.assertEqual(cluster.now, 1060.0)
        self.assertEqual(sum(cluster.sleeps), 60.0)

    def test_nothing_resolves(self) -> None:
        """
        A Service without endpoints (yet): keep waiting; on timeout, say that nothing resolved.
        """
        cluster = FakeCluster([({}, set())])
        status, lines, err = self.wait(cluster)
        self.assertEqual(status, EXIT_FAILED)
        self.assertEqual(cluster.round, 30)
        self.assertEqual(cluster.probed, [])
        self.assertEqual(lines, [f"{NAME}:8080 resolved to no address"])
        self.assertEqual(
            err, f"spegel: error: timed out after 60s: {NAME}:8080 resolved to no address\n"
        )

    def test_new_address_starts_over(self) -> None:
        """
        A pod whose address appears after a clean round (a node's pod started late) must be
        seen clean twice too.
        """
        a, b = "10.0.0.5", "10.0.0.6"
        cluster = FakeCluster(
            [
                ({NAME: [a]}, {a, b}),
                ({NAME: [a, b]}, {a, b}),
                ({NAME: [a, b]}, {a, b}),
            ]
        )
        status, lines, _ = self.wait(cluster)
        self.assertEqual(status, EXIT_OK)
        self.assertEqual(cluster.round, 2)
        self.assertEqual(lines[-1], "every node is clean: 2 addresses answered /healthz in 2 rounds in a row")

    def test_gone_address_does_not_start_over(self) -> None:
        a, b = "10.0.0.5", "10.0.0.6"
        cluster = FakeCluster([({NAME: [a, b]}, {a, b}), ({NAME: [a]}, {a})])
        self.assertEqual(self.wait(cluster)[0], EXIT_OK)
        self.assertEqual(cluster.round, 1)

    def test_unclean_round_starts_over(self) -> None:
        a, b = "10.0.0.5", "10.0.0.6"
        cluster = FakeCluster(
            [
                ({NAME: [a, b]}, {a, b}),
                ({NAME: [a, b]}, {a}),
                ({NAME: [a, b]}, {a, b}),
                ({NAME: [a, b]}, {a, b}),
            ]
        )
        status, lines, _ = self.wait(cluster)
        self.assertEqual(status, EXIT_OK)
        self.assertEqual(cluster.round, 3)
        self.assertEqual(
            lines[:3],
            [
                "2 addresses clean, waiting for a round that confirms it",
                "1 of 2 addresses not clean: 10.0.0.6:8080",
                "2 addresses clean, waiting for a round that confirms it",
            ],
        )

    def test_several_endpoints_and_ip_literals(self) -> None:
        other = "spegel-cleanup.other.svc.cluster.local"
        cluster = FakeCluster(
            [({NAME: ["10.0.0.5"], other: ["10.0.0.6"], "10.0.0.7": ["10.0.0.7"]}, {"10.0.0.5", "10.0.0.6"})]
        )
        status, lines, err = self.wait(
            cluster, f"--probe-endpoints={NAME}:8080,{other}:8081", "--probe-endpoints", "10.0.0.7:8080"
        )
        self.assertEqual(status, EXIT_FAILED)
        self.assertEqual(lines, ["1 of 3 addresses not clean: 10.0.0.7:8080"])
        self.assertIn(("10.0.0.6", 8081), cluster.probed)

    def test_long_list_is_cut(self) -> None:
        hosts = [f"10.0.1.{i}" for i in range(30)]
        cluster = FakeCluster([({NAME: hosts}, set())])
        _, _, err = self.wait(cluster)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("30 of 30 addresses not clean: 10.0.1.0:8080, ", err)
        self.assertIn("10.0.1.19:8080 and 10 more", err)
        self.assertNotIn("10.0.1.20:8080", err)

    def test_defaults(self) -> None:
        options = parse_command_line(["cleanup-wait", f"--probe-endpoints={NAME}:8080"]).subOptions
        self.assertEqual((options["timeout"], options["interval"]), (600.0, 2.0))
        self.assertEqual(options["probe-endpoints"], ((NAME, 8080),))


class RealResolverAndProbeTests(SynchronousTestCase):
    """
    The real resolver and probe, on what needs no network.
    """

    def test_ip_literals_resolve_to_themselves(self) -> None:
        self.assertEqual(cleanuphook.resolve_addresses("10.0.0.5", 8080), ["10.0.0.5"])
        self.assertEqual(cleanuphook.resolve_addresses("::1", 8080), ["::1"])

    def test_probe_refuses_malformed_address(self) -> None:
        """
        An address no URL can hold is "not clean", not a traceback.
        """
        self.assertFalse(cleanuphook.probe_healthz("fe80::1%eth0", 8080))


class BadInputTests(CommandLineTestMixin, SynchronousTestCase):
    """
    Bad input: exit status 2, one line on stderr saying what is wrong, nothing written.
    """

    def check_usage_error(self, argv: list[str], expected: str) -> None:
        root = self.config_path("replace-existing")
        before = snapshot(root)
        status, out, err = self.spegel(*[a.replace("ROOT", str(root)) for a in argv])
        self.assertEqual(status, EXIT_USAGE, argv)
        self.assertEqual(out, "", argv)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("spegel: error: "), err)
        self.assertIn(expected, err, argv)
        self.assertNotIn("Traceback", err)
        self.assertEqual(snapshot(root), before, argv)

    def test_usage_errors(self) -> None:
        config = "--containerd-registry-config-path=ROOT"
        target = "--mirror-targets=http://10.0.0.5:30020"
        cases: list[tuple[list[str], str]] = [
            ([], "configuration,cleanup,cleanup-wait,version"),
            (["frobnicate"], "invalid choice: 'frobnicate'"),
            (["configuration", config], "--mirror-targets"),
            (["configuration", config, "--mirror-targets="], "at least one mirror target"),
            (["configuration", config, "--mirror-targets=10.0.0.5:30020"], "http:// or https://"),
            (["configuration", config, target, "--mirrored-registries=docker.io"], "docker.io"),
            (
                [
                    "configuration",
                    config,
                    target,
                    "--mirrored-registries=https://docker.io/library",
                ],
                "path",
            ),
            (["configuration", config, target, "--mirrored-registries=https://r?x=1"], "query"),
            (
                ["configuration", config, target, "--mirrored-registries=https://a,https://a"],
                "listed twice",
            ),
            (["configuration", config, target, "--resolve-tags=maybe"], "'maybe'"),
            (["configuration", config, target, "--prepend-existing=2"], "'2'"),
            (["configuration", config, target, "--unknown-flag"], "--unknown-flag"),
            (["configuration", "--containerd-registry-config-path=", target], "must not be empty"),
            (["cleanup", "--mirror-targets=http://a"], "--mirror-targets"),
            (["cleanup", config, "--serve-addr=8080"], "[host]:port"),
            (["cleanup-wait"], "--probe-endpoints"),
            (["cleanup-wait", "--probe-endpoints="], "at least one NAME:PORT"),
            (["cleanup-wait", "--probe-endpoints=spegel-cleanup"], "missing port"),
            (["cleanup-wait", "--probe-endpoints=a:8080,b_c:x"], "'b_c:x'"),
            # A valid IPv6 address without a port, not ::1 port 8080.
            (["cleanup-wait", "--probe-endpoints=::1:8080"], "missing port"),
            (["cleanup-wait", "--probe-endpoints=a:1", "--timeout=soon"], "'soon'"),
            (["cleanup-wait", "--probe-endpoints=a:1", "--interval=0s"], "--interval"),
            (["cleanup-wait", "--probe-endpoints=a:1", config], "--containerd-registry-config-path"),
            (["version", "extra"], "extra"),
        ]
        for argv, expected in cases:
            self.check_usage_error(argv, expected)

    def test_unwritable_config_path(self) -> None:
        """
        A directory that cannot be written is not a usage error: status 1, still one line.
        """
        parent = Path(self.mktemp())
        parent.write_bytes(b"a file, not a directory")
        status, out, err = self.spegel(
            "configuration",
            f"--containerd-registry-config-path={parent}/certs.d",
            "--mirror-targets=http://10.0.0.5:30020",
        )
        self.assertEqual((status, out), (EXIT_FAILED, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith(f"spegel: error: {parent}"), err)

    def test_unparsable_existing_file(self) -> None:
        root = self.config_path()
        (root / "docker.io").mkdir(parents=True)
        (root / "docker.io" / "hosts.toml").write_text("server = \n")
        status, _, err = self.spegel(
            "configuration",
            f"--containerd-registry-config-path={root}",
            "--mirrored-registries=https://docker.io",
            "--mirror-targets=http://10.0.0.5:30020",
            "--prepend-existing",
        )
        self.assertEqual(status, EXIT_FAILED)
        self.assertIn("cannot parse _backup/docker.io/hosts.toml", err)
        self.assertEqual(len(err.splitlines()), 1, err)


class ParserTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        command = parse_command_line(["configuration", "--mirror-targets=http://a"])
        options = command.subOptions
        self.assertEqual(command.subCommand, "configuration")
        self.assertEqual(options["containerd-registry-config-path"], "/etc/containerd/certs.d")
        self.assertEqual(options["mirrored-registries"], ())
        self.assertIs(options["resolve-tags"], True)
        self.assertIs(options["prepend-existing"], False)

    def test_bool_spellings(self) -> None:
        """
        A boolean flag alone is true; its value may follow as =VALUE or as the next word.
        """
        for argv, expected in (
            (["--resolve-tags"], True),
            (["--resolve-tags", "off"], False),
            (["--resolve-tags=NO"], False),
            (["--resolve-tags=false", "--resolve-tags"], True),
        ):
            options = parse_command_line(["configuration", "--mirror-targets=http://a", *argv]).subOptions
            self.assertIs(options["resolve-tags"], expected, argv)

    def test_help_names_the_command(self) -> None:
        status, out, err = CommandLineTestMixin.spegel(self, "cleanup-wait", "--help")  # type: ignore[arg-type]
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertIn("--probe-endpoints", out)
        self.assertIn("cleanup-wait", out)
