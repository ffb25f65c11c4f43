# -*- test-case-name: tests.e2e.test_e2e_cri -*-
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
- L{ImportedImageTests}: an image loaded with C{ctr images import}, never pulled, is served to
  peers.
- L{PrivateRegistryTests}: a registry spegel does not mirror, reachable only through its own
  C{hosts.toml} (plain HTTP), keeps pulling through C{spegel configuration} and C{cleanup}, and
  cleanup gives back its files byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import TestCase

from spegel import preflight
from spegel_testing.cluster import Cluster, spegel_cli, static_bootstrap
from spegel_testing.containerd import per_containerd
from spegel_testing.images import TestImage, build_image
from spegel_testing.process import CommandFailed, ProcessFailed
from spegel_testing.registry import UpstreamRegistry
from tests.e2e.test_containerd_real import write_oci_archive
from tests.unit.test_hostsconfig import snapshot

MiB = 1 << 20

# Generous: findable takes well under a second on an idle machine (benchmarks/ measures it).
FINDABLE_WITHIN = 60.0


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
            # The node said why at start, read from its containerd's configuration.
            self.assertIn("Preflight: discard_unpacked_layers = true", cluster.nodes[0].log_text())
            self.assertEqual(
                cluster.nodes[0].metrics().total("spegel_preflight_problems", check="discard_unpacked_layers"), 1.0
            )


class ImportedImageTests(_CRITestCase):
    nodes = 2

    def test_importedImageServedToPeers(self) -> None:
        """
        An image loaded with C{ctr images import} (an air-gapped node, a pre-loaded base image),
        never pulled from a registry, is advertised and served: node 1 pulls it through the CRI
        with the registry it is named after stopped.
        """
        cluster = self.startCluster()
        cluster.mirror_through_own_nodes()
        image = self.image("imported")
        name = cluster.registry.ref("cri/imported", "v1")
        archive = os.path.join(cluster.base_dir, "imported.tar")
        write_oci_archive(image, name, archive)
        cluster.registry.stop()
        with self.logsOnFailure():
            cluster.containerds[0].ctr("images", "import", archive)
            cluster.wait_findable([1], "cri/imported", image, tag="v1", timeout=FINDABLE_WITHIN)
            before = cluster.served()
            cluster.containerds[1].cri_pull(name)
            self.assertHoldsByCRI(1, name, image)
            peer = cluster.served()[1].peer - before[1].peer  # type: ignore[union-attr]
            self.assertGreaterEqual(peer, sum(layer.size for layer in image.layers))


class PreflightTests(_CRITestCase):
    nodes = 1

    def test_whatContainerdSays(self) -> None:
        """
        The preflight asks the real containerd what it runs with: the CRI's status on 1.6, the
        images plugin's exports on 2.2+, nothing on 2.1 (the file then decides).  A file
        changed without a restart is caught where containerd says; a config_path elsewhere is
        fatal for C{spegel configuration}, which then writes nothing.
        """
        cluster = self.startCluster(discard_unpacked_layers=True)
        daemon = cluster.containerds[0]
        facts = preflight.probe_containerd(daemon.socket, "k8s.io")
        self.assertEqual(preflight.parse_version(facts.version), daemon.build.major_minor)
        says = daemon.build.major_minor != (2, 1)
        if says:
            assert facts.running is not None
            self.assertEqual((facts.running.config_path, facts.running.discard_unpacked_layers), (daemon.hosts_dir, True))
        else:
            self.assertIsNone(facts.running)
        problems = preflight.run_preflight(
            config_file=daemon.config_path, certs_dir=daemon.hosts_dir, socket_path=daemon.socket, namespace="k8s.io"
        )
        self.assertEqual([p.check for p in problems], ["discard_unpacked_layers", "no_images"])
        # The file now says otherwise, containerd not restarted.
        with open(daemon.config_path) as f:
            text = f.read()
        with open(daemon.config_path, "w") as f:
            f.write(text.replace("discard_unpacked_layers = true", "discard_unpacked_layers = false"))
        problems = preflight.run_preflight(
            config_file=daemon.config_path, certs_dir=daemon.hosts_dir, socket_path=daemon.socket, namespace="k8s.io"
        )
        expected = ["config_not_applied", "discard_unpacked_layers", "no_images"] if says else ["no_images"]
        self.assertEqual([p.check for p in problems], expected)
        # Warnings only: configuration goes ahead.
        cluster.configure_mirrors(0, [0])
        elsewhere = os.path.join(cluster.base_dir, "elsewhere")
        status = subprocess.run(
            [*spegel_cli(), "configuration", "--containerd-registry-config-path", elsewhere,
             "--mirror-targets", "http://127.0.0.1:1", "--containerd-config-file", daemon.config_path,
             "--containerd-sock", daemon.socket],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(status.returncode, 1, status.stderr)
        self.assertIn("spegel: error: containerd reads registry configuration from", status.stderr)
        self.assertFalse(os.path.exists(elsewhere))


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
        original = snapshot(Path(daemon.hosts_dir))
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
                {k: v for k, v in snapshot(Path(daemon.hosts_dir)).items() if k.startswith(private.host)},
                original,
            )
            cluster.cleanup_mirrors(0)
            self.assertEqual(snapshot(Path(daemon.hosts_dir)), original)
            daemon.cri_pull(private.ref("team/app", "cleaned"))
        for tag in tags:
            self.assertIn(private.ref("team/app", tag), daemon.images())


for _template in (CRIPullTests, DiscardUnpackedLayersTests, ImportedImageTests, PreflightTests, PrivateRegistryTests):
    globals().update(per_containerd(_template))
del _template, CRIPullTests, DiscardUnpackedLayersTests, ImportedImageTests, PreflightTests, PrivateRegistryTests
