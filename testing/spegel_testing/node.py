# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A real spegel node process for end-to-end tests, bound to one L{ContainerdDaemon}.

The node runs as C{python -m twisted spegel ...} (our plugin under the C{twist} runner, in the
foreground; L{twistd_command} runs it under C{twistd -n} instead), on free
loopback ports chosen once, so a restarted node comes back on the same addresses and peers that
know it keep working.  Its output goes to a log file read back with L{SpegelNode.log_text}.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence

from attrs import define, field
from prometheus_client.parser import text_string_to_metric_families

from spegel_testing.containerd import ContainerdDaemon
from spegel_testing.httputil import Response, get_status, request
from spegel_testing.netns import Host
from spegel_testing.ports import free_port
from spegel_testing.process import ManagedProcess, ProcessFailed, RunsOneProcess, read_log, wait_for


def _str_list(items: Iterable[str]) -> list[str]:
    # A typed converter: attrs' mypy plugin cannot type a bare `list` as one.
    return list(items)

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


class Metrics(dict[MetricKey, float]):
    """
    Parsed Prometheus text: C{(sample name, sorted label pairs)} to value.
    """

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        metrics = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                metrics[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return metrics

    def total(self, name: str, **labels: str) -> float:
        """
        The sum of every sample called C{name} whose labels include C{labels}; 0 when none.
        """
        wanted = set(labels.items())
        return sum(value for (n, pairs), value in self.items() if n == name and wanted <= set(pairs))

    def names(self) -> set[str]:
        return {name for name, _ in self}


def twist_command(log_level: str = "debug") -> list[str]:
    """
    The default runner prefix: C{python -m twisted} (the C{twist} runner) with text logs on
    stdout, using the interpreter running us (so a virtualenv's packages are used).  It stops the
    node cleanly on SIGTERM.
    """
    return [sys.executable, "-m", "twisted", "--log-format=text", f"--log-level={log_level}"]


def twistd_command() -> list[str]:
    """
    The alternative runner prefix: C{twistd -n --pidfile=} (foreground, no pid file, logs on
    stdout), which exercises the plugin's twistd log observer hook.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script, "-n", "--pidfile="]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())", "-n", "--pidfile="]


@define(eq=False)
class SpegelNode(RunsOneProcess):
    """
    One spegel node process.

    @ivar containerd: the daemon whose content this node serves.
    @ivar mirrored_registries: C{--mirrored-registries} (registry URLs).
    @ivar extra_args: more node arguments (bootstrap, filters...); may be changed before
        L{start}.
    @ivar command: the runner prefix: L{twistd_command} (what operators run) by default.
    @ivar log_level: the node's C{--log-level}.
    @ivar host: the rig host (network namespace) the node runs in, on every address, or
        L{None}: loopback.
    @ivar resolv_conf: a resolv.conf the node sees as /etc/resolv.conf (DNS bootstrap), or
        L{None}: the machine's.
    """

    containerd: ContainerdDaemon
    mirrored_registries: Sequence[str] = ()
    name: str = "spegel"
    base_dir: str = field(factory=lambda: tempfile.mkdtemp(prefix="spegel-node-"))
    extra_args: list[str] = field(factory=list, converter=_str_list)
    registry_port: int = field(factory=free_port)
    router_port: int = field(factory=lambda: free_port(udp_too=True))
    metrics_port: int = field(factory=free_port)
    command: list[str] = field(factory=twistd_command)
    log_level: str = "debug"
    env: dict[str, str] | None = None
    host: Host | None = None
    resolv_conf: str | None = None
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """Where the node is reached: its host's address (L{spegel_testing.netns}), or loopback."""
        return self.host.address if self.host is not None else "127.0.0.1"

    def _listen(self, port: int) -> str:
        # In a host of its own the node listens on every address, as in its pod (":5000").
        return f":{port}" if self.host is not None else f"127.0.0.1:{port}"

    @property
    def registry_addr(self) -> str:
        return f"{self.address}:{self.registry_port}"

    @property
    def registry_url(self) -> str:
        """
        C{http://<address>:<registry port>}: what C{spegel configuration --mirror-targets} takes.
        """
        return f"http://{self.registry_addr}"

    @property
    def router_addr(self) -> str:
        return f"{self.address}:{self.router_port}"

    @property
    def metrics_addr(self) -> str:
        return f"{self.address}:{self.metrics_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.base_dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "node.log")

    def args(self) -> list[str]:
        """
        The full command line.
        """
        args = [
            *self.command,
            "spegel",
            "--registry-addr",
            self._listen(self.registry_port),
            "--router-addr",
            self._listen(self.router_port),
            "--metrics-addr",
            self._listen(self.metrics_port),
            "--containerd-sock",
            self.containerd.socket,
            "--containerd-namespace",
            self.containerd.namespace,
            "--containerd-content-path",
            self.containerd.content_path,
            "--containerd-config-file",
            self.containerd.config_path,
            "--containerd-registry-config-path",
            self.containerd.hosts_dir,
            "--data-dir",
            self.data_dir,
            "--log-level",
            self.log_level,
        ]
        if self.mirrored_registries:
            args += ["--mirrored-registries", ",".join(self.mirrored_registries)]
        return [*args, *self.extra_args]

    def launch(self) -> None:
        """
        Start the process without waiting for it (see L{wait_live}); lets a cluster start all its
        nodes at once.
        """
        os.makedirs(self.data_dir, exist_ok=True)
        args = self.args()
        if self.resolv_conf is not None:
            # Its own /etc/resolv.conf, as a pod has: in a mount namespace of its own.
            args = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', self.resolv_conf, *args,
            ]
        self._process = ManagedProcess(
            name=self.name, args=self.host.command(args) if self.host is not None else args, log_path=self.log_path, env=self.env
        )
        self._process.start()

    def wait_live(self, timeout: float = 30.0) -> None:
        """
        Wait until C{GET /livez} answers 200.

        @raise ProcessFailed: if the node exits first or the time runs out (with its log tail).
        """
        wait_for(
            lambda: get_status(self.address, self.registry_port, "/livez") == 200,
            timeout=timeout,
            what=f"{self.name} /livez on {self.registry_addr}",
            process=self._process,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """
        Wait until C{GET /readyz} answers 200.
        """
        wait_for(
            lambda: get_status(self.address, self.registry_port, "/readyz") == 200,
            timeout=timeout,
            what=f"{self.name} /readyz on {self.registry_addr}",
            process=self._process,
        )

    def start(self, timeout: float = 30.0) -> None:
        """
        Start the node and wait until it is live.
        """
        self.launch()
        self.wait_live(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM (clean shutdown), SIGKILL after C{timeout}.
        """
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """
        SIGKILL: the node gets no chance to say goodbye to its peers.
        """
        if self._process is not None:
            self._process.kill()

    def restart(self, timeout: float = 30.0) -> None:
        """
        Stop and start again on the same ports and data directory.
        """
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_text(self) -> str:
        """
        Everything the node has logged so far (across restarts).
        """
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        if self._process is None:
            return f"---- {self.name}: never started ----"
        return self._process.log_tail(lines)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 30.0,
    ) -> Response:
        """
        One HTTP request to the node's registry port; C{path} is sent unencoded.
        """
        return request(self.address, self.registry_port, method, path, headers=headers, body=body, timeout=timeout)

    def metrics_text(self) -> str:
        response = request(self.address, self.metrics_port, "GET", "/metrics", timeout=10)
        if response.status != 200:
            raise ProcessFailed(f"{self.name} /metrics answered {response.status}")
        return response.body.decode("utf-8")

    def metrics(self) -> Metrics:
        """
        The node's current metrics, parsed.
        """
        return Metrics.parse(self.metrics_text())
