# -*- test-case-name: tests.e2e.test_k8s -*-
"""
Tests for the Helm chart in charts/spegel and the manifests in k8s/: the chart lints, renders
with its defaults to exactly k8s/spegel.yaml (without the post-delete hook) and k8s/cleanup.yaml
(the hook alone), renders with other values files to manifests that the Kubernetes schemas
accept (offline, kubernetes-validate), and what it renders agrees with the code: every flag is
one the node or the C{spegel} command accepts, ports, probes and mounts match the flags, the
hook's pods run where the DaemonSet's do and its wait pod probes its cleanup pods, and the
dashboard's queries name metrics the node exports.  Bad values fail at C{helm template}, with
the values schema's message.

Rendering runs the real C{helm} (built by C{.ci/setup} from the Go module proxy, see
L{spegel_testing.tools}); the YAML is read with PyYAML.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from spegel.cli import UsageError, parse_command_line
from spegel_testing import tools

ROOT = Path(__file__).parent.parent.parent
CHART = ROOT / "charts" / "spegel"
K8S = ROOT / "k8s"
NODE_IP = "10.0.0.5"
RELEASE = ("spegel", "--namespace", "spegel")
HOOK_TEMPLATE = "templates/post-delete-hook.yaml"
# k8s/spegel.yaml names the cluster key's Secret instead of holding a random key of its own (one
# key for everyone who applies the file would be no key): its users create it first.
K8S_KEY_SECRET = "spegel.routerSecret.existingSecret=spegel-router-key"
# How k8s/ is made: the command each file's comment header must name, and its arguments.
K8S_RENDERS = {
    "spegel.yaml": (
        f"helm template spegel charts/spegel --namespace spegel --no-hooks --set {K8S_KEY_SECRET}",
        ("--no-hooks", "--set", K8S_KEY_SECRET),
    ),
    "cleanup.yaml": (
        f"helm template spegel charts/spegel --namespace spegel --show-only {HOOK_TEMPLATE}",
        ("--show-only", HOOK_TEMPLATE),
    ),
}
# The oldest Kubernetes the chart's manifests are checked against, and the newest the
# schemas ship.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")


class HelmFailed(Exception):
    pass


def helm(*args: str) -> str:
    """
    Run the helm built by .ci/setup; its stdout.

    @raise HelmFailed: with helm's stderr, on a non-zero exit.
    """
    if not tools.HELM.built():
        raise HelmFailed(f"helm is not built in {tools.HELM.path()}: run bash .ci/setup")
    result = subprocess.run(
        [tools.HELM.binary("helm"), *args], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise HelmFailed(result.stderr.strip())
    return result.stdout


def render(*values: dict[str, Any], tmp: Path | None = None, args: tuple[str, ...] = ()) -> str:
    """
    C{helm template} of the chart as the k8s/ manifests are made, with C{values} as values
    files (written under C{tmp}) and more C{args}; hooks included unless C{args} says not.
    """
    command = ["template", *RELEASE, str(CHART), *args]
    for index, value in enumerate(values):
        assert tmp is not None
        path = tmp / f"values-{index}.yaml"
        path.write_text(yaml.safe_dump(value))
        command += ["--values", str(path)]
    return helm(*command)


def spegel_args(argv: list[str]) -> tuple[str | None, Any]:
    """
    What the C{spegel} command makes of C{argv}: the command, and its options by flag name.
    """
    command = parse_command_line(argv)
    return command.subCommand, command.subOptions


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def is_hook(d: dict[str, Any]) -> bool:
    return "helm.sh/hook" in d["metadata"].get("annotations", {})


def split_header(path: Path) -> tuple[str, str]:
    """
    A k8s/ manifest's leading comment lines (how to use it), and the rest.
    """
    lines = path.read_text().splitlines(keepends=True)
    count = 0
    while count < len(lines) and lines[count].startswith("#"):
        count += 1
    return "".join(lines[:count]), "".join(lines[count:])


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name}")


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    for c in pod["initContainers" if init else "containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def expand(c: dict[str, Any]) -> list[str]:
    """
    C{c}'s args with C{$(VAR)} replaced as the kubelet does (NODE_IP by a sample address).
    """
    values = {"NODE_IP": NODE_IP}
    for variable in c.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]


def flag_values(args: list[str]) -> dict[str, str]:
    """
    C{--flag=value} arguments by flag (C{--flag} included).
    """
    values = {}
    for arg in args:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            values[name] = value
    return values


class ChartTestCase(SynchronousTestCase):
    def temp(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class DefaultRenderTests(ChartTestCase):
    """
    The default render, which is k8s/spegel.yaml.
    """

    def setUp(self) -> None:
        everything = documents(render())
        self.documents = [d for d in everything if not is_hook(d)]
        self.hooks = [d for d in everything if is_hook(d)]
        self.secret = find(self.documents, "Secret", "spegel-router-key")
        self.daemonset = find(self.documents, "DaemonSet", "spegel")
        self.pod = self.daemonset["spec"]["template"]["spec"]
        self.node = container(self.pod, "spegel")
        self.init = container(self.pod, "configuration", init=True)

    def assertRendered(self, name: str, expected: list[dict[str, Any]]) -> None:
        """
        k8s/<name> is a comment header naming the command that renders it, then exactly what
        that command prints (regenerate it with that command when the chart changes); and what
        it holds is C{expected}, the documents of the full render it stands for.
        """
        command, args = K8S_RENDERS[name]
        header, body = split_header(K8S / name)
        self.assertIn(f"#   {command}\n", header)
        self.assertEqual(body, render(args=args))
        self.assertEqual(documents(body), expected)

    def test_k8s_manifest_is_the_default_render(self) -> None:
        """
        k8s/spegel.yaml: the default render without the post-delete hook, which kubectl would
        otherwise create with everything else (it would clean every node at once).
        """
        self.assertRendered("spegel.yaml", [d for d in self.documents if d is not self.secret])

    def test_k8s_cleanup_is_the_hook(self) -> None:
        self.assertRendered("cleanup.yaml", self.hooks)

    def test_lint(self) -> None:
        self.assertIn("0 chart(s) failed", helm("lint", "--strict", str(CHART)))

    def node_args(self) -> list[str]:
        self.assertEqual(self.node["command"], ["twistd"])
        self.assertEqual(self.node["args"][:3], ["-n", "--pidfile=", "spegel"])
        return expand(self.node)[3:]

    def test_kinds_and_namespace(self) -> None:
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in self.documents)
        self.assertEqual(
            kinds,
            [
                ("DaemonSet", "spegel"),
                ("Secret", "spegel-router-key"),
                ("Service", "spegel-bootstrap"),
                ("Service", "spegel-metrics"),
                ("ServiceAccount", "spegel"),
            ],
        )
        for d in self.documents + self.hooks:
            self.assertEqual(d["metadata"]["namespace"], "spegel", d["kind"])
        self.assertEqual(self.pod["serviceAccountName"], "spegel")

    def test_node_accepts_arguments(self) -> None:
        """
        The node's own option parser takes the DaemonSet's arguments, values included.
        """
        from spegel.tap import Options

        # The key file, where the Secret's volume puts it in the pod.
        folder = self.temp()
        (folder / "key").write_bytes(base64.b64decode(self.secret["data"]["key"]))
        args = [a.replace("/etc/spegel/router/", f"{folder}/") for a in self.node_args()]
        options = Options()
        try:
            options.parseOptions(args)
        except SystemExit as e:
            self.fail(f"spegel.tap.Options refused the DaemonSet's arguments (exit {e.code})")
        self.assertEqual(options.node.bootstrap_kind, "dns")
        self.assertEqual(options.node.data_dir, "/var/lib/spegel")
        self.assertEqual(options.node.router_secret, base64.b64decode(self.secret["data"]["key"]))

    def test_cluster_key_by_default(self) -> None:
        """
        Secure by default: the chart makes a random cluster key (a new one per render, as
        `helm template` sees no cluster to read the installed one from) and every node uses it.
        """
        key = base64.b64decode(self.secret["data"]["key"])
        self.assertGreaterEqual(len(key), 32)
        again = find(documents(render()), "Secret", "spegel-router-key")
        self.assertNotEqual(again["data"]["key"], self.secret["data"]["key"])
        mount = {m["mountPath"]: m for m in self.node["volumeMounts"]}["/etc/spegel/router"]
        self.assertTrue(mount["readOnly"])
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        self.assertEqual(volume["secret"]["secretName"], "spegel-router-key")
        self.assertEqual(flag_values(self.node_args())["--router-secret-file"], "/etc/spegel/router/key")

    def test_key_rotation_and_no_key(self) -> None:
        rotating = documents(render({"spegel": {"routerSecret": {"previousKey": "old"}}}, tmp=self.temp()))
        pod = find(rotating, "DaemonSet", "spegel")["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "router-secret"]
        self.assertEqual([i["key"] for i in volume["secret"]["items"]], ["key", "old"])
        node = container(pod, "spegel")
        self.assertEqual(
            flag_values(expand(node))["--router-secret-file"], "/etc/spegel/router/key,/etc/spegel/router/old"
        )
        keyless = documents(render({"spegel": {"routerSecret": {"create": False}}}, tmp=self.temp()))
        self.assertNotIn("Secret", [d["kind"] for d in keyless])
        pod = find(keyless, "DaemonSet", "spegel")["spec"]["template"]["spec"]
        self.assertNotIn("router-secret", [v["name"] for v in pod["volumes"]])
        self.assertNotIn("--router-secret-file", flag_values(expand(container(pod, "spegel"))))

    def test_configuration_flags_accepted(self) -> None:
        self.assertEqual(self.init["command"], ["spegel"])
        try:
            command, parsed = spegel_args(expand(self.init))
        except UsageError as e:
            self.fail(f"spegel refused the init container's arguments: {e}")
        self.assertEqual(command, "configuration")
        self.assertIn("https://docker.io", parsed["mirrored-registries"])
        self.assertEqual(parsed["mirror-targets"], (f"http://{NODE_IP}:30020",))
        self.assertEqual(parsed["preflight"], "strict")

    def test_same_registries(self) -> None:
        configured = flag_values(expand(self.init))["--mirrored-registries"]
        served = flag_values(self.node_args())["--mirrored-registries"]
        self.assertEqual(configured, served)
        self.assertIn("https://docker.io", configured.split(","))

    def ports(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.node["ports"]}

    def test_ports_match_flags(self) -> None:
        flags = flag_values(self.node_args())
        ports = self.ports()
        self.assertEqual(flags["--registry-addr"], f":{ports['registry']['containerPort']}")
        self.assertEqual(flags["--router-addr"], f":{ports['router']['containerPort']}")
        self.assertEqual(flags["--metrics-addr"], f":{ports['metrics']['containerPort']}")
        self.assertEqual(ports["router"]["protocol"], "UDP")

    def test_mirror_target_is_host_port(self) -> None:
        """
        containerd on the node reaches this node's pod: node IP and the registry's hostPort.
        """
        self.assertNotIn("hostNetwork", self.pod)
        target = flag_values(expand(self.init))["--mirror-targets"]
        self.assertEqual(target, f"http://{NODE_IP}:{self.ports()['registry']['hostPort']}")
        (variable,) = [v for v in self.init["env"] if v["name"] == "NODE_IP"]
        self.assertEqual(variable["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP")

    def test_probes(self) -> None:
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            self.assertEqual(self.node[probe]["httpGet"], {"path": path, "port": "registry"}, probe)

    def mounts(self, c: dict[str, Any]) -> dict[str, dict[str, Any]]:
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in c["volumeMounts"]}

    def test_node_mounts_match_flags(self) -> None:
        flags = flag_values(self.node_args())
        mounts = self.mounts(self.node)
        socket = mounts[flags["--containerd-sock"]]
        self.assertEqual(socket["volume"]["hostPath"], {"path": flags["--containerd-sock"], "type": "Socket"})
        content = mounts[flags["--containerd-content-path"]]
        self.assertIs(content["readOnly"], True)
        self.assertEqual(content["volume"]["hostPath"]["path"], flags["--containerd-content-path"])
        self.assertIn("hostPath", mounts[flags["--data-dir"]]["volume"])
        self.assertIs(self.node["securityContext"]["readOnlyRootFilesystem"], True)
        self.assertIn("emptyDir", mounts["/tmp"]["volume"])

    def test_init_mounts_config_path(self) -> None:
        path = flag_values(expand(self.init))["--containerd-registry-config-path"]
        self.assertEqual(path, "/etc/containerd/certs.d")
        mounts = self.mounts(self.init)
        self.assertEqual(mounts[path]["volume"]["hostPath"]["path"], path)
        self.assertNotIn("readOnly", mounts[path])

    def test_preflight_reads_what_is_mounted(self) -> None:
        """
        The init container and the node read containerd's configuration from a read-only
        mount of the node's /etc/containerd, and the init container asks containerd itself.
        """
        init_flags = flag_values(expand(self.init))
        node_flags = flag_values(self.node_args())
        for c, flags in ((self.init, init_flags), (self.node, node_flags)):
            self.assertEqual(flags["--containerd-config-file"], "/etc/containerd/config.toml")
            etc = self.mounts(c)["/etc/containerd"]
            self.assertIs(etc["readOnly"], True)
            self.assertEqual(etc["volume"]["hostPath"]["path"], "/etc/containerd")
        socket = self.mounts(self.init)[init_flags["--containerd-sock"]]
        self.assertEqual(socket["volume"]["hostPath"]["type"], "Socket")
        self.assertEqual(
            node_flags["--containerd-registry-config-path"], init_flags["--containerd-registry-config-path"]
        )

    def test_selectors(self) -> None:
        labels = self.daemonset["spec"]["template"]["metadata"]["labels"]
        selector = self.daemonset["spec"]["selector"]["matchLabels"]
        self.assertLessEqual(selector.items(), labels.items())
        for name in ("spegel-bootstrap", "spegel-metrics"):
            service_selector = find(self.documents, "Service", name)["spec"]["selector"]
            self.assertLessEqual(service_selector.items(), labels.items(), name)

    def test_bootstrap_service(self) -> None:
        service = find(self.documents, "Service", "spegel-bootstrap")
        self.assertEqual(service["spec"]["clusterIP"], "None")
        self.assertIs(service["spec"]["publishNotReadyAddresses"], True)
        flags = flag_values(self.node_args())
        self.assertEqual(flags["--bootstrap-kind"], "dns")
        self.assertEqual(flags["--dns-bootstrap-domain"], "spegel-bootstrap.spegel.svc.cluster.local")

    def test_metrics_service(self) -> None:
        (port,) = find(self.documents, "Service", "spegel-metrics")["spec"]["ports"]
        self.assertEqual((port["port"], port["targetPort"]), (9090, "metrics"))
        self.assertIn("metrics", self.ports())

    def test_service_account_has_no_token(self) -> None:
        self.assertIs(find(self.documents, "ServiceAccount", "spegel")["automountServiceAccountToken"], False)
        self.assertIs(self.pod["automountServiceAccountToken"], False)

    def test_defaults_at_parity(self) -> None:
        """
        The defaults operators of the reference chart expect.
        """
        self.assertEqual(self.pod["nodeSelector"], {"kubernetes.io/os": "linux"})
        self.assertEqual(self.pod["priorityClassName"], "system-node-critical")


# Values files a test renders and validates, each exercising templates the defaults leave out.
VALUES_FILES: dict[str, dict[str, Any]] = {
    "nodePort": {
        "service": {"registry": {"mode": "nodePort", "nodePort": 30021}},
        "spegel": {"additionalMirrorTargets": ["https://mirror.example.com"], "registryFilters": [":latest$"]},
    },
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {"enabled": True, "metricsNamespaceSelector": {"matchLabels": {"name": "monitoring"}}},
    },
    "everything-else": {
        "image": {"repository": "registry.example.com/spegel", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "pull"}],
        "serviceAccount": {"create": False, "name": "existing"},
        "podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "spegel", "operator": "In", "values": ["on"]}]}]}}},
        "commonLabels": {"team": "platform"},
        "spegel": {
            "mirroredRegistries": [],
            "persistence": {"enabled": False},
            "routerSecret": {"existingSecret": "spegel-router", "key": "key"},
            "debugWebEnabled": True,
            "containerdMirrorAdd": False,
            "logLevel": "debug",
        },
        "livenessProbe": {"enabled": False},
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraInitContainers": [{"name": "first", "image": "busybox", "command": ["true"]}],
    },
    "cleanup": {
        "nameOverride": "mirror",
        "namespaceOverride": "infra",
        "clusterDomain": "example.internal.",
        "imagePullSecrets": [{"name": "pull"}],
        "podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": {"kubernetes.io/os": "linux", "pool": "workers"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "spegel", "operator": "In", "values": ["on"]}]}]}}},
        "priorityClassName": "",
        "serviceAccount": {"create": False, "name": "existing"},
        "service": {"cleanup": {"port": 8081}},
        "cleanup": {"timeout": "9m", "interval": "500ms", "resources": {"requests": {"memory": "80Mi"}}},
        "spegel": {"containerdRegistryConfigPath": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"},
    },
}


class ValuesFilesTests(ChartTestCase):
    def render(self, name: str) -> list[dict[str, Any]]:
        return documents(render(VALUES_FILES[name], tmp=self.temp()))

    def test_validate_against_kubernetes_schemas(self) -> None:
        """
        Every render, defaults included, is valid for the Kubernetes versions the chart
        supports (strict: no unknown fields); the ServiceMonitor, a custom resource, is checked
        for the fields the Prometheus Operator needs.
        """
        import kubernetes_validate

        hooks_validated = []
        for name in ("defaults", *VALUES_FILES):
            docs = documents(render()) if name == "defaults" else self.render(name)
            for d in docs:
                if d["kind"] == "ServiceMonitor":
                    self.assertEqual(d["apiVersion"], "monitoring.coreos.com/v1")
                    self.assertEqual(d["spec"]["endpoints"][0]["port"], "metrics")
                    continue
                for version in KUBERNETES_VERSIONS:
                    try:
                        kubernetes_validate.validate(d, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(f"{name}: {d['kind']} {d['metadata']['name']} invalid for {version}: {e.message}")
                if is_hook(d):
                    hooks_validated.append((name, d["kind"]))
        # The post-delete hook (left out of k8s/spegel.yaml) is rendered, and checked, too.
        for name in ("defaults", "cleanup"):
            self.assertEqual(
                sorted(kind for values, kind in hooks_validated if values == name),
                ["DaemonSet", "Pod", "Service"],
                name,
            )

    def test_node_port_mode(self) -> None:
        docs = self.render("nodePort")
        service = find(docs, "Service", "spegel-registry")
        self.assertEqual(service["spec"]["type"], "NodePort")
        self.assertEqual(service["spec"]["trafficDistribution"], "PreferSameNode")
        self.assertEqual(service["spec"]["ports"][0]["nodePort"], 30021)
        pod = find(docs, "DaemonSet", "spegel")["spec"]["template"]["spec"]
        registry = [p for p in container(pod, "spegel")["ports"] if p["name"] == "registry"][0]
        self.assertNotIn("hostPort", registry)
        _, parsed = spegel_args(expand(container(pod, "configuration", init=True)))
        self.assertEqual(parsed["mirror-targets"], (f"http://{NODE_IP}:30021", "https://mirror.example.com"))
        node = flag_values(expand(container(pod, "spegel"))[3:])
        self.assertEqual(node["--registry-filters"], ":latest$")

    def test_everything_else(self) -> None:
        from spegel.tap import Options

        docs = self.render("everything-else")
        self.assertNotIn("ServiceAccount", [d["kind"] for d in docs])
        daemonset = find(docs, "DaemonSet", "spegel")
        self.assertEqual(daemonset["metadata"]["labels"]["team"], "platform")
        pod = daemonset["spec"]["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], "existing")
        self.assertEqual([c["name"] for c in pod["initContainers"]], ["first"])
        node = container(pod, "spegel")
        self.assertEqual(node["image"], "registry.example.com/spegel@sha256:" + "a" * 64)
        self.assertNotIn("livenessProbe", node)
        options = Options()
        # The key file exists only in the pod: the rest of the arguments must parse.
        options.parseOptions([a for a in expand(node)[3:] if not a.startswith("--router-secret-file")])
        self.assertIsNone(options.node.data_dir)
        self.assertTrue(options.node.debug_web_enabled)
        self.assertEqual(options.node.registry_filter.mirrored_registries, frozenset())
        secret = {m["mountPath"]: m for m in node["volumeMounts"]}["/etc/spegel/router"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == secret["name"]]
        self.assertEqual(volume["secret"]["secretName"], "spegel-router")
        self.assertEqual(flag_values(expand(node)[3:])["--router-secret-file"], "/etc/spegel/router/key")
        self.assertIn("extra", [v["name"] for v in pod["volumes"]])

    def test_dashboard_and_monitor(self) -> None:
        docs = self.render("monitoring")
        monitor = find(docs, "ServiceMonitor", "spegel")
        metrics = find(docs, "Service", "spegel-metrics")
        self.assertLessEqual(monitor["spec"]["selector"]["matchLabels"].items(), metrics["metadata"]["labels"].items())
        dashboard = json.loads(find(docs, "ConfigMap", "spegel-dashboard")["data"]["spegel.json"])
        self.assertEqual(dashboard["uid"], "spegel")
        policy = find(docs, "NetworkPolicy", "spegel")
        ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        self.assertEqual(ports, {"registry", "router", "metrics"})


class DashboardTests(SynchronousTestCase):
    def test_queries_name_exported_metrics(self) -> None:
        """
        Every metric the dashboard queries is one a node exports (histograms through their
        _bucket series), and it shows the figures operators ask for.
        """
        exported = _exported_metric_names()
        dashboard = json.loads((CHART / "dashboards" / "spegel.json").read_text())
        queried = set()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                queried |= set(re.findall(r"\b(spegel_[a-z_]+|http_[a-z_]+)\b", target["expr"]))
        self.assertTrue(queried)
        self.assertEqual(queried - exported, set())
        for needed in (
            "spegel_served_bytes_total",
            "spegel_mirror_requests_total",
            "spegel_resolve_duration_seconds_bucket",
            "spegel_advertised_content_digests",
            "spegel_dht_routing_table_contacts",
            "spegel_digest_mismatches_total",
        ):
            self.assertIn(needed, queried)


def _exported_metric_names() -> set[str]:
    """
    The series names of every metric a node exports.
    """
    from spegel.metrics import Metrics

    names = set()
    for metric in Metrics().registry.collect():
        for sample in metric.samples:
            names.add(sample.name)
        if metric.type == "histogram":
            names |= {metric.name + "_bucket", metric.name + "_sum", metric.name + "_count"}
        elif metric.type == "counter":
            names.add(metric.name + "_total")
        else:
            names.add(metric.name)
    return names


class BadValuesTests(ChartTestCase):
    def assertRefused(self, values: dict[str, Any], *fragments: str) -> None:
        e = self.assertRaises(HelmFailed, render, values, tmp=self.temp())
        for fragment in fragments:
            self.assertIn(fragment, str(e))

    def test_wrong_type(self) -> None:
        self.assertRefused({"spegel": {"mirrorResolveRetries": "three"}}, "/spegel/mirrorResolveRetries")
        self.assertRefused({"spegel": {"mirrorResolveTimeout": "fast"}}, "/spegel/mirrorResolveTimeout")
        self.assertRefused({"service": {"registry": {"nodePort": 70000}}}, "/service/registry/nodePort")

    def test_unknown_registry_url(self) -> None:
        for url in ("docker.io", "https://docker.io/", "ftp://x", "https://host:0"):
            self.assertRefused({"spegel": {"mirroredRegistries": [url]}}, "/spegel/mirroredRegistries/0")

    def test_misspelt_key(self) -> None:
        self.assertRefused({"spegel": {"mirroredRegistry": []}}, "mirroredRegistry")

    def test_cleanup_values(self) -> None:
        self.assertRefused({"cleanup": {"timeout": "soon"}}, "/cleanup/timeout")
        self.assertRefused({"cleanup": {"interval": "0s"}}, "/cleanup/interval")
        self.assertRefused({"cleanup": {"enable": False}}, "enable")
        self.assertRefused({"service": {"cleanup": {"port": 0}}}, "/service/cleanup/port")


PLACEMENT = ("imagePullSecrets", "priorityClassName", "securityContext", "nodeSelector", "tolerations", "affinity")


class CleanupHookTests(ChartTestCase):
    """
    The post-delete hook: a cleanup pod on every node the DaemonSet ran on, a headless Service
    listing them, and a pod that waits until each has said its node is clean.
    """

    def hook(self, *values: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """
        The render's documents other than the hook's, and the hook's by kind.
        """
        everything = documents(render(*values, tmp=self.temp()))
        hooks = {d["kind"]: d for d in everything if is_hook(d)}
        self.assertEqual(len(hooks), len([d for d in everything if is_hook(d)]))
        return [d for d in everything if not is_hook(d)], hooks

    def test_annotations(self) -> None:
        """
        Helm runs all three after deleting the release, the DaemonSet and Service before the
        wait pod it waits for, deletes them once that succeeded, and replaces leftovers.
        """
        _, hooks = self.hook()
        self.assertEqual(
            sorted((kind, d["metadata"]["name"]) for kind, d in hooks.items()),
            [("DaemonSet", "spegel-cleanup"), ("Pod", "spegel-cleanup-wait"), ("Service", "spegel-cleanup")],
        )
        weights = {}
        for kind, d in hooks.items():
            annotations = d["metadata"]["annotations"]
            self.assertEqual(annotations["helm.sh/hook"], "post-delete", kind)
            self.assertEqual(
                set(annotations["helm.sh/hook-delete-policy"].split(",")),
                {"before-hook-creation", "hook-succeeded"},
                kind,
            )
            weights[kind] = int(annotations["helm.sh/hook-weight"])
        self.assertLess(max(weights["DaemonSet"], weights["Service"]), weights["Pod"])

    def cleanup_container(self, hooks: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        pod = hooks["DaemonSet"]["spec"]["template"]["spec"]
        return pod, container(pod, "cleanup")

    def test_cleanup_pods(self) -> None:
        """
        `spegel cleanup` accepts the arguments, cleans the folder the init container wrote
        (mounted writable from the host), and serves /healthz where the probe and the Service
        look for it.
        """
        main, hooks = self.hook()
        pod, cleanup = self.cleanup_container(hooks)
        self.assertEqual(cleanup["command"], ["spegel"])
        try:
            command, parsed = spegel_args(cleanup["args"])
        except UsageError as e:
            self.fail(f"spegel refused the cleanup pod's arguments: {e}")
        self.assertEqual(command, "cleanup")
        init = container(find(main, "DaemonSet", "spegel")["spec"]["template"]["spec"], "configuration", init=True)
        configured = spegel_args(expand(init))[1]["containerd-registry-config-path"]
        self.assertEqual(parsed["containerd-registry-config-path"], configured)
        (mount,) = cleanup["volumeMounts"]
        (volume,) = pod["volumes"]
        self.assertEqual(mount["name"], volume["name"])
        self.assertEqual(mount["mountPath"], configured)
        self.assertNotIn("readOnly", mount)
        self.assertEqual(volume["hostPath"]["path"], configured)
        (port,) = cleanup["ports"]
        self.assertEqual((parsed["serve-addr"].host, parsed["serve-addr"].port), ("", port["containerPort"]))
        self.assertEqual(cleanup["readinessProbe"]["httpGet"], {"path": "/healthz", "port": port["name"]})
        (service_port,) = hooks["Service"]["spec"]["ports"]
        self.assertEqual((service_port["port"], service_port["targetPort"]), (port["containerPort"], port["name"]))

    def test_wait_pod_probes_the_cleanup_service(self) -> None:
        _, hooks = self.hook()
        wait = hooks["Pod"]["spec"]
        self.assertIn(wait["restartPolicy"], ("Never", "OnFailure"))
        (waiter,) = wait["containers"]
        self.assertEqual(waiter["command"], ["spegel"])
        try:
            command, parsed = spegel_args(waiter["args"])
        except UsageError as e:
            self.fail(f"spegel refused the wait pod's arguments: {e}")
        self.assertEqual(command, "cleanup-wait")
        (endpoint,) = parsed["probe-endpoints"]
        service = hooks["Service"]
        name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        self.assertEqual(endpoint, (name, service["spec"]["ports"][0]["port"]))
        self.assertEqual(service["spec"]["clusterIP"], "None")
        self.assertIs(service["spec"]["publishNotReadyAddresses"], True)
        self.assertEqual((parsed["timeout"], parsed["interval"]), (240.0, 2.0))

    def test_selectors(self) -> None:
        """
        The cleanup DaemonSet and Service select the cleanup pods, and nothing else selects
        them or the wait pod: not the cleanup Service, and none of the release's selectors
        (its DaemonSet must not adopt them, its Services must not route to them).
        """
        main, hooks = self.hook()
        cleanup_labels = hooks["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
        wait_labels = hooks["Pod"]["metadata"]["labels"]
        selector = hooks["DaemonSet"]["spec"]["selector"]["matchLabels"]
        self.assertLessEqual(selector.items(), cleanup_labels.items())
        self.assertLessEqual(hooks["Service"]["spec"]["selector"].items(), cleanup_labels.items())
        self.assertFalse(hooks["Service"]["spec"]["selector"].items() <= wait_labels.items())
        main_selectors = [find(main, "DaemonSet", "spegel")["spec"]["selector"]["matchLabels"]]
        main_selectors += [d["spec"]["selector"] for d in main if d["kind"] == "Service"]
        for main_selector in main_selectors:
            for labels in (cleanup_labels, wait_labels):
                self.assertFalse(main_selector.items() <= labels.items(), (main_selector, labels))

    def assertPlacedLikeDaemonSet(self, main: list[dict[str, Any]], hooks: dict[str, dict[str, Any]]) -> None:
        (daemonset,) = [d for d in main if d["kind"] == "DaemonSet"]
        pod = daemonset["spec"]["template"]["spec"]
        node = container(pod, "spegel")
        for hook_pod, hook_container in (
            self.cleanup_container(hooks),
            (hooks["Pod"]["spec"], hooks["Pod"]["spec"]["containers"][0]),
        ):
            for key in PLACEMENT:
                self.assertEqual(hook_pod.get(key), pod.get(key), key)
            self.assertIs(hook_pod["automountServiceAccountToken"], False)
            self.assertEqual(hook_container["image"], node["image"])
            self.assertEqual(hook_container["imagePullPolicy"], node["imagePullPolicy"])
            self.assertEqual(hook_container["securityContext"], node["securityContext"])
            self.assertLessEqual(hook_container["resources"]["requests"].keys(), {"cpu", "memory"})

    def test_placed_like_the_daemonset(self) -> None:
        self.assertPlacedLikeDaemonSet(*self.hook())

    def test_service_account(self) -> None:
        """
        The chart's ServiceAccount is deleted before post-delete hooks run, and a pod naming a
        missing one is refused: the hook uses the namespace's default, or the operator's own.
        """
        main, hooks = self.hook()
        self.assertIn("ServiceAccount", [d["kind"] for d in main])
        for pod in (hooks["DaemonSet"]["spec"]["template"]["spec"], hooks["Pod"]["spec"]):
            self.assertEqual(pod["serviceAccountName"], "default")
        _, hooks = self.hook({"serviceAccount": {"create": False, "name": "existing"}})
        for pod in (hooks["DaemonSet"]["spec"]["template"]["spec"], hooks["Pod"]["spec"]):
            self.assertEqual(pod["serviceAccountName"], "existing")

    def test_other_values(self) -> None:
        """
        Names, namespace, cluster domain, port, config path, timing and placement follow the
        values.
        """
        main, hooks = self.hook(VALUES_FILES["cleanup"])
        self.assertPlacedLikeDaemonSet(main, hooks)
        for d in hooks.values():
            self.assertEqual(d["metadata"]["namespace"], "infra")
        pod, cleanup = self.cleanup_container(hooks)
        path = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
        self.assertEqual(
            cleanup["args"],
            ["cleanup", f"--containerd-registry-config-path={path}", "--serve-addr=:8081"],
        )
        self.assertEqual(pod["volumes"][0]["hostPath"]["path"], path)
        self.assertEqual(cleanup["volumeMounts"][0]["mountPath"], path)
        self.assertEqual(pod["serviceAccountName"], "existing")
        _, parsed = spegel_args(hooks["Pod"]["spec"]["containers"][0]["args"])
        self.assertEqual(parsed["probe-endpoints"], (("spegel-mirror-cleanup.infra.svc.example.internal", 8081),))
        self.assertEqual(hooks["Service"]["metadata"]["name"], "spegel-mirror-cleanup")
        self.assertEqual((parsed["timeout"], parsed["interval"]), (540.0, 0.5))
        # Helm merges maps: the default limit and cpu request stay.
        self.assertEqual(cleanup["resources"]["requests"], {"cpu": "10m", "memory": "80Mi"})

    def test_only_when_nodes_were_configured(self) -> None:
        for values in ({"cleanup": {"enabled": False}}, {"spegel": {"containerdMirrorAdd": False}}):
            _, hooks = self.hook(values)
            self.assertEqual(hooks, {}, values)
