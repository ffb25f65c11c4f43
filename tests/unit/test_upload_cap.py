"""
Tests for the registry's upload bandwidth cap (C{--max-upload-rate}): blob bodies sent to peers
share the node's token bucket, on a fake clock; the node's own containerd is never held back;
ranges work as before; a peer that goes away while its body waits for tokens frees its slot and
leaves no timer. Requests go through the node's real HTTP channel (L{make_site}) on an in-memory
transport, so the test sees the bytes as the peer would, as they are written.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from spegel import flags
from spegel.interfaces import MIRRORED_HEADER
from spegel.metrics import Metrics
from spegel.pacing import MIN_RATE, TokenBucket
from spegel.httpserver import make_site
from spegel.registry import RegistryFilter, RegistryResource
from spegel.tap import Options
from spegel.uploads import UploadSlots
from tests.unit.test_registry import REGISTRY, MemoryContent

MiB = 1024 * 1024
RATE = MiB


class Exchange:
    """
    One request on a connection of its own, and what the node has written back so far.
    """

    def __init__(self, site: object, request: bytes) -> None:
        address = IPv4Address("TCP", "10.0.0.7", 40000)
        self.channel = site.buildProtocol(address)  # type: ignore[attr-defined]
        # Lenient: like a TCP transport, it may be resumed after the connection was cut.
        self.transport = StringTransport(peerAddress=address, lenient=True)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(request)

    @property
    def head(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def lose(self) -> None:
        # As a TCP transport does: its producer is stopped, then the protocol told.
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionDone()))


class UploadCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.content = MemoryContent(self.mktemp())
        os.makedirs(self.content.tmpdir)
        self.data = os.urandom(3 * MiB)
        self.on_disk = self.content.add_blob(self.data)
        self.through_containerd = self.content.add_blob(os.urandom(2 * MiB), on_disk=False)
        self.metrics = Metrics()
        self.bucket = TokenBucket(self.clock, RATE, metrics=self.metrics)
        self.uploads = UploadSlots(bandwidth=self.bucket, metrics=self.metrics)
        registry = RegistryResource(
            self.clock, self.content, RegistryFilter(frozenset({REGISTRY})), uploads=self.uploads, metrics=self.metrics
        )
        self.site = make_site(registry.resource(), reactor=self.clock)

    def counted(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    def get(self, digest: str, *, peer: bool = True, range_: str | None = None) -> Exchange:
        lines = [f"GET /v2/team/app/blobs/{digest}?ns={REGISTRY} HTTP/1.1", "Host: node"]
        if peer:
            lines.append(f"{MIRRORED_HEADER}: true")
        if range_:
            lines.append(f"Range: {range_}")
        return Exchange(self.site, ("\r\n".join(lines) + "\r\n\r\n").encode())

    def bucket_timers(self) -> list[object]:
        # The HTTP channels' idle timers are on the same clock.
        return [
            call for call in self.clock.getDelayedCalls()
            if isinstance(call, DelayedCall) and call.func == self.bucket._wake
        ]

    def run_until(self, *exchanges: Exchange, size: int) -> None:
        """Advance the clock until every exchange has its C{size}-byte body, checking the cap."""
        while any(len(exchange.body) < size for exchange in exchanges):
            self.assertLess(self.clock.seconds(), 60, "the bodies never ended")
            self.clock.advance(0.05)
            sent = sum(len(exchange.body) for exchange in exchanges)
            self.assertLessEqual(sent, self.bucket.burst + RATE * self.clock.seconds() + 1)

    def test_peer_body_is_paced(self) -> None:
        exchange = self.get(self.on_disk)
        self.assertIn(b"HTTP/1.1 200 ", exchange.head)
        self.assertEqual(len(exchange.body), self.bucket.burst)
        self.run_until(exchange, size=len(self.data))
        self.assertEqual(exchange.body, self.data)
        self.assertGreaterEqual(self.clock.seconds(), (len(self.data) - self.bucket.burst) / RATE - 1e-6)
        self.assertEqual(self.counted("spegel_uploaded_bytes_total"), len(self.data))
        self.assertGreater(self.counted("spegel_upload_throttled_seconds_total"), 2.5)
        self.assertEqual(self.uploads.active, 0)
        self.assertEqual(self.bucket_timers(), [])

    def test_read_through_containerd_is_paced(self) -> None:
        exchange = self.get(self.through_containerd)
        self.assertEqual(len(exchange.body), self.bucket.burst)
        self.run_until(exchange, size=2 * MiB)
        self.assertEqual(exchange.body, self.content.blobs[self.through_containerd])
        self.assertGreaterEqual(self.clock.seconds(), (2 * MiB - self.bucket.burst) / RATE - 1e-6)

    def test_range_to_a_peer(self) -> None:
        exchange = self.get(self.on_disk, range_="bytes=1000-1500999")
        self.assertIn(b"HTTP/1.1 206 ", exchange.head)
        self.assertIn(b"bytes 1000-1500999/%d" % len(self.data), exchange.head.lower())
        self.run_until(exchange, size=1_500_000)
        self.assertEqual(exchange.body, self.data[1000:1_501_000])

    def test_containerd_is_not_held_back(self) -> None:
        """
        While a peer's upload waits for tokens, the node's own containerd gets a whole blob at
        once, and it is not counted as uploaded.
        """
        peer = self.get(self.on_disk)
        self.assertEqual(self.bucket.waiting, 1)
        uploaded = self.counted("spegel_uploaded_bytes_total")
        local = self.get(self.on_disk, peer=False)
        self.assertEqual(local.body, self.data)
        local_read = self.get(self.through_containerd, peer=False)
        self.assertEqual(local_read.body, self.content.blobs[self.through_containerd])
        self.assertEqual(self.counted("spegel_uploaded_bytes_total"), uploaded)
        self.run_until(peer, size=len(self.data))

    def test_peers_share_the_cap(self) -> None:
        first, second = self.get(self.on_disk), self.get(self.on_disk)
        self.assertEqual(self.uploads.active, 2)
        self.clock.advance(1)
        self.run_until(first, second, size=len(self.data))
        self.assertEqual((first.body, second.body), (self.data, self.data))
        # Together: two bodies, one burst, then the rate.
        self.assertGreaterEqual(self.clock.seconds(), (2 * len(self.data) - self.bucket.burst) / RATE - 1e-6)

    def test_peer_goes_away_while_waiting(self) -> None:
        exchange = self.get(self.on_disk)
        self.assertEqual((self.uploads.active, self.bucket.waiting), (1, 1))
        self.assertEqual(len(self.bucket_timers()), 1)
        exchange.lose()
        self.assertEqual((self.uploads.active, self.bucket.waiting), (0, 0))
        self.assertEqual(self.bucket_timers(), [])
        self.assertTrue(exchange.transport.disconnecting, "the body was cut short")
        # The tokens are there for the next peer.
        self.clock.advance(1)
        after = self.get(self.on_disk)
        self.assertGreater(len(after.body), 0)

    def test_head_to_a_peer_is_not_an_upload(self) -> None:
        exchange = Exchange(
            self.site,
            f"HEAD /v2/team/app/blobs/{self.on_disk}?ns={REGISTRY} HTTP/1.1\r\nHost: node\r\n"
            f"{MIRRORED_HEADER}: true\r\n\r\n".encode(),
        )
        self.assertIn(b"HTTP/1.1 200 ", exchange.head)
        self.assertEqual(self.bucket.upload().take(MiB), self.bucket.burst)


class MaxUploadRateFlagTests(SynchronousTestCase):
    """
    C{--max-upload-rate}: bytes per second with a decimal or binary multiplier; anything else
    stops the node with one line naming the flag.
    """

    def test_values(self) -> None:
        convert = flags.byte_rate(MIN_RATE)
        cases = {
            "0": 0,
            "0MiB": 0,
            "100MiB": 100 * MiB,
            "100Mi": 100 * MiB,
            "12.5MB/s": 12.5e6,
            "12.5M": 12.5e6,
            "1GiB/s": 1024**3,
            "500kB": 500_000,
            "500KB": 500_000,
            "64KiB": 64 * 1024,
            "2000000": 2e6,
            " 1G ": 1e9,
        }
        for text, rate in cases.items():
            with self.subTest(text=text):
                self.assertEqual(convert(text), rate)
        for bad in ["", "fast", "800Mbit", "100mb", "100Mb", "100 MiB", "-1MiB", "1e6", ".5M", "1TiB", "10KiB"]:
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, convert, bad)

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_flag(self) -> None:
        self.assertEqual(self.parse().node.max_upload_rate, 0)
        self.assertEqual(self.parse("--max-upload-rate", "100MiB").node.max_upload_rate, 100 * MiB)
        self.assertEqual(self.parse("--max-upload-rate=12.5MB/s").node.max_upload_rate, 12.5e6)
        for bad, says in [("800Mbit", "not a rate in bytes per second"), ("1KiB", "below the lowest cap, 64KiB/s")]:
            with self.subTest(bad=bad):
                stderr = io.StringIO()
                self.patch(sys, "stderr", stderr)
                with self.assertRaises(SystemExit) as exited:
                    self.parse("--max-upload-rate", bad)
                self.assertEqual(exited.exception.code, 2)
                lines = stderr.getvalue().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(lines[0].startswith("spegel: error: --max-upload-rate: "), lines)
                self.assertIn(says, lines[0])
