# -*- test-case-name: tests.e2e.test_e2e_p2p -*-
"""
End-to-end tests of the peer-to-peer mirror: three real containerd daemons, each mirroring
through its own spegel node (hosts.toml written by C{spegel configuration}), three nodes that
bootstrap from each other (static), one real upstream registry that is stopped to prove the bytes
came from peers.

A cluster is shared by the tests that leave it as they found it (L{ClusterPullTests}); the tests
that kill a node or corrupt a store start their own, because the puller then keeps the bad peer
put aside for a minute.  Every process is killed at the end, also on failure, and a failing test
carries the tail of every log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from spegel_testing.cluster import Cluster, Served, static_bootstrap
from spegel_testing.images import TestImage, build_image
from spegel_testing.process import CommandFailed, ProcessFailed, wait_for
from spegel_testing.containerd import ContainerdBuild, per_containerd
from spegel_testing.shared import Shared

_log = Logger()

MiB = 1 << 20

# A cluster-wide lookup should find new content within a second of the pull; the tests allow
# a few on this shared, noisy machine, and log what they saw.
# A deadline for what takes well under a second on an idle machine (benchmarks/ measures how
# long); generous, so a loaded machine does not fail the test.
FINDABLE_WITHIN = 60.0

# Spooled and checked before a byte is sent (at most 4 MiB) and streamed with the last chunk held
# back (more): an image with both kinds of layer takes both paths.
SMALL_AND_LARGE = (6 * MiB, 512 * 1024, 64 * 1024)

SUBSCRIBED = "Subscribed to containerd events"
ANNOUNCED = "Announced "


def _startCluster(build: ContainerdBuild, nodes: int = 3, extra_args: tuple[str, ...] = ()) -> Cluster:
    def node_args(index: int, cluster: Cluster) -> list[str]:
        return [*static_bootstrap(index, cluster), *extra_args]

    cluster = Cluster(nodes, node_args=node_args, wait_ready=True, containerd_build=build)
    cluster.start()
    try:
        cluster.mirror_through_own_nodes()
    except BaseException:
        cluster.stop()
        raise
    return cluster


_shared = Shared(_startCluster, Cluster.stop)


class _P2PTestCase(TestCase):
    """
    Helpers over a L{Cluster} whose containerds mirror through their own nodes.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    cluster: Cluster

    def oneLayerImage(self, seed: str, size: int) -> TestImage:
        """
        An image with one layer of C{size} random bytes, plain tar (cheap to build at any size),
        built in a scratch directory removed when the test ends.
        """
        scratch = tempfile.mkdtemp(prefix="spegel-p2p-")
        self.addCleanup(_removeTree, scratch)
        return build_image(seed=seed, layer_sizes=(size,), compress=False, directory=scratch)

    @contextlib.contextmanager
    def logsOnFailure(self) -> Iterator[None]:
        """
        Re-raise a failed assertion or a failed rig step with every log tail attached.
        """
        try:
            yield
        except (self.failureException, CommandFailed, ProcessFailed) as e:
            raise self.failureException(f"{e}\n{self.cluster.dump_logs()}") from e

    @contextlib.contextmanager
    def upstreamStopped(self) -> Iterator[None]:
        """
        Stop the upstream registry for the block, and start it again after, whatever happens.
        """
        self.cluster.registry.stop()
        try:
            yield
        finally:
            self.cluster.registry.start()

    def assertHolds(self, index: int, ref: str, image: TestImage) -> None:
        """
        containerd C{index} has image C{ref} at C{image}'s digest, every blob of it, and no blob
        in its store whose bytes differ from its digest.
        """
        daemon = self.cluster.containerds[index]
        self.assertEqual(daemon.image_digest(ref), image.digest, f"containerd {index}")
        self.assertEqual(image.digests() - daemon.content_digests(), set(), f"containerd {index} lacks")
        self.assertEqual(daemon.damaged_content(), {}, f"containerd {index} stored wrong bytes")

    def waitFindable(self, others: list[int], repo: str, image: TestImage, tag: str, what: str) -> float:
        """
        Wait until the nodes C{others} find C{repo}:C{tag} and every digest of C{image} in the
        cluster; log and return how long that took.
        """
        seconds = self.cluster.wait_findable(others, repo, image, tag=tag, timeout=FINDABLE_WITHIN)
        _log.info("{what}: findable from nodes {others} after {seconds:.3f}s", what=what, others=others, seconds=seconds)
        return seconds

    def subscriptions(self, index: int) -> int:
        """
        How many times node C{index} has subscribed to its containerd's events.
        """
        return self.cluster.nodes[index].log_text().count(SUBSCRIBED)

    def announcements(self, index: int) -> int:
        """
        How many batches of keys node C{index} has announced to the DHT.
        """
        return self.cluster.nodes[index].log_text().count(ANNOUNCED)


