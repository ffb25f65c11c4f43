# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A real containerd daemon for tests: own root, state, socket and hosts directory (certs.d).

Every test that starts one can run against each containerd the project supports
(L{containerd_builds}): Debian's 1.6 and the 2.x releases C{.ci/setup} builds
(L{spegel_testing.tools}).  The daemon's configuration is written in the format of its version:
C{version = 2} with the CRI plugin's C{io.containerd.grpc.v1.cri} sections for 1.x, and
C{version = 3} with C{io.containerd.cri.v1.images}/C{runtime} for 2.x.

By default the daemon runs with the CRI plugin disabled (it would add its own image names); a
daemon started with C{cri=True} runs it the way a kubelet's containerd does, with C{config_path}
pointing at its certs.d and C{discard_unpacked_layers = false} (or true, for a test of the
misconfiguration), so tests can pull through the CRI C{ImageService} as the kubelet does.  No CNI
is configured: pulls and host-network sandboxes need none.  The optional plugins that write
outside the daemon's root (C{opt}, NRI's socket) or probe hardware filesystems are turned off, so
several daemons, of several versions, can run side by side on one machine.  Its content store is
the directory a spegel node is given as C{--containerd-content-path}.

Everything is driven through C{ctr} and C{crictl}, the clients users have, so tests see exactly
what a user of that containerd would see.

The builds and their versions are in L{spegel_testing.containerd_builds} (their names are
importable from here too, as the tests and the rig have always imported them), the
configuration file each version reads in L{spegel_testing.containerd_config}.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile

from attrs import define, field

from spegel_testing import containerd_config
from spegel_testing.containerd_builds import (
    ContainerdBuild,
    built_containerd,
    containerd_builds,
    crictl,
    newest_containerd,
    per_containerd,
    system_containerd,
)
from spegel_testing.netns import Host
from spegel_testing.process import ManagedProcess, ProcessFailed, RunsOneProcess, run, wait_for

# Unix socket paths are limited to 108 bytes (sun_path); stay clear of it.
MAX_SOCKET_PATH = 100


