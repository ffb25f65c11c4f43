# -*- test-case-name: tests.unit.test_tools -*-
"""
Tests for L{spegel_testing.tools}: building the Go tools into the cache by version, with a stand-in
C{go} command (a shell script), so nothing is downloaded or compiled.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from spegel_testing import tools
from spegel_testing.containerd import ContainerdBuild, built_containerd
from spegel_testing.process import ProcessFailed

# Records its arguments; "go build ... -o DIR/ pkg..." creates one executable per package.
FAKE_GO = """#!/bin/sh
echo "$@" >> "{log}"
if [ "$1" = build ]; then
    [ -n "{fail}" ] && {{ echo "compile error in {fail}"; exit 1; }}
    while [ "$1" != -o ]; do shift; done
    out="$2"; shift 2
    for pkg in "$@"; do
        printf '#!/bin/sh\\necho built\\n' > "$out$(basename "$pkg")"
        chmod +x "$out$(basename "$pkg")"
    done
fi
exit 0
"""

TOOL = tools.GoTool(
    name="containerd",
    module="github.com/containerd/containerd/v2",
    version="9.9.9",
    commands=("cmd/containerd", "cmd/ctr"),
    link_variables=(("github.com/containerd/containerd/v2/version.Version", "{version}"), ("x.y/v.State", "clean")),
)


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = Path(self.mktemp()).absolute()
        self.log = Path(self.mktemp()).absolute()
        self.log.write_text("")

    def fakeGo(self, fail: str = "") -> str:
        path = Path(self.mktemp()).absolute()
        path.write_text(FAKE_GO.format(log=self.log, fail=fail))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
        return str(path)

    def test_builds_then_cached(self) -> None:
        """
        The first call builds every command into <cache>/<name>-<version> with the version
        linked in; the second calls no Go at all.
        """
        go = self.fakeGo()
        directory = tools.build(TOOL, str(self.cache), go=go)
        self.assertEqual(directory, str(self.cache / "containerd-9.9.9"))
        self.assertEqual(sorted(os.listdir(directory)), ["containerd", "ctr"])
        self.assertTrue(TOOL.built(str(self.cache)))
        calls = self.log.read_text().splitlines()
        self.assertEqual(calls[0], "mod tidy")
        self.assertIn("-X github.com/containerd/containerd/v2/version.Version=9.9.9 -X x.y/v.State=clean", calls[1])
        self.assertTrue(calls[1].endswith("github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr"))
        tools.build(TOOL, str(self.cache), go=go)
        self.assertEqual(len(self.log.read_text().splitlines()), 2)
        # Only the finished directory is left in the cache.
        self.assertEqual(os.listdir(self.cache), ["containerd-9.9.9"])

    def test_incomplete_build_replaced(self) -> None:
        """
        A cached build that lacks a command (one added to the tool since) is built again and
        replaces the old one.
        """
        old = self.cache / "containerd-9.9.9"
        old.mkdir(parents=True)
        (old / "containerd").write_text("old")
        (old / "containerd").chmod(0o755)
        self.assertFalse(TOOL.built(str(self.cache)))
        tools.build(TOOL, str(self.cache), go=self.fakeGo())
        self.assertTrue(TOOL.built(str(self.cache)))
        self.assertNotEqual((old / "containerd").read_text(), "old")
        self.assertEqual(os.listdir(self.cache), ["containerd-9.9.9"])

    def test_failure_leaves_nothing(self) -> None:
        e = self.assertRaises(tools.BuildFailed, tools.build, TOOL, str(self.cache), go=self.fakeGo(fail="ctr"))
        self.assertIn("building containerd-9.9.9 failed at 'go build'", str(e))
        self.assertIn("compile error in ctr", str(e))
        self.assertEqual(os.listdir(self.cache), [])
        self.assertFalse(TOOL.built(str(self.cache)))

    def test_no_go(self) -> None:
        e = self.assertRaises(tools.BuildFailed, tools.build, TOOL, str(self.cache), go=str(self.cache / "no-go"))
        self.assertIn("no Go toolchain", str(e))

    def test_missing_build_named(self) -> None:
        """
        A containerd that is not built is reported as such, with the command that builds it.
        """
        self.patch(os, "environ", {**os.environ, tools.TOOLS_DIR_ENV: str(self.cache)})
        build = built_containerd(TOOL)
        self.assertEqual(build.label, "containerd_9_9")
        self.assertIn("run bash .ci/setup", build.missing or "")
        self.assertRaises(ProcessFailed, build.check)

    def test_config_versions(self) -> None:
        self.assertEqual(ContainerdBuild("1.6.20").config_version, 2)
        self.assertEqual(ContainerdBuild("2.0.0").config_version, 3)
        self.assertFalse(ContainerdBuild("2.0.5").publishes_content_create)
        self.assertTrue(ContainerdBuild("2.1.9").publishes_content_create)
