# -*- test-case-name: tests.test_k8s -*-
"""
Tests for the manifests in k8s/: every flag they pass is one the code accepts, and the ports,
probes, mounts and bootstrap domain agree with each other.

PyYAML is not a dependency, so the manifests are written in a small block-YAML subset and read
with L{parse_yaml} below, which refuses anything outside that subset (anchors, flow
collections, block scalars, inline comments, YAML 1.1 booleans such as C{yes}) rather than
guessing at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from spegel.cli import UsageError, build_parser
from spegel.hostsconfig import parse_registry_url

K8S = Path(__file__).parent.parent / "k8s"
NODE_IP = "10.0.0.5"


class YAMLSubsetError(ValueError):
    """
    The text uses YAML this parser does not support.
    """


_KEY = re.compile(r"[A-Za-z0-9_./-]+")
_INT = re.compile(r"-?(0|[1-9][0-9]*)")
# Unquoted words YAML 1.1 parsers (and some Kubernetes tooling) would read as booleans.
_YAML11_BOOLEANS = frozenset({"yes", "no", "on", "off", "y", "n"})


def parse_yaml(text: str) -> list[Any]:
    """
    The documents of a multi-document YAML text in the supported subset.

    @raise YAMLSubsetError: naming the line that is outside the subset.
    """
    documents: list[list[tuple[int, int, str]]] = [[]]
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise YAMLSubsetError(f"line {number}: tab")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw == "---":
            documents.append([])
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        documents[-1].append((number, indent, stripped))
    parsed = []
    for lines in documents:
        if not lines:
            continue
        value, end = _parse_block(lines, 0, lines[0][1])
        if end != len(lines):
            raise YAMLSubsetError(f"line {lines[end][0]}: unexpected indentation")
        parsed.append(value)
    return parsed


def _parse_block(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    number, _, text = lines[i]
    if text == "-" or text.startswith("- "):
        return _parse_sequence(lines, i, indent)
    return _parse_mapping(lines, i, indent)


def _parse_sequence(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    items = []
    while i < len(lines) and lines[i][1] == indent:
        number, _, text = lines[i]
        if not text.startswith("- "):
            raise YAMLSubsetError(f"line {number}: expected '- ' in a sequence")
        rest = text[2:]
        if _split_key(rest) is not None:
            # "- key: value": a mapping whose further keys are indented to line up with "key".
            lines[i] = (number, indent + 2, rest)
            value, i = _parse_mapping(lines, i, indent + 2)
        else:
            value, i = _scalar(rest, number), i + 1
        items.append(value)
    return items, i


def _parse_mapping(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][1] == indent:
        number, _, text = lines[i]
        split = _split_key(text)
        if split is None:
            raise YAMLSubsetError(f"line {number}: expected 'key: value'")
        key, rest = split
        if key in mapping:
            raise YAMLSubsetError(f"line {number}: duplicate key {key!r}")
        if rest:
            mapping[key], i = _scalar(rest, number), i + 1
        elif i + 1 < len(lines) and lines[i + 1][1] > indent:
            mapping[key], i = _parse_block(lines, i + 1, lines[i + 1][1])
        else:
            raise YAMLSubsetError(f"line {number}: {key!r} has no value (write null)")
    if i < len(lines) and lines[i][1] > indent:
        raise YAMLSubsetError(f"line {lines[i][0]}: unexpected indentation")
    return mapping, i


def _split_key(text: str) -> tuple[str, str] | None:
    key, sep, rest = text.partition(":")
    if not sep or (rest and not rest.startswith(" ")) or _KEY.fullmatch(key) is None:
        return None
    return key, rest.strip()


def _scalar(text: str, number: int) -> Any:
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError:
            raise YAMLSubsetError(f"line {number}: bad double-quoted string") from None
        return value
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'") or "'" in text[1:-1].replace("''", ""):
            raise YAMLSubsetError(f"line {number}: bad single-quoted string")
        return text[1:-1].replace("''", "'")
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text[0] in "[]{}&*!|>%@`,?:#" or ": " in text or " #" in text or text.endswith(":"):
        raise YAMLSubsetError(f"line {number}: {text!r} is outside the supported subset")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if text.lower() in _YAML11_BOOLEANS:
        raise YAMLSubsetError(f"line {number}: quote {text!r}, YAML 1.1 reads it as a boolean")
    if _INT.fullmatch(text):
        return int(text)
    if re.fullmatch(r"-?[0-9][0-9_.eE+-]*", text):
        raise YAMLSubsetError(f"line {number}: quote {text!r}, its type is ambiguous")
    return text


def load(name: str) -> list[dict[str, Any]]:
    return parse_yaml((K8S / name).read_text())


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(matches) != 1:
        raise AssertionError(f"expected one {kind} {name}, found {len(matches)}")
    return matches[0]


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    containers = pod["initContainers" if init else "containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def expand(c: dict[str, Any], documents: list[dict[str, Any]]) -> list[str]:
    """
    C{c}'s args with C{$(VAR)} replaced as the kubelet would, from its env: literal values,
    ConfigMap keys from C{documents}, and a node IP for C{status.hostIP}. An undefined
    variable fails the test: the kubelet would leave C{$(VAR)} in place, silently.
    """
    env = {}
    for variable in c.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            configmap = find(documents, "ConfigMap", ref["name"])
            env[variable["name"]] = configmap["data"][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "status.hostIP":
            env[variable["name"]] = NODE_IP
        else:
            raise AssertionError(f"unsupported env source {source}")

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) not in env:
            raise AssertionError(f"{c['name']}: $({match.group(1)}) is not defined in its env")
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, arg) for arg in c["args"]]


def flag_values(args: list[str]) -> dict[str, str]:
    values = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and sep:
            values[name] = value
    return values


class ParserTests(SynchronousTestCase):
    """
    The subset parser reads what the manifests use and refuses what it does not understand.
    """

    def test_reads_subset(self) -> None:
        text = (
            "# comment\n---\na: 1\nb:\n  c: 'it''s'\n  d:\n    - x\n    - k: \"v\"\n      m: true\n"
            "  e: []\n  f: http://$(X):1\n---\n- --flag=\n"
        )
        self.assertEqual(
            parse_yaml(text),
            [
                {
                    "a": 1,
                    "b": {
                        "c": "it's",
                        "d": ["x", {"k": "v", "m": True}],
                        "e": [],
                        "f": "http://$(X):1",
                    },
                },
                ["--flag="],
            ],
        )

    def test_refuses_outside_subset(self) -> None:
        for text in (
            "a: &anchor 1\n",
            "a: [1, 2]\n",
            "a: |\n  x\n",
            "a: 1 # comment\n",
            "a: yes\n",
            "a: 0755\n",
            "a: 1.5\n",
            "a:\n",
            "a: 1\na: 2\n",
            "a:\n  b: 1\n   c: 2\n",
            "a:\n\tb: 1\n",
            "a: x: y\n",
        ):
            self.assertRaises(YAMLSubsetError, parse_yaml, text)


class ManifestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.documents = load("spegel.yaml")
        self.daemonset = find(self.documents, "DaemonSet", "spegel")
        self.pod = self.daemonset["spec"]["template"]["spec"]
        self.node = container(self.pod, "spegel")
        self.init = container(self.pod, "configuration", init=True)

    def node_args(self) -> list[str]:
        """
        The node container's arguments after C{twistd -n --pidfile= spegel}.
        """
        self.assertEqual(self.node["command"], ["twistd"])
        self.assertEqual(self.node["args"][:3], ["-n", "--pidfile=", "spegel"])
        return expand(self.node, self.documents)[3:]

    def test_kinds_and_namespace(self) -> None:
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in self.documents)
        self.assertEqual(
            kinds,
            [
                ("ConfigMap", "spegel"),
                ("DaemonSet", "spegel"),
                ("Namespace", "spegel"),
                ("Service", "spegel-bootstrap"),
                ("Service", "spegel-metrics"),
                ("ServiceAccount", "spegel"),
            ],
        )
        for d in self.documents:
            if d["kind"] != "Namespace":
                self.assertEqual(d["metadata"]["namespace"], "spegel", d["kind"])
        self.assertEqual(self.pod["serviceAccountName"], "spegel")

    def test_node_flags_are_known(self) -> None:
        """
        Every --flag the DaemonSet passes to the node is one spegel.tap.Options declares.
        """
        from spegel.tap import Options

        known = set()
        for parameter in Options.optParameters:
            known.add(parameter[0])
        for flag in getattr(Options, "optFlags", []):
            known.add(flag[0])
        args = self.node_args()
        self.assertTrue(args)
        for arg in args:
            self.assertTrue(arg.startswith("--"), arg)
            name = arg[2:].partition("=")[0]
            self.assertIn(name, known, f"the node does not accept --{name}")

    def test_node_accepts_arguments(self) -> None:
        """
        The node's own option parser takes the DaemonSet's arguments, values included.
        """
        from spegel.tap import Options

        options = Options()
        try:
            options.parseOptions(self.node_args())
        except SystemExit as e:
            self.fail(f"spegel.tap.Options refused the DaemonSet's arguments (exit {e.code})")
        self.assertEqual(options["bootstrap-kind"], "dns")

    def test_configuration_flags_accepted(self) -> None:
        """
        The init container's command line is one `spegel configuration` accepts, and its URLs
        are valid.
        """
        self.assertEqual(self.init["command"], ["spegel"])
        args = expand(self.init, self.documents)
        try:
            parsed = build_parser().parse_args(args)
        except UsageError as e:
            self.fail(f"spegel refused the init container's arguments: {e}")
        self.assertEqual(parsed.command, "configuration")
        for url in parsed.mirrored_registries:
            parse_registry_url(url)
        self.assertEqual(parsed.mirror_targets, [f"http://{NODE_IP}:30020"])

    def test_same_registries(self) -> None:
        """
        containerd is only pointed at spegel for registries the node agrees to serve.
        """
        configured = flag_values(expand(self.init, self.documents))["--mirrored-registries"]
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
        self.assertEqual(
            (
                ports["registry"]["containerPort"],
                ports["router"]["containerPort"],
                ports["metrics"]["containerPort"],
            ),
            (5000, 5001, 9090),
        )
        self.assertEqual(ports["router"]["protocol"], "UDP")

    def test_mirror_target_is_host_port(self) -> None:
        """
        containerd on the node reaches this node's pod: node IP and the registry's hostPort.
        """
        self.assertNotIn("hostNetwork", self.pod)
        target = flag_values(expand(self.init, self.documents))["--mirror-targets"]
        self.assertEqual(target, f"http://{NODE_IP}:{self.ports()['registry']['hostPort']}")
        for variable in self.init["env"]:
            if variable["name"] == "NODE_IP":
                self.assertEqual(variable["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP")

    def test_probes(self) -> None:
        self.assertEqual(
            self.node["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "registry"}
        )
        self.assertEqual(
            self.node["livenessProbe"]["httpGet"], {"path": "/livez", "port": "registry"}
        )

    def mounts(self, c: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """
        C{c}'s mounts by path, each with the volume it mounts.
        """
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in c["volumeMounts"]}

    def test_node_mounts_match_flags(self) -> None:
        flags = flag_values(self.node_args())
        mounts = self.mounts(self.node)
        socket = mounts[flags["--containerd-sock"]]
        self.assertEqual(
            socket["volume"]["hostPath"], {"path": flags["--containerd-sock"], "type": "Socket"}
        )
        content = mounts[flags["--containerd-content-path"]]
        self.assertIs(content["readOnly"], True)
        self.assertEqual(
            content["volume"]["hostPath"]["path"],
            "/var/lib/containerd/io.containerd.content.v1.content",
        )
        self.assertIn("hostPath", mounts[flags["--data-dir"]]["volume"])
        self.assertIs(self.node["securityContext"]["readOnlyRootFilesystem"], True)
        self.assertIn("emptyDir", mounts["/tmp"]["volume"])

    def test_init_mounts_config_path(self) -> None:
        flags = flag_values(expand(self.init, self.documents))
        path = flags["--containerd-registry-config-path"]
        self.assertEqual(path, "/etc/containerd/certs.d")
        mounts = self.mounts(self.init)
        self.assertEqual(mounts[path]["volume"]["hostPath"]["path"], path)
        self.assertNotIn("readOnly", mounts[path])

    def test_preflight_reads_what_is_mounted(self) -> None:
        """
        The init container and the node read containerd's configuration from a read-only
        mount of the node's /etc/containerd, and the init container asks containerd itself.
        """
        init_flags = flag_values(expand(self.init, self.documents))
        node_flags = flag_values(self.node_args())
        for container, flags in ((self.init, init_flags), (self.node, node_flags)):
            config_file = flags["--containerd-config-file"]
            self.assertEqual(config_file, "/etc/containerd/config.toml")
            etc = self.mounts(container)["/etc/containerd"]
            self.assertIs(etc["readOnly"], True)
            self.assertEqual(etc["volume"]["hostPath"]["path"], "/etc/containerd")
        self.assertEqual(init_flags["--preflight"], "strict")
        socket = self.mounts(self.init)[init_flags["--containerd-sock"]]
        self.assertEqual(socket["volume"]["hostPath"]["type"], "Socket")
        self.assertEqual(node_flags["--containerd-registry-config-path"], init_flags["--containerd-registry-config-path"])

    def test_selectors(self) -> None:
        labels = self.daemonset["spec"]["template"]["metadata"]["labels"]
        selector = self.daemonset["spec"]["selector"]["matchLabels"]
        self.assertLessEqual(selector.items(), labels.items())
        for name in ("spegel-bootstrap", "spegel-metrics"):
            service_selector = find(self.documents, "Service", name)["spec"]["selector"]
            self.assertLessEqual(service_selector.items(), labels.items(), name)

    def test_bootstrap_service(self) -> None:
        """
        The DNS bootstrap domain is the headless Service, which lists pods before they are ready.
        """
        service = find(self.documents, "Service", "spegel-bootstrap")
        self.assertEqual(service["spec"]["clusterIP"], "None")
        self.assertIs(service["spec"]["publishNotReadyAddresses"], True)
        flags = flag_values(self.node_args())
        self.assertEqual(flags["--bootstrap-kind"], "dns")
        namespace = service["metadata"]["namespace"]
        self.assertEqual(
            flags["--dns-bootstrap-domain"], f"spegel-bootstrap.{namespace}.svc.cluster.local"
        )

    def test_metrics_service(self) -> None:
        (port,) = find(self.documents, "Service", "spegel-metrics")["spec"]["ports"]
        self.assertEqual((port["port"], port["targetPort"]), (9090, "metrics"))
        self.assertIn("metrics", self.ports())

    def test_service_account_has_no_token(self) -> None:
        self.assertIs(
            find(self.documents, "ServiceAccount", "spegel")["automountServiceAccountToken"], False
        )
        self.assertIs(self.pod["automountServiceAccountToken"], False)


class CleanupManifestTests(SynchronousTestCase):
    def test_cleanup_command(self) -> None:
        documents = load("cleanup.yaml")
        daemonset = find(documents, "DaemonSet", "spegel-cleanup")
        pod = daemonset["spec"]["template"]["spec"]
        init = container(pod, "cleanup", init=True)
        self.assertEqual(init["command"], ["spegel"])
        parsed = build_parser().parse_args(expand(init, documents))
        self.assertEqual(parsed.command, "cleanup")
        (mount,) = init["volumeMounts"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        self.assertEqual(mount["mountPath"], parsed.containerd_registry_config_path)
        self.assertEqual(volume["hostPath"]["path"], parsed.containerd_registry_config_path)
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        self.assertLessEqual(daemonset["spec"]["selector"]["matchLabels"].items(), labels.items())
