# -*- test-case-name: tests.e2e.test_e2e_rollout -*-
"""
A cluster on one machine in which every node is a host of its own, as in Kubernetes: its own
network namespace and address (L{spegel_testing.netns}), its own containerd, and a spegel node
on the chart's ports (registry 5000, router 5001, metrics 9090), all nodes finding each other
through DNS (L{spegel_testing.dns}: the bootstrap name answered with every node's address, as
the chart's headless Service does).

The upstream registry is "across the internet": a host of its own whose link is capped with
C{tc tbf} (e.g. 100 Mbit/s) behind a proxy that adds latency (L{spegel_testing.delayproxy}, e.g.
15 ms each way; this kernel has no C{netem}), which also counts the bytes it sends, so a
benchmark knows how much came from upstream.  Node links can be capped too (C{node_rate}).

    with NetCluster(5) as cluster:
        ref = cluster.push_image("app", "v1", image)     # straight into the registry, unshaped
        cluster.pull(0, ref)                              # node 0's ctr, in node 0's namespace
        cluster.upstream_bytes()                          # what the registry sent, through the link

Everything it creates (namespaces, bridge, links, qdiscs, processes, folders) is removed by
L{stop}, also when L{start} fails half-way.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

from attrs import define, field

from spegel_testing.cluster import ClusterQueries, spegel_cli
from spegel_testing.containerd import ContainerdBuild, ContainerdDaemon, newest_containerd, short_tempdir
from spegel_testing.dns import DNSServer
from spegel_testing.images import TestImage
from spegel_testing.netns import Host, Network, ensure_neighbour_table, restore_neighbour_table
from spegel_testing.node import SpegelNode, twistd_command
from spegel_testing.process import ManagedProcess, run, wait_for
from spegel_testing.registry import UpstreamRegistry

REGISTRY_PORT = 5000
ROUTER_PORT = 5001
METRICS_PORT = 9090
BOOTSTRAP_DOMAIN = "spegel-bootstrap.spegel.svc.cluster.local"
# The registry itself, behind the delay proxy that clients reach on REGISTRY_PORT.
UPSTREAM_INNER_PORT = 5080


@define(eq=False)
class NetCluster(ClusterQueries):
    """
    @ivar n_nodes: nodes to start.
    @ivar containerd_build: which containerd every node runs.
    @ivar upstream_rate: the upstream link's bandwidth (C{tc} units), or L{None} for no cap.
    @ivar upstream_delay: one-way latency to upstream, seconds.
    @ivar node_rate: every node link's bandwidth, or L{None}.
    @ivar node_args: more arguments for every spegel node.
    @ivar spegel: run spegel nodes and point containerd at them (false: the no-mirror baseline,
        every containerd pulling straight from upstream).
    @ivar cluster_key: give every node the same cluster key (C{--router-secret-file}), as the
        chart does by default.
    """

    n_nodes: int
    containerd_build: ContainerdBuild = field(factory=newest_containerd)
    upstream_rate: str | None = "100mbit"
    upstream_delay: float = 0.015
    node_rate: str | None = None
    node_args: Sequence[str] = ()
    spegel: bool = True
    cluster_key: bool = True
    log_level: str = "info"
    base_dir: str = field(factory=lambda: short_tempdir("spn"))
    network: Network | None = field(default=None, init=False)
    upstream_host: Host | None = field(default=None, init=False)
    registry: UpstreamRegistry | None = field(default=None, init=False)
    proxy: ManagedProcess | None = field(default=None, init=False)
    dns: DNSServer | None = field(default=None, init=False)
    hosts: list[Host] = field(factory=list, init=False)
    containerds: list[ContainerdDaemon] = field(factory=list, init=False)
    nodes: list[SpegelNode] = field(factory=list, init=False)

    def __enter__(self) -> "NetCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def upstream(self) -> str:
        """C{<address>:5000}: the upstream registry as nodes see it (through the shaped link)."""
        assert self.upstream_host is not None
        return f"{self.upstream_host.address}:{REGISTRY_PORT}"

    @property
    def upstream_ns(self) -> str:
        return self.upstream

    @property
    def upstream_url(self) -> str:
        return f"http://{self.upstream}"

    def ref(self, repo: str, tag_or_digest: str) -> str:
        separator = "@" if ":" in tag_or_digest else ":"
        return f"{self.upstream}/{repo}{separator}{tag_or_digest}"

    def start(self, timeout: float = 60.0) -> None:
        atexit.register(self.stop)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        # Nodes, upstream and the host's side of the bridge.
        ensure_neighbour_table(self.n_nodes + 2)
        self.network = Network.create()
        self.upstream_host = self.network.add_host()
        self._start_upstream()
        self.dns = DNSServer(address=self.network.host_address, base_dir=os.path.join(self.base_dir, "dns"))
        os.makedirs(self.dns.base_dir, exist_ok=True)
        self.dns.start()
        for index in range(self.n_nodes):
            host = self.network.add_host()
            if self.node_rate:
                host.limit_rate(self.node_rate)
            self.hosts.append(host)
            daemon = ContainerdDaemon(
                base_dir=os.path.join(self.base_dir, f"c{index}"),
                name=f"containerd-{index}",
                build=self.containerd_build,
                host=host,
            )
            self.containerds.append(daemon)
        self.dns.set_records({BOOTSTRAP_DOMAIN: [h.address for h in self.hosts]})
        for daemon in self.containerds:
            daemon.start()
        if not self.spegel:
            return
        key_args: list[str] = []
        if self.cluster_key:
            key_path = os.path.join(self.base_dir, "router-key")
            with open(key_path, "w") as f:
                f.write(os.urandom(32).hex())
            key_args = ["--router-secret-file", key_path]
        for index, (host, daemon) in enumerate(zip(self.hosts, self.containerds)):
            node_dir = os.path.join(self.base_dir, f"n{index}")
            os.makedirs(node_dir, exist_ok=True)
            node = SpegelNode(
                containerd=daemon,
                mirrored_registries=[self.upstream_url],
                name=f"spegel-{index}",
                base_dir=node_dir,
                registry_port=REGISTRY_PORT,
                router_port=ROUTER_PORT,
                metrics_port=METRICS_PORT,
                command=twistd_command(),
                log_level=self.log_level,
                host=host,
                extra_args=[
                    "--bootstrap-kind", "dns", "--dns-bootstrap-domain", BOOTSTRAP_DOMAIN, *key_args, *self.node_args
                ],
                # The node's resolver: the cluster's DNS server (as a pod's resolv.conf names it).
                resolv_conf=self._resolv_conf(),
            )
            self.nodes.append(node)
            run([
                *spegel_cli(), "configuration",
                "--containerd-registry-config-path", daemon.hosts_dir,
                "--mirrored-registries", self.upstream_url,
                "--mirror-targets", f"http://{host.address}:{REGISTRY_PORT}",
                "--containerd-config-file", daemon.config_path,
                "--containerd-sock", daemon.socket,
                "--preflight", "warn",
            ])
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout)

    def _resolv_conf(self) -> str:
        path = os.path.join(self.base_dir, "resolv.conf")
        if not os.path.exists(path):
            assert self.network is not None
            with open(path, "w") as f:
                f.write(f"nameserver {self.network.host_address}\noptions ndots:5\n")
        return path

    def _start_upstream(self) -> None:
        assert self.upstream_host is not None
        host = self.upstream_host
        self.registry = UpstreamRegistry(
            base_dir=os.path.join(self.base_dir, "registry"),
            port=UPSTREAM_INNER_PORT,
            address=host.address,
            netns=host,
            name="upstream",
            access_log=True,
        )
        os.makedirs(self.registry.base_dir, exist_ok=True)
        self.registry.start()
        self.proxy = ManagedProcess(
            name="upstream-link",
            args=host.command([
                sys.executable, "-m", "spegel_testing.delayproxy",
                "--listen", f"{host.address}:{REGISTRY_PORT}",
                "--to", f"{host.address}:{UPSTREAM_INNER_PORT}",
                "--delay", str(self.upstream_delay),
                "--stats", self._stats_path,
            ]),
            log_path=os.path.join(self.base_dir, "upstream-link.log"),
        )
        self.proxy.start()
        wait_for(lambda: os.path.exists(self._stats_path), timeout=20, what="the upstream link", process=self.proxy)
        if self.upstream_rate:
            host.limit_rate(self.upstream_rate)

    @property
    def _stats_path(self) -> str:
        return os.path.join(self.base_dir, "upstream-link.json")

    def upstream_bytes(self) -> int:
        """Bytes upstream has sent to nodes so far, through its shaped link."""
        return int(self._upstream_stats()["bytes_to_clients"])

    def upstream_bytes_by_node(self) -> list[int]:
        """Bytes upstream has sent to each node so far (by the node's address), in node order."""
        by_host = self._upstream_stats().get("bytes_to_client_hosts", {})
        return [int(by_host.get(host.address, 0)) for host in self.hosts]

    def _upstream_stats(self) -> dict:
        time.sleep(0.6)  # the proxy writes its counters twice a second
        with open(self._stats_path) as f:
            return json.load(f)

    def push_image(self, repo: str, tag: str | None, image: TestImage) -> str:
        """
        Push C{image} straight into the registry (not through the shaped link); the reference
        nodes pull, through it.
        """
        assert self.registry is not None
        self.registry.push_image(repo, tag, image)
        return self.ref(repo, tag or image.digest)

    def pull(self, index: int, ref: str, timeout: float = 600.0, fetch_only: bool = False) -> float:
        """
        Pull C{ref} on node C{index} (ctr, in its namespace, through its certs.d); seconds.
        C{fetch_only}: fetch its content without unpacking it (L{ContainerdDaemon.fetch}).
        """
        started = time.monotonic()
        if fetch_only:
            self.containerds[index].fetch(ref, timeout=timeout)
        else:
            self.containerds[index].pull(ref, timeout=timeout)
        return time.monotonic() - started

    def rss_mib(self) -> list[float]:
        """Every spegel node's resident memory, MiB."""
        sizes = []
        for node in self.nodes:
            pid = node.pid
            try:
                with open(f"/proc/{pid}/status") as f:
                    line = next(entry for entry in f if entry.startswith("VmRSS:"))
                sizes.append(int(line.split()[1]) / 1024)
            except (OSError, StopIteration, TypeError):
                sizes.append(0.0)
        return sizes

    def dump_logs(self, lines: int = 30) -> str:
        parts = []
        for daemon, node in zip(self.containerds, self.nodes):
            parts += [daemon.log_tail(lines), node.log_tail(lines)]
        if self.registry is not None:
            parts.append(self.registry.log_tail(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for node in self.nodes:
            node.kill()
        for daemon in self.containerds:
            daemon.kill()
        if self.proxy is not None:
            self.proxy.kill()
        if self.registry is not None:
            self.registry.kill()
        if self.dns is not None:
            self.dns.cleanup()
        if self.network is not None:
            self.network.cleanup()
        restore_neighbour_table()
        shutil.rmtree(self.base_dir, ignore_errors=True)
