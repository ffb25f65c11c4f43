# -*- test-case-name: tests.test_e2e_cri -*-
"""
End-to-end tests of the kubelet's own pull path: containerd's CRI plugin
(C{ImageService.PullImage}, driven by C{crictl} as the kubelet drives it), which takes the
registry configuration from C{config_path} in containerd's own configuration rather than from a
C{--hosts-dir} flag, and which on containerd 2.1+ pulls through the transfer service.  Each test
runs against every containerd (Debian's 1.6 and the 2.x builds); the class names say which.

- L{CRIPullTests}: node 0 pulls from upstream, upstream stops, nodes 1 and 2 pull by tag and by
  digest through their peers.
- L{DiscardUnpackedLayersTests}: the failing control: a node whose containerd discards layers
  after unpacking has nothing to share, and its spegel node says so at start.
- L{PrivateRegistryTests}: a registry spegel does not mirror, reachable only through its own
  C{hosts.toml} (plain HTTP), keeps pulling through C{spegel configuration} and C{cleanup}, and
  cleanup gives back its files byte for byte.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from twisted.trial.unittest import TestCase

from spegel.testing.cluster import Cluster, static_bootstrap
from spegel.testing.containerd import per_containerd
from spegel.testing.images import TestImage, build_image
from spegel.testing.process import CommandFailed, ProcessFailed
from spegel.testing.registry import UpstreamRegistry

MiB = 1 << 20

FINDABLE_WITHIN = 10.0


class _CRITestCase(TestCase):
    timeout = 240
    nodes = 3

    def startCluster(self, **daemon_settings: object) -> Cluster:
        cluster = Cluster(
            self.nodes,
            node_args=static_bootstrap,
            wait_ready=True,
            containerd_build=self.containerd_build,  # type: ignore[attr-defined]
            cri=True,
        )
        for daemon in cluster.containerds:
            for name, value in daemon_settings.items():
                setattr(daemon, name, value)
        cluster.start()
        self.addCleanup(cluster.stop)
        self.cluster = cluster
        return cluster

    def image(self, seed: str) -> TestImage:
        # A layer above 4 MiB streams (spliced) and one below is checked whole: both paths.
        return build_image(seed=f"{seed}-{self.containerd_build.label}", layer_sizes=(5 * MiB, 256 * 1024))  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def logsOnFailure(self) -> Iterator[None]:
        try:
            yield
        except (self.failureException, CommandFailed, ProcessFailed) as e:
            raise self.failureException(f"{e}\n{self.cluster.dump_logs()}") from e

    def assertHoldsByCRI(self, index: int, ref: str, image: TestImage) -> None:
        """
        containerd C{index} holds image C{ref} (the CRI's images are containerd's images of the
        C{k8s.io} namespace) at C{image}'s digest, with every blob, none of them damaged.
        """
        daemon = self.cluster.containerds[index]
        self.assertEqual(daemon.image_digest(ref), image.digest, f"containerd {index}")
        self.assertEqual(image.digests() - daemon.content_digests(), set(), f"containerd {index} lacks")
        self.assertEqual(daemon.damaged_content(), {}, f"containerd {index}")


class CRIPullTests(_CRITestCase):
    def test_pullThroughPeersByTagAndDigest(self) -> None:
        """
        With the upstream registry stopped, a CRI pull by tag and one by digest both complete,
        every layer byte coming from a peer.
        """
        cluster = self.startCluster()
        cluster.mirror_through_own_nodes()
        image = self.image("cri")
        ref = cluster.registry.push_image("cri/app", "v1", image)
        byDigest = cluster.registry.ref("cri/app", image.digest)
        with self.logsOnFailure():
            cluster.containerds[0].cri_pull(ref)
            cluster.wait_findable([1, 2], "cri/app", image, tag="v1", timeout=FINDABLE_WITHIN)
            before = cluster.served()
            cluster.registry.stop()
            cluster.containerds[1].cri_pull(ref)
            cluster.containerds[2].cri_pull(byDigest)
            after = cluster.served()
            for index in (1, 2):
                self.assertHoldsByCRI(index, ref if index == 1 else byDigest, image)
                peer = after[index].peer - before[index].peer  # type: ignore[union-attr]
                self.assertGreaterEqual(peer, sum(layer.size for layer in image.layers), f"node {index}")


class DiscardUnpackedLayersTests(_CRITestCase):
    nodes = 2

    def test_nothingToShare(self) -> None:
        """
        The failing control: node 0's containerd discards layers once unpacked, so with the
        upstream registry stopped node 1's pull fails; node 0's spegel says why at start.
        """
        cluster = self.startCluster(discard_unpacked_layers=True)
        cluster.mirror_through_own_nodes()
        image = self.image("discard")
        ref = cluster.registry.push_image("cri/discard", "v1", image)
        with self.logsOnFailure():
            cluster.containerds[0].cri_pull(ref)
            # Discarded layers are unreferenced, and go at the next garbage collection.
            cluster.containerds[0].collect_garbage()
            layers = {layer.digest for layer in image.layers}
            self.assertEqual(layers & cluster.containerds[0].content_digests(), set())
            cluster.registry.stop()
            self.assertRaises(CommandFailed, cluster.containerds[1].cri_pull, ref, timeout=60)


class PrivateRegistryTests(_CRITestCase):
    nodes = 1

    def test_privateRegistryKeepsPulling(self) -> None:
        """
        A private registry with its own hosts.toml (plain HTTP: without that file the CRI
        would try HTTPS and fail) pulls before C{spegel configuration}, after it (with and
        without C{--prepend-existing}, and when every registry is mirrored), and after
        C{cleanup}, which gives its files back byte for byte.
        """
        cluster = self.startCluster()
        private = UpstreamRegistry(name="private-registry", base_dir=os.path.join(cluster.base_dir, "private"))
        os.makedirs(private.base_dir, exist_ok=True)
        private.start()
        self.addCleanup(private.cleanup)
        daemon = cluster.containerds[0]
        daemon.write_hosts_toml(
            private.host,
            f"server = 'http://{private.host}'\n\n[host.'http://{private.host}']\ncapabilities = ['pull', 'resolve']\n",
        )
        with open(os.path.join(daemon.hosts_dir, private.host, "ca.crt"), "wb") as f:
            f.write(b"a CA this registry's clients would trust\n")
        original = _snapshot(daemon.hosts_dir)
        image = self.image("private")
        tags = ["before", "configured", "prepended", "default", "cleaned"]
        for tag in tags:
            private.push_image("team/app", tag, image)
        with self.logsOnFailure():
            daemon.cri_pull(private.ref("team/app", "before"))
            cluster.configure_mirrors(0, [0])
            daemon.cri_pull(private.ref("team/app", "configured"))
            cluster.configure_mirrors(0, [0], prepend_existing=True)
            daemon.cri_pull(private.ref("team/app", "prepended"))
            cluster.configure_mirrors(0, [0], registries=[])
            daemon.cri_pull(private.ref("team/app", "default"))
            self.assertEqual(
                {k: v for k, v in _snapshot(daemon.hosts_dir).items() if k.startswith(private.host)},
                original,
            )
            cluster.cleanup_mirrors(0)
            self.assertEqual(_snapshot(daemon.hosts_dir), original)
            daemon.cri_pull(private.ref("team/app", "cleaned"))
        for tag in tags:
            self.assertIn(private.ref("team/app", tag), daemon.images())


def _snapshot(root: str) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


for _template in (CRIPullTests, DiscardUnpackedLayersTests, PrivateRegistryTests):
    globals().update(per_containerd(_template))
del _template, CRIPullTests, DiscardUnpackedLayersTests, PrivateRegistryTests
