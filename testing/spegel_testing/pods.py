# -*- test-case-name: tests.e2e.test_e2e_pods -*-
"""
Pods started the way the kubelet starts them: a Kubernetes pod spec, as the chart renders it,
turned into the CRI calls the kubelet makes (C{PullImage}, C{RunPodSandbox}, then
C{CreateContainer} and C{StartContainer} for each init container in turn, each run to
completion, then for the containers), on one node's containerd, through C{crictl}.

What is translated, as the kubelet translates it: the image and its pull policy; command and
args, with C{$(VAR)} expanded from the container's environment; environment values and the
downward API fields a node agent uses (C{status.hostIP}, C{status.podIP}, C{metadata.name},
C{metadata.namespace}, C{spec.nodeName}); C{hostPath}, C{emptyDir} and C{secret} volumes and
their mounts; the container and pod security contexts (read-only root, no privilege
escalation, capabilities, user and group); memory and CPU resources; the pod's DNS
(C{ClusterFirst}: the cluster's DNS server and search path).  Probes are not run by a kubelet
here: L{RunningPod.wait_ready} polls the container's startup probe the same way.

What is substituted, because this machine has no CNI: every pod gets its node's network, as
with C{hostNetwork: true}.  A node of the rig is a network namespace with its own address
(L{spegel_testing.netns}), so that is still one address per node with the ports as written.
A pod whose C{hostPort} differs from its C{containerPort} would need the CNI's port mapping;
such a spec is refused with a message saying so (render it with the two equal).  Anything
else in the spec that this translation does not know is refused too, so a chart change the
test cannot honour is noticed instead of silently dropped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from typing import Any

from attrs import define, field

from spegel_testing.containerd import ContainerdDaemon
from spegel_testing.process import CommandFailed, ProcessFailed

# runtime.v1.NamespaceMode
_POD, _CONTAINER, _NODE = 0, 1, 2

_KNOWN_CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "ports", "volumeMounts",
    "securityContext", "resources", "startupProbe", "readinessProbe", "livenessProbe",
}
_KNOWN_POD_KEYS = {
    "containers", "initContainers", "volumes", "serviceAccountName", "automountServiceAccountToken",
    "priorityClassName", "nodeSelector", "tolerations", "affinity", "securityContext",
    "imagePullSecrets", "restartPolicy", "hostNetwork", "dnsPolicy",
}
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodFailed(Exception):
    """
    A pod could not be started, or one of its containers failed; the message says which and
    carries its log.
    """


def expand(text: str, environment: dict[str, str]) -> str:
    """
    Kubernetes' expansion of C{$(VAR)} in a command or argument: a defined variable is replaced,
    C{$$} is a literal C{$}, anything else is left as written.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return environment.get(match.group(1), match.group(0))

    return _VARIABLE.sub(replace, text)


