# -*- test-case-name: tests.unit.test_preflight -*-
"""
Tests for L{spegel.preflight}: containerd's configuration read in both formats, every check, and
the C{spegel configuration} command stopping before it writes when containerd would not use it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from twisted.trial.unittest import SynchronousTestCase

from spegel import preflight
from spegel.cli import EXIT_FAILED, EXIT_OK, main
from spegel.preflight import (
    ContainerdFacts,
    ImagePullSettings,
    PreflightError,
    check_configuration,
    check_containerd,
    image_pull_settings,
    parse_version,
    read_containerd_config,
    run_preflight,
)

CERTS = "/etc/containerd/certs.d"

V2 = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = {discard}
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{path}"
"""

V3 = """\
version = 3
[plugins.'io.containerd.cri.v1.images']
  discard_unpacked_layers = {discard}
  {extra}
[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '{path}'
"""


def settings(path: str | None = CERTS, discard: bool = False, forced: str | None = None) -> ImagePullSettings:
    return ImagePullSettings(config_path=path, discard_unpacked_layers=discard, local_pull_forced_by=forced, source="c.toml")


def checks(problems: list[preflight.Problem]) -> list[tuple[str, bool]]:
    return [(p.check, p.fatal) for p in problems]


class ParseVersionTests(SynchronousTestCase):
    def test_versions(self) -> None:
        for text, expected in {
            "1.6.20~ds1": (1, 6),
            "v2.1.4": (2, 1),
            "2.4.2+unknown": (2, 4),
            "2.0": (2, 0),
            "devel": None,
            "": None,
        }.items():
            self.assertEqual(parse_version(text), expected, text)


class SettingsTests(SynchronousTestCase):
    def parse(self, text: str) -> ImagePullSettings:
        import tomllib

        return image_pull_settings(tomllib.loads(text), "c.toml")

    def test_version_2(self) -> None:
        self.assertEqual(self.parse(V2.format(discard="true", path=CERTS)), settings(discard=True, forced="discard_unpacked_layers = true"))

    def test_version_3(self) -> None:
        self.assertEqual(self.parse(V3.format(discard="false", path=CERTS, extra="")), settings())

    def test_version_1_and_missing(self) -> None:
        """
        A file without a version is containerd's oldest format, whose CRI section is "cri".
        """
        text = '[plugins.cri.registry]\nconfig_path = "/x"\n[plugins.cri.containerd]\ndiscard_unpacked_layers = true\n'
        self.assertEqual(self.parse(text), settings("/x", True, "discard_unpacked_layers = true"))

    def test_v3_ignores_v2_sections(self) -> None:
        """
        containerd 2.x ignores the grpc.v1.cri image keys inside a version 3 file.
        """
        text = 'version = 3\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/x"\n'
        self.assertEqual(self.parse(text).config_path, None)

    def test_local_pull_forced(self) -> None:
        for extra, forced in {
            "use_local_image_pull = true": "use_local_image_pull = true",
            "max_concurrent_downloads = 10": "max_concurrent_downloads",
            "max_concurrent_downloads = 3": None,
            "image_pull_with_sync_fs = true": "image_pull_with_sync_fs = true",
        }.items():
            parsed = self.parse(V3.format(discard="false", path=CERTS, extra=extra))
            self.assertEqual(parsed.local_pull_forced_by, forced, extra)
        text = V3.format(discard="false", path=CERTS, extra="") + "[plugins.'io.containerd.cri.v1.images'.registry.mirrors.'docker.io']\nendpoint = ['https://m']\n"
        self.assertEqual(self.parse(text).local_pull_forced_by, "registry.mirrors")

    def test_empty_config_path_is_unset(self) -> None:
        self.assertIsNone(self.parse(V3.format(discard="false", path="", extra="")).config_path)


class ReadConfigTests(SynchronousTestCase):
    def test_imports_merge(self) -> None:
        """
        Imported files (relative globs) are merged table by table, later files winning.
        """
        root = Path(self.mktemp())
        (root / "conf.d").mkdir(parents=True)
        (root / "config.toml").write_text(
            'version = 3\nimports = ["conf.d/*.toml"]\n'
            "[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = true\n"
        )
        (root / "conf.d" / "10-spegel.toml").write_text(
            "[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n"
        )
        (root / "conf.d" / "20-keep.toml").write_text(
            "[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n"
        )
        parsed = image_pull_settings(read_containerd_config(str(root / "config.toml")))
        self.assertEqual((parsed.config_path, parsed.discard_unpacked_layers), (CERTS, False))

    def test_not_toml(self) -> None:
        path = Path(self.mktemp())
        path.write_text("version = [\n")
        e = self.assertRaises(PreflightError, read_containerd_config, str(path))
        self.assertIn(f"{path} is not valid TOML", str(e))
        self.assertEqual(len(str(e).splitlines()), 1)

    def test_missing_import_target(self) -> None:
        path = Path(self.mktemp())
        path.write_text('version = 2\nimports = ["/nonexistent/*.toml"]\n')
        self.assertEqual(read_containerd_config(str(path)), {"version": 2})

    def test_unreadable(self) -> None:
        e = self.assertRaises(PreflightError, read_containerd_config, self.mktemp())
        self.assertIn("cannot read containerd's configuration", str(e))


