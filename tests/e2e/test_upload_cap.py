# -*- test-case-name: tests.e2e.test_upload_cap -*-
"""
End-to-end tests of C{--max-upload-rate}: a real node on loopback, holding a blob in its
containerd's content store, serves it to "peers" (requests carrying C{X-Spegel-Mirrored: true})
no faster than its cap, by sendfile, and to its own containerd without a cap.

Rates are measured from the client's side, from the request to the last body byte. Only upper
bounds are asserted: the token bucket guarantees that C{size} bytes take at least
C{(size - burst) / cap} seconds, however loaded the machine is, so "not faster than the cap plus
a generous margin" cannot fail because the machine is slow. How fast an uncapped body goes is
not asserted at all (that would be a wall-clock threshold); that it was not paced is read from
the node's metrics.
"""

from __future__ import annotations

import hashlib
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from attrs import frozen
from twisted.trial.unittest import TestCase

from spegel.interfaces import MIRRORED_HEADER
from spegel.pacing import BURST_FLOOR, BURST_SECONDS
from spegel.uploads import UPLOAD_STALL_TIMEOUT
from spegel_testing.cluster import Cluster
from spegel_testing.images import build_image
from spegel_testing.process import wait_for
from spegel_testing.shared import Shared

MiB = 1024 * 1024
CAP = 8 * MiB
CAP_FLAG = "8MiB"
BURST = max(CAP * BURST_SECONDS, BURST_FLOOR)
# The cap's bound is exact (at most about 7% over the cap for a 16 MiB body, from the burst);
# the margin is for nothing but rounding and the clocks of two processes.
MARGIN = 0.25
REPO = "e2e/capped"
IMAGE = build_image(seed="e2e-upload-cap", layer_sizes=(16 * MiB,), compress=False)
LAYER = IMAGE.layers[0]


def _start() -> Cluster:
    cluster = Cluster(1, node_args=["--max-upload-rate", CAP_FLAG], log_level="info")
    cluster.start()
    try:
        ref = cluster.registry.push_image(REPO, "v1", IMAGE)
        daemon = cluster.containerds[0]
        # Every blob into the content store, where the node reads (and sendfiles) it from.
        daemon.ctr("content", "fetch", "--plain-http", "--hosts-dir", daemon.hosts_dir, ref, timeout=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


_cluster = Shared(_start, Cluster.stop)


@frozen
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.body) / self.seconds


def fetch(port: int, path: str, headers: dict[str, str]) -> Fetched:
    """
    One GET on a fresh connection, read to the end; timed from before connecting to the last byte.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n{head}\r\n".encode())
        received = bytearray()
        while True:
            chunk = sock.recv(1024 * 1024)
            if not chunk:
                break
            received += chunk
    seconds = time.monotonic() - started
    head_bytes, _, body = bytes(received).partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Fetched(int(lines[0].split(" ")[1]), parsed, body, seconds)


def process_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {name: int(value) for name, _, value in (line.partition(": ") for line in f)}


class UploadCapTests(TestCase):
    def setUp(self) -> None:
        self.cluster = _cluster.get()
        self.node = self.cluster.nodes[0]
        ns = urllib.parse.quote(self.cluster.registry.host, safe="")
        self.path = f"/v2/{REPO}/blobs/{LAYER.digest}?ns={ns}"
        self.data = LAYER.read()

    def get(self, *, peer: bool = True, **headers: str) -> Fetched:
        if peer:
            headers[MIRRORED_HEADER] = "true"
        return fetch(self.node.registry_port, self.path, headers)

    def counters(self) -> tuple[float, float]:
        metrics = self.node.metrics()
        return metrics.total("spegel_uploaded_bytes_total"), metrics.total("spegel_upload_throttled_seconds_total")

    def assertNotFasterThanTheCap(self, rate: float) -> None:
        self.assertLessEqual(rate, CAP * (1 + MARGIN), f"{rate / MiB:.1f} MiB/s under a cap of {CAP / MiB:.0f} MiB/s")

    def test_peer_upload_is_capped_and_zero_copy(self) -> None:
        """
        A whole blob to a peer: the right bytes, no faster than the cap, counted as uploaded
        and throttled, and sent by sendfile (the node's write count grows by the blob, its
        read count by little more: the bytes were not read into Python).
        """
        uploaded, throttled = self.counters()
        assert self.node.pid is not None
        io_before = process_io(self.node.pid)
        got = self.get()
        io_after = process_io(self.node.pid)
        self.assertEqual(got.status, 200)
        self.assertEqual(hashlib.sha256(got.body).hexdigest(), LAYER.digest.split(":")[1])
        self.assertNotFasterThanTheCap(got.rate)
        uploaded_after, throttled_after = self.counters()
        self.assertEqual(uploaded_after - uploaded, LAYER.size)
        self.assertGreater(throttled_after - throttled, 0.5)
        written = io_after["wchar"] - io_before["wchar"]
        read_into_python = (io_after["rchar"] - io_before["rchar"]) - written
        self.assertGreaterEqual(written, LAYER.size * 0.9, "sendfile counts in wchar")
        self.assertLess(read_into_python, LAYER.size * 0.1)

    def test_range_to_a_peer(self) -> None:
        last = 5 * MiB + 999
        got = self.get(Range=f"bytes=1000-{last}")
        self.assertEqual(got.status, 206)
        self.assertEqual(got.headers["content-range"], f"bytes 1000-{last}/{LAYER.size}")
        self.assertEqual(got.body, self.data[1000 : last + 1])
        self.assertNotFasterThanTheCap(got.rate)

    def test_peers_share_the_cap(self) -> None:
        """
        Two peers at once: together no faster than the cap, both bodies whole.
        """
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: self.get(), range(2)))
        seconds = time.monotonic() - started
        for got in results:
            self.assertEqual((got.status, len(got.body)), (200, LAYER.size))
            self.assertEqual(got.body, self.data)
        self.assertNotFasterThanTheCap(2 * LAYER.size / seconds)

    def test_own_containerd_is_not_paced(self) -> None:
        """
        A request without the peer header (the node's containerd) is served whole and is
        neither counted as an upload nor throttled.
        """
        uploaded, throttled = self.counters()
        got = self.get(peer=False)
        self.assertEqual((got.status, got.body), (200, self.data))
        self.assertEqual(self.counters(), (uploaded, throttled))

    def test_a_peer_that_stops_reading_loses_its_upload(self) -> None:
        """
        A "peer" asks for the blob and reads nothing: once the socket buffers are full the
        node's upload makes no progress, and after UPLOAD_STALL_TIMEOUT the node ends it and
        frees its --max-uploads slot.
        """
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.connect(("127.0.0.1", self.node.registry_port))
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: node\r\n{MIRRORED_HEADER}: true\r\n\r\n".encode())
            wait_for(lambda: self.active_uploads() == 1, timeout=30, what="the upload to start")
            started = time.monotonic()
            wait_for(lambda: self.active_uploads() == 0, timeout=UPLOAD_STALL_TIMEOUT + 60, what="the stalled upload to end")
            seconds = time.monotonic() - started
        self.assertGreaterEqual(seconds, UPLOAD_STALL_TIMEOUT - 5)
        self.assertIn(f"the client took nothing for {UPLOAD_STALL_TIMEOUT:.0f} s", self.node.log_text())

    def active_uploads(self) -> float:
        return self.node.metrics().total("spegel_uploads_active")