def _delta(after: list[Served | None], before: list[Served | None]) -> list[Served | None]:
    return [None if a is None or b is None else a - b for a, b in zip(after, before)]


def _of(served: list[Served | None], index: int) -> Served:
    """
    Node C{index}'s counters; the test fails if the node was not running to report them.
    """
    counters = served[index]
    if counters is None:
        raise AssertionError(f"node {index} reported no counters: {served}")
    return counters


class ClusterPullTests(_P2PTestCase):
    """
    Pulls through the cluster with the upstream registry stopped, on a shared cluster that every
    test leaves running and with upstream started again.
    """

    def setUp(self) -> None:
        self.cluster = _shared.get(self.containerd_build)

    def test_pullThroughPeers(self) -> None:
        """
        Node 0 pulls an image through its own mirror: a miss, so containerd fetches it upstream.
        Within seconds it is findable from the other nodes; with upstream stopped, node 1 pulls
        it by tag and node 2 by digest, both from peers, and all three hold the same digests.
        """
        cluster = self.cluster
        repo = "p2p/app"
        image = build_image(seed="p2p-app", layer_sizes=SMALL_AND_LARGE)
        with self.logsOnFailure():
            tagRef = cluster.registry.push_image(repo, "v1", image)
            digestRef = cluster.registry.ref(repo, image.digest)
            before = cluster.nodes[0].metrics()
            cluster.pull(0, tagRef)
            after = cluster.nodes[0].metrics()
            self.assertHolds(0, tagRef, image)
            # The node was asked and found nothing: containerd fell back upstream.
            self.assertGreater(
                after.total("spegel_mirror_requests_total", cache="miss"),
                before.total("spegel_mirror_requests_total", cache="miss"),
            )
            self.assertEqual(
                after.total("spegel_served_bytes_total", source="peer"),
                before.total("spegel_served_bytes_total", source="peer"),
            )
            self.waitFindable([1, 2], repo, image, "v1", "new image")

            served = cluster.served()
            with self.upstreamStopped():
                cluster.pull(1, tagRef)
                cluster.pull(2, digestRef)
            delta = _delta(cluster.served(), served)

            for index in range(3):
                self.assertHolds(index, tagRef if index < 2 else digestRef, image)
            layerBytes = sum(layer.size for layer in image.layers)
            # Upstream was gone: every layer byte the pullers got came through their nodes from peers.
            for index in (1, 2):
                self.assertGreaterEqual(_of(delta, index).peer, layerBytes, f"node {index}: {delta}")
            self.assertGreaterEqual(sum(_of(delta, i).local for i in range(len(delta))), 2 * layerBytes, delta)
            self.assertGreater(_of(delta, 0).local, 0, delta)
            self.assertGreater(cluster.nodes[1].metrics().total("spegel_mirror_last_success_timestamp_seconds"), 0)

    def test_containerdRestartedUnderNode(self) -> None:
        """
        containerd is restarted under a running node: the node stays up, subscribes to events
        again, and an image pulled afterwards is advertised and served to another node.
        """
        cluster = self.cluster
        node = cluster.nodes[1]
        repo = "p2p/after-restart"
        image = build_image(seed="p2p-containerd-restart", layer_sizes=(256 * 1024, 32 * 1024))
        with self.logsOnFailure():
            pid = node.pid
            subscribed = self.subscriptions(1)
            cluster.containerds[1].restart()
            wait_for(lambda: self.subscriptions(1) > subscribed, timeout=15, what="node 1 resubscribing")
            self.assertEqual((node.running, node.pid), (True, pid))

            ref = cluster.registry.push_image(repo, "v1", image)
            cluster.pull(1, ref)
            self.waitFindable([0, 2], repo, image, "v1", "pulled after a containerd restart")
            served = cluster.served()
            with self.upstreamStopped():
                cluster.pull(2, ref)
            delta = _delta(cluster.served(), served)
            self.assertHolds(2, ref, image)
            # Node 1 was the only holder.
            self.assertGreaterEqual(_of(delta, 1).local, sum(layer.size for layer in image.layers), delta)
            self.assertGreaterEqual(_of(delta, 2).peer, sum(layer.size for layer in image.layers), delta)

    def test_nodeRestarted(self) -> None:
        """
        A node is stopped while its containerd pulls an image straight upstream, then started
        again: it advertises what its containerd holds, the image pulled while it was down as
        well as the one from before, and another node pulls both from it.
        """
        cluster = self.cluster
        node = cluster.nodes[2]
        before = build_image(seed="p2p-before-node-restart", layer_sizes=(128 * 1024,))
        during = build_image(seed="p2p-during-node-restart", layer_sizes=(192 * 1024,))
        with self.logsOnFailure():
            beforeRef = cluster.registry.push_image("p2p/before", "v1", before)
            duringRef = cluster.registry.push_image("p2p/during", "v1", during)
            cluster.pull(2, beforeRef)
            self.waitFindable([0], "p2p/before", before, "v1", "pulled before a node restart")

            node.stop()
            # Its mirror refuses connections: containerd goes straight upstream.
            cluster.pull(2, duringRef)
            node.start()
            node.wait_ready()
            self.waitFindable([0, 1], "p2p/during", during, "v1", "pulled while the node was down")

            served = cluster.served()
            with self.upstreamStopped():
                cluster.pull(0, beforeRef)
                cluster.pull(0, duringRef)
            delta = _delta(cluster.served(), served)
            self.assertHolds(0, beforeRef, before)
            self.assertHolds(0, duringRef, during)
            layerBytes = before.layers[0].size + during.layers[0].size
            self.assertGreaterEqual(_of(delta, 2).local, layerBytes, delta)
            self.assertGreaterEqual(_of(delta, 0).peer, layerBytes, delta)