class CheckConfigurationTests(SynchronousTestCase):
    def test_fine(self) -> None:
        for version in ((1, 6), (2, 0), (2, 4), None):
            self.assertEqual(check_configuration(settings(), CERTS, version), [])

    def test_unset(self) -> None:
        problems = check_configuration(settings(path=None), CERTS, (1, 6))
        self.assertEqual(checks(problems), [("config_path_unset", True)])
        self.assertIn('[plugins."io.containerd.grpc.v1.cri".registry]', problems[0].message)
        problems = check_configuration(settings(path=None), CERTS, (2, 1))
        self.assertIn("[plugins.'io.containerd.cri.v1.images'.registry]", problems[0].message)

    def test_elsewhere(self) -> None:
        problems = check_configuration(settings(path="/etc/docker/certs.d"), CERTS, (2, 4))
        self.assertEqual(checks(problems), [("config_path_elsewhere", True)])
        self.assertEqual(check_configuration(settings(path=CERTS + "/"), CERTS, (2, 4)), [])

    def test_list_on_transfer_service(self) -> None:
        """
        The EKS AL2023 setting: fatal from 2.1 on (and when the version is unknown), unless
        something sends the CRI back to its local pull path.
        """
        listed = f"{CERTS}:/etc/docker/certs.d"
        for version in ((2, 1), (2, 4), None):
            problems = check_configuration(settings(path=listed), CERTS, version)
            self.assertEqual(checks(problems), [("config_path_list_ignored", True)], version)
            self.assertIn("use_local_image_pull = true", problems[0].message)
        for version in ((1, 6), (1, 7), (2, 0)):
            self.assertEqual(check_configuration(settings(path=listed), CERTS, version), [])
        forced = settings(path=listed, forced="use_local_image_pull = true")
        self.assertEqual(check_configuration(forced, CERTS, (2, 4)), [])

    def test_discard(self) -> None:
        problems = check_configuration(settings(discard=True, forced="discard_unpacked_layers = true"), CERTS, (2, 4))
        self.assertEqual(checks(problems), [("discard_unpacked_layers", False)])
        self.assertIn("nothing to share", problems[0].message)

    def test_one_line_each(self) -> None:
        problems = check_configuration(settings(path="/a:/b", discard=True), CERTS, None)
        self.assertEqual(len(problems), 2)
        for problem in problems:
            self.assertEqual(len(str(problem).splitlines()), 1)
            self.assertIn(problem.check, preflight.CHECKS)


class CheckContainerdTests(SynchronousTestCase):
    def test_fine(self) -> None:
        self.assertEqual(check_containerd(ContainerdFacts("2.4.2", 3), "k8s.io"), [])

    def test_unknown_version_and_no_images(self) -> None:
        problems = check_containerd(ContainerdFacts("devel", 0), "default")
        self.assertEqual(checks(problems), [("containerd_version_unknown", False), ("no_images", False)])
        self.assertIn("'default'", problems[1].message)


