# -*- test-case-name: tests.e2e.test_e2e_node -*-
"""
End-to-end tests of a real spegel node: real containerd daemons pull through it with the upstream
registry stopped, and its registry port is probed with good and bad HTTP requests.

One loopback cluster (an upstream registry, two containerd daemons, two nodes) is shared by the
whole module and started by the first test that needs it; every process is killed at exit.
Tests that stop the upstream registry start it again before they return.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse

from twisted.trial.unittest import TestCase

from spegel_testing.cluster import Cluster
from spegel_testing.images import LINUX_AMD64, MediaFormat, TestImage, build_image, build_index
from spegel_testing.node import SpegelNode
from spegel_testing.process import CommandFailed
from spegel_testing.containerd import ContainerdBuild, per_containerd
from spegel_testing.shared import Shared

# Big enough to make ranges and streaming meaningful, small enough to stay fast.
LAYER_SIZES = (256 * 1024, 64 * 1024)
HTTP_REPO = "e2e/http"
HTTP_IMAGE = build_image(seed="e2e-http", layer_sizes=(300 * 1024,))


def _startCluster(build: ContainerdBuild) -> Cluster:
    cluster = Cluster(2, containerd_build=build)
    cluster.start()
    try:
        # Node 0 holds HTTP_IMAGE for the HTTP tests; node 1's containerd mirrors through node 0.
        ref = cluster.registry.push_image(HTTP_REPO, "v1", HTTP_IMAGE)
        cluster.pull(0, ref)
        cluster.configure_mirrors(1, [0])
    except BaseException:
        cluster.stop()
        raise
    return cluster


_cluster = Shared(_startCluster, Cluster.stop)


class PullThroughNodeTests(TestCase):
    """
    Node 1's containerd, configured by C{spegel configuration}, pulls an image that only node 0's
    containerd holds, through node 0, with the upstream registry stopped.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    def setUp(self) -> None:
        self.cluster = _cluster.get(self.containerd_build)
        self.node = self.cluster.nodes[0]

    def assertHolds(self, index: int, ref: str, image: TestImage, digests: set[str]) -> None:
        """
        containerd C{index} has image C{ref} at C{image}'s digest and every blob of C{digests},
        byte for byte.
        """
        daemon = self.cluster.containerds[index]
        self.assertEqual(daemon.image_digest(ref), image.digest)
        self.assertEqual(digests - daemon.content_digests(), set())
        for digest in digests:
            self.assertEqual(daemon.read_content(digest), image.blob(digest).read(), digest)

    def pullThrough(self, repo: str, image: TestImage, **pullArgs: object) -> None:
        """
        Push C{image} upstream, pull it on node 0, stop upstream, then pull it on node 1 by tag,
        remove it there, and pull it by digest; both pulls must end with node 0's digests and
        node 0's metrics must count the bytes it served.
        """
        cluster = self.cluster
        registry = cluster.registry
        platform = None if pullArgs.get("all_platforms") else LINUX_AMD64
        if not image.is_index:
            platform = None
        digests = image.digests(platform)
        tagRef = registry.push_image(repo, "v1", image)
        digestRef = registry.ref(repo, image.digest)
        cluster.pull(0, tagRef, **pullArgs)
        self.assertHolds(0, tagRef, image, digests)
        self.assertIn(f"[host.'{self.node.registry_url}']", cluster.hosts_toml(1))
        self.assertIn(f"server = '{registry.url}'", cluster.hosts_toml(1))
        layerBytes = sum(image.blob(d).size for d in digests if image.blob(d) in image.layers)

        registry.stop()
        try:
            before = self.node.metrics()
            try:
                cluster.pull(1, tagRef, **pullArgs)
            except CommandFailed as e:
                self.fail(f"pull by tag through node 0 failed: {e}\n{cluster.dump_logs()}")
            self.assertHolds(1, tagRef, image, digests)
            afterTag = self.node.metrics()
            # Node 0 holds everything itself: all of it is served from its own containerd.
            served = afterTag.total("spegel_served_bytes_total", source="local") - before.total(
                "spegel_served_bytes_total", source="local"
            )
            self.assertGreaterEqual(served, layerBytes)
            self.assertGreater(
                afterTag.total("spegel_mirror_requests_total", cache="hit"),
                before.total("spegel_mirror_requests_total", cache="hit"),
            )

            cluster.containerds[1].remove_image(tagRef)
            self.assertEqual(digests & cluster.containerds[1].content_digests(), set())
            try:
                cluster.pull(1, digestRef, **pullArgs)
            except CommandFailed as e:
                self.fail(f"pull by digest through node 0 failed: {e}\n{cluster.dump_logs()}")
            self.assertHolds(1, digestRef, image, digests)
            afterDigest = self.node.metrics()
            served = afterDigest.total("spegel_served_bytes_total", source="local") - afterTag.total(
                "spegel_served_bytes_total", source="local"
            )
            self.assertGreaterEqual(served, layerBytes)
        finally:
            registry.start()

    def test_ociImage(self) -> None:
        """
        A single-platform OCI image.
        """
        self.pullThrough("e2e/oci", build_image(seed="e2e-oci", layer_sizes=LAYER_SIZES))

    def test_dockerImage(self) -> None:
        """
        A single-platform image with Docker media types (schema2 manifest, gzip'd rootfs diffs).
        """
        self.pullThrough("e2e/docker", build_image(seed="e2e-docker", layer_sizes=LAYER_SIZES, format=MediaFormat.DOCKER))

    def test_multiPlatformIndex(self) -> None:
        """
        An OCI index over linux/amd64 and linux/arm64, every platform pulled.
        """
        self.pullThrough("e2e/index", build_index(seed="e2e-index", layer_sizes=LAYER_SIZES), all_platforms=True)

    def test_dockerManifestListOnePlatform(self) -> None:
        """
        A Docker manifest list, only this machine's platform pulled.
        """
        self.pullThrough(
            "e2e/list", build_index(seed="e2e-list", layer_sizes=LAYER_SIZES, format=MediaFormat.DOCKER)
        )


