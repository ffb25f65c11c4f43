# -*- test-case-name: tests.e2e.test_e2e_coalesce -*-
"""
End-to-end tests of pull coalescing (C{--mirror-coalesce-timeout}, L{spegel.coalesce}): three
real containerd daemons, each mirroring through its own spegel node, every node started with
coalescing on, and one real upstream registry.

A node that misses a manifest says in the DHT that its containerd is pulling it upstream; a
second node that misses the same manifest while that marker is fresh waits for the first pull to
finish and then gets everything from peers, instead of going upstream too.  Every process is
killed at the end, also on failure, and a failing test carries the tail of every log.
"""

from __future__ import annotations

import re
import threading
import time

from twisted.logger import Logger

from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.containerd import per_containerd
from spegel_testing.images import build_image
from spegel_testing.process import wait_for
from tests.e2e.test_e2e_p2p import MiB, _delta, _of, _P2PTestCase

_log = Logger()

COALESCE_TIMEOUT = "30s"
COALESCING = "spegel_pull_coalescing_total"
PROVIDER_RECORDS = "spegel_dht_provider_records"
# The layer of the first test: large enough that the first node's pull, straight from the
# upstream registry on loopback, is still running when the second node starts its own.
LARGE_LAYER = 192 * MiB
WAITING = re.compile(r"another node is pulling (\S+) from upstream: waiting for it")


def _coalescingNodeArgs(index: int, cluster: Cluster) -> list[str]:
    """
    A L{Cluster} C{node_args} hook: static bootstrap, and coalescing on.
    """
    return [*static_bootstrap(index, cluster), f"--mirror-coalesce-timeout={COALESCE_TIMEOUT}"]


def _coalescingLines(log: str) -> list[str]:
    """
    The lines of a node's log about waiting for another node's pull, and about the manifest
    lookups around them.
    """
    return [line for line in log.splitlines() if "from upstream" in line or "manifest" in line.lower()][:40]


def _upstreamGets(cluster: Cluster, digest: str) -> int:
    """
    How many times the upstream registry's access log shows a GET of blob C{digest}.
    """
    with open(cluster.registry.log_path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if "GET /v2/" in line and f"/blobs/{digest}" in line)