class _OwnClusterTestCase(_P2PTestCase):
    """
    A cluster of its own for a test that leaves peers put aside (killed or caught lying).
    """

    nodes = 3
    node_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.cluster = _startCluster(self.containerd_build, self.nodes, self.node_args)
        self.addCleanup(self.cluster.stop)


class KilledPeerTests(_OwnClusterTestCase):
    """
    The node streaming a large blob to a puller dies mid-transfer.
    """

    # The copy from one holder that resumes on the other (with two holders, a layer this large
    # would be fetched from both at once: tests.e2e.test_e2e_parallel kills a holder of that).
    node_args = ("--mirror-parallel-min-size=0",)

    def test_killedMidTransfer(self) -> None:
        """
        Nodes 0 and 1 hold an image with one large layer; node 2 pulls it with upstream stopped.
        Whichever holder starts sending the layer is SIGKILLed while its bytes flow (the client
        runs in short bursts, so the copy cannot finish first): node 2's node resumes the copy on
        the other holder with a Range request and the pull completes, byte for byte.
        """
        cluster = self.cluster
        repo = "p2p/large"
        # Big enough that a transfer lasts well over a poll.
        image = self.oneLayerImage("p2p-large", 64 * MiB)
        layer = image.layers[0]
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            cluster.pull(0, ref)
            announced = self.announcements(1)
            cluster.pull(1, ref)
            # Node 2 keeps the providers it finds for a few seconds: it must find both holders,
            # so node 1 announces before node 2 first looks.
            wait_for(lambda: self.announcements(1) > announced, timeout=60, what="node 1 announcing")
            self.waitFindable([2], repo, image, "v1", "large image held by two nodes")
            with self.upstreamStopped():
                start = cluster.served()
                pull = cluster.containerds[2].start_pull(ref)
                self.addCleanup(pull.kill)
                # The puller runs in short bursts, paused while the holders' counters are
                # read: a poll on this busy machine can take longer than the whole copy, but a
                # paused client lets only socket buffers' worth of bytes through.  Both ctr
                # and node 2's containerd are paused: on 2.x the transfer runs in the daemon.
                puller = cluster.containerds[2]
                victim = None
                deadline = time.monotonic() + 30
                while victim is None and pull.running and time.monotonic() < deadline:
                    puller.resume()
                    pull.resume()
                    # Short: loopback moves tens of MiB in 50 ms, the whole layer at once.
                    time.sleep(0.01)
                    pull.pause()
                    puller.pause()
                    moved = {i: _localBytes(cluster, i) - _of(start, i).local for i in (0, 1)}
                    index = max(moved, key=moved.__getitem__)
                    if moved[index] > MiB:
                        victim, sentBeforeKill = index, moved[index]
                        cluster.nodes[index].kill()
                puller.resume()
                pull.resume()
                self.assertIsNotNone(victim, "no holder's counter moved before the pull ended:\n" + pull.log_text())
                self.assertLess(sentBeforeKill, layer.size)
                self.assertEqual(pull.wait(60), 0, pull.log_text())
            assert victim is not None
            survivor = 1 - victim
            delta = _delta(cluster.served(), start)
            self.assertHolds(2, ref, image)
            self.assertGreater(_of(delta, survivor).local, 0, delta)
            self.assertGreaterEqual(_of(delta, 2).peer, layer.size, delta)
            victimPeer = re.escape(cluster.nodes[victim].registry_addr)
            self.assertRegex(cluster.nodes[2].log_text(), rf"peer {victimPeer}: the peer stopped after \d+ of \d+ bytes")
            _log.info("killed node {victim} after it sent {sent} of {size} bytes", victim=victim, sent=sentBeforeKill, size=layer.size)


