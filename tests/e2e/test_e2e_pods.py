# -*- test-case-name: tests.e2e.test_e2e_pods -*-
"""
The chart's pods, run for real: the image built from the Containerfile, the DaemonSet's pod spec
as C{helm template} renders it, started on each of three nodes through containerd's CRI as the
kubelet starts it (L{spegel_testing.pods}), once per containerd.

Each node is a host of its own (L{spegel_testing.netns}: a network namespace with its own
address on a bridge, its own containerd), so every pod listens on the ports the chart gives, and
finds its peers through real DNS: a DNS server on the bridge answers the bootstrap Service's
name with every node's address, as a headless Service with C{publishNotReadyAddresses} does.

What the test substitutes for what a cluster has, and why:
- pods share their node's network (no CNI here), so the chart is rendered with the registry's
  C{containerPort} equal to its C{hostPort} (30020): containerd on the node reaches the pod at
  C{<node IP>:30020} either way;
- the paths of each node's containerd (socket, content store, config, certs.d) are the rig's,
  given to the chart as values, as an operator does for a distribution with other paths;
- the sandbox ("pause") image is built here (no registry.k8s.io).

Then, as an operator would see it: node 1 pulls an image from upstream, upstream stops, nodes 2
and 3 pull it by tag and by digest, through the containerised spegel of their peers.  The pods
are deleted and the chart's post-delete hook runs (its cleanup DaemonSet on every node, then its
wait pod): each node's certs.d is back as it was.
"""

from __future__ import annotations

import base64
import os
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

import spegel
from spegel_testing import image
from spegel_testing.containerd import ContainerdDaemon, per_containerd
from spegel_testing.dns import DNSServer
from spegel_testing.images import build_image
from spegel_testing.netns import Network
from spegel_testing.node import Metrics
from spegel_testing.pods import Kubelet, PodFailed, RunningPod
from spegel_testing.process import CommandFailed, ProcessFailed
from spegel_testing.registry import UpstreamRegistry
from tests.e2e.test_e2e_image import _built
from tests.unit.test_hostsconfig import snapshot
from tests.e2e.test_k8s import documents, find, render

MiB = 1 << 20
NAMESPACE = "spegel"
# The registry's port in the pod and on the node: equal, because pods share the node's network.
REGISTRY_PORT = 30020
METRICS_PORT = 9090
# Generous: findable takes about a second on an idle machine (benchmarks/ measures it).
FINDABLE_WITHIN = 60.0