class RunPreflightTests(SynchronousTestCase):
    def test_missing_file_skipped(self) -> None:
        self.assertEqual(run_preflight(config_file=self.mktemp(), certs_dir=CERTS, socket_path=None, namespace="k8s.io"), [])

    def test_unparseable_file_is_a_warning(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[[[")
        problems = run_preflight(config_file=str(path), certs_dir=CERTS, socket_path=None, namespace="k8s.io")
        self.assertEqual(checks(problems), [("config_unreadable", False)])


class ReportTests(SynchronousTestCase):
    def test_gauge(self) -> None:
        """
        Every check is exported: 1 for those that found a problem, 0 for the others.
        """
        registry = CollectorRegistry()
        gauge = Gauge("spegel_preflight_problems", "", ("check",), registry=registry)
        service = preflight.PreflightService(None, config_file=None, certs_dir=CERTS, socket_path="/x", namespace="k8s.io", gauge=gauge)
        service._report([preflight.Problem("no_images", False, "x")])
        for check in preflight.CHECKS:
            value = registry.get_sample_value("spegel_preflight_problems", {"check": check})
            self.assertEqual(value, 1.0 if check == "no_images" else 0.0, check)


class CommandTests(SynchronousTestCase):
    """
    C{spegel configuration} runs the preflight first.
    """

    def spegel(self, config: str, *extra: str) -> tuple[int, str, str, Path]:
        root = Path(self.mktemp()) / "certs.d"
        config_file = Path(self.mktemp())
        config_file.write_text(config.format(path=root))
        out, err = io.StringIO(), io.StringIO()
        status = main(
            [
                "configuration",
                f"--containerd-registry-config-path={root}",
                "--mirrored-registries=https://docker.io",
                "--mirror-targets=http://10.0.0.5:30020",
                f"--containerd-config-file={config_file}",
                *extra,
            ],
            stdout=out,
            stderr=err,
        )
        return status, out.getvalue(), err.getvalue(), root

    def test_fatal_writes_nothing(self) -> None:
        status, out, err, root = self.spegel("version = 3\n")
        self.assertEqual(status, EXIT_FAILED)
        self.assertEqual(out, "")
        lines = err.splitlines()
        self.assertTrue(lines[0].startswith("spegel: error: containerd's registry config_path is not set"), lines)
        self.assertIn("--preflight=warn", lines[-1])
        self.assertFalse(root.exists())

    def test_warn_writes(self) -> None:
        status, out, err, root = self.spegel("version = 3\n", "--preflight=warn")
        self.assertEqual(status, EXIT_OK)
        self.assertIn("spegel: error: containerd's registry config_path is not set", err)
        self.assertTrue((root / "docker.io" / "hosts.toml").exists())

    def test_warning_only(self) -> None:
        config = V2.format(discard="true", path="{path}")
        status, out, err, root = self.spegel(config)
        self.assertEqual(status, EXIT_OK)
        self.assertEqual(err.splitlines()[0][:len("spegel: warning: discard")], "spegel: warning: discard")
        self.assertTrue((root / "docker.io" / "hosts.toml").exists())

    def test_fine_is_silent(self) -> None:
        status, out, err, root = self.spegel(V3.format(discard="false", path="{path}", extra=""))
        self.assertEqual((status, err), (EXIT_OK, ""))

    def test_off(self) -> None:
        status, out, err, root = self.spegel("not toml [[[", "--preflight=off")
        self.assertEqual((status, err), (EXIT_OK, ""))


class RunningSettingsTests(SynchronousTestCase):
    """
    What containerd says it runs with: introspection exports (2.2+) or the CRI's status (1.x).
    """

    def test_exports(self) -> None:
        running = preflight.running_settings_from_exports(
            {"RegistryConfigPath": CERTS, "DiscardUnpackedLayers": "true"}
        )
        assert running is not None
        self.assertEqual((running.config_path, running.discard_unpacked_layers), (CERTS, True))
        self.assertFalse(running.local_pull_known)
        self.assertIsNone(preflight.running_settings_from_exports({}))
        unset = preflight.running_settings_from_exports({"RegistryConfigPath": "", "DiscardUnpackedLayers": "false"})
        assert unset is not None
        self.assertIsNone(unset.config_path)

    def test_cri_status(self) -> None:
        config = {"registry": {"configPath": CERTS}, "containerd": {"discardUnpackedLayers": False}}
        running = preflight.running_settings_from_cri_status({"config": json.dumps(config)})
        assert running is not None
        self.assertEqual((running.config_path, running.discard_unpacked_layers), (CERTS, False))
        # 2.x leaves the image settings out; junk is not trusted.
        for info in ({"config": json.dumps({"cni": {}})}, {"config": "{"}, {}):
            self.assertIsNone(preflight.running_settings_from_cri_status(info), info)

    def test_running_wins_and_restart_is_asked_for(self) -> None:
        """
        The file says one thing, containerd runs with another (changed without a restart):
        the checks use what containerd runs with, and say to restart it.
        """
        path = Path(self.mktemp())
        path.write_text(V3.format(discard="false", path=CERTS, extra=""))
        running = ImagePullSettings(None, True, None, "containerd's running configuration", local_pull_known=False)
        self.patch(preflight, "probe_containerd", lambda *a, **k: ContainerdFacts("2.4.2", 1, running))
        problems = run_preflight(config_file=str(path), certs_dir=CERTS, socket_path="/s", namespace="k8s.io")
        self.assertEqual(
            checks(problems),
            [("config_not_applied", False), ("config_path_unset", True), ("discard_unpacked_layers", False)],
        )
        self.assertIn("restart containerd", problems[0].message)

    def test_list_without_file_is_a_warning(self) -> None:
        """
        Only the file tells use_local_image_pull: without it, a list on 2.1+ is doubtful, not
        fatal.
        """
        running = ImagePullSettings(f"{CERTS}:/etc/docker/certs.d", False, None, "containerd", local_pull_known=False)
        self.patch(preflight, "probe_containerd", lambda *a, **k: ContainerdFacts("2.4.2", 1, running))
        problems = run_preflight(config_file=None, certs_dir=CERTS, socket_path="/s", namespace="k8s.io")
        self.assertEqual(checks(problems), [("config_path_list_ignored", False)])
        self.assertIn("not readable", problems[0].message)

    def test_applied(self) -> None:
        self.assertEqual(preflight.check_applied(settings(), settings()), [])