class CorruptPeerTests(_OwnClusterTestCase):
    """
    A holder whose containerd store has a wrong copy of a blob on disk.
    """

    # Node 2 puts node 0 aside once caught, and keeps the providers it found for a few
    # seconds: a second puller, node 3, starts afresh once the honest holder is back.
    nodes = 4

    def test_corruptCopyNeverStored(self) -> None:
        """
        Node 0's copy of a small layer is corrupted on disk; node 1 holds a good copy; upstream
        is stopped.  While node 1's copy is out of its store (node 1 then finds nothing locally), the
        only copy on offer is the bad one: node 2 checks it before sending a byte, the pull
        fails, and no containerd stored it.  Once node 1's copy is back, node 3 pulls
        and gets the good copy (if it tries node 0 first, containerd never notices).
        """
        cluster = self.cluster
        repo = "p2p/corrupt"
        image = build_image(seed="p2p-corrupt", layer_sizes=(1 * MiB, 128 * 1024))
        layer = image.layers[0]
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            cluster.pull(0, ref)
            cluster.pull(1, ref)
            self.waitFindable([2], repo, image, "v1", "image held by two nodes")

            path = cluster.containerds[0].blob_path(layer.digest)
            good = layer.read()
            _overwrite(path, bytes(b ^ 0x5A for b in good))
            self.assertEqual(list(cluster.containerds[0].damaged_content()), [layer.digest])

            with self.upstreamStopped():
                # Node 1's good copy out of its store (node 1 then answers 404 for it; its
                # containerd stays up): node 1 serves what its store holds on disk whether
                # containerd answers or not.
                hidden = _hide(cluster.containerds[1].blob_path(layer.digest))
                with self.assertRaises(CommandFailed):
                    cluster.pull(2, ref)
                self.assertNotIn(layer.digest, cluster.containerds[2].content_digests())
                self.assertEqual(cluster.containerds[2].damaged_content(), {})
                if _mismatches(cluster, 2) == 0:
                    # containerd fetches blobs concurrently and may give up on another one
                    # before node 2 has checked the bad copy: then ask for the bad layer alone,
                    # as containerd does, on a fresh node 2 that has put no peer aside yet.
                    cluster.nodes[2].restart()
                    cluster.nodes[2].wait_ready()
                    wait_for(
                        lambda: self.askedForBadCopy(layer.digest),
                        timeout=30,
                        what="node 2 checking node 0's copy",
                    )
                self.assertGreater(_mismatches(cluster, 2), 0)

                hidden()
                served = cluster.served()
                cluster.pull(3, ref)
            delta = _delta(cluster.served(), served)

            self.assertHolds(3, ref, image)
            self.assertHolds(1, ref, image)
            self.assertEqual(cluster.containerds[2].damaged_content(), {})
            self.assertGreaterEqual(_of(delta, 1).local, layer.size, delta)
            # The only wrong bytes anywhere are the ones this test wrote.
            self.assertEqual(cluster.containerds[0].damaged_content(), {layer.digest: _sha256Of(path)})
            _log.info("node 3 caught {n:.0f} bad copies on its way", n=_mismatches(cluster, 3))

    def askedForBadCopy(self, digest: str) -> bool:
        """
        GET blob C{digest} through node 2 as containerd would; the bad copy must never come
        back.  Whether node 2 has caught a copy that does not match its digest yet.
        """
        ns = urllib.parse.quote(self.cluster.registry.host, safe="")
        response = self.cluster.nodes[2].request("GET", f"/v2/p2p/corrupt/blobs/{digest}?ns={ns}")
        self.assertEqual(response.status, 404, response.body[:200])
        return _mismatches(self.cluster, 2) > 0


