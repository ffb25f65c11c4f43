# -*- test-case-name: tests.e2e.test_partial -*-
"""
End-to-end test of serving a blob while containerd is still downloading it (L{spegel.ingest}):
a real containerd ingests a blob slowly (C{ctr content ingest}, fed through a pipe, writes it into
an ingest of the content store exactly as a pull does), and a peer's request to the node, made
when half of it is written, gets every byte as it arrives, then the whole blob once committed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import threading
import urllib.parse
import urllib.request

from twisted.trial.unittest import TestCase

from spegel.interfaces import MIRRORED_HEADER
from spegel.uploads import PARTIAL_HEADER
from spegel_testing.cluster import Cluster
from spegel_testing.containerd import ContainerdBuild, per_containerd
from spegel_testing.process import wait_for

MiB = 1 << 20


class PartialBlobTests(TestCase):
    containerd_build: ContainerdBuild

    def setUp(self) -> None:
        self.cluster = Cluster(1, containerd_build=self.containerd_build)
        self.cluster.start()
        self.addCleanup(self.cluster.stop)
        self.daemon = self.cluster.containerds[0]
        self.node = self.cluster.nodes[0]
        self.data = os.urandom(6 * MiB)
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        ns = urllib.parse.quote(self.cluster.registry.host, safe="")
        self.path = f"/v2/e2e/partial/blobs/{self.digest}?ns={ns}"
        self.url = f"http://{self.node.registry_addr}{self.path}"

    def ingest(self) -> subprocess.Popen[bytes]:
        """C{ctr content ingest} of the blob, under a ref named as a pull names a layer's."""
        command = [
            self.daemon.build.ctr, "-a", self.daemon.socket, "-n", self.daemon.namespace,
            "content", "ingest", "--expected-size", str(len(self.data)), "--expected-digest", self.digest,
            f"layer-{self.digest}",
        ]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(process.kill)  # nothing to do if it ended
        return process

    def peer_get(self, **headers: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url, headers={MIRRORED_HEADER: "true", **headers})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def test_a_blob_is_served_while_containerd_writes_it(self) -> None:
        self.assertEqual(self.peer_get()[0], 404)
        process = self.ingest()
        stdin = process.stdin
        assert stdin is not None
        half = len(self.data) // 2
        trickle = 4096
        release = threading.Event()

        def download() -> None:
            """
            Half at once, then a trickle (a download that is moving, however loaded the machine:
            a still one is answered "not yet"), then the rest once the test says so.
            """
            stdin.write(self.data[:half])
            stdin.flush()
            offset = half
            while not release.wait(0.25) and offset + trickle < len(self.data) - MiB:
                stdin.write(self.data[offset : offset + trickle])
                stdin.flush()
                offset += trickle
            stdin.write(self.data[offset:])
            stdin.close()

        writer = threading.Thread(target=download)
        writer.start()
        self.addCleanup(writer.join, 60)
        self.addCleanup(release.set)
        # The first bytes are readable once containerd has written them.
        wait_for(lambda: self.peer_get(Range="bytes=0-0")[0] == 206, timeout=30, what="the ingest to be served")
        status, headers, body = self.peer_get(Range=f"bytes=0-{half - 1}")
        self.assertEqual((status, headers.get(PARTIAL_HEADER.lower())), (206, "true"))
        self.assertEqual(body, self.data[:half])

        # A whole-blob request answered now gets the rest as containerd writes it.
        connection = http.client.HTTPConnection(self.node.registry_addr, timeout=60)
        self.addCleanup(connection.close)
        connection.request("GET", self.path, headers={MIRRORED_HEADER: "true"})
        response = connection.getresponse()
        self.assertEqual((response.status, response.getheader(PARTIAL_HEADER)), (200, "true"))
        self.assertEqual(response.getheader("content-length"), str(len(self.data)))
        release.set()
        body = response.read()
        self.assertEqual(process.wait(timeout=60), 0, process.stderr.read() if process.stderr else b"")
        self.assertEqual(hashlib.sha256(body).hexdigest(), self.digest.split(":")[1])

        # Committed: served whole, from the content store.
        status, headers, body = self.peer_get()
        self.assertEqual((status, headers.get(PARTIAL_HEADER.lower())), (200, None))
        self.assertEqual(body, self.data)


globals().update(per_containerd(PartialBlobTests))
del PartialBlobTests
