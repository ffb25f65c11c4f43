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
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from typing import TypeVar

from attrs import define, field, frozen

from spegel_testing import tools
from spegel_testing.netns import Host
from spegel_testing.process import ManagedProcess, ProcessFailed, RunsOneProcess, run, wait_for

CONTAINERD = "containerd"
CTR = "ctr"

# Unix socket paths are limited to 108 bytes (sun_path); stay clear of it.
MAX_SOCKET_PATH = 100

_VERSION = re.compile(r"\b(\d+)\.(\d+)\.(\d+)")

_DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.tracing.processor.v1.otlp",
    # One socket per machine (/var/run/nri): daemons side by side would fight over it.
    "io.containerd.nri.v1.nri",
)

# The CRI plugin of 1.x; of 2.x it is split in three.
_CRI_PLUGINS = {
    2: ("io.containerd.grpc.v1.cri",),
    3: ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"),
}

_COMMON = """\
version = {config_version}
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "{log_level}"

[metrics]
  address = ""
"""

# Where the CRI plugin finds registry configuration, and whether it keeps layers. Written also
# when the plugin is disabled (containerd ignores it then), so the file always says where this
# daemon's mirrors are configured: `spegel configuration` checks that before writing there.
_IMAGES_V2 = """
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = {discard}

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{hosts_dir}"
"""

_IMAGES_V3 = """
[plugins.'io.containerd.cri.v1.images']
  discard_unpacked_layers = {discard}

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '{hosts_dir}'
"""

# root lacks CAP_SYS_RESOURCE in this sandbox, so pods need restrict_oom_score_adj. No CNI is
# configured: pulls and host-network sandboxes need none.
_RUNTIME_V2 = """
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
{sandbox}
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni}/bin"
  conf_dir = "{cni}/conf"
"""

_RUNTIME_V3 = """
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['{cni}/bin']
  conf_dir = '{cni}/conf'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"""

# The image of every pod's sandbox ("pause") container, when a test runs pods.
_SANDBOX_V3 = """
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{image}'
"""


@frozen
class ContainerdBuild:
    """
    One containerd to test against: its binaries and the version they are.

    @ivar version: C{major.minor.patch}.
    @ivar containerd: the daemon's path (or name on C{PATH}).
    @ivar ctr: its client's.
    @ivar missing: why the binaries are not there (not built yet), or L{None}.
    """

    version: str
    containerd: str = CONTAINERD
    ctr: str = CTR
    missing: str | None = None

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor, _ = self.version.split(".", 2)
        return int(major), int(minor)

    @property
    def label(self) -> str:
        """
        What test names carry: C{containerd_2_4}.
        """
        major, minor = self.major_minor
        return f"containerd_{major}_{minor}"

    @property
    def config_version(self) -> int:
        """
        The configuration format this containerd reads natively.
        """
        return 3 if self.major_minor >= (2, 0) else 2

    @property
    def publishes_content_create(self) -> bool:
        """
        containerd 2.1 added C{/content/create} events, sent as each blob is committed.
        """
        return self.major_minor >= (2, 1)

    def check(self) -> None:
        """
        @raise ProcessFailed: when the binaries are not there, saying how to build them.
        """
        if self.missing is not None:
            raise ProcessFailed(self.missing)

    def __str__(self) -> str:
        return f"containerd {self.version}"


@functools.lru_cache(maxsize=None)
def system_containerd() -> ContainerdBuild:
    """
    The containerd on C{PATH} (Debian's 1.6), asking it for its version.
    """
    try:
        output = subprocess.run(
            [CONTAINERD, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError as e:
        return ContainerdBuild("0.0.0", missing=f"no containerd on PATH ({e}): run bash .ci/setup")
    match = _VERSION.search(output)
    if match is None:
        return ContainerdBuild("0.0.0", missing=f"cannot tell the version of containerd: {output!r}")
    return ContainerdBuild(".".join(match.groups()))


def built_containerd(tool: tools.GoTool) -> ContainerdBuild:
    """
    A containerd 2.x from the tools cache, or one that says it is missing.
    """
    build = ContainerdBuild(
        tool.version, containerd=tool.binary("containerd"), ctr=tool.binary("ctr")
    )
    if not tool.built():
        return ContainerdBuild(
            tool.version,
            containerd=build.containerd,
            ctr=build.ctr,
            missing=f"containerd {tool.version} is not built in {tool.path()}: run bash .ci/setup",
        )
    return build


def containerd_builds() -> tuple[ContainerdBuild, ...]:
    """
    Every containerd the end-to-end tests run against: Debian's, then the 2.x builds.
    """
    return (system_containerd(), *(built_containerd(t) for t in tools.CONTAINERD_2))


def newest_containerd() -> ContainerdBuild:
    """
    The newest containerd that is built, for a demo or a benchmark that runs one.
    """
    ready = [b for b in containerd_builds() if b.missing is None]
    if not ready:
        return system_containerd()
    return max(ready, key=lambda b: b.major_minor)


_T = TypeVar("_T", bound=type)


def per_containerd(template: _T) -> dict[str, _T]:
    """
    One subclass of the test case C{template} per containerd (L{containerd_builds}), named
    C{<template>_containerd_<major>_<minor>} and with C{containerd_build} set, so a test's name
    says which containerd ran it.  Put them in the module and remove the template, so trial
    collects each once::

        globals().update(per_containerd(PullTests))
        del PullTests

    A build that is missing makes its tests fail (L{ContainerdBuild.check}), never skip.
    """
    classes = {}
    for build in containerd_builds():
        name = f"{template.__name__}_{build.label}"
        classes[name] = type(
            name,
            (template,),
            {"containerd_build": build, "__module__": template.__module__, "__qualname__": name},
        )
    return classes


def crictl() -> str:
    """
    The path of crictl, built by C{.ci/setup}.

    @raise ProcessFailed: when it is not built.
    """
    if not tools.CRICTL.built():
        raise ProcessFailed(f"crictl is not built in {tools.CRICTL.path()}: run bash .ci/setup")
    return tools.CRICTL.binary("crictl")


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
        containerd's configuration, in its version's own format.
        """
        version = self.build.config_version
        disabled = list(_DISABLED_PLUGINS)
        if not self.cri:
            disabled = list(_CRI_PLUGINS[version]) + disabled
        text = _COMMON.format(
            config_version=version,
            root=self.root,
            state=self.state,
            disabled=", ".join(f'"{p}"' for p in disabled),
            socket=self.socket,
            ttrpc=self.socket + ".ttrpc",
            log_level=self.log_level,
        )
        text += (_IMAGES_V3 if version == 3 else _IMAGES_V2).format(
            discard="true" if self.discard_unpacked_layers else "false", hosts_dir=self.hosts_dir
        )
        if self.cri:
            sandbox = f'  sandbox_image = "{self.sandbox_image}"\n' if self.sandbox_image else ""
            text += (_RUNTIME_V3 if version == 3 else _RUNTIME_V2).format(
                cni=os.path.join(self.base_dir, "cni"), sandbox=sandbox
            )
            if self.sandbox_image and version == 3:
                text += _SANDBOX_V3.format(image=self.sandbox_image)
        return text

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
    "containerd_builds",
    "crictl",
    "newest_containerd",
    "per_containerd",
    "short_tempdir",
    "system_containerd",
]