class CorruptLargeLayerTests(_OwnClusterTestCase):
    """
    A holder with a wrong copy of a layer too large to check before sending: it streams (by
    splice, on Linux) with its last bytes held back until the digest matches.
    """

    def test_corruptStreamedLayerNeverStored(self) -> None:
        """
        Node 0's copy of a 16 MiB layer has one byte flipped near its start; node 1's is good but
        it is out of its store for a while; upstream is stopped.  Node 2's pull gets node 0's bytes up to the
        held-back end, then the connection is cut: the pull fails and containerd keeps nothing.
        With node 1's copy back, the next pull (containerd starts the blob afresh) comes
        from node 1 and stores the good layer.  What containerd does after the cut is what a
        kubelet retry would see.
        """
        cluster = self.cluster
        repo = "p2p/corrupt-large"
        image = self.oneLayerImage("p2p-corrupt-large", 16 * MiB)
        layer = image.layers[0]
        with self.logsOnFailure():
            ref = cluster.registry.push_image(repo, "v1", image)
            cluster.pull(0, ref)
            cluster.pull(1, ref)
            self.waitFindable([2], repo, image, "v1", "image held by two nodes")
            path = cluster.containerds[0].blob_path(layer.digest)
            with open(path, "r+b") as f:
                f.seek(1000)
                flipped = f.read(1)[0] ^ 0xFF
                f.seek(1000)
                f.write(bytes([flipped]))

            with self.upstreamStopped():
                hidden = _hide(cluster.containerds[1].blob_path(layer.digest))  # see CorruptPeerTests
                with self.assertRaises(CommandFailed):
                    cluster.pull(2, ref)
                self.assertGreater(_mismatches(cluster, 2), 0)
                self.assertNotIn(layer.digest, cluster.containerds[2].content_digests())
                self.assertEqual(cluster.containerds[2].damaged_content(), {})

                hidden()
                # The next pull as the kubelet's retry makes it, seconds later: by then containerd
                # has collected the cut pull's ingest with its lease (restarting node 1's
                # containerd, as this test once did, gave it that time).
                wait_for(
                    lambda: layer.digest not in cluster.containerds[2].ctr("content", "active"),
                    timeout=30,
                    what="containerd 2 dropping the cut ingest",
                )
                served = cluster.served()
                try:
                    cluster.pull(2, ref)
                except CommandFailed as e:
                    # containerd may resume its partial ingest of the cut transfer (with the
                    # flipped byte in it) instead of starting afresh; its own digest check then
                    # refuses the commit and drops the ingest, and the kubelet's retry starts
                    # over.  Seen once in CI under heavy load; never a wrong blob stored.
                    self.assertIn("unexpected commit digest", str(e))
                    self.assertNotIn(layer.digest, cluster.containerds[2].content_digests())
                    cluster.pull(2, ref)
            delta = _delta(cluster.served(), served)

            self.assertHolds(2, ref, image)
            self.assertEqual(cluster.containerds[2].damaged_content(), {})
            self.assertGreaterEqual(_of(delta, 1).local, layer.size, delta)
            self.assertGreater(cluster.nodes[2].metrics().total("spegel_spliced_bytes_total"), 0)


def _localBytes(cluster: Cluster, index: int) -> float:
    return cluster.nodes[index].metrics().total("spegel_served_bytes_total", source="local")


def _mismatches(cluster: Cluster, index: int) -> float:
    return cluster.nodes[index].metrics().total("spegel_digest_mismatches_total")


def _overwrite(path: str, data: bytes) -> None:
    """
    Replace a content store file's bytes in place, as a failing disk or a tampering process
    would; containerd keeps the file read-only, which does not stop root.
    """
    with open(path, "r+b") as f:
        f.write(data)


def _sha256Of(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def _hide(path: str) -> Callable[[], None]:
    """
    Move the blob file C{path} out of its content store; the returned function puts it back.
    """
    aside = path + ".hidden"
    os.rename(path, aside)
    return lambda: os.rename(aside, path)


def _removeTree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


for _template in (ClusterPullTests, KilledPeerTests, CorruptPeerTests, CorruptLargeLayerTests):
    globals().update(per_containerd(_template))
del _template, ClusterPullTests, KilledPeerTests, CorruptPeerTests, CorruptLargeLayerTests
