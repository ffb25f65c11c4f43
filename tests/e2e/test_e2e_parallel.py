# -*- test-case-name: tests.e2e.test_e2e_parallel -*-
"""
End-to-end test of a large blob fetched in pieces from several holders at once
(L{spegel.piecewise}): real containerds, real spegel nodes, the upstream registry stopped.
"""

from __future__ import annotations

from spegel_testing.containerd import per_containerd
from tests.e2e.test_e2e_p2p import MiB, _delta, _of, _OwnClusterTestCase


class ParallelPullTests(_OwnClusterTestCase):
    """
    Nodes 0 and 1 hold an image whose one layer is above the nodes' default
    C{--mirror-parallel-min-size} (32 MiB); node 2 pulls it with upstream gone.
    """

    def test_layerFromTwoHolders(self) -> None:
        """
        Both holders serve pieces of the layer to node 2, which stores it whole and verified,
        and counts the pieces it fetched.
        """
        cluster = self.cluster
        repo = "p2p/parallel"
        image = self.oneLayerImage("p2p-parallel", 48 * MiB)
        layer = image.layers[0]
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            cluster.pull(0, ref)
            cluster.pull(1, ref)
            self.waitFindable([2], repo, image, "v1", "image held by two nodes")
            served = cluster.served()
            pieces = cluster.nodes[2].metrics().total("spegel_mirror_pieces_fetched_total")
            with self.upstreamStopped():
                cluster.pull(2, ref)
            delta = _delta(cluster.served(), served)

            self.assertHolds(2, ref, image)
            metrics = cluster.nodes[2].metrics()
            self.assertGreaterEqual(metrics.total("spegel_mirror_parallel_copies_total"), 1)
            # 48 MiB in pieces of 8 MiB: six, each from one holder or the other.
            self.assertGreaterEqual(metrics.total("spegel_mirror_pieces_fetched_total") - pieces, 6)
            for holder in (0, 1):
                self.assertGreater(_of(delta, holder).local, 0, f"holder {holder} sent no piece: {delta}")
            self.assertGreaterEqual(_of(delta, 0).local + _of(delta, 1).local, layer.size, delta)
            self.assertGreaterEqual(_of(delta, 2).peer, layer.size, delta)


globals().update(per_containerd(ParallelPullTests))
del ParallelPullTests