def short_tempdir(prefix: str = "sp") -> str:
    """
    A fresh directory directly under /tmp, short enough to hold unix sockets.
    """
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@define(eq=False)
class ContainerdDaemon(RunsOneProcess):
    """
    One containerd daemon under C{base_dir}.

    Layout: C{base_dir}/root (C{.root}), C{base_dir}/state, C{base_dir}/certs.d (C{.hosts_dir}),
    C{base_dir}/c.sock (C{.socket}), C{base_dir}/containerd.log.  C{stop} and C{restart} keep
    root, so pulled content survives a restart.

    @ivar base_dir: directory owning everything of this daemon; short (see L{short_tempdir}).
    @ivar namespace: containerd namespace used by L{ctr}.
    @ivar name: label for logs and errors.
    @ivar log_level: containerd's own log level.
    @ivar build: which containerd runs (L{containerd_builds}).
    @ivar cri: run the CRI plugin, as on a Kubernetes node.
    @ivar discard_unpacked_layers: the CRI setting that makes a node useless to spegel.
    @ivar host: the network namespace the daemon runs in (L{spegel_testing.netns}); its pods'
        "host network" is then that namespace, with its own address.  L{None}: the machine's.
    @ivar sandbox_image: the CRI's pause image, for tests that run pods.
    """

    base_dir: str = field(factory=short_tempdir)
    namespace: str = "k8s.io"
    name: str = "containerd"
    log_level: str = "info"
    build: ContainerdBuild = field(factory=system_containerd)
    cri: bool = False
    discard_unpacked_layers: bool = False
    host: Host | None = None
    sandbox_image: str | None = None
    _process: ManagedProcess | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if len(self.socket) >= MAX_SOCKET_PATH or len(self.socket + ".ttrpc") >= MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a unix socket: {self.socket!r}")
        for path in (self.root, self.state, self.hosts_dir):
            os.makedirs(path, exist_ok=True)

    @property
    def root(self) -> str:
        return os.path.join(self.base_dir, "root")

    @property
    def state(self) -> str:
        return os.path.join(self.base_dir, "state")

    @property
    def socket(self) -> str:
        return os.path.join(self.base_dir, "c.sock")

    @property
    def hosts_dir(self) -> str:
        return os.path.join(self.base_dir, "certs.d")

    @property
    def content_path(self) -> str:
        return os.path.join(self.root, "io.containerd.content.v1.content")

    @property
    def config_path(self) -> str:
        return os.path.join(self.base_dir, "config.toml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "containerd.log")

    def config_text(self) -> str:
        """
        containerd's configuration, in its version's own format (L{containerd_config}).
        """
        return containerd_config.config_text(self)

    def start(self, timeout: float = 20.0) -> None:
        """
        Start the daemon and wait until it answers on its socket.
        """
        self.build.check()
        with open(self.config_path, "w") as f:
            f.write(self.config_text())
        # A socket file left by a killed daemon would make the readiness probe below
        # connect to nothing; containerd removes and recreates it anyway.
        for stale in (self.socket, self.socket + ".ttrpc"):
            if os.path.exists(stale):
                os.unlink(stale)
        environment = None
        if os.path.dirname(self.build.containerd):
            # Its own shim (containerd-shim-runc-v2) before any other on PATH: a 1.6 shim
            # cannot serve containerd 2.x.
            folder = os.path.dirname(self.build.containerd)
            environment = {**os.environ, "PATH": f"{folder}:{os.environ.get('PATH', '')}"}
        args = [self.build.containerd, "--config", self.config_path]
        self._process = ManagedProcess(
            name=self.name,
            args=self.host.command(args) if self.host is not None else args,
            log_path=self.log_path,
            env=environment,
        )
        self._process.start()
        wait_for(
            self._socket_answers,
            timeout=timeout,
            what=f"{self.name} socket {self.socket}",
            process=self._process,
        )
        # The socket accepting connections does not yet mean every service is registered.
        wait_for(self._version_answers, timeout=timeout, what=f"{self.name} version", process=self._process)

    def _socket_answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def _version_answers(self) -> bool:
        try:
            self.ctr("version", timeout=5)
        except Exception:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop the daemon (SIGTERM, then SIGKILL); root and state are kept.
        """
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """
        SIGKILL the daemon.
        """
        if self._process is not None:
            self._process.kill()

    def pause(self) -> None:
        """
        SIGSTOP the daemon: on 2.x, whose C{ctr} pulls through the daemon's transfer service,
        this (not pausing C{ctr}) is what stalls a pull's transfer.
        """
        if self._process is not None:
            self._process.pause()

    def resume(self) -> None:
        """
        SIGCONT the daemon after L{pause}.
        """
        if self._process is not None:
            self._process.resume()

    def restart(self) -> None:
        """
        Stop and start again with the same directories and socket.
        """
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """
        Kill the daemon and delete C{base_dir}.
        """
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        if self._process is None:
            return f"---- {self.name}: never started ----"
        return self._process.log_tail(lines)

    def ctr(self, *args: str, timeout: float = 120.0) -> str:
        """
        Run C{ctr -a <socket> -n <namespace> *args} and return its stdout.

        @raise spegel_testing.process.CommandFailed: on a non-zero exit, with ctr's stderr.
        """
        command = [self.build.ctr, "-a", self.socket, "-n", self.namespace, *args]
        # In its host's namespace: ctr itself fetches (on 1.6) from where the node would.
        return run(self.host.command(command) if self.host is not None else command, timeout=timeout)

    def pull(
        self,
        ref: str,
        *,
        platform: str | None = None,
        all_platforms: bool = False,
        timeout: float = 120.0,
    ) -> str:
        """
        Pull C{ref} (C{host:port/repo:tag} or C{host:port/repo@sha256:...}) through this
        daemon's hosts directory, the way the kubelet's pulls are routed through certs.d.

        Plain HTTP is the default scheme because every registry of the rig is on loopback
        without TLS; a hosts.toml for the registry overrides it with its own C{server} URL.

        @return: ctr's output.
        """
        return self.ctr(*self._pull_args(ref, platform, all_platforms), timeout=timeout)

    def fetch(self, ref: str, *, timeout: float = 120.0) -> str:
        """
        Fetch C{ref}'s content into this daemon's store, as L{pull} does, without unpacking it:
        half the disk of a pull, for a benchmark of many nodes with a large image.  ctr itself
        fetches (in its host's namespace), through the same hosts directory.

        @return: ctr's output.
        """
        return self.ctr("content", "fetch", "--hosts-dir", self.hosts_dir, "--plain-http", ref, timeout=timeout)

    def _pull_args(self, ref: str, platform: str | None, all_platforms: bool) -> list[str]:
        args = ["images", "pull", "--hosts-dir", self.hosts_dir, "--plain-http"]
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return [*args, ref]

    def start_pull(
        self,
        ref: str,
        *,
        platform: str | None = None,
        all_platforms: bool = False,
        log_path: str | None = None,
    ) -> ManagedProcess:
        """
        Start the same pull as L{pull} in the background, for a test that acts while bytes flow
        (kill the serving node, L{ManagedProcess.pause} the client).  C{ctr} itself fetches over
        HTTP and writes into containerd, so pausing it stalls the transfer.

        @return: the running C{ctr}; C{wait(timeout)} gives its exit status, C{log_text()} its
            output (in C{log_path}, by default C{pull.log} in C{base_dir}).
        """
        process = ManagedProcess(
            name=f"{self.name} pull",
            args=self._in_host([self.build.ctr, "-a", self.socket, "-n", self.namespace, *self._pull_args(ref, platform, all_platforms)]),
            log_path=log_path or os.path.join(self.base_dir, "pull.log"),
        )
        process.start()
        return process

    def _in_host(self, command: list[str]) -> list[str]:
        return self.host.command(command) if self.host is not None else command

    def crictl(self, *args: str, timeout: float = 120.0) -> str:
        """
        Run C{crictl} against this daemon's CRI plugin (started with C{cri=True}), as the
        kubelet talks to it, and return its stdout.

        @raise spegel_testing.process.CommandFailed: on a non-zero exit, with crictl's stderr.
        """
        return run(self.crictl_command("--timeout", f"{int(timeout)}s", *args), timeout=timeout + 10)

    def crictl_command(self, *args: str) -> list[str]:
        """The C{crictl} command line for this daemon's CRI plugin, for callers that run it."""
        endpoint = f"unix://{self.socket}"
        return [crictl(), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, *args]

    def cri_pull(self, ref: str, timeout: float = 120.0) -> str:
        """
        Pull C{ref} through the CRI C{ImageService.PullImage}, the kubelet's path: containerd
        takes the registry configuration from its own C{config_path} (this daemon's certs.d),
        and on 2.1+ pulls through its transfer service.

        @return: the image id crictl prints.
        """
        output = self.crictl("pull", ref, timeout=timeout)
        return output.strip().rsplit(" ", 1)[-1]

    def images(self) -> dict[str, str]:
        """
        Every image name in the namespace mapped to its root digest.
        """
        result = {}
        for line in self.ctr("images", "ls").splitlines()[1:]:
            columns = line.split()
            if len(columns) >= 3:
                result[columns[0]] = columns[2]
        return result

    def image_digest(self, ref: str) -> str:
        """
        The root digest (index or manifest) of the image named C{ref}.

        @raise KeyError: when there is no such image.
        """
        return self.images()[ref]

    def content_digests(self) -> set[str]:
        """
        The digests of every blob in the content store.
        """
        return {line.strip() for line in self.ctr("content", "ls", "-q").splitlines() if line.strip()}

    def blob_path(self, digest: str) -> str:
        """
        Where containerd keeps blob C{digest} on disk.
        """
        algorithm, _, hexdigest = digest.partition(":")
        return os.path.join(self.content_path, "blobs", algorithm, hexdigest)

    def read_content(self, digest: str) -> bytes:
        """
        The bytes of blob C{digest}, read from the content store on disk.
        """
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    def damaged_content(self) -> dict[str, str]:
        """
        Every blob on disk whose bytes do not hash to its name, mapped to what they hash to.
        containerd checks a blob only when it is written, so this is how a test proves nothing
        wrong was ever stored (or finds what it corrupted itself).
        """
        damaged = {}
        directory = os.path.join(self.content_path, "blobs", "sha256")
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            hasher = hashlib.sha256()
            with open(os.path.join(directory, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            if hasher.hexdigest() != name:
                damaged[f"sha256:{name}"] = f"sha256:{hasher.hexdigest()}"
        return damaged

    def collect_garbage(self) -> None:
        """
        Run containerd's garbage collection now, to completion: create a lease and delete it
        with C{--sync}, which waits for a collection (there is no other way to ask for one).
        """
        lease = self.ctr("leases", "create").split()[-1]
        self.ctr("leases", "rm", "--sync", lease)

    def remove_image(self, ref: str) -> None:
        """
        Delete image C{ref} and wait for garbage collection of the content it alone used.
        """
        self.ctr("images", "rm", "--sync", ref)

    def write_hosts_toml(self, registry_host: str, text: str) -> str:
        """
        Write C{text} as C{<hosts_dir>/<registry_host>/hosts.toml}; return its path.
        """
        directory = os.path.join(self.hosts_dir, registry_host)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "hosts.toml")
        with open(path, "w") as f:
            f.write(text)
        return path


__all__ = [
    "ContainerdBuild",
    "ContainerdDaemon",
    "ProcessFailed",
    "built_containerd",
    "containerd_builds",
    "crictl",
    "newest_containerd",
    "per_containerd",
    "short_tempdir",
    "system_containerd",
]
