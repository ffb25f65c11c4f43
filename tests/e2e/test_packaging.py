# -*- test-case-name: tests.e2e.test_packaging -*-
"""
What each distribution ships: the node's wheel holds the node and its commands only; the test rig,
the DHT simulator, the proto files and their regenerator ship in spegel-testing (testing/).

Both wheels are built for real (pip, no network: the venv's setuptools) from a copy of the
checkout's tracked files, so a package list in setup.cfg that drifts from the tree fails here, and
a stale build/ directory in a working checkout cannot hide it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

import spegel
import spegel_testing

ROOT = Path(__file__).resolve().parent.parent.parent


def tracked_copy(into: Path) -> Path:
    """
    Copy the checkout's tracked (and new, not ignored) files into C{into}; return it.
    """
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listing):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def build_wheel(project: Path, into: Path) -> list[str]:
    """
    Build C{project}'s wheel into C{into} and return the names of the files it holds.
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(into), str(project)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


class WheelContentsTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="spegel-wheels-"))
        self.addCleanup(shutil.rmtree, self.work)
        self.source = tracked_copy(self.work / "source")

    def test_node_wheel_holds_the_node_only(self) -> None:
        names = build_wheel(self.source, self.work / "node")
        # The node and the twistd plugin that starts it are there...
        for needed in ("spegel/tap.py", "spegel/mirror.py", "spegel/cli.py", "spegel/dht/node.py",
                       "spegel/containerd/api/content_pb2.py", "twisted/plugins/spegel_plugin.py"):
            self.assertIn(needed, names)
        # ...and nothing a running node never reads.
        self.assertEqual([n for n in names if n.startswith(("spegel_testing/", "spegel/testing/", "tests/"))], [])
        self.assertEqual([n for n in names if n.endswith(".proto")], [])
        self.assertEqual([n for n in names if "simulation" in n or "regenerate" in n or "protos" in n], [])
        # Twisted's own plugin package stays Twisted's: no __init__.py of ours replaces it.
        self.assertNotIn("twisted/plugins/__init__.py", names)

    def test_testing_wheel_holds_the_rig_and_the_protos(self) -> None:
        names = build_wheel(self.source / "testing", self.work / "testing")
        for needed in ("spegel_testing/cluster.py", "spegel_testing/dhtsim.py", "spegel_testing/protos.py",
                       "spegel_testing/proto/spegel/containerd/api/content.proto"):
            self.assertIn(needed, names)
        self.assertEqual([n for n in names if n.startswith("spegel/")], [])
        self.assertEqual(spegel_testing.__version__, spegel.__version__)