class ChartPodsTests(TestCase):
    timeout = 900
    nodes = 3

    def setUp(self) -> None:
        spegel_image = _built.get()
        pause_image = image.build_pause()
        self.network = Network.create()
        self.addCleanup(self.network.cleanup)
        self.registry = UpstreamRegistry(name="upstream", address=self.network.host_address)
        self.registry.start()
        self.addCleanup(self.registry.cleanup)
        self.image_ref = f"{self.registry.host}/spegel:{spegel.__version__}"
        pause_ref = f"{self.registry.host}/pause:test"
        image.push(spegel_image, self.image_ref)
        image.push(pause_image, pause_ref)
        self.dns = DNSServer(address=self.network.host_address)
        self.dns.start()
        self.addCleanup(self.dns.cleanup)
        self.kubelets: list[Kubelet] = []
        self.original_certs: list[dict[str, Any]] = []
        for index in range(self.nodes):
            host = self.network.add_host()
            daemon = ContainerdDaemon(
                name=f"node{index + 1}-containerd",
                build=self.containerd_build,  # type: ignore[attr-defined]
                cri=True,
                host=host,
                sandbox_image=pause_ref,
            )
            # The node reaches the registry the way it did before spegel: its own hosts.toml.
            daemon.write_hosts_toml(
                self.registry.host,
                f"server = '{self.registry.url}'\n\n[host.'{self.registry.url}']\ncapabilities = ['pull', 'resolve']\n",
            )
            self.original_certs.append(snapshot(Path(daemon.hosts_dir)))
            daemon.start()
            self.addCleanup(daemon.cleanup)
            kubelet = Kubelet(daemon=daemon, node_ip=host.address, node_name=f"node{index + 1}", dns_server=self.network.host_address)
            self.addCleanup(kubelet.remove_all)
            self.kubelets.append(kubelet)

    def values(self, kubelet: Kubelet) -> dict[str, Any]:
        daemon = kubelet.daemon
        return {
            "image": {"repository": self.image_ref.rsplit(":", 1)[0], "tag": spegel.__version__},
            "service": {"registry": {"port": REGISTRY_PORT, "nodePort": REGISTRY_PORT}, "metrics": {"port": METRICS_PORT}},
            "spegel": {
                "mirroredRegistries": [self.registry.url],
                "containerdSock": daemon.socket,
                "containerdContentPath": daemon.content_path,
                "containerdConfigFile": daemon.config_path,
                "containerdRegistryConfigPath": daemon.hosts_dir,
                "persistence": {"hostPath": os.path.join(daemon.base_dir, "spegel")},
            },
        }

    def manifests(self, kubelet: Kubelet) -> list[dict[str, Any]]:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        return documents(render(self.values(kubelet), tmp=tmp))

    def dump(self, pods: list[RunningPod]) -> str:
        parts = [self.registry.log_tail(20)]
        for kubelet in self.kubelets:
            parts.append(kubelet.daemon.log_tail(20))
        for pod in pods:
            for name in pod.containers:
                parts.append(f"---- {pod.name}/{name} ----\n{pod.logs(name)[-4000:]}")
        return "\n".join(parts)

    def metrics(self, kubelet: Kubelet) -> Metrics:
        with urllib.request.urlopen(f"http://{kubelet.node_ip}:{METRICS_PORT}/metrics", timeout=10) as response:
            return Metrics.parse(response.read().decode())

    def findable(self, kubelet: Kubelet, repo: str, reference: str) -> bool:
        url = f"http://{kubelet.node_ip}:{REGISTRY_PORT}/v2/{repo}/manifests/{reference}?ns={self.registry.host}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def test_install_pull_uninstall(self) -> None:
        """
        The chart's pods start on three nodes and become ready; with upstream stopped, nodes 2
        and 3 pull node 1's image by tag and by digest through the containerised spegel, every
        layer byte from a peer; the post-delete hook gives every node its certs.d back.
        """
        rendered = [self.manifests(kubelet) for kubelet in self.kubelets]
        # One cluster key for every node, as one Secret is mounted by every pod of a cluster
        # (each render here made a random one of its own).
        key = find(rendered[0], "Secret", "spegel-router-key")
        secret = {field: base64.b64decode(value) for field, value in key["data"].items()}
        for kubelet in self.kubelets:
            kubelet.secrets["spegel-router-key"] = secret
        bootstrap = find(rendered[0], "Service", "spegel-bootstrap")
        domain = f"{bootstrap['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        self.dns.set_records({domain: [k.node_ip for k in self.kubelets]})
        pods: list[RunningPod] = []
        try:
            # As a DaemonSet rollout does: every node's kubelet starts its pod at once.
            def start(kubelet: Kubelet, docs: list[dict[str, Any]]) -> tuple[RunningPod, float]:
                began = time.monotonic()
                pod = kubelet.run_pod(find(docs, "DaemonSet", "spegel"), timeout=300)
                return pod, time.monotonic() - began

            with ThreadPoolExecutor(self.nodes) as executor:
                futures = [executor.submit(start, k, docs) for k, docs in zip(self.kubelets, rendered)]
                results = [future.result() for future in futures]
            pods.extend(pod for pod, _ in results)
            started = [seconds for _, seconds in results]
            ready = [pod.wait_ready("spegel", timeout=120) for pod in pods]
            print(f"\n  {self.containerd_build}: image pull + init + start {', '.join(f'{s:.1f}s' for s in started)}; "  # type: ignore[attr-defined]
                  f"sandbox start to ready {', '.join(f'{s:.1f}s' for s in ready)}")
            for kubelet in self.kubelets:
                self.assertIn(self.image_ref, kubelet.daemon.images())
                # Secure by default: every node signs and checks datagrams with the chart's key.
                self.assertEqual(self.metrics(kubelet).total("spegel_dht_cluster_keys"), 1)

            test_image = build_image(seed=f"pods-{self.containerd_build.label}", layer_sizes=(8 * MiB, 256 * 1024))  # type: ignore[attr-defined]
            ref = self.registry.push_image("chart/app", "v1", test_image)
            by_digest = self.registry.ref("chart/app", test_image.digest)
            first, second, third = self.kubelets
            began = time.monotonic()
            first.daemon.cri_pull(ref)
            upstream_pull = time.monotonic() - began
            deadline = time.monotonic() + FINDABLE_WITHIN
            while not all(self.findable(k, "chart/app", "v1") for k in (second, third)):
                if time.monotonic() > deadline:
                    self.fail(f"the image is not findable from nodes 2 and 3 after {FINDABLE_WITHIN}s")
                time.sleep(0.1)
            before = [self.metrics(k).total("spegel_served_bytes_total", source="peer") for k in (second, third)]
            self.registry.stop()
            times = []
            for kubelet, reference in ((second, ref), (third, by_digest)):
                began = time.monotonic()
                kubelet.daemon.cri_pull(reference)
                times.append(time.monotonic() - began)
                self.assertEqual(kubelet.daemon.image_digest(reference), test_image.digest)
                self.assertEqual(test_image.digests() - kubelet.daemon.content_digests(), set())
                self.assertEqual(kubelet.daemon.damaged_content(), {})
            after = [self.metrics(k).total("spegel_served_bytes_total", source="peer") for k in (second, third)]
            layers = sum(layer.size for layer in test_image.layers)
            for index, (b, a) in enumerate(zip(before, after)):
                self.assertGreaterEqual(a - b, layers, f"node {index + 2} served from peers")
            print(f"  pulls of {test_image.total_size() / MiB:.1f} MiB: upstream {upstream_pull:.2f}s; "
                  f"through peers with upstream down: by tag {times[0]:.2f}s, by digest {times[1]:.2f}s")
        except (PodFailed, CommandFailed, ProcessFailed, self.failureException) as e:
            raise self.failureException(f"{e}\n{self.dump(pods)}") from e

        for pod in pods:
            pod.delete()
        for kubelet, original in zip(self.kubelets, self.original_certs):
            self.assertNotEqual(snapshot(Path(kubelet.daemon.hosts_dir)), original, "spegel configured the node")
        self.run_post_delete_hook()
        for index, (kubelet, original) in enumerate(zip(self.kubelets, self.original_certs)):
            self.assertEqual(snapshot(Path(kubelet.daemon.hosts_dir)), original, f"node {index + 1}")

    def run_post_delete_hook(self) -> None:
        """
        What C{helm uninstall} does after deleting the release: the hook's cleanup DaemonSet on
        every node, the Service naming its pods, and the wait pod, which must succeed.
        """
        hooks: list[dict[tuple[str, str], Any]] = []
        cleanup_pods: list[RunningPod] = []
        for kubelet in self.kubelets:
            docs = [d for d in self.manifests(kubelet) if "helm.sh/hook" in d["metadata"].get("annotations", {})]
            self.assertTrue(docs, "the chart renders no hook")
            hooks.append({(d["kind"], d["metadata"]["name"]): d for d in docs})
        names = {name for name in hooks[0]}
        daemonset = next(d for (kind, _), d in hooks[0].items() if kind == "DaemonSet")
        service = next(d for (kind, _), d in hooks[0].items() if kind == "Service")
        wait = next(d for (kind, _), d in hooks[0].items() if kind == "Pod")
        self.assertEqual(len(names), 3, names)
        domain = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        self.dns.set_records({domain: [k.node_ip for k in self.kubelets]})
        try:
            for kubelet, node_hooks in zip(self.kubelets, hooks):
                node_daemonset = node_hooks[("DaemonSet", daemonset["metadata"]["name"])]
                cleanup_pods.append(kubelet.run_pod(node_daemonset, timeout=120))
            waiter = self.kubelets[0].run_pod(wait, timeout=120)
            container_name = wait["spec"]["containers"][0]["name"]
            code = waiter.wait_exit(container_name, timeout=120)
            self.assertEqual(code, 0, waiter.logs(container_name))
        except (PodFailed, CommandFailed, ProcessFailed, self.failureException) as e:
            raise self.failureException(f"{e}\n{self.dump(cleanup_pods)}") from e
        finally:
            for pod in cleanup_pods:
                pod.delete()


globals().update(per_containerd(ChartPodsTests))
del ChartPodsTests
