# -*- test-case-name: tests.e2e.test_e2e_early_headers -*-
"""
End-to-end tests of early headers (C{--mirror-blob-headers-after}, L{spegel.latebody}) with real
containerd: two nodes, node 0 the only holder of an image and at its C{--max-uploads} of 1 (a
"peer" that reads nothing holds its one upload slot), node 1's containerd pulling the image.

  - The slot is held for longer than containerd 2.4 waits for response headers (30 s) with the
    upstream registry stopped: node 1 answers with the headers after 2 s, the bytes follow from
    node 0 once its slot is free, and the pull succeeds, where containerd 2.4 would otherwise
    have left for the stopped registry and failed.
  - Node 0 loses the image's config while node 1 has sent its headers: node 1 cuts the
    connection, containerd asks it again for the config, gets a 404 at once and pulls it
    upstream.

Every containerd build runs both: 1.6 and 2.1 wait for headers without a deadline, and must
take the cut (an orderly close before the announced length) as a reason to ask again too.
"""

from __future__ import annotations

import socket
import time
import urllib.parse

from twisted.logger import Logger

from spegel.interfaces import MIRRORED_HEADER
from spegel_testing.containerd import per_containerd
from spegel_testing.images import TestImage, build_image
from spegel_testing.node import SpegelNode
from spegel_testing.process import wait_for
from tests.e2e.test_e2e_coalesce import _BackgroundPull, _upstreamGets
from tests.e2e.test_e2e_p2p import MiB, _hide, _OwnClusterTestCase

_log = Logger()

EARLY = "spegel_mirror_early_headers_total"
HEADERS_SENT = "headers sent, bytes to follow"
# Longer than containerd 2.4's ResponseHeaderTimeout (core/remotes/docker/registry.go).
HOLD = 33.0
# Larger than what the socket buffers of both ends take in, so node 0's upload of it cannot end
# while the holding "peer" reads nothing.
BALLAST = 48 * MiB


class _SlotHolder:
    """
    A "peer" that asks node C{node} for blob C{path} and reads nothing: one upload slot taken
    until L{release}.
    """

    def __init__(self, node: SpegelNode, path: str) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self._sock.connect((node.address, node.registry_port))
        self._sock.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n{MIRRORED_HEADER}: true\r\n\r\n".encode())
        wait_for(
            lambda: node.metrics().total("spegel_uploads_active") >= 1, timeout=30, what="the held upload to start"
        )

    def release(self) -> None:
        self._sock.close()


class EarlyHeadersTests(_OwnClusterTestCase):
    nodes = 2
    node_args = ("--max-uploads=1", "--mirror-blob-headers-after=2s")

    def hold_the_only_slot(self) -> _SlotHolder:
        """Node 0 pulls a ballast image and a "peer" takes node 0's one upload slot with it."""
        ballast = self.oneLayerImage("early-headers-ballast", BALLAST)
        ref = self.cluster.registry.push_image("early/ballast", "v1", ballast)
        self.cluster.pull(0, ref)
        ns = urllib.parse.quote(self.cluster.registry.host, safe="")
        holder = _SlotHolder(self.cluster.nodes[0], f"/v2/early/ballast/blobs/{ballast.layers[0].digest}?ns={ns}")
        self.addCleanup(holder.release)
        return holder

    def held_by_node_0(self, repo: str, seed: str) -> tuple[str, TestImage]:
        # A streamed layer and a spooled one (4 MiB or less): both kinds of body come late.
        image = build_image(seed=seed, layer_sizes=(6 * MiB, 64 * 1024))
        ref = self.cluster.registry.push_image(repo, "v1", image)
        self.cluster.pull(0, ref)
        self.waitFindable([1], repo, image, "v1", "image held by node 0")
        return ref, image

    def early(self, outcome: str) -> float:
        return self.cluster.nodes[1].metrics().total(EARLY, outcome=outcome)

    def test_bytes_follow_when_the_holder_is_free(self) -> None:
        with self.logsOnFailure():
            ref, image = self.held_by_node_0("early/served", "early-headers-served")
            holder = self.hold_the_only_slot()
            with self.upstreamStopped():
                started = time.monotonic()
                pull = _BackgroundPull(self.cluster, 1, ref)
                wait_for(
                    lambda: HEADERS_SENT in self.cluster.nodes[1].log_text() or not pull.running,
                    timeout=HOLD,
                    what="node 1 to send early headers",
                )
                # What is tested is a duration: the only holder stays busy past containerd 2.4's
                # header deadline, so no event can stand in for the rest of the hold.
                time.sleep(max(0.0, HOLD - (time.monotonic() - started)))
                self.assertTrue(pull.running, "the pull ended while node 0 could serve nobody")
                holder.release()
                pull.join()
            seconds = time.monotonic() - started
            _log.info("pull through early headers: {seconds:.1f}s", seconds=seconds)
            self.assertHolds(1, ref, image)
            self.assertGreaterEqual(self.early("served"), 1)
            self.assertEqual(self.early("cut"), 0)
            self.assertGreater(self.cluster.nodes[1].metrics().total("spegel_mirror_peers_busy_total"), 0)

    def test_no_holder_in_the_end_sends_containerd_upstream(self) -> None:
        with self.logsOnFailure():
            ref, image = self.held_by_node_0("early/cut", "early-headers-cut")
            # The image's config: containerd 2.x asks for the layers only once it has it.
            (config,) = image.configs
            holder = self.hold_the_only_slot()
            pull = _BackgroundPull(self.cluster, 1, ref)
            wait_for(
                lambda: f"no holder of {config.digest} answered" in self.cluster.nodes[1].log_text() or not pull.running,
                timeout=60,
                what="node 1 to send early headers for the config",
            )
            # Node 0 loses the config (it then answers 404 for it) and serves again.
            restore = _hide(self.cluster.containerds[0].blob_path(config.digest))
            self.addCleanup(restore)
            holder.release()
            pull.join()
            self.assertHolds(1, ref, image)
            self.assertGreaterEqual(self.early("cut"), 1)
            self.assertRegex(self.cluster.nodes[1].log_text(), "waited for in vain a moment ago: 404")
            # Node 0's pull, and node 1's containerd after the cut.
            self.assertEqual(_upstreamGets(self.cluster, config.digest), 2)

globals().update(per_containerd(EarlyHeadersTests))
del EarlyHeadersTests
