# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
End-to-end tests of the real-component test rig itself: docker-registry, containerd and the
process handling around them.  These start real processes and clean every one of them up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from functools import partial
from typing import Any

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.containerd import ContainerdBuild, ContainerdDaemon, per_containerd, short_tempdir
from spegel_testing.images import LINUX_ARM64, MediaFormat, TestImage, build_image, build_index
from spegel_testing import pods
from spegel_testing.dns import DNSServer
from spegel_testing.netns import BENCHMARK_RANGE, Network, ensure_neighbour_table, restore_neighbour_table
from spegel_testing.node import SpegelNode
from spegel_testing.ports import free_port
from spegel_testing.process import CommandFailed, ManagedProcess, ProcessFailed, live_processes, wait_for
from spegel_testing.registry import UpstreamRegistry
from spegel_testing.shared import Shared


class ContainerdDaemonTests(TestCase):
    """
    L{ContainerdDaemon} runs a real containerd on a private socket.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    def setUp(self) -> None:
        self.daemon = ContainerdDaemon(name="test-containerd", build=self.containerd_build)
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


def _logs_line(process: ManagedProcess, line: str) -> bool:
    """
    Whether C{process}'s log has C{line} on a line of its own, after the first (the command).
    """
    return line in process.log_text().splitlines()[1:]


def _dotted(record: dns.RRHeader) -> str:
    """
    The address of an A record.
    """
    assert isinstance(record.payload, dns.Record_A), record
    return record.payload.dottedQuad()


def _isAlive(pid: int | None) -> bool:
    """
    Whether C{pid} is a live (not zombie) process; L{None}, never started, is not.
    """
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except FileNotFoundError:
        return False
    return False


def _startRegistryAndDaemon(build: ContainerdBuild) -> tuple[UpstreamRegistry, ContainerdDaemon]:
    registry = UpstreamRegistry(name="test-registry")
    daemon = ContainerdDaemon(name="test-containerd", build=build)
    try:
        registry.start()
        daemon.start()
    except BaseException:
        _stopRegistryAndDaemon((registry, daemon))
        raise
    return registry, daemon


def _stopRegistryAndDaemon(pair: tuple[UpstreamRegistry, ContainerdDaemon]) -> None:
    for component in pair:
        component.cleanup()


_registryAndDaemon = Shared(_startRegistryAndDaemon, _stopRegistryAndDaemon)


class RegistryAndContainerdTests(TestCase):
    """
    Images pushed to L{UpstreamRegistry} are pulled by a L{ContainerdDaemon} straight from it.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    def setUp(self) -> None:
        self.registry, self.daemon = _registryAndDaemon.get(self.containerd_build)

    def assertPulled(self, image: TestImage, ref: str, digests: set[str]) -> None:
        """
        The daemon has image C{ref} with C{image}'s root digest and holds every blob in
        C{digests}, byte for byte.
        """
        self.assertEqual(self.daemon.image_digest(ref), image.digest)
        self.assertEqual(digests - self.daemon.content_digests(), set())
        for digest in digests:
            self.assertEqual(self.daemon.read_content(digest), image.blob(digest).read())

    def test_pullEachKind(self) -> None:
        """
        Single-platform OCI and Docker images, plain tar layers, and indexes (all platforms or
        one) pushed to the registry pull with every digest matching.
        """
        cases: list[tuple[str, Any, dict[str, Any], Any]] = [
            ("oci", build_image(seed="r1"), {}, None),
            ("docker", build_image(seed="r2", format=MediaFormat.DOCKER), {}, None),
            ("tar", build_image(seed="r3", compress=False), {}, None),
            ("index", build_index(seed="r4"), {"all_platforms": True}, None),
            ("list", build_index(seed="r5", format=MediaFormat.DOCKER), {"platform": "linux/arm64"}, LINUX_ARM64),
        ]
        for repo, image, pullArgs, platform in cases:
            ref = self.registry.push_image(f"rig/{repo}", "v1", image)
            self.assertEqual(ref, f"{self.registry.host}/rig/{repo}:v1")
            self.assertEqual(self.registry.manifest_digest(f"rig/{repo}", "v1"), image.digest)
            self.daemon.pull(ref, **pullArgs)
            self.assertPulled(image, ref, image.digests(platform))

    def test_pullByDigest(self) -> None:
        """
        An image pushed without a tag pulls by digest.
        """
        image = build_image(seed="r6")
        ref = self.registry.push_image("rig/bydigest", None, image)
        self.assertEqual(ref, f"{self.registry.host}/rig/bydigest@{image.digest}")
        self.daemon.pull(ref)
        self.assertPulled(image, ref, image.digests())

    def test_restartKeepsContent(self) -> None:
        """
        A containerd restart keeps images and content; a registry restart keeps its storage
        and port.
        """
        image = build_image(seed="r7")
        ref = self.registry.push_image("rig/restart", "v1", image)
        self.daemon.pull(ref)
        pid = self.daemon.pid
        self.daemon.restart()
        self.assertNotEqual(self.daemon.pid, pid)
        self.assertPulled(image, ref, image.digests())
        port = self.registry.port
        self.registry.stop()
        self.assertFalse(self.registry.running)
        self.registry.start()
        self.assertEqual(self.registry.port, port)
        self.assertEqual(self.registry.manifest_digest("rig/restart", "v1"), image.digest)

    def test_removeImage(self) -> None:
        """
        C{remove_image} deletes the image and the content only it used.
        """
        image = build_image(seed="r8")
        ref = self.registry.push_image("rig/remove", "v1", image)
        self.daemon.pull(ref)
        self.daemon.remove_image(ref)
        self.assertNotIn(ref, self.daemon.images())
        self.assertEqual(image.digests() & self.daemon.content_digests(), set())

    def test_stoppedRegistryFailsPull(self) -> None:
        """
        With the registry stopped, a pull fails with L{CommandFailed} carrying ctr's error.
        """
        image = build_image(seed="r9")
        ref = self.registry.push_image("rig/stopped", "v1", image)
        self.registry.stop()
        try:
            error = self.assertRaises(CommandFailed, self.daemon.pull, ref)
        finally:
            self.registry.start()
        self.assertIn("connection refused", error.stderr)

    def test_backgroundPull(self) -> None:
        """
        C{start_pull} runs the same pull in the background: paused, the process is stopped;
        resumed, it completes and C{wait} gives its exit status and its output is logged.
        """
        image = build_image(seed="r10")
        ref = self.registry.push_image("rig/background", "v1", image)
        pull = self.daemon.start_pull(ref)
        self.addCleanup(pull.kill)
        pull.pause()
        self.assertTrue(pull.running)

        def state() -> str:
            with open(f"/proc/{pull.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]

        # Signals are delivered asynchronously: a stopped process shows state T soon after.
        wait_for(lambda: state() == "T", timeout=30, what="ctr to stop")
        pull.resume()
        self.assertEqual(pull.wait(60), 0, pull.log_text())
        self.assertFalse(pull.running)
        self.assertIn(ref, pull.log_text())
        self.assertPulled(image, ref, image.digests())

    def test_damagedContent(self) -> None:
        """
        C{damaged_content} names a blob whose bytes on disk were changed, with what they hash
        to now, and nothing once the bytes are put back.
        """
        image = build_image(seed="r11")
        ref = self.registry.push_image("rig/damaged", "v1", image)
        self.daemon.pull(ref)
        self.assertEqual(self.daemon.damaged_content(), {})
        layer = image.layers[0]
        path = self.daemon.blob_path(layer.digest)
        bad = b"x" + layer.read()[1:]
        with open(path, "r+b") as f:
            f.write(bad)
        try:
            self.assertEqual(
                self.daemon.damaged_content(), {layer.digest: "sha256:" + hashlib.sha256(bad).hexdigest()}
            )
        finally:
            with open(path, "r+b") as f:
                f.write(layer.read())
        self.assertEqual(self.daemon.damaged_content(), {})


FAKE_NODE = [sys.executable, "-m", "spegel_testing.fakenode"]


class SpegelNodeProcessTests(TestCase):
    """
    L{SpegelNode}'s process handling, exercised with the L{spegel_testing.fakenode} stand-in
    (the real node has its own end-to-end tests).  No containerd is needed: the stand-in never
    connects to it.
    """

    def setUp(self) -> None:
        self.node = SpegelNode(
            containerd=ContainerdDaemon(),
            mirrored_registries=["http://127.0.0.1:5000"],
            command=FAKE_NODE,
            name="fake-node",
        )
        self.addCleanup(self.node.cleanup)
        self.addCleanup(shutil.rmtree, self.node.containerd.base_dir, True)

    def test_commandLine(self) -> None:
        """
        The node is given its containerd's socket, namespace and content path, its own data
        directory, loopback addresses and the mirrored registries, then the extra arguments.
        """
        self.node.extra_args.extend(["--registry-filters", "x"])
        args = self.node.args()
        self.assertEqual(args[: len(FAKE_NODE) + 1], [*FAKE_NODE, "spegel"])

        def value(flag: str) -> str:
            return args[args.index(flag) + 1]

        self.assertEqual(value("--containerd-sock"), self.node.containerd.socket)
        self.assertEqual(value("--containerd-namespace"), "k8s.io")
        self.assertEqual(value("--containerd-content-path"), self.node.containerd.content_path)
        self.assertEqual(value("--registry-addr"), f"127.0.0.1:{self.node.registry_port}")
        self.assertEqual(value("--mirrored-registries"), "http://127.0.0.1:5000")
        self.assertTrue(value("--data-dir").startswith(self.node.base_dir))
        self.assertEqual(args[-2:], ["--registry-filters", "x"])
        self.assertEqual(len({self.node.registry_port, self.node.router_port, self.node.metrics_port}), 3)

    def test_lifecycle(self) -> None:
        """
        C{start} waits for C{/livez}; metrics parse; C{restart} comes back on the same port;
        C{kill} leaves no process.
        """
        self.node.start()
        self.node.wait_ready()
        self.assertEqual(self.node.request("GET", "/v2/x/blobs/y").status, 404)
        metrics = self.node.metrics()
        # /livez by start(), /readyz, and the GET above: at least three.
        self.assertGreaterEqual(metrics.total("spegel_fake_requests_total"), 3)
        self.assertEqual(metrics[("spegel_fake_requests_total", (("port", "registry"),))], metrics.total("spegel_fake_requests_total"))
        self.assertEqual(metrics.total("spegel_fake_requests_total", port="other"), 0)
        firstPid, port = self.node.pid, self.node.registry_port
        self.node.restart()
        self.assertNotEqual(self.node.pid, firstPid)
        self.assertEqual(self.node.registry_port, port)
        self.assertEqual(self.node.request("GET", "/livez").status, 200)
        self.assertIn("fakenode: serving", self.node.log_text())
        self.assertEqual(self.node.log_text().count("==== starting"), 2)
        pid = self.node.pid
        self.node.kill()
        self.assertFalse(self.node.running)
        self.assertFalse(_isAlive(pid))

    def test_failedStartReportsLog(self) -> None:
        """
        A node that exits during start-up makes C{start} raise L{ProcessFailed} quoting its log.
        """
        self.node.extra_args.append("--fail-start")
        error = self.assertRaises(ProcessFailed, self.node.start)
        self.assertIn("refusing to start", str(error))
        self.assertIn("exited (3)", str(error))


class ClusterLifecycleTests(TestCase):
    """
    L{Cluster} starts and stops everything together.
    """

    def test_stopLeavesNothing(self) -> None:
        """
        After the C{with} block no process of the cluster is alive and its directory is gone,
        also when the block raised.
        """
        pids = []
        cluster = Cluster(2, node_command=FAKE_NODE, node_args=static_bootstrap)
        with self.assertRaises(RuntimeError):
            with cluster:
                pids = [cluster.registry.pid, *(d.pid for d in cluster.containerds), *(n.pid for n in cluster.nodes)]
                self.assertEqual(len(set(pids)), 5)
                self.assertTrue(all(_isAlive(pid) for pid in pids))
                self.assertEqual(cluster.nodes[0].request("GET", "/livez").status, 200)
                self.assertEqual(cluster.containerds[1].content_digests(), set())
                self.assertEqual(cluster.nodes[1].mirrored_registries, [cluster.registry.url])
                raise RuntimeError("the with block fails")
        self.assertEqual([pid for pid in pids if _isAlive(pid)], [])
        self.assertEqual([p for p in live_processes() if p.pid in pids], [])
        self.assertFalse(os.path.exists(cluster.base_dir))

    def test_staticBootstrapArgs(self) -> None:
        """
        The C{static_bootstrap} hook gives every node the router addresses of the others.
        """
        cluster = Cluster(3, node_command=FAKE_NODE, node_args=static_bootstrap)
        self.addCleanup(cluster.stop)
        for index, node in enumerate(cluster.nodes):
            args = node.args()
            peers = args[args.index("--static-bootstrap-peers") + 1].split(",")
            self.assertEqual(peers, [n.router_addr for i, n in enumerate(cluster.nodes) if i != index])

    def test_failedStartCleansUp(self) -> None:
        """
        When a node fails to start, C{start} raises and nothing keeps running.
        """
        cluster = Cluster(2, node_command=FAKE_NODE, node_args=["--fail-start"])
        self.assertRaises(ProcessFailed, cluster.start)
        pids = [cluster.registry.pid, *(d.pid for d in cluster.containerds)]
        self.assertEqual([pid for pid in pids if pid is not None and _isAlive(pid)], [])
        self.assertFalse(os.path.exists(cluster.base_dir))


class OrphanTests(TestCase):
    """
    Rig processes die with the process that started them, even when it gets no chance to clean
    up.
    """

    def test_killedParentTakesChildrenAlong(self) -> None:
        """
        A script that starts a containerd and is then SIGKILLed leaves no containerd running.
        """
        base = short_tempdir()
        self.addCleanup(shutil.rmtree, base, True)
        script = (
            "import os, signal, sys\n"
            "from spegel_testing.containerd import ContainerdDaemon\n"
            f"d = ContainerdDaemon(base_dir={base!r})\n"
            "d.start()\n"
            "print(d.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
        self.assertEqual(completed.returncode, -signal.SIGKILL, completed.stderr)
        pid = int(completed.stdout.split()[0])
        wait_for(lambda: not _isAlive(pid), timeout=30, what=f"orphaned containerd {pid} to die")
        self.assertFalse(_isAlive(pid))


for _template in (ContainerdDaemonTests, RegistryAndContainerdTests):
    globals().update(per_containerd(_template))
del _template, ContainerdDaemonTests, RegistryAndContainerdTests


class NetworkNamespaceTests(TestCase):
    """
    L{spegel_testing.netns}: hosts of their own, each with an address, reaching each other and
    the host over the bridge, and gone without a trace after clean-up.
    """

    def test_hostsReachEachOtherOnTheSamePort(self) -> None:
        network = Network.create()
        self.addCleanup(network.cleanup)
        first, second = network.add_host(), network.add_host()
        self.assertNotEqual(first.address, second.address)
        for address in (first.address, second.address, network.host_address):
            self.assertIn(ipaddress.ip_address(address), BENCHMARK_RANGE)
        # Both listen on port 5000 of their own address; each answers with its own name.
        server = (
            "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
            "s.bind(('0.0.0.0', 5000)); s.listen(); print('up', flush=True); c,_=s.accept(); c.sendall(sys.argv[1].encode())"
        )
        servers = []
        for host in (first, second):
            process = ManagedProcess(
                name=f"server {host.name}",
                args=host.command([sys.executable, "-c", server, host.name]),
                log_path=os.path.join(self.mktemp() + ".log"),
            )
            process.start()
            self.addCleanup(process.kill)
            # A line of its own: the log's first line, the command, also holds the word.
            wait_for(partial(_logs_line, process, "up"), timeout=30, what="server up")
            servers.append(process)
        client = "import socket,sys; print(socket.create_connection((sys.argv[1], 5000), timeout=5).recv(100).decode())"
        self.assertEqual(first.run([sys.executable, "-c", client, second.address]).strip(), second.name)
        with socket.create_connection((first.address, 5000), timeout=5) as connection:
            self.assertEqual(connection.recv(100).decode(), first.name)

    def test_cleanupRemovesEverything(self) -> None:
        network = Network.create()
        host = network.add_host()
        sleeper = subprocess.Popen(host.command(["sleep", "600"]))
        wait_for(lambda: sleeper.pid in host.pids(), timeout=30, what="sleep in the namespace")
        network.cleanup()
        self.assertEqual(sleeper.wait(10), -signal.SIGKILL)
        self.assertNotIn(host.name, subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        self.assertNotIn(network.bridge, links)
        self.assertNotIn(host.veth, links)
        network.cleanup()


class DNSServerTests(TestCase):
    """
    L{spegel_testing.dns}: answers from its records file, over UDP and TCP, as a cluster's DNS
    answers a headless Service's name.
    """

    def query(self, server: DNSServer, name: str, tcp: bool = False, kind: int = dns.A) -> dns.Message:
        request = dns.Message(id=7, recDes=True)
        request.queries = [dns.Query(name, kind, dns.IN)]
        data = request.toStr()
        if tcp:
            with socket.create_connection((server.address, server.port), timeout=5) as s:
                s.sendall(struct.pack("!H", len(data)) + data)
                length = struct.unpack("!H", s.recv(2))[0]
                answer = b""
                while len(answer) < length:
                    answer += s.recv(length - len(answer))
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(data, (server.address, server.port))
                answer, _ = s.recvfrom(65535)
        message = dns.Message()
        message.fromStr(answer)
        return message

    def test_answersFromRecords(self) -> None:
        server = DNSServer(address="127.0.0.1", port=free_port(udp_too=True))
        self.addCleanup(server.cleanup)
        server.set_records({"svc.example": ["198.18.7.2", "198.18.7.3"]})
        server.start()
        for tcp in (False, True):
            answer = self.query(server, "svc.example", tcp=tcp)
            self.assertEqual(answer.rCode, dns.OK)
            self.assertTrue(answer.auth)
            self.assertEqual(sorted(_dotted(a) for a in answer.answers), ["198.18.7.2", "198.18.7.3"])
        self.assertEqual(self.query(server, "svc.example", kind=dns.AAAA).answers, [])
        self.assertEqual(self.query(server, "other.example").rCode, dns.ENAME)
        server.set_records({"svc.example": ["198.18.7.4"]})
        self.assertEqual([_dotted(a) for a in self.query(server, "svc.example").answers], ["198.18.7.4"])


class PodSpecTranslationTests(SynchronousTestCase):
    """
    The parts of L{spegel_testing.pods} that follow Kubernetes' rules without a node.
    """

    def test_expandAsTheKubeletDoes(self) -> None:
        environment = {"NODE_IP": "198.18.1.2", "PORT": "30020"}
        self.assertEqual(pods.expand("http://$(NODE_IP):$(PORT)", environment), "http://198.18.1.2:30020")
        self.assertEqual(pods.expand("$(UNSET) stays", environment), "$(UNSET) stays")
        self.assertEqual(pods.expand("$$(NODE_IP) is escaped", environment), "$(NODE_IP) is escaped")
        self.assertEqual(pods.expand("$NODE_IP is not a reference", environment), "$NODE_IP is not a reference")

    def test_quantities(self) -> None:
        self.assertEqual(pods._quantity("128Mi"), 128 * 2**20)
        self.assertEqual(pods._quantity("1Gi"), 2**30)
        self.assertEqual(pods._quantity("100m"), 0.1)
        self.assertEqual(pods._quantity(2), 2)

    def test_hostPortMustEqualContainerPort(self) -> None:
        kubelet = pods.Kubelet(daemon=ContainerdDaemon(), node_ip="198.18.1.2", node_name="n", dns_server="198.18.1.1")
        self.addCleanup(shutil.rmtree, kubelet.daemon.base_dir)
        container = {"name": "c", "image": "i", "ports": [{"containerPort": 5000, "hostPort": 30020}]}
        e = self.assertRaises(pods.PodFailed, kubelet._check, "p", container)
        self.assertIn("hostPort 30020 != containerPort 5000", str(e))
        e = self.assertRaises(pods.PodFailed, kubelet._check, "p", {**container, "ports": [], "lifecycle": {}})
        self.assertIn("['lifecycle']", str(e))


class NeighbourTableTests(SynchronousTestCase):
    """
    The kernel's ARP table is shared by every namespace: a rig of N hosts raises its limits
    to fit N * N entries (at 50 nodes the defaults overflowed: "No route to host" between
    nodes) and puts the originals back.
    """

    def test_raised_and_restored(self) -> None:
        def limits() -> list[int]:
            return [int(open(f"/proc/sys/net/ipv4/neigh/default/{n}").read()) for n in ("gc_thresh1", "gc_thresh2", "gc_thresh3")]

        before = limits()
        hosts = 1 + int((before[2] / 4) ** 0.5) + 10  # enough that thresh3 must grow
        ensure_neighbour_table(hosts)
        self.addCleanup(restore_neighbour_table)
        raised = limits()
        self.assertEqual(raised[2], 4 * hosts * hosts)
        self.assertTrue(all(r >= b for r, b in zip(raised, before)))
        restore_neighbour_table()
        self.assertEqual(limits(), before)
