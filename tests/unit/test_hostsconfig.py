# -*- test-case-name: tests.unit.test_hostsconfig -*-
"""
Tests for L{spegel.hostsconfig}: URL validation and rendering without a disk, then whole
configuration directories compared with the golden trees in tests/unit/golden/.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from spegel import hostsconfig, hostsfiles
from spegel.hostsconfig import (
    BACKUP_DIR,
    MARKER,
    STAGING_DIR,
    ExistingConfigError,
    FileContent,
    HostsConfigError,
    InvalidMirrorConfiguration,
    InvalidRegistryURL,
    MirrorConfiguration,
    RegistryURL,
    parse_existing_hosts,
    parse_registry_url,
    plan_configuration,
    render_hosts_toml,
    toml_string,
)
from spegel.hostsfiles import cleanup, configure

GOLDEN = Path(__file__).parent / "golden"
EMPTY_MARKER = ".empty"
TARGET = "http://10.0.0.5:30020"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """
    Everything under C{root}: file path to bytes, and C{"dir/": None} for each empty directory.
    """
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        if not dirnames and not filenames and directory != root:
            tree[directory.relative_to(root).as_posix() + "/"] = None
        for name in filenames:
            tree[(directory / name).relative_to(root).as_posix()] = (directory / name).read_bytes()
    return tree


def golden_snapshot(root: Path) -> dict[str, bytes | None]:
    """
    A golden tree as L{snapshot} would see it once its C{.empty} markers are empty directories.
    """
    tree: dict[str, Any] = {}
    for path, data in snapshot(root).items():
        if path.endswith("/" + EMPTY_MARKER):
            tree[path[: -len(EMPTY_MARKER)]] = None
        else:
            tree[path] = data
    return tree


def materialize(golden: Path, destination: Path) -> None:
    """
    Copy a golden input tree to C{destination}, turning C{.empty} markers into empty directories.
    """
    destination.mkdir(parents=True)
    for path, data in golden_snapshot(golden).items():
        if data is None:
            (destination / path).mkdir(parents=True, exist_ok=True)
        else:
            (destination / path).parent.mkdir(parents=True, exist_ok=True)
            (destination / path).write_bytes(data)


class GoldenTestMixin:
    """
    Helpers to start from a case's input tree and compare with its expected tree.
    """

    def config_path(self, case: str | None = None) -> Path:
        root = Path(self.mktemp()) / "certs.d"  # type: ignore[attr-defined]
        if case is not None and (GOLDEN / case / "input").is_dir():
            materialize(GOLDEN / case / "input", root)
        return root

    def assertMatchesGolden(self, root: Path, golden: Path) -> None:
        actual = snapshot(root)
        expected = golden_snapshot(golden)
        self.assertEqual(sorted(actual), sorted(expected))  # type: ignore[attr-defined]
        for path in expected:
            self.assertEqual(actual[path], expected[path], path)  # type: ignore[attr-defined]


def configuration(
    registries: list[str], targets: Sequence[str] = (TARGET,), **kwargs: Any
) -> MirrorConfiguration:
    return MirrorConfiguration.from_strings(registries, targets, **kwargs)


class ParseRegistryURLTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """
        Scheme and host[:port] are kept; host and scheme are lowercased, IPv6 keeps brackets.
        """
        cases = {
            "https://docker.io": RegistryURL("https", "docker.io"),
            "http://127.0.0.1:5000": RegistryURL("http", "127.0.0.1:5000"),
            "HTTPS://Registry.Example.COM:443": RegistryURL("https", "registry.example.com:443"),
            "http://[fd00::1]:30020": RegistryURL("http", "[fd00::1]:30020"),
            "http://my_registry.local": RegistryURL("http", "my_registry.local"),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_registry_url(text), expected)
        self.assertEqual(
            str(parse_registry_url("http://[fd00::1]:30020")), "http://[fd00::1]:30020"
        )

    def test_invalid(self) -> None:
        """
        Anything but http(s)://host[:port] is refused, saying what is wrong with it.
        """
        cases = {
            "docker.io": "http:// or https://",
            "ftp://docker.io": "http:// or https://",
            "https:docker.io": "http:// or https://",
            "": "empty",
            "https://": "no host",
            "https://docker.io/": "path",
            "https://docker.io/v2": "path",
            "https://docker.io?x=1": "query",
            "https://docker.io?": "query",
            "https://docker.io#x": "fragment",
            "https://user:pw@docker.io": "credentials",
            "https://docker.io:0": "port",
            "https://docker.io:65536": "port",
            "https://docker.io:http": "port",
            "https://docker.io:": "port",
            "https://dock er.io": "whitespace",
            "https://docker.io\n": "whitespace",
            "https://[not-v6]:5000": "IPv6",
            "https://-bad.example": "host name",
            "https://a..b": "host name",
            "https://quote'.example": "host name",
        }
        for text, reason in cases.items():
            e = self.assertRaises(
                InvalidRegistryURL, parse_registry_url, text, role="mirror target"
            )
            self.assertIn(reason, str(e), text)
            self.assertIn("mirror target", str(e))
            self.assertIn(repr(text), str(e))

    def test_invalid_is_value_error(self) -> None:
        """
        Callers that only know ValueError still catch it.
        """
        self.assertRaises(ValueError, parse_registry_url, "nope")


class MirrorConfigurationTests(SynchronousTestCase):
    def test_duplicate_registry(self) -> None:
        e = self.assertRaises(
            InvalidMirrorConfiguration, configuration, ["https://docker.io", "HTTPS://docker.io"]
        )
        self.assertIn("listed twice", str(e))

    def test_same_directory(self) -> None:
        """
        http and https to the same host:port would write the same file: refused.
        """
        e = self.assertRaises(
            InvalidMirrorConfiguration,
            configuration,
            ["http://r.example:5000", "https://r.example:5000"],
        )
        self.assertIn("'r.example:5000'", str(e))

    def test_duplicate_target(self) -> None:
        self.assertRaises(InvalidMirrorConfiguration, configuration, [], [TARGET, TARGET])

    def test_no_target(self) -> None:
        e = self.assertRaises(InvalidMirrorConfiguration, configuration, ["https://docker.io"], [])
        self.assertIn("at least one mirror target", str(e))

    def test_directories(self) -> None:
        self.assertEqual(
            configuration(["https://docker.io", "http://127.0.0.1:5000"]).directories(),
            ("docker.io", "127.0.0.1:5000"),
        )
        self.assertEqual(configuration([]).directories(), ("_default",))


class RenderTests(SynchronousTestCase):
    def test_reference_example(self) -> None:
        """
        The example in REFERENCE.md, byte for byte, after our marker line (plus the final newline
        of a text file).
        """
        self.assertEqual(
            render_hosts_toml(
                parse_registry_url("https://docker.io"),
                [parse_registry_url("http://10.0.0.5:30020")],
            ),
            f"{MARKER}\n"
            "server = 'https://registry-1.docker.io'\n"
            "\n"
            "[host.'http://10.0.0.5:30020']\n"
            "capabilities = ['pull', 'resolve']\n"
            "dial_timeout = '200ms'\n",
        )

    def test_default_has_no_server(self) -> None:
        text = render_hosts_toml(None, [parse_registry_url(TARGET)], resolve_tags=False)
        self.assertEqual(
            text,
            f"{MARKER}\n\n"
            "[host.'http://10.0.0.5:30020']\ncapabilities = ['pull']\ndial_timeout = '200ms'\n",
        )

    def test_docker_hub_only_for_https(self) -> None:
        """
        Only https://docker.io is Docker Hub; anything else is its own server.
        """
        self.assertEqual(
            hostsconfig.upstream_server(parse_registry_url("https://docker.io")),
            "https://registry-1.docker.io",
        )
        self.assertEqual(
            hostsconfig.upstream_server(parse_registry_url("http://docker.io:5000")),
            "http://docker.io:5000",
        )

    def test_toml_string(self) -> None:
        """
        Literal strings when possible, escaped basic strings otherwise; tomllib reads both back.
        """
        for text, expected in {
            "plain": "'plain'",
            "it's": '"it\'s"',
            'a"b\\c\n\x01': '"a\\"b\\\\c\\n\\u0001"',
            "tab\tok": "'tab\tok'",
        }.items():
            self.assertEqual(toml_string(text), expected)
            self.assertEqual(tomllib.loads(f"k = {expected}")["k"], text)

    def test_existing_not_toml(self) -> None:
        e = self.assertRaises(ExistingConfigError, parse_existing_hosts, "[host", source="old.toml")
        self.assertIn("cannot parse old.toml", str(e))

    def test_existing_host_not_table(self) -> None:
        self.assertRaises(ExistingConfigError, parse_existing_hosts, "host = 'x'")
        self.assertRaises(ExistingConfigError, parse_existing_hosts, "[host]\na = 1")

    def test_existing_types_survive(self) -> None:
        """
        Every kind of value a hosts.toml can hold is written back with the same meaning.
        """
        old = parse_existing_hosts(
            "ca = ['/a.pem']\n"
            "[header]\nX-A = ['1', '2']\n"
            "[host.'https://m.example']\n"
            "skip_verify = true\nn = 3\nf = 1.5\nwhen = 1979-05-27T07:32:00Z\n"
            "inline = {a = 1}\n"
            "[[host.'https://m.example'.list]]\nx = 1\n"
        )
        text = render_hosts_toml(
            parse_registry_url("https://m2.example"), [parse_registry_url(TARGET)], existing=old
        )
        parsed = tomllib.loads(text)
        self.assertEqual(parsed["host"]["https://m.example"], old["host"]["https://m.example"])
        self.assertEqual(parsed["header"], old["header"])
        self.assertEqual(parsed["ca"], old["ca"])
        self.assertEqual(parsed["server"], "https://m2.example")
        self.assertEqual(list(parsed["host"]), [TARGET, "https://m.example"])

    @settings(max_examples=150, deadline=None)
    @given(
        hosts=st.dictionaries(
            st.text(min_size=1, max_size=20),
            st.dictionaries(
                st.text(min_size=1, max_size=10),
                st.one_of(
                    st.booleans(),
                    st.integers(-(2**63), 2**63 - 1),
                    st.text(max_size=20),
                    st.lists(st.text(max_size=10), max_size=3),
                    st.dictionaries(
                        st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=2
                    ),
                ),
                max_size=4,
            ),
            max_size=4,
        ),
        resolve_tags=st.booleans(),
    )
    def test_prepend_round_trip(self, hosts: dict[str, dict[str, Any]], resolve_tags: bool) -> None:
        """
        Whatever [host] tables the old file had, the result is valid TOML holding ours first, in
        order, then every old one (ours replacing any old table of the same name).
        """
        targets = [parse_registry_url(TARGET), parse_registry_url("http://10.0.0.5:30021")]
        text = render_hosts_toml(
            parse_registry_url("https://docker.io"),
            targets,
            resolve_tags=resolve_tags,
            existing={"host": hosts},
        )
        parsed = tomllib.loads(text)
        capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
        ours = {str(t): {"capabilities": capabilities, "dial_timeout": "200ms"} for t in targets}
        theirs = {k: v for k, v in hosts.items() if k not in ours}
        self.assertEqual(list(parsed["host"]), list(ours) + list(theirs))
        self.assertEqual(parsed["host"], {**ours, **theirs})
        self.assertEqual(parsed["server"], "https://registry-1.docker.io")


class PlanTests(SynchronousTestCase):
    """
    L{plan_configuration} decides every byte without touching a disk.
    """

    def test_plain(self) -> None:
        plan = plan_configuration(configuration(["https://docker.io", "http://127.0.0.1:5000"]), {})
        self.assertEqual(sorted(plan), ["127.0.0.1:5000/hosts.toml", "docker.io/hosts.toml"])
        self.assertTrue(
            plan["docker.io/hosts.toml"].data.startswith(
                MARKER.encode() + b"\nserver = 'https://registry-1"
            )
        )
        self.assertEqual(plan["docker.io/hosts.toml"].mode, 0o644)

    def test_backup_ignored_without_prepend(self) -> None:
        backup = {
            "docker.io/hosts.toml": FileContent(b"[host.'https://x']\n"),
            "docker.io/a": FileContent(b"a"),
        }
        plan = plan_configuration(configuration(["https://docker.io"]), backup)
        self.assertEqual(list(plan), ["docker.io/hosts.toml"])
        self.assertNotIn(b"https://x", plan["docker.io/hosts.toml"].data)

    def test_prepend_copies_neighbours_with_mode(self) -> None:
        backup = {
            "docker.io/hosts.toml": FileContent(b"[host.'https://x']\n"),
            "docker.io/certs/key.pem": FileContent(b"key", 0o600),
            "docker.iox/hosts.toml": FileContent(b"not ours"),
            "ghcr.io/hosts.toml": FileContent(b"not ours"),
        }
        plan = plan_configuration(
            configuration(["https://docker.io"], prepend_existing=True), backup
        )
        self.assertEqual(sorted(plan), ["docker.io/certs/key.pem", "docker.io/hosts.toml"])
        self.assertEqual(plan["docker.io/certs/key.pem"], FileContent(b"key", 0o600))
        self.assertIn(b"[host.'https://x']", plan["docker.io/hosts.toml"].data)

    def test_prepend_without_old_file(self) -> None:
        """
        A registry with no old hosts.toml gets ours only, and none of the directory's other files.
        """
        backup = {"docker.io/ca.pem": FileContent(b"ca")}
        plan = plan_configuration(
            configuration(["https://docker.io"], prepend_existing=True), backup
        )
        self.assertEqual(list(plan), ["docker.io/hosts.toml"])

    def test_prepend_bad_old_file(self) -> None:
        for data in (b"[[[", b"\xff\xfe"):
            e = self.assertRaises(
                ExistingConfigError,
                plan_configuration,
                configuration(["https://docker.io"], prepend_existing=True),
                {"docker.io/hosts.toml": FileContent(data)},
            )
            self.assertIn("_backup/docker.io/hosts.toml", str(e))


class GoldenTests(GoldenTestMixin, SynchronousTestCase):
    """
    Whole configuration directories, compared with tests/unit/golden/<case>/expected.
    """

    def check(self, case: str, *configurations: MirrorConfiguration) -> Path:
        root = self.config_path(case)
        for c in configurations:
            configure(root, c)
        self.assertMatchesGolden(root, GOLDEN / case / "expected")
        return root

    def test_docker_and_local(self) -> None:
        root = self.check(
            "docker-and-local",
            configuration(
                ["https://docker.io", "http://127.0.0.1:5000"], [TARGET, "http://10.0.0.5:30021"]
            ),
        )
        self.assertEqual(stat.S_IMODE((root / "docker.io" / "hosts.toml").stat().st_mode), 0o644)

    def test_resolve_tags_off(self) -> None:
        self.check(
            "resolve-tags-off",
            configuration(["https://docker.io", "https://ghcr.io"], resolve_tags=False),
        )

    def test_empty_list_default(self) -> None:
        self.check("empty-list-default", configuration([]))

    def test_prepend_existing(self) -> None:
        self.check(
            "prepend-existing",
            configuration(["https://docker.io", "http://127.0.0.1:5000"], prepend_existing=True),
        )

    def test_replace_existing(self) -> None:
        result = configure(
            self.config_path("replace-existing"), configuration(["https://docker.io"])
        )
        self.assertEqual(result.backed_up, ("docker.io",))
        self.assertEqual(result.untouched, ("README.txt",))
        self.assertEqual(result.written, ("docker.io/hosts.toml",))
        self.check("replace-existing", configuration(["https://docker.io"]))

    def test_second_run_keeps_backup(self) -> None:
        """
        The second run finds _backup and replaces only our own files, whatever it writes now.
        """
        self.check(
            "second-run-keeps-backup",
            configuration(["https://docker.io", "https://ghcr.io"], prepend_existing=True),
            configuration(["https://docker.io"], ["http://10.0.0.5:30021"], resolve_tags=False),
        )

    def test_second_run_reports(self) -> None:
        """
        A registry no longer mirrored gets its original back; nothing is backed up twice.
        """
        root = self.config_path("second-run-keeps-backup")
        first = configure(root, configuration(["https://docker.io", "https://ghcr.io"]))
        self.assertEqual(first.backed_up, ("docker.io",))
        second = configure(root, configuration(["https://docker.io"]))
        self.assertEqual(second.backed_up, ())
        self.assertEqual(second.removed, ("ghcr.io",))
        self.assertEqual(second.restored, ())
        self.assertFalse((root / "ghcr.io").exists())

    def test_backup_then_cleanup(self) -> None:
        """
        Cleanup after one or two configuration runs gives back the operator's tree exactly:
        bytes, empty directories, permission bits.
        """
        root = self.config_path("backup-then-cleanup")
        (root / "docker.io" / "certs" / "client.key").chmod(0o600)
        first = configure(
            root, configuration(["https://docker.io", "https://quay.io"], prepend_existing=True)
        )
        self.assertEqual(first.backed_up, ("docker.io", "quay.io"))
        self.assertEqual(first.untouched, ("empty-dir",))
        second = configure(root, configuration(["https://docker.io"], ["http://10.0.0.5:30021"]))
        # quay.io is no longer mirrored: its original is back at once.
        self.assertEqual((second.removed, second.restored), (("quay.io",), ("quay.io",)))
        self.assertNotEqual(
            snapshot(root), golden_snapshot(GOLDEN / "backup-then-cleanup" / "input")
        )
        result = cleanup(root)
        self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")
        self.assertEqual(result.restored, ("docker.io",))
        self.assertEqual(result.removed, ("docker.io",))
        self.assertEqual(
            stat.S_IMODE((root / "docker.io" / "certs" / "client.key").stat().st_mode), 0o600
        )

    def test_other_registries_untouched(self) -> None:
        """
        A private registry's own directory (hosts.toml with its CA, plain HTTP, its own mirror)
        is the same bytes after configuration, reconfiguration and cleanup: only the mirrored
        registries' directories are ever touched.
        """
        root = self.config_path("backup-then-cleanup")
        private = root / "registry.internal:5443"
        private.mkdir()
        (private / "hosts.toml").write_bytes(
            b"server = 'https://registry.internal:5443'\nca = 'ca.crt'\n"
        )
        (private / "ca.crt").write_bytes(b"private CA")
        before = snapshot(root)
        for prepend in (False, True):
            configure(
                root, configuration(["https://docker.io"], prepend_existing=prepend)
            )
            self.assertEqual(
                {p: d for p, d in snapshot(root).items() if p.startswith("registry.internal")},
                {p: d for p, d in before.items() if p.startswith("registry.internal")},
            )
            cleanup(root)
            self.assertEqual(snapshot(root), before)

    def test_default_leaves_registry_directories(self) -> None:
        """
        Mirroring every registry writes _default only; registries with a directory of their
        own keep it (containerd reads it instead of _default), and the result says which.
        """
        root = self.config_path("backup-then-cleanup")
        before = snapshot(root)
        result = configure(root, configuration([]))
        self.assertEqual(result.untouched, ("docker.io", "empty-dir", "quay.io"))
        self.assertEqual(result.backed_up, ())
        self.assertFalse((root / BACKUP_DIR).exists())
        cleanup(root)
        self.assertEqual(snapshot(root), before)

    def test_cleanup_twice(self) -> None:
        """
        A second cleanup finds nothing to do and changes nothing.
        """
        root = self.config_path("backup-then-cleanup")
        configure(root, configuration(["https://docker.io"]))
        cleanup(root)
        self.assertEqual(cleanup(root), hostsfiles.CleanupResult(removed=(), restored=()))
        self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")

    def test_cleanup_nothing_there(self) -> None:
        root = Path(self.mktemp())
        self.assertEqual(cleanup(root), hostsfiles.CleanupResult(removed=(), restored=()))
        self.assertFalse(root.exists())

    def test_cleanup_of_empty_configuration(self) -> None:
        """
        Configured over an empty directory, cleanup leaves it empty again.
        """
        root = self.config_path()
        configure(root, configuration([]))
        cleanup(root)
        self.assertEqual(snapshot(root), {})
        self.assertTrue(root.is_dir())

    def test_symlinks_are_moved_not_followed(self) -> None:
        root = self.config_path()
        outside = Path(self.mktemp())
        outside.mkdir()
        (outside / "keep").write_bytes(b"outside")
        root.mkdir(parents=True)
        (root / "docker.io").symlink_to(outside)
        configure(root, configuration(["https://docker.io"]))
        self.assertTrue((root / BACKUP_DIR / "docker.io").is_symlink())
        self.assertFalse((root / "docker.io").is_symlink())
        cleanup(root)
        self.assertTrue((root / "docker.io").is_symlink())
        self.assertEqual((outside / "keep").read_bytes(), b"outside")

    def test_operator_file_with_marker_text_elsewhere(self) -> None:
        """
        Only a hosts.toml that starts with the marker is ours: one quoting it further down is
        the operator's and is backed up, not overwritten.
        """
        root = self.config_path()
        (root / "docker.io").mkdir(parents=True)
        text = f"server = 'https://registry-1.docker.io'\n{MARKER}\n".encode()
        (root / "docker.io" / "hosts.toml").write_bytes(text)
        result = configure(root, configuration(["https://docker.io"]))
        self.assertEqual(result.backed_up, ("docker.io",))
        cleanup(root)
        self.assertEqual(snapshot(root), {"docker.io/hosts.toml": text})


class InterruptionTests(GoldenTestMixin, SynchronousTestCase):
    """
    Every intermediate state a killed run can leave behind is finished by the next run.
    """

    def test_killed_after_backup_then_configure(self) -> None:
        """
        Killed after the original was moved aside, before ours was in place.
        """
        root = self.config_path("replace-existing")
        (root / BACKUP_DIR).mkdir()
        os.rename(root / "docker.io", root / BACKUP_DIR / "docker.io")
        configure(root, configuration(["https://docker.io"]))
        self.assertMatchesGolden(root, GOLDEN / "replace-existing" / "expected")

    def test_killed_after_backup_then_cleanup(self) -> None:
        root = self.config_path("replace-existing")
        (root / BACKUP_DIR).mkdir()
        os.rename(root / "docker.io", root / BACKUP_DIR / "docker.io")
        result = cleanup(root)
        self.assertEqual(result.restored, ("docker.io",))
        self.assertMatchesGolden(root, GOLDEN / "replace-existing" / "input")

    def test_killed_while_staging(self) -> None:
        """
        A half-assembled directory of ours is thrown away by the next run, whichever it is.
        """
        for command in (lambda r: configure(r, configuration(["https://docker.io"])), cleanup):
            root = self.config_path("replace-existing")
            (root / BACKUP_DIR).mkdir()
            os.rename(root / "docker.io", root / BACKUP_DIR / "docker.io")
            (root / STAGING_DIR / "docker.io").mkdir(parents=True)
            (root / STAGING_DIR / "docker.io" / "ca.pem").write_bytes(b"half")
            command(root)
            self.assertFalse((root / STAGING_DIR).exists())
        self.assertMatchesGolden(root, GOLDEN / "replace-existing" / "input")

    def test_killed_during_cleanup(self) -> None:
        """
        A cleanup that removed one of our directories and died before moving its original
        back: the next cleanup, or configure, finishes the job.
        """
        for finish in ("cleanup", "configure"):
            root = self.config_path("backup-then-cleanup")
            configure(root, configuration(["https://docker.io", "https://quay.io"]))
            shutil.rmtree(root / "docker.io")
            if finish == "configure":
                configure(root, configuration(["https://docker.io", "https://quay.io"]))
                self.assertEqual(
                    sorted(p.name for p in (root / BACKUP_DIR).iterdir()), ["docker.io", "quay.io"]
                )
            cleanup(root)
            self.assertMatchesGolden(root, GOLDEN / "backup-then-cleanup" / "input")

    def test_failed_write_keeps_what_was_there(self) -> None:
        """
        A write that fails half-way leaves the previous directory of ours in place, and no
        staging leftovers once the next run succeeds.
        """
        root = self.config_path()
        configure(root, configuration(["https://docker.io"]))
        before = snapshot(root)
        (root / STAGING_DIR).write_bytes(b"in the way")  # mkdir of the staging area fails
        original = hostsfiles._remove
        self.patch(hostsfiles, "_remove", lambda path: None)
        self.assertRaises(HostsConfigError, configure, root, configuration(["https://docker.io"], ["http://10.0.0.5:30021"]))
        self.patch(hostsfiles, "_remove", original)
        self.assertEqual(snapshot(root), {**before, STAGING_DIR: b"in the way"})
        configure(root, configuration(["https://docker.io"]))
        self.assertEqual(snapshot(root), before)


class FailureTests(GoldenTestMixin, SynchronousTestCase):
    def test_config_path_under_a_file(self) -> None:
        parent = Path(self.mktemp())
        parent.write_bytes(b"")
        e = self.assertRaises(HostsConfigError, configure, parent / "certs.d", configuration([]))
        self.assertIn(str(parent), str(e))

    def test_backup_is_a_file(self) -> None:
        root = self.config_path()
        (root / "docker.io").mkdir(parents=True)
        (root / BACKUP_DIR).write_bytes(b"")
        e = self.assertRaises(
            HostsConfigError, configure, root, configuration(["https://docker.io"])
        )
        self.assertIn("not a directory", str(e))
        self.assertEqual(snapshot(root), {BACKUP_DIR: b"", "docker.io/": None})

    def test_original_and_backup_both_there(self) -> None:
        """
        An operator's directory where ours should be, while _backup already holds an earlier
        original: neither is overwritten, and the message says what to do.
        """
        root = self.config_path()
        (root / "docker.io").mkdir(parents=True)
        (root / "docker.io" / "hosts.toml").write_bytes(b"new")
        (root / BACKUP_DIR / "docker.io").mkdir(parents=True)
        (root / BACKUP_DIR / "docker.io" / "hosts.toml").write_bytes(b"old")
        before = snapshot(root)
        e = self.assertRaises(
            HostsConfigError, configure, root, configuration(["https://docker.io"])
        )
        self.assertIn("move one of them away", str(e))
        self.assertEqual(snapshot(root), before)
        e = self.assertRaises(HostsConfigError, cleanup, root)
        self.assertIn("move one of them away", str(e))
        self.assertEqual(snapshot(root), before)

    def test_read_only_config_path(self) -> None:
        """
        A config path on a read-only file system fails with one message naming the path, and
        loses nothing: the operator's folder moved aside is still there, and cleanup (once the
        file system is writable again) puts it back.  Read-only is simulated (root ignores
        permission bits): every file creation fails with EROFS.
        """
        root = self.config_path("replace-existing")
        before = snapshot(root)

        def read_only(path: Path, content: FileContent) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        self.patch(hostsfiles, "_write_synced", read_only)
        e = self.assertRaises(HostsConfigError, configure, root, configuration(["https://docker.io"]))
        self.assertIn(str(root), str(e))
        self.assertIn("Read-only file system", str(e))
        self.assertEqual(len(str(e).splitlines()), 1)
        self.assertEqual(
            snapshot(root),
            {path.replace("docker.io/", "_backup/docker.io/"): data for path, data in before.items()},
        )
        cleanup(root)
        self.assertEqual(snapshot(root), before)

    def test_bad_old_file_keeps_originals(self) -> None:
        """
        An old hosts.toml that cannot be merged stops the run with the originals safe in the
        backup; cleanup puts them back.
        """
        root = self.config_path()
        (root / "docker.io").mkdir(parents=True)
        (root / "docker.io" / "hosts.toml").write_bytes(b"[host.'x'\n")
        self.assertRaises(
            ExistingConfigError,
            configure,
            root,
            configuration(["https://docker.io"], prepend_existing=True),
        )
        cleanup(root)
        self.assertEqual(snapshot(root), {"docker.io/hosts.toml": b"[host.'x'\n"})
