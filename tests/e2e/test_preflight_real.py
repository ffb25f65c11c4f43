# -*- test-case-name: tests.e2e.test_preflight_real -*-
"""
Tests for L{spegel.preflight}'s containerd probe against sockets that are not containerd's: a real
Unix socket nothing speaks gRPC on (the rest is in L{tests.unit.test_preflight}; real containerd is
probed in L{tests.e2e.test_e2e_cri}).
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from spegel import preflight
from spegel.preflight import ContainerdFacts, run_preflight
from tests.unit.test_preflight import CERTS, checks


class ProbeTests(SynchronousTestCase):
    def test_socket_that_is_not_containerd(self) -> None:
        """
        A missing socket, a plain file and a socket nothing speaks gRPC on: one warning each.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        plain = directory / "file.sock"
        plain.write_text("")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(str(directory / "other.sock"))
        listening.listen(1)
        for path in (directory / "none.sock", plain, directory / "other.sock"):
            self.patch(preflight, "probe_containerd", _quick_probe)
            problems = run_preflight(config_file=None, certs_dir=CERTS, socket_path=str(path), namespace="k8s.io")
            self.assertEqual(checks(problems), [("containerd_unreachable", False)], path)
            self.assertIn(str(path), problems[0].message)


_real_probe = preflight.probe_containerd


def _quick_probe(socket_path: str, namespace: str, timeout: float = 5.0) -> ContainerdFacts:
    return _real_probe(socket_path, namespace, timeout=0.5)