class _BackgroundPull:
    """
    C{cluster.pull(index, ref)} in a thread; L{join} re-raises what it raised.
    """

    def __init__(self, cluster: Cluster, index: int, ref: str) -> None:
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(cluster, index, ref), name=f"pull on node {index}", daemon=True
        )
        self._thread.start()

    def _run(self, cluster: Cluster, index: int, ref: str) -> None:
        try:
            self.seconds = cluster.pull(index, ref)
        except BaseException as e:
            self.error = e

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 150.0) -> float:
        """
        Wait for the pull; re-raise its exception.

        @return: the seconds it took.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self._thread.name} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.seconds is not None
        return self.seconds


class CoalescingTests(_P2PTestCase):
    """
    A cluster of its own, every node with C{--mirror-coalesce-timeout=30s}: the markers a test
    leaves would hold back another test's pulls of the same manifests for a minute or two.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(
            3, node_args=_coalescingNodeArgs, wait_ready=True, containerd_build=self.containerd_build
        )
        self.cluster.start()
        self.addCleanup(self.cluster.stop)
        self.cluster.mirror_through_own_nodes()

    def coalescing(self, index: int) -> dict[str, float]:
        """
        Node C{index}'s C{spegel_pull_coalescing_total}, by outcome.
        """
        metrics = self.cluster.nodes[index].metrics()
        return {outcome: metrics.total(COALESCING, outcome=outcome) for outcome in ("upstream", "waited", "timeout")}

    def test_secondPullWaitsForTheFirst(self) -> None:
        """
        Node 0 pulls a new image with one large layer: its node misses the manifest, marks the
        pull in the DHT and sends containerd upstream.  While that pull is still running, node
        1 pulls the same image: its node finds the marker and, rather than answer 404, waits
        until node 0 holds the image, then serves every byte to its containerd from node 0.
        The image's layer went upstream once, not twice.
        """
        cluster = self.cluster
        repo = "coalesce/large"
        image = self.oneLayerImage("coalesce-large", LARGE_LAYER)
        layer = image.layers[0]
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            before = {i: self.coalescing(i) for i in range(3)}
            served = cluster.served()
            records = cluster.nodes[1].metrics().total(PROVIDER_RECORDS)

            started = time.monotonic()
            first = _BackgroundPull(cluster, 0, ref)
            try:
                wait_for(
                    lambda: self.coalescing(0)["upstream"] > before[0]["upstream"],
                    timeout=30,
                    what="node 0 marking its upstream pull",
                )
                marked = time.monotonic() - started
                # The marker is provided to the nodes closest to its key, node 1 among them in a
                # cluster of three: wait until node 0's first announcement since (the marker's,
                # perhaps with the first blobs') is stored there.
                wait_for(
                    lambda: cluster.nodes[1].metrics().total(PROVIDER_RECORDS) > records,
                    timeout=30,
                    what="node 0's marker to reach node 1",
                )
                if not first.running:
                    self.fail(
                        f"node 0's pull of a {layer.size}-byte layer ended {time.monotonic() - started:.2f}s "
                        "after it started, before node 1 could pull alongside it: the image is too small "
                        "for this machine, make LARGE_LAYER bigger"
                    )
                secondStarted = time.monotonic() - started
                secondPull = _BackgroundPull(cluster, 1, ref)
                try:
                    # Node 1's node counts "waited" once node 0's pull has made the manifest
                    # findable: how long node 1's containerd was held back.
                    wait_for(
                        lambda: self.coalescing(1)["waited"] > before[1]["waited"] or not secondPull.running,
                        timeout=60,
                        what="node 1 to stop waiting",
                    )
                    waited = time.monotonic() - started - secondStarted
                    firstStillRunning = first.running
                finally:
                    second = secondPull.join()
            finally:
                firstSeconds = first.join()
            delta = _delta(cluster.served(), served)
            after = {i: self.coalescing(i) for i in range(3)}

            _log.info(
                "coalesced pull: node 0 marked after {marked:.3f}s, pulled in {first:.3f}s; node 1 started "
                "at {secondStarted:.3f}s, waited {waited:.3f}s (node 0's ctr still running then: {still}), "
                "pulled in {second:.3f}s; served {delta}; coalescing {after}",
                marked=marked,
                first=firstSeconds,
                secondStarted=secondStarted,
                waited=waited,
                still=firstStillRunning,
                second=second,
                delta=delta,
                after=after,
            )
            for index in (0, 1):
                _log.info(
                    "node {index} on coalescing:\n{lines}",
                    index=index,
                    lines="\n".join(_coalescingLines(cluster.nodes[index].log_text())),
                )
            self.assertGreaterEqual(after[0]["upstream"] - before[0]["upstream"], 1, after)
            self.assertGreaterEqual(after[1]["waited"] - before[1]["waited"], 1, after)
            self.assertEqual(after[1]["timeout"], before[1]["timeout"], after)
            self.assertEqual(after[1]["upstream"], before[1]["upstream"], after)
            self.assertRegex(cluster.nodes[1].log_text(), WAITING)
            self.assertHolds(0, ref, image)
            self.assertHolds(1, ref, image)
            # Node 1's containerd got the layer through its node from node 0, the only holder.
            self.assertGreaterEqual(_of(delta, 1).peer, layer.size, delta)
            self.assertGreaterEqual(_of(delta, 0).local, layer.size, delta)
            # And the upstream registry sent it once, to node 0's containerd.
            self.assertEqual(_upstreamGets(cluster, layer.digest), 1)

    def test_noOneElsePullingGoesUpstreamAtOnce(self) -> None:
        """
        With coalescing on, a node that is the only one pulling a new image is not held back:
        its node finds no other node's marker, marks its own, and answers 404 at once; the pull
        succeeds from upstream, counted as C{upstream}, never as C{waited} or C{timeout}.
        """
        cluster = self.cluster
        repo = "coalesce/alone"
        image = build_image(seed="coalesce-alone", layer_sizes=(1 * MiB, 64 * 1024))
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            before = self.coalescing(2)
            served = cluster.served()
            seconds = cluster.pull(2, ref)
            after = self.coalescing(2)
            delta = _delta(cluster.served(), served)
            _log.info("lone pull with coalescing on: {seconds:.3f}s; coalescing {after}", seconds=seconds, after=after)

            self.assertHolds(2, ref, image)
            self.assertGreaterEqual(after["upstream"] - before["upstream"], 1, after)
            self.assertEqual(after["waited"], before["waited"], after)
            self.assertEqual(after["timeout"], before["timeout"], after)
            self.assertNotRegex(cluster.nodes[2].log_text(), WAITING)
            # Nothing came from peers: there were none to come from.
            self.assertEqual(_of(delta, 2).peer, 0, delta)
            # Not held back: the counters and the log above say so without a clock (how long
            # the pull took is logged; it depends on the machine's load).


globals().update(per_containerd(CoalescingTests))
del CoalescingTests
