# -*- test-case-name: tests.test_rig -*-
"""
End-to-end tests of the real-component test rig itself: docker-registry, containerd and the
process handling around them.  These start real processes and clean every one of them up.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from spegel.testing.containerd import ContainerdDaemon
from spegel.testing.process import live_processes


class ContainerdDaemonTests(TestCase):
    """
    L{ContainerdDaemon} runs a real containerd on a private socket.
    """

    def setUp(self) -> None:
        self.daemon = ContainerdDaemon(name="test-containerd")
        self.addCleanup(self.daemon.cleanup)

    def test_startAnswersOnSocket(self) -> None:
        """
        After C{start} the daemon answers C{ctr version} on its own socket, and its store is empty.
        """
        self.daemon.start()
        self.assertIn("Server:", self.daemon.ctr("version"))
        self.assertEqual(self.daemon.content_digests(), set())
        self.assertEqual(self.daemon.images(), {})
        self.assertTrue(self.daemon.socket.startswith(self.daemon.base_dir))

    def test_cleanupLeavesNoProcess(self) -> None:
        """
        C{cleanup} kills the daemon and removes its directory.
        """
        self.daemon.start()
        pid = self.daemon.pid
        self.daemon.cleanup()
        self.assertFalse(self.daemon.running)
        self.assertNotIn(pid, [p.pid for p in live_processes()])
        self.assertFalse(os.path.exists(f"/proc/{pid}/status") and _isAlive(pid))
        self.assertFalse(os.path.exists(self.daemon.base_dir))


def _isAlive(pid: int) -> bool:
    """
    Whether C{pid} is a live (not zombie) process.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except FileNotFoundError:
        return False
    return False
