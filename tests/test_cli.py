# -*- test-case-name: tests.test_cli -*-
"""
Tests for L{spegel.cli}: the ``spegel`` console script, called as C{main([...])} on temporary
directories and compared with the golden trees in tests/golden/.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import spegel
from spegel.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, main, parse_bool
from tests.test_hostsconfig import GOLDEN, GoldenTestMixin, snapshot


class CommandLineTestMixin(GoldenTestMixin):
    def spegel(self, *argv: str) -> tuple[int, str, str]:
        if argv[:1] == ("configuration",) and not any(
            a.startswith("--containerd-config-file") for a in argv
        ):
            # Not this machine's own /etc/containerd/config.toml: a file that is not there,
            # which the preflight skips.
            argv += (f"--containerd-config-file={self.mktemp()}",)  # type: ignore[attr-defined]
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

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
        root = self.config_path("backup-then-cleanup")
        status, _, _ = self.spegel(
            "configuration",
            f"--containerd-registry-config-path={root}",
            "--mirrored-registries=https://docker.io",
            "--mirror-targets=http://10.0.0.5:30020",
            "--prepend-existing",
        )
        self.assertEqual(status, EXIT_OK)
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
            ([], "configuration,cleanup,version"),
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
    def test_parse_bool(self) -> None:
        for text in ("true", "TRUE", "yes", "1", "on"):
            self.assertIs(parse_bool(text), True)
        for text in ("false", "False", "no", "0", "off"):
            self.assertIs(parse_bool(text), False)
        self.assertRaises(argparse.ArgumentTypeError, parse_bool, "")

    def test_defaults(self) -> None:
        arguments = build_parser().parse_args(["configuration", "--mirror-targets=http://a"])
        self.assertEqual(arguments.containerd_registry_config_path, "/etc/containerd/certs.d")
        self.assertEqual(arguments.mirrored_registries, [])
        self.assertIs(arguments.resolve_tags, True)
        self.assertIs(arguments.prepend_existing, False)