def _quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (C{128Mi}, C{100m}, C{1}) as a number."""
    text = str(text)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@define(eq=False)
class RunningPod:
    """
    A pod started by L{Kubelet.run_pod}: its sandbox and its containers' ids.
    """

    kubelet: "Kubelet"
    name: str
    sandbox_id: str
    spec: dict[str, Any]
    containers: dict[str, str] = field(factory=dict)
    started_at: float = 0.0

    def logs(self, container: str) -> str:
        return self.kubelet.container_logs(self.containers[container])

    def state(self, container: str) -> dict[str, Any]:
        return self.kubelet.container_status(self.containers[container])

    def wait_ready(self, container: str, timeout: float) -> float:
        """
        Poll the container's startup probe (else its readiness probe), an C{httpGet} on the
        node's address, until it answers 2xx; fail early if the container exits.

        @return: seconds from the sandbox's start to the first success.
        """
        spec = next(c for c in self.spec["containers"] if c["name"] == container)
        probe = spec.get("startupProbe") or spec.get("readinessProbe")
        if not probe or "httpGet" not in probe:
            raise PodFailed(f"{self.name}/{container}: no httpGet startup or readiness probe")
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port)
        url = f"http://{self.kubelet.node_ip}:{port}{probe['httpGet'].get('path', '/')}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as response:
                    if 200 <= response.status < 400:
                        return time.monotonic() - self.started_at
            except OSError:
                pass
            status = self.state(container)
            if status.get("state") == "CONTAINER_EXITED":
                raise PodFailed(
                    f"{self.name}/{container} exited ({status.get('exitCode')}) before ready:\n{self.logs(container)}"
                )
            if time.monotonic() > deadline:
                raise PodFailed(f"{self.name}/{container} not ready at {url} after {timeout}s:\n{self.logs(container)}")
            time.sleep(0.1)

    def wait_exit(self, container: str, timeout: float) -> int:
        """Wait for a container to exit; its exit code."""
        return self.kubelet.wait_exit(self.containers[container], f"{self.name}/{container}", timeout)

    def delete(self) -> None:
        """Stop and remove the pod, as the kubelet does when it is deleted."""
        self.kubelet.daemon.crictl("stopp", self.sandbox_id, timeout=60)
        self.kubelet.daemon.crictl("rmp", self.sandbox_id, timeout=60)


@define(eq=False)
class Kubelet:
    """
    The kubelet's part for one node: runs pods on C{daemon} (started with C{cri=True} and a
    C{sandbox_image}).

    @ivar node_ip: the node's address (C{status.hostIP}; also every pod's, see the module).
    @ivar node_name: C{spec.nodeName}.
    @ivar dns_server: the cluster's DNS server, in every pod's resolv.conf.
    @ivar cluster_domain: the cluster's DNS domain, for the search path.
    @ivar secrets: C{{secret name: {key: bytes}}} for C{secret} volumes.
    """

    daemon: ContainerdDaemon
    node_ip: str
    node_name: str
    dns_server: str
    cluster_domain: str = "cluster.local"
    secrets: dict[str, dict[str, bytes]] = field(factory=dict)

    @property
    def pods_dir(self) -> str:
        return os.path.join(self.daemon.base_dir, "pods")

    def run_pod(self, manifest: dict[str, Any], *, timeout: float = 120.0) -> RunningPod:
        """
        Start the pod of C{manifest} (a Pod, or the C{template} of a DaemonSet) and return
        once its containers are started; its init containers have then all exited 0.

        @raise PodFailed: an image could not be pulled, an init container failed, or the spec
            asks for what this translation cannot honour.
        """
        template = manifest["spec"].get("template", manifest)
        metadata = dict(template.get("metadata", {}))
        spec = template["spec"]
        unknown = set(spec) - _KNOWN_POD_KEYS
        if unknown:
            raise PodFailed(f"pod spec has {sorted(unknown)}, which tests cannot run")
        name = metadata.get("name") or f"{manifest['metadata']['name']}-{self.node_name}"
        namespace = manifest["metadata"].get("namespace", "default")
        uid = str(uuid.uuid4())
        pod_dir = os.path.join(self.pods_dir, f"{namespace}_{name}_{uid}")
        os.makedirs(pod_dir)
        containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
        for container in containers:
            self._check(name, container)
            self._ensure_image(container)
        sandbox = self._sandbox_config(name, namespace, uid, metadata, pod_dir)
        sandbox_path = os.path.join(pod_dir, "sandbox.json")
        with open(sandbox_path, "w") as f:
            json.dump(sandbox, f)
        started_at = time.monotonic()
        try:
            sandbox_id = self.daemon.crictl("runp", sandbox_path, timeout=timeout).strip()
        except CommandFailed as e:
            raise PodFailed(f"RunPodSandbox {namespace}/{name}: {e}") from e
        pod = RunningPod(kubelet=self, name=name, sandbox_id=sandbox_id, spec=spec, started_at=started_at)
        volumes = self._volumes(spec, pod_dir)
        downward = {
            "status.hostIP": self.node_ip,
            "status.podIP": self.node_ip,
            "metadata.name": name,
            "metadata.namespace": namespace,
            "spec.nodeName": self.node_name,
        }
        for init in spec.get("initContainers", []):
            container_id = self._start_container(pod, sandbox_path, init, spec, volumes, downward, pod_dir)
            code = self.wait_exit(container_id, f"{name}/{init['name']}", timeout)
            if code != 0:
                raise PodFailed(f"init container {name}/{init['name']} exited {code}:\n{self.container_logs(container_id)}")
        for container in spec.get("containers", []):
            self._start_container(pod, sandbox_path, container, spec, volumes, downward, pod_dir)
        return pod

    def _check(self, pod_name: str, container: dict[str, Any]) -> None:
        unknown = set(container) - _KNOWN_CONTAINER_KEYS
        if unknown:
            raise PodFailed(f"container {pod_name}/{container['name']} has {sorted(unknown)}, which tests cannot run")
        for port in container.get("ports", []):
            if "hostPort" in port and port["hostPort"] != port["containerPort"]:
                raise PodFailed(
                    f"{pod_name}/{container['name']}: hostPort {port['hostPort']} != containerPort "
                    f"{port['containerPort']} needs a CNI's port mapping; pods here share their "
                    "node's network (render with the two equal)"
                )

    def _ensure_image(self, container: dict[str, Any]) -> None:
        image = container["image"]
        policy = container.get("imagePullPolicy", "IfNotPresent")
        if policy == "Never":
            return
        if policy == "IfNotPresent":
            try:
                self.daemon.crictl("inspecti", image, timeout=30)
                return
            except CommandFailed:
                pass
        try:
            self.daemon.cri_pull(image)
        except CommandFailed as e:
            raise PodFailed(f"PullImage {image}: {e}") from e

    def _sandbox_config(self, name: str, namespace: str, uid: str, metadata: dict[str, Any], pod_dir: str) -> dict[str, Any]:
        domain = self.cluster_domain
        return {
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "attempt": 0},
            "labels": metadata.get("labels", {}),
            "annotations": metadata.get("annotations", {}),
            "log_directory": pod_dir,
            "dns_config": {
                "servers": [self.dns_server],
                "searches": [f"{namespace}.svc.{domain}", f"svc.{domain}", domain],
                "options": ["ndots:5"],
            },
            "linux": {
                "security_context": {
                    "namespace_options": {"network": _NODE, "pid": _CONTAINER, "ipc": _POD},
                },
            },
        }

    def _volumes(self, spec: dict[str, Any], pod_dir: str) -> dict[str, str]:
        """Each volume's folder (or socket) on the node."""
        paths = {}
        for volume in spec.get("volumes", []):
            name = volume["name"]
            if "hostPath" in volume:
                path = volume["hostPath"]["path"]
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                elif kind == "Directory" and not os.path.isdir(path):
                    raise PodFailed(f"hostPath volume {name}: {path} is not a directory")
                elif kind == "Socket" and not os.path.exists(path):
                    raise PodFailed(f"hostPath volume {name}: no socket at {path}")
                paths[name] = path
            elif "emptyDir" in volume:
                path = os.path.join(pod_dir, "volumes", name)
                os.makedirs(path)
                paths[name] = path
            elif "secret" in volume:
                secret_name = volume["secret"]["secretName"]
                if secret_name not in self.secrets:
                    raise PodFailed(f"secret volume {name}: no secret {secret_name!r} on this node")
                data = self.secrets[secret_name]
                path = os.path.join(pod_dir, "volumes", name)
                os.makedirs(path)
                items = volume["secret"].get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    with open(os.path.join(path, item["path"]), "wb") as f:
                        f.write(data[item["key"]])
                paths[name] = path
            else:
                raise PodFailed(f"volume {name}: {sorted(set(volume) - {'name'})} is not supported here")
        return paths

    def _environment(self, container: dict[str, Any], downward: dict[str, str]) -> dict[str, str]:
        environment: dict[str, str] = {}
        for variable in container.get("env", []):
            if "value" in variable:
                environment[variable["name"]] = expand(str(variable["value"]), environment)
            elif "fieldRef" in variable.get("valueFrom", {}):
                path = variable["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in downward:
                    raise PodFailed(f"env {variable['name']}: fieldRef {path} is not supported here")
                environment[variable["name"]] = downward[path]
            else:
                raise PodFailed(f"env {variable['name']}: {variable} is not supported here")
        return environment

    def _security_context(self, container: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        pod_context = spec.get("securityContext") or {}
        context = {**pod_context, **(container.get("securityContext") or {})}
        unknown = set(context) - {
            "readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities", "runAsUser",
            "runAsGroup", "runAsNonRoot", "privileged", "fsGroup",
        }
        if unknown:
            raise PodFailed(f"securityContext {sorted(unknown)} is not supported here")
        result: dict[str, Any] = {
            "namespace_options": {"network": _NODE, "pid": _CONTAINER, "ipc": _POD},
            "readonly_rootfs": bool(context.get("readOnlyRootFilesystem", False)),
            "no_new_privs": context.get("allowPrivilegeEscalation") is False,
            "privileged": bool(context.get("privileged", False)),
        }
        capabilities = context.get("capabilities") or {}
        if capabilities:
            result["capabilities"] = {
                "add_capabilities": list(capabilities.get("add", [])),
                "drop_capabilities": list(capabilities.get("drop", [])),
            }
        if "runAsUser" in context:
            result["run_as_user"] = {"value": context["runAsUser"]}
        if "runAsGroup" in context:
            result["run_as_group"] = {"value": context["runAsGroup"]}
        return result

    def _resources(self, container: dict[str, Any]) -> dict[str, Any]:
        resources = container.get("resources") or {}
        result: dict[str, Any] = {}
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if "memory" in limits:
            result["memory_limit_in_bytes"] = int(_quantity(limits["memory"]))
        if "cpu" in requests:
            # The kubelet's shares: 1024 per CPU requested.
            result["cpu_shares"] = max(2, int(_quantity(requests["cpu"]) * 1024))
        return result

    def _start_container(
        self,
        pod: RunningPod,
        sandbox_path: str,
        container: dict[str, Any],
        spec: dict[str, Any],
        volumes: dict[str, str],
        downward: dict[str, str],
        pod_dir: str,
    ) -> str:
        environment = self._environment(container, downward)
        mounts = []
        for mount in container.get("volumeMounts", []):
            if "subPath" in mount:
                raise PodFailed(f"volumeMount {mount['name']}: subPath is not supported here")
            mounts.append(
                {
                    "container_path": mount["mountPath"],
                    "host_path": volumes[mount["name"]],
                    "readonly": bool(mount.get("readOnly", False)),
                }
            )
        config: dict[str, Any] = {
            "metadata": {"name": container["name"], "attempt": 0},
            "image": {"image": container["image"]},
            "command": [expand(word, environment) for word in container.get("command", [])],
            "args": [expand(word, environment) for word in container.get("args", [])],
            "envs": [{"key": key, "value": value} for key, value in environment.items()],
            "mounts": mounts,
            "log_path": f"{container['name']}.log",
            "linux": {
                "resources": self._resources(container),
                "security_context": self._security_context(container, spec),
            },
        }
        config_path = os.path.join(pod_dir, f"{container['name']}.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        try:
            container_id = self.daemon.crictl("create", pod.sandbox_id, config_path, sandbox_path).strip()
            self.daemon.crictl("start", container_id)
        except CommandFailed as e:
            raise PodFailed(f"container {pod.name}/{container['name']}: {e}") from e
        pod.containers[container["name"]] = container_id
        return container_id

    def container_status(self, container_id: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.daemon.crictl("inspect", "-o", "json", container_id))["status"]
        return status

    def container_logs(self, container_id: str) -> str:
        """The container's output, stdout and stderr interleaved as written."""
        completed = subprocess.run(
            self.daemon.crictl_command("logs", container_id),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
        return completed.stdout.decode("utf-8", "replace")

    def wait_exit(self, container_id: str, what: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.get("state") == "CONTAINER_EXITED":
                return int(status.get("exitCode", 0))
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{what} still running after {timeout}s:\n{self.container_logs(container_id)}")
            time.sleep(0.1)

    def remove_all(self) -> None:
        """Stop and remove every pod on the node (for clean-up: errors are ignored)."""
        try:
            self.daemon.crictl("rmp", "--force", "--all", timeout=60)
        except (CommandFailed, ProcessFailed, OSError):
            pass
        shutil.rmtree(self.pods_dir, ignore_errors=True)
