# -*- test-case-name: tests.e2e.test_e2e_node -*-
"""
A whole loopback cluster for end-to-end tests: one upstream registry, and per node a containerd
and a spegel node bound to it.

Use it as a context manager; L{Cluster.stop} kills everything it started, also when the body
raised, and the process module's C{atexit} hook catches anything left over (a Ctrl-C during
start-up, a test process torn down abruptly).  Nodes are launched together and then waited for,
so start-up costs roughly one node's start time, not n of them.
"""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from attrs import define, field, frozen

from spegel_testing.containerd import ContainerdBuild, ContainerdDaemon, short_tempdir, system_containerd
from spegel_testing.images import Platform, TestImage
from spegel_testing.node import SpegelNode, twistd_command
from spegel_testing.process import ProcessFailed, run
from spegel_testing.registry import UpstreamRegistry

NodeArgs = Callable[[int, "Cluster"], Sequence[str]]


def spegel_cli() -> list[str]:
    """
    The command that runs the C{spegel} console script of the interpreter running us.
    """
    script = os.path.join(os.path.dirname(sys.executable), "spegel")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from spegel.cli import main; sys.exit(main())"]


def static_bootstrap(index: int, cluster: "Cluster") -> list[str]:
    """
    A L{Cluster} C{node_args} hook: every node bootstraps from the router addresses of all the
    others.
    """
    peers = [node.router_addr for i, node in enumerate(cluster.nodes) if i != index]
    if not peers:
        # A single-node cluster: bootstrapping finds only itself, and is ready.
        peers = [cluster.nodes[index].router_addr]
    return ["--bootstrap-kind", "static", "--static-bootstrap-peers", ",".join(peers)]


@frozen
class Served:
    """
    One node's C{spegel_served_bytes_total}: bytes it served from its own containerd
    (C{local}, to its containerd or to peers) and bytes it passed on from peers (C{peer}), of
    which C{spliced} never entered the node's process (C{spegel_spliced_bytes_total}).
    """

    local: float
    peer: float
    spliced: float = 0.0

    def __sub__(self, other: "Served") -> "Served":
        return Served(self.local - other.local, self.peer - other.peer, self.spliced - other.spliced)


class ClusterQueries:
    """
    What a test or the demo asks any rig cluster (L{Cluster} on loopback, or
    L{spegel_testing.netcluster.NetCluster}): is an image findable through a node, and how
    many bytes has each node served.  The cluster provides C{nodes} and C{upstream_ns} (the
    upstream registry as C{host:port}, the C{ns} containerd sends).
    """

    nodes: list[SpegelNode]

    @property
    def upstream_ns(self) -> str:
        raise NotImplementedError

    def unfindable(
        self,
        node_index: int,
        repo: str,
        image: TestImage,
        *,
        tag: str | None = None,
        platform: Platform | None = None,
    ) -> list[str]:
        """
        Ask node C{node_index}'s registry, as its containerd would (C{HEAD}, no peer header),
        for C{tag} and every digest of C{image} (of C{platform} only, if given).

        @return: what it could not find (empty when everything is findable through it).
        """
        node = self.nodes[node_index]
        ns = urllib.parse.quote(self.upstream_ns, safe="")
        wanted = image.digests(platform)
        manifests = {image.digest, *(m.digest for m in image.manifests)} & wanted
        paths = [f"manifests/{tag}"] if tag is not None else []
        paths += [f"manifests/{d}" for d in sorted(manifests)]
        paths += [f"blobs/{d}" for d in sorted(wanted - manifests)]
        missing = []
        for path in paths:
            try:
                status = node.request("HEAD", f"/v2/{repo}/{path}?ns={ns}", timeout=5).status
            except (OSError, http.client.HTTPException):
                status = None
            if status != 200:
                missing.append(path)
        return missing

    def wait_findable(
        self,
        node_indexes: Iterable[int],
        repo: str,
        image: TestImage,
        *,
        tag: str | None = None,
        platform: Platform | None = None,
        timeout: float = 5.0,
        interval: float = 0.02,
    ) -> float:
        """
        Poll L{unfindable} on every node of C{node_indexes} until each finds everything.

        @return: the seconds it took.
        @raise ProcessFailed: on timeout, naming what was still missing where.
        """
        started = time.monotonic()
        indexes = list(node_indexes)
        while True:
            missing = {i: self.unfindable(i, repo, image, tag=tag, platform=platform) for i in indexes}
            missing = {i: paths for i, paths in missing.items() if paths}
            if not missing:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise ProcessFailed(f"not findable after {timeout}s: {missing}")
            indexes = list(missing)
            time.sleep(interval)

    def served(self) -> list[Served | None]:
        """
        Every node's L{Served} counters now; L{None} for a node that is not running.
        """
        result: list[Served | None] = []
        for node in self.nodes:
            if not node.running:
                result.append(None)
                continue
            metrics = node.metrics()
            result.append(
                Served(
                    metrics.total("spegel_served_bytes_total", source="local"),
                    metrics.total("spegel_served_bytes_total", source="peer"),
                    metrics.total("spegel_spliced_bytes_total"),
                )
            )
        return result