def _ociError(testCase: TestCase, response, status: int | None = None) -> str:  # type: ignore[no-untyped-def]
    """
    Assert C{response} is a 4xx (or exactly C{status}) with an OCI error body; return its code.
    """
    if status is not None:
        testCase.assertEqual(response.status, status, response.body[:300])
    testCase.assertTrue(400 <= response.status < 500, f"{response.status} {response.body[:300]!r}")
    testCase.assertTrue(response.headers.get("content-type", "").startswith("application/json"), response.headers)
    document = json.loads(response.body)
    testCase.assertIsInstance(document["errors"], list)
    testCase.assertTrue(document["errors"])
    error = document["errors"][0]
    testCase.assertIsInstance(error["message"], str)
    return error["code"]


class LiveNodeHTTPTests(TestCase):
    """
    Node 0's registry port answers distribution API requests for what its containerd holds.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    def setUp(self) -> None:
        self.cluster = _cluster.get(self.containerd_build)
        self.node = self.cluster.nodes[0]
        self.ns = urllib.parse.quote(self.cluster.registry.host, safe="")
        self.layer = HTTP_IMAGE.layers[0]
        self.layerBytes = self.layer.read()
        self.blobPath = f"/v2/{HTTP_REPO}/blobs/{self.layer.digest}?ns={self.ns}"

    def get(self, path: str, method: str = "GET", **headers: str):  # type: ignore[no-untyped-def]
        return self.node.request(method, path, headers=headers)

    def test_v2(self) -> None:
        """
        C{GET /v2/} answers 200: the API version check.
        """
        self.assertEqual(self.get("/v2/").status, 200)

    def test_wholeBlob(self) -> None:
        """
        A blob comes back whole, with its length, digest and C{Accept-Ranges}.
        """
        response = self.get(self.blobPath)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, self.layerBytes)
        self.assertEqual(response.headers["content-length"], str(self.layer.size))
        self.assertEqual(response.headers["docker-content-digest"], self.layer.digest)
        self.assertEqual(response.headers["accept-ranges"], "bytes")

    def test_ranges(self) -> None:
        """
        C{bytes=a-b}, C{bytes=a-} and C{bytes=-n} answer 206 with C{Content-Range} and exactly
        those bytes; an end past the size is clamped.
        """
        size = self.layer.size
        cases = {
            "bytes=0-0": (0, 0),
            "bytes=100-4195": (100, 4195),
            f"bytes={size - 10}-": (size - 10, size - 1),
            "bytes=-1000": (size - 1000, size - 1),
            f"bytes=5-{size * 2}": (5, size - 1),
            f"bytes=-{size * 3}": (0, size - 1),
        }
        for header, (first, last) in cases.items():
            response = self.get(self.blobPath, Range=header)
            self.assertEqual(response.status, 206, header)
            self.assertEqual(response.headers["content-range"], f"bytes {first}-{last}/{size}", header)
            self.assertEqual(response.headers["content-length"], str(last - first + 1), header)
            self.assertEqual(response.body, self.layerBytes[first : last + 1], header)

    def test_unsatisfiableRange(self) -> None:
        """
        A range starting at or past the end answers 416 with an OCI error.
        """
        for header in (f"bytes={self.layer.size}-", f"bytes={self.layer.size + 5}-{self.layer.size + 9}", "bytes=-0"):
            response = self.get(self.blobPath, Range=header)
            _ociError(self, response, 416)
            self.assertEqual(response.headers.get("content-range"), f"bytes */{self.layer.size}")

    def test_heads(self) -> None:
        """
        HEAD of a blob, a manifest by tag and by digest: the GET's headers, no body.
        """
        blob = self.get(self.blobPath, "HEAD")
        self.assertEqual((blob.status, blob.body), (200, b""))
        self.assertEqual(blob.headers["content-length"], str(self.layer.size))
        self.assertEqual(blob.headers["docker-content-digest"], self.layer.digest)
        for reference in ("v1", HTTP_IMAGE.digest):
            path = f"/v2/{HTTP_REPO}/manifests/{reference}?ns={self.ns}"
            head = self.get(path, "HEAD")
            self.assertEqual((head.status, head.body), (200, b""), reference)
            self.assertEqual(head.headers["docker-content-digest"], HTTP_IMAGE.digest)
            self.assertEqual(head.headers["content-type"], HTTP_IMAGE.media_type)
            self.assertEqual(head.headers["content-length"], str(HTTP_IMAGE.root.size))
            get = self.get(path)
            self.assertEqual(get.body, HTTP_IMAGE.root.read())
            self.assertEqual(get.headers["content-type"], HTTP_IMAGE.media_type)

    def test_configBlob(self) -> None:
        """
        The config is served as a blob too.
        """
        config = HTTP_IMAGE.configs[0]
        response = self.get(f"/v2/{HTTP_REPO}/blobs/{config.digest}?ns={self.ns}")
        self.assertEqual((response.status, response.body), (200, config.read()))

    def test_unknownDigests(self) -> None:
        """
        Content the node does not hold is a 404 with C{BLOB_UNKNOWN} or C{MANIFEST_UNKNOWN}, so
        containerd falls back to the next host.
        """
        missing = "sha256:" + "0" * 64
        self.assertEqual(_ociError(self, self.get(f"/v2/{HTTP_REPO}/blobs/{missing}?ns={self.ns}"), 404), "BLOB_UNKNOWN")
        self.assertEqual(
            _ociError(self, self.get(f"/v2/{HTTP_REPO}/manifests/{missing}?ns={self.ns}"), 404), "MANIFEST_UNKNOWN"
        )
        self.assertEqual(
            _ociError(self, self.get(f"/v2/{HTTP_REPO}/manifests/nosuchtag?ns={self.ns}"), 404), "MANIFEST_UNKNOWN"
        )
        head = self.get(f"/v2/{HTTP_REPO}/blobs/{missing}?ns={self.ns}", "HEAD")
        self.assertEqual((head.status, head.body), (404, b""))

    def test_unmirroredRegistry(self) -> None:
        """
        A C{?ns=} registry not in C{--mirrored-registries} is a 404, even for content the node
        holds.
        """
        path = f"/v2/{HTTP_REPO}/manifests/v1?ns=" + urllib.parse.quote("registry.example.com", safe="")
        self.assertEqual(self.get(path).status, 404)
        _ociError(self, self.get(path), 404)
        blob = f"/v2/{HTTP_REPO}/blobs/{self.layer.digest}?ns=" + urllib.parse.quote("127.0.0.1:1", safe="")
        _ociError(self, self.get(blob), 404)

    def test_registryFilters(self) -> None:
        """
        A node started with C{--registry-filters} matching the repository answers 404 for it,
        while another repository of the same registry is served.
        """
        filtered = SpegelNode(
            containerd=self.cluster.containerds[0],
            mirrored_registries=[self.cluster.registry.url],
            extra_args=["--registry-filters", f"^{self.cluster.registry.host}/e2e/ht"],
            name="spegel-filtered",
        )
        self.addCleanup(filtered.cleanup)
        filtered.start()
        _ociError(self, filtered.request("GET", self.blobPath), 404)
        _ociError(self, filtered.request("GET", f"/v2/{HTTP_REPO}/manifests/v1?ns={self.ns}"), 404)
        # The same blob asked for under a repository the filter does not match.
        self.assertEqual(filtered.request("GET", f"/v2/other/repo/blobs/{self.layer.digest}?ns={self.ns}").status, 200)

    def test_badInput(self) -> None:
        """
        Malformed requests get a 4xx with an OCI error body, never a 5xx, and the node keeps
        serving afterwards.
        """
        digest = self.layer.digest
        blobs = f"/blobs/{digest}?ns={self.ns}"
        cases = [
            ("GET", f"/v2/../../etc/passwd{blobs}", {}),
            ("GET", f"/v2/e2e/../../x{blobs}", {}),
            ("GET", f"/v2/%2e%2e/%2e%2e/etc{blobs}", {}),
            ("GET", f"/v2/e2e/./http{blobs}", {}),
            ("GET", f"/v2/E2E/UPPER{blobs}", {}),
            ("GET", f"/v2//{blobs}", {}),
            ("GET", f"/v2/{HTTP_REPO}/blobs/sha256:xyz?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/blobs/sha256:{'a' * 63}?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/blobs/md5:{'a' * 32}?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/blobs/sha256:{'A' * 64}?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/blobs/..?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/bad%20tag!?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/{'t' * 300}?ns={self.ns}", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/v1", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/v1?ns=", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/v1?ns=no%20such%20host", {}),
            ("GET", f"/v2/{HTTP_REPO}/manifests/v1?ns=a&ns=b", {}),
            ("GET", self.blobPath, {"Range": "bytes=abc"}),
            ("GET", self.blobPath, {"Range": "items=0-1"}),
            ("GET", self.blobPath, {"Range": "bytes=9-2"}),
            ("GET", self.blobPath, {"Range": "bytes=0-1,3-4"}),
            ("GET", self.blobPath, {"Range": "bytes=" + "9" * 400 + "-"}),
            ("GET", self.blobPath, {"X-Big": "x" * 20_000}),
            ("GET", f"/v2/{'a/' * 2000}x{blobs}", {}),
            ("PUT", f"/v2/{HTTP_REPO}/manifests/v1?ns={self.ns}", {}),
            ("DELETE", self.blobPath, {}),
            ("POST", f"/v2/{HTTP_REPO}/blobs/uploads/", {}),
        ]
        failures = []
        for method, path, headers in cases:
            try:
                response = self.node.request(method, path, headers=headers)
                _ociError(self, response)
            except Exception as e:
                failures.append(f"{method} {path[:80]} {list(headers)}: {e!r}"[:400])
        self.assertEqual(failures, [])
        self.assertEqual(self.get("/v2/").status, 200)
        self.assertEqual(self.get(self.blobPath).body, self.layerBytes)
        self.assertTrue(self.node.running)


class DemoTests(TestCase):
    """
    The README demo, C{python -m spegel_testing.demo}, run as a user would.
    """

    def runDemo(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "spegel_testing.demo", "--layers", "2", "--size-mib", "2", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def assertCleanedUp(self, stdout: str) -> None:
        """
        The cluster directory the demo printed is gone and no process mentions it.
        """
        match = re.search(r"\(containerd (/tmp/[^/ ]+)/c0/c\.sock\)", stdout)
        assert match is not None, stdout
        baseDir = match.group(1)
        self.assertFalse(os.path.exists(baseDir))
        self.assertEqual(_processesMentioning(baseDir), [])

    def test_succeeds(self) -> None:
        """
        The demo on loopback exits 0: node 1 pulls from upstream, nodes 2 and 3 get every byte
        from node 1 or each other with upstream stopped, digests are equal, and no process is
        left.
        """
        result = self.runDemo("--loopback")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("upstream = node 1 = node 2 = node 3: yes", result.stdout)
        first = re.search(r"node 1 pulled \S+ by tag in [0-9.]+s: ([0-9.]+) MiB from upstream", result.stdout)
        assert first is not None, result.stdout
        self.assertGreaterEqual(float(first.group(1)), 2.0)
        for node, how in (("2", "by tag"), ("3", "by digest")):
            pulled = re.search(
                rf"node {node} pulled \S+ {how} in [0-9.]+s: 0\.0 MiB from upstream, [0-9.]+ MiB from its own "
                rf"disk, ([0-9.]+) MiB from peers \(node [13]",
                result.stdout,
            )
            assert pulled is not None, result.stdout
            self.assertGreaterEqual(float(pulled.group(1)), 2.0)
        self.assertTrue(result.stdout.rstrip().endswith("demo ok"))
        self.assertCleanedUp(result.stdout)

    def test_rolloutOnHostsOfTheirOwn(self) -> None:
        """
        The README's demo as CI's machine runs it (root): five nodes, each a host of its own
        with its own address; node 1 pulls from upstream, then nodes 2 to 5 pull at once with
        upstream stopped, every byte from peers, and nothing is left behind (processes,
        namespaces).
        """
        result = self.runDemo()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("running on 127.0.0.1", result.stdout)
        addresses = re.findall(r"node \d at (198\.1[89]\.\d+\.\d+) ", result.stdout)
        self.assertEqual(len(set(addresses)), 5, result.stdout)
        self.assertIn("nodes 2 and 3 and 4 and 5 pull at once", result.stdout)
        for node in ("2", "3", "4", "5"):
            pulled = re.search(
                rf"node {node} pulled \S+ by (tag|digest) in [0-9.]+s: 0\.0 MiB from upstream, [0-9.]+ MiB from its own "
                rf"disk, ([0-9.]+) MiB from peers",
                result.stdout,
            )
            assert pulled is not None, result.stdout
            self.assertGreaterEqual(float(pulled.group(2)), 2.0)
        self.assertIn("served to the others during the rollout: node 1", result.stdout)
        self.assertIn("upstream = node 1 = node 2 = node 3 = node 4 = node 5: yes", result.stdout)
        self.assertTrue(result.stdout.rstrip().endswith("demo ok"))
        self.assertCleanedUp(result.stdout)
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        self.assertNotIn("sp", "".join(line.split()[0][:2] for line in namespaces.splitlines() if line))

    def test_failsWithOneLineReason(self) -> None:
        """
        When the nodes serve nothing (a filter refusing every repository), node 1's image never
        becomes findable in the cluster: the demo exits 1 with a one-line reason on stderr
        before stopping upstream, and leaves no process.
        """
        result = self.runDemo("--loopback", "--node-arg=--registry-filters=.")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("demo failed: "), result.stderr)
        self.assertIn("not findable", result.stderr)
        self.assertNotIn("demo ok", result.stdout)
        self.assertCleanedUp(result.stdout)


def _processesMentioning(text: str) -> list[str]:
    """
    The command lines of every process on the machine that contain C{text}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry}: {command}")
    return found


globals().update(per_containerd(PullThroughNodeTests))
globals().update(per_containerd(LiveNodeHTTPTests))
del PullThroughNodeTests, LiveNodeHTTPTests
