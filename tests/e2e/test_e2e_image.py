# -*- test-case-name: tests.e2e.test_e2e_image -*-
"""
End-to-end tests of spegel's image, built offline from the root Containerfile
(L{spegel_testing.image}: debootstrap'ed Debian bases, buildah, a wheelhouse), pushed to a real
registry and run by each containerd with a read-only root file system, as the chart runs it.

The image is built once per test run (its bases and wheels are cached across runs).
"""

from __future__ import annotations

import os
import urllib.request

from twisted.trial.unittest import TestCase

import spegel
from spegel_testing import image
from spegel_testing.containerd import ContainerdDaemon, per_containerd
from spegel_testing.ports import free_port
from spegel_testing.process import CommandFailed, wait_for
from spegel_testing.registry import UpstreamRegistry
from spegel_testing.shared import Shared

_built = Shared(lambda: image.build(), lambda tag: None)


class ImageTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        tag = _built.get()
        self.registry = UpstreamRegistry(name="image-registry")
        self.registry.start()
        self.addCleanup(self.registry.cleanup)
        self.daemon = ContainerdDaemon(name="image-containerd", build=self.containerd_build)  # type: ignore[attr-defined]
        self.daemon.start()
        self.addCleanup(self.daemon.cleanup)
        self.ref = f"{self.registry.host}/spegel:{spegel.__version__}"
        image.push(tag, self.ref)
        self.daemon.pull(self.ref)

    def run_in_image(self, name: str, *args: str, mounts: tuple[str, ...] = ()) -> str:
        """
        Run C{args} in a container of the image with a read-only root and the host's network.
        """
        options = ["--rm", "--read-only", "--net-host"]
        for mount in mounts:
            options += ["--mount", mount]
        return self.daemon.ctr("run", *options, self.ref, name, *args, timeout=120)

    def test_commands_on_a_read_only_root(self) -> None:
        """
        The init container's command and the node's both start with nothing writable; pip,
        setuptools and the test rig are not in the image.
        """
        self.assertEqual(self.run_in_image("version", "spegel", "version").strip(), spegel.__version__)
        usage = self.run_in_image("help", "twistd", "spegel", "--help")
        self.assertIn("--registry-addr", usage)
        for module in ("pip", "setuptools", "spegel_testing"):
            # Decided by the exit status, not by the ImportError's text: ctr run sometimes
            # returns before it has copied a short-lived container's stderr (seen in CI).
            self.run_in_image(
                "no-" + module.replace(".", "-"), "python3", "-c",
                f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is not None)",
            )

    def test_node_serves_from_the_image(self) -> None:
        """
        The node in the image, on a read-only root, bound to this containerd's socket and
        content store, answers /readyz and serves a blob its containerd holds (its own image's
        layers).
        """
        port = free_port()
        name = "node"
        data = os.path.join(self.daemon.base_dir, "node-data")
        os.makedirs(data)
        args = [
            "twistd", "-n", "--pidfile=", "spegel",
            f"--registry-addr=127.0.0.1:{port}", f"--router-addr=127.0.0.1:{free_port()}",
            f"--metrics-addr=127.0.0.1:{free_port()}",
            "--containerd-sock=/run/containerd/containerd.sock",
            "--containerd-content-path=/var/lib/containerd/io.containerd.content.v1.content",
            "--data-dir=/var/lib/spegel",
            f"--mirrored-registries=http://{self.registry.host}",
        ]
        mounts = (
            f"type=bind,src={self.daemon.socket},dst=/run/containerd/containerd.sock,options=rbind:rw",
            f"type=bind,src={self.daemon.content_path},dst=/var/lib/containerd/io.containerd.content.v1.content,options=rbind:ro",
            f"type=bind,src={data},dst=/var/lib/spegel,options=rbind:rw",
        )
        options = ["--read-only", "--net-host", "--detach"]
        for mount in mounts:
            options += ["--mount", mount]
        self.daemon.ctr("run", *options, self.ref, name, *args)
        self.addCleanup(self._kill, name)

        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(ready, timeout=60, what="the node in the image to be ready")
        digest = self.daemon.image_digest(self.ref)
        ns = self.registry.host.replace(":", "%3A")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/spegel/manifests/{digest}?ns={ns}", timeout=10) as response:
            self.assertEqual(response.status, 200)
            self.assertEqual(response.headers["Docker-Content-Digest"], digest)

    def _kill(self, name: str) -> None:
        for args in (("task", "kill", "--signal", "SIGKILL", name), ("task", "rm", "--force", name), ("containers", "rm", name)):
            try:
                self.daemon.ctr(*args, timeout=30)
            except CommandFailed:
                pass


globals().update(per_containerd(ImageTests))
del ImageTests