@define(eq=False)
class Cluster(ClusterQueries):
    """
    C{n_nodes} containerd + spegel pairs and one upstream registry, all on 127.0.0.1.

    @ivar node_args: extra node arguments, either the same list for every node or a hook called
        with (node index, cluster) once every node's ports are known (see L{static_bootstrap}).
    @ivar mirrored_registries: the nodes' C{--mirrored-registries}; the upstream registry's URL
        when L{None}.
    @ivar start_nodes: start the spegel nodes in L{start} (false: only registry and containerds,
        nodes started later with C{node.start()}).
    @ivar wait_ready: also wait for every node's C{/readyz}.
    @ivar log_level: the nodes' log level.
    @ivar node_command: the runner prefix for nodes instead of L{twistd_command} (for example a
        stand-in, L{spegel_testing.fakenode}).
    @ivar containerd_build: which containerd every node runs.
    @ivar cri: run containerd's CRI plugin (pull as the kubelet does, through C{crictl}).
    """

    n_nodes: int = 2
    node_args: Sequence[str] | NodeArgs = ()
    mirrored_registries: Sequence[str] | None = None
    start_nodes: bool = True
    wait_ready: bool = False
    log_level: str = "debug"
    node_command: Sequence[str] | None = None
    containerd_build: ContainerdBuild = field(factory=system_containerd)
    cri: bool = False
    base_dir: str = field(factory=lambda: short_tempdir("spc"))
    keep_dir: bool = False
    registry: UpstreamRegistry = field(init=False)
    containerds: list[ContainerdDaemon] = field(init=False, factory=list)
    nodes: list[SpegelNode] = field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.registry = UpstreamRegistry(base_dir=os.path.join(self.base_dir, "registry"))
        os.makedirs(self.registry.base_dir, exist_ok=True)
        mirrored = list(self.mirrored_registries) if self.mirrored_registries is not None else [self.registry.url]
        for index in range(self.n_nodes):
            daemon = ContainerdDaemon(
                base_dir=os.path.join(self.base_dir, f"c{index}"),
                name=f"containerd-{index}",
                build=self.containerd_build,
                cri=self.cri,
            )
            node_dir = os.path.join(self.base_dir, f"n{index}")
            os.makedirs(node_dir, exist_ok=True)
            node = SpegelNode(
                containerd=daemon,
                mirrored_registries=mirrored,
                name=f"spegel-{index}",
                base_dir=node_dir,
                command=list(self.node_command) if self.node_command is not None else twistd_command(),
                log_level=self.log_level,
            )
            self.containerds.append(daemon)
            self.nodes.append(node)
        for index, node in enumerate(self.nodes):
            extra = self.node_args(index, self) if callable(self.node_args) else self.node_args
            node.extra_args.extend(extra)

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """
        Start the registry, every containerd and (unless C{start_nodes} is false) every node;
        return once all are live.  On failure everything started is stopped again.
        """
        # Directories, not only processes (those die anyway), must go when a script forgets stop().
        atexit.register(self.stop)
        try:
            self.registry.start()
            for daemon in self.containerds:
                daemon.start()
            if self.start_nodes:
                for node in self.nodes:
                    node.launch()
                for node in self.nodes:
                    node.wait_live(timeout)
                if self.wait_ready:
                    for node in self.nodes:
                        node.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """
        Kill every process of the cluster and delete its directory (unless C{keep_dir}).
        """
        atexit.unregister(self.stop)
        for node in self.nodes:
            node.kill()
        for daemon in self.containerds:
            daemon.kill()
        self.registry.kill()
        if not self.keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def upstream_ns(self) -> str:
        return self.registry.host

    def mirror_target(self, target: int | str) -> str:
        return self.nodes[target].registry_url if isinstance(target, int) else target

    def configure_mirrors(
        self,
        node_index: int,
        targets: Sequence[int | str],
        *,
        resolve_tags: bool = True,
        prepend_existing: bool = False,
        registries: Sequence[str] | None = None,
    ) -> str:
        """
        Run C{spegel configuration} so that containerd C{node_index} tries C{targets} (node
        indexes or URLs) before the upstream registry.

        @return: the command's output.
        """
        args = [
            *spegel_cli(),
            "configuration",
            "--containerd-registry-config-path",
            self.containerds[node_index].hosts_dir,
            "--mirrored-registries",
            ",".join(registries if registries is not None else [self.registry.url]),
            "--mirror-targets",
            ",".join(self.mirror_target(t) for t in targets),
            # The preflight reads this daemon's configuration and asks the daemon itself, as
            # the init container does on a node.
            "--containerd-config-file",
            self.containerds[node_index].config_path,
            "--containerd-sock",
            self.containerds[node_index].socket,
        ]
        if not resolve_tags:
            args.append("--resolve-tags=false")
        if prepend_existing:
            args.append("--prepend-existing")
        return run(args)

    def cleanup_mirrors(self, node_index: int) -> str:
        """
        Run C{spegel cleanup} on containerd C{node_index}'s hosts directory.
        """
        return run(
            [*spegel_cli(), "cleanup", "--containerd-registry-config-path", self.containerds[node_index].hosts_dir]
        )

    def hosts_toml(self, node_index: int, registry_host: str | None = None) -> str:
        """
        The text of containerd C{node_index}'s hosts.toml for the upstream registry (or
        C{registry_host}).
        """
        path = os.path.join(self.containerds[node_index].hosts_dir, registry_host or self.registry.host, "hosts.toml")
        with open(path) as f:
            return f.read()

    def pull(self, node_index: int, ref: str, **kwargs: object) -> float:
        """
        Pull C{ref} on containerd C{node_index} through its hosts directory.

        @return: the wall time the pull took, in seconds.
        """
        started = time.monotonic()
        self.containerds[node_index].pull(ref, **kwargs)  # type: ignore[arg-type]
        return time.monotonic() - started

    def mirror_through_own_nodes(self) -> None:
        """
        Configure every containerd to mirror through its own node, as in a real cluster.
        """
        for index in range(self.n_nodes):
            self.configure_mirrors(index, [index])

    def dump_logs(self, lines: int = 40) -> str:
        """
        The tail of every log of the cluster, for a failing test's message.
        """
        parts = [self.registry.log_tail(lines)]
        for daemon, node in zip(self.containerds, self.nodes):
            parts += [daemon.log_tail(lines), node.log_tail(lines)]
        return "\n".join(parts)
