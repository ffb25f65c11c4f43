"""
Tests for L{spegel.debugweb} and the C{--debug-web-enabled} flag of L{spegel.tap}: the debug
pages over a fake router, a real routing table and a fake clock, through StubTreq. Socket-free.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Callable

from tests.unit.stubtreq import StubTreq
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from spegel import flags
from spegel.debugweb import (
    LOOKUP_TIMEOUT,
    MAX_CONCURRENT_LOOKUPS,
    DebugWeb,
    KeyInvalid,
    PutAsidePeer,
    parse_key,
    put_aside_peers,
)
from spegel.dht.ids import Contact, Provider
from spegel.interfaces import IDebugRouter
from spegel.dht.routing import RoutingTable
from spegel.mirror import PutAside
from spegel.tap import Options, makeService

OWN_ID = bytes(32)
# Bucket 0 (first bit differs) and bucket 7 (first seven bits shared): the second is closer.
FAR = Contact(b"\x80" + b"\x11" * 31, "10.0.0.2", 5001)
NEAR = Contact(b"\x01" + b"\x22" * 31, "<script>alert(1)</script>", 5002)
DIGEST = "sha256:" + "ab" * 32


def provider(n: int) -> Provider:
    return Provider(bytes([n]) * 32, f"10.0.1.{n}", 5000 + n)


class FakeNode:
    def __init__(self, routing: RoutingTable) -> None:
        self.routing = routing


@implementer(IDebugRouter)
class FakeRouter:
    """
    The part of L{spegel.dht.service.DHTService} the pages read; lookups wait for the test.
    """

    def __init__(self, clock: Clock, contacts: list[Contact]) -> None:
        self.node_id = OWN_ID
        self.node = FakeNode(RoutingTable(OWN_ID, 20, clock.seconds))
        for contact in contacts:
            self.node.routing.observe(contact)
        self.ready = True
        self.listening: tuple[str, int] | None = ("0.0.0.0", 5001)
        self.provided = 7
        self.lookups: list[tuple[str, Callable[[Provider], None], bool, Deferred[list[Provider]]]] = []
        self.cancelled: list[str] = []

    @property
    def address(self) -> tuple[str, int]:
        if self.listening is None:
            raise RuntimeError("the DHT service is not listening")
        return self.listening

    def provided_keys_count(self) -> int:
        return self.provided

    def find_providers(
        self,
        key: str,
        *,
        on_provider: Callable[[Provider], None] | None = None,
        limit: int = 20,
        use_cache: bool = True,
    ) -> Deferred[list[Provider]]:
        assert on_provider is not None
        d: Deferred[list[Provider]] = Deferred(lambda d: self.cancelled.append(key))
        self.lookups.append((key, on_provider, use_cache, d))
        return d


class DebugWebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.router = FakeRouter(self.clock, [FAR, NEAR])
        self.put_aside = PutAside(self.clock)
        self.put_aside.put_aside(provider(9))
        debug = DebugWeb(
            self.clock, self.router, self.put_aside, registry_address=("10.0.0.1", 5000)
        )
        # Mounted as makeService mounts it, so the paths are the real ones.
        root = Resource()
        root.putChild(b"debug", debug.resource())
        self.treq = StubTreq(root)

    def start(self, path: str, **kwargs: Any) -> Deferred[tuple[int, Any, bytes]]:
        d = self.treq.get("http://node:9090" + path, allow_redirects=False, **kwargs)

        def read(response: Any) -> Deferred[tuple[int, Any, bytes]]:
            return self.treq.content(response).addCallback(
                lambda body: (response.code, response.headers, body)
            )

        return d.addCallback(read)

    def get(self, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        d = self.start(path, **kwargs)
        self.treq.flush()
        return self.successResultOf(d)

    def assertJSONError(self, answer: tuple[int, Any, bytes], status: int, code: str) -> None:
        got, headers, body = answer
        self.assertEqual(got, status, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body)["errors"][0]["code"], code)

    # -- the page and the peers -----------------------------------------------------------

    def test_page_shows_node_and_contacts_escaped(self) -> None:
        code, headers, body = self.get("/debug/web/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertIn("default-src 'none'", headers.getRawHeaders("content-security-policy")[0])
        page = body.decode("utf-8")
        for text in [OWN_ID.hex(), FAR.node_id.hex(), NEAR.node_id.hex(), "10.0.0.2", "5002",
                     "0.0.0.0:5001", "10.0.0.1:5000", "10.0.1.9", "5009"]:
            self.assertIn(text, page)
        # A host comes from the network: it is shown, never run.
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn('href="peers"', page)
        self.assertIn('action="lookup"', page)
        self.assertRegex(page, r"DHT ready</th><td>yes<")
        self.assertRegex(page, r"Keys provided</th><td>7<")

    def test_page_of_a_node_not_listening(self) -> None:
        self.router.listening = None
        self.router.ready = False
        page = self.get("/debug/web/")[2].decode("utf-8")
        self.assertIn("not listening", page)
        self.assertRegex(page, r"DHT ready</th><td>no<")

    def test_without_slash_redirects_so_relative_links_work(self) -> None:
        code, headers, _ = self.get("/debug/web")
        self.assertIn(code, (301, 302, 307, 308))
        self.assertEqual(headers.getRawHeaders("location"), ["http://node:9090/debug/web/"])

    def test_peers_json(self) -> None:
        self.clock.advance(15)
        code, headers, body = self.get("/debug/web/peers")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(
            json.loads(body),
            {
                "node_id": OWN_ID.hex(),
                "router_address": "0.0.0.0:5001",
                "registry_address": "10.0.0.1:5000",
                "ready": True,
                "provided_keys": 7,
                # Closest first.
                "contacts": [
                    {"node_id": NEAR.node_id.hex(), "host": NEAR.host, "port": 5002, "bucket": 7},
                    {"node_id": FAR.node_id.hex(), "host": "10.0.0.2", "port": 5001, "bucket": 0},
                ],
                "put_aside": [{"host": "10.0.1.9", "registry_port": 5009, "seconds_left": 45.0}],
            },
        )

    def test_put_aside_read_without_changing_it(self) -> None:
        self.clock.advance(30)
        self.put_aside.put_aside(provider(3))
        self.clock.advance(40)  # provider 9's minute is over; provider 3 has 20 s left
        self.assertEqual(
            put_aside_peers(self.put_aside),
            [PutAsidePeer("10.0.1.3", 5003, 20.0)],
        )
        # Dropping expired entries is is_aside's business, not a page's.
        self.assertEqual(len(self.put_aside._until), 2)

    def test_unknown_path_and_method(self) -> None:
        for path in ["/debug/web/nothing", "/debug/", "/debug", "/debug/web/peers/x"]:
            with self.subTest(path=path):
                self.assertJSONError(self.get(path), 404, "NOT_FOUND")
        d = self.treq.post("http://node:9090/debug/web/lookup?key=" + DIGEST)
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 405)
        self.assertEqual(self.router.lookups, [])

    def test_head_of_lookup_asks_nobody(self) -> None:
        d = self.treq.head("http://node:9090/debug/web/lookup?key=" + DIGEST)
        self.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.router.lookups, [])

    # -- lookups ------------------------------------------------------------------------

    def test_lookup_reports_each_provider_with_its_time(self) -> None:
        d = self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        [(key, on_provider, use_cache, lookup)] = self.router.lookups
        self.assertEqual(key, DIGEST)
        self.assertFalse(use_cache)
        self.assertNoResult(d)
        self.clock.advance(0.002)
        on_provider(provider(1))
        self.clock.advance(0.003)
        on_provider(provider(2))
        self.clock.advance(0.001)
        lookup.callback([provider(1), provider(2)])
        self.treq.flush()
        code, headers, body = self.successResultOf(d)
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        answer = json.loads(body)
        self.assertEqual(answer["key"], DIGEST)
        self.assertEqual(
            [(p["host"], p["registry_port"]) for p in answer["providers"]],
            [("10.0.1.1", 5001), ("10.0.1.2", 5002)],
        )
        self.assertEqual(answer["providers"][0]["node_id"], (bytes([1]) * 32).hex())
        self.assertAlmostEqual(answer["providers"][0]["seconds"], 0.002)
        self.assertAlmostEqual(answer["providers"][1]["seconds"], 0.005)
        self.assertAlmostEqual(answer["seconds"], 0.006)
        self.assertFalse(answer["timed_out"])
        # Nothing left scheduled: the timeout went with the answer.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookup_of_tag_keys(self) -> None:
        for key in ["docker.io/library/nginx:1.27", "127.0.0.1:5000/team/app:v1"]:
            with self.subTest(key=key):
                d = self.start("/debug/web/lookup", params={"key": key})
                self.treq.flush()
                self.assertEqual(self.router.lookups[-1][0], key)
                self.router.lookups[-1][3].callback([])
                self.treq.flush()
                code, _, body = self.successResultOf(d)
                self.assertEqual(code, 200)
                self.assertEqual(json.loads(body)["providers"], [])

    def test_lookup_without_a_key(self) -> None:
        for path in ["/debug/web/lookup", "/debug/web/lookup?key=", "/debug/web/lookup?other=1"]:
            with self.subTest(path=path):
                self.assertJSONError(self.get(path), 400, "KEY_INVALID")
        self.assertEqual(self.router.lookups, [])

    def test_lookup_with_a_malformed_key(self) -> None:
        for key in [
            "sha256:abc",
            "SHA256:" + "ab" * 32,
            "nginx:latest",  # no registry
            "docker.io/library/nginx",  # no tag
            "docker.io/library/nginx:1@" + DIGEST,
            "docker.io/Library/nginx:1",
            "docker.io/library/nginx:<script>",
        ]:
            with self.subTest(key=key):
                self.assertJSONError(
                    self.get("/debug/web/lookup", params={"key": key}), 400, "KEY_INVALID"
                )
        self.assertJSONError(
            self.get("/debug/web/lookup?key=" + DIGEST + "&key=" + DIGEST), 400, "KEY_INVALID"
        )
        self.assertJSONError(self.get("/debug/web/lookup?key=%ff"), 400, "KEY_INVALID")
        self.assertEqual(self.router.lookups, [])

    def test_lookup_timeout_answers_what_was_found(self) -> None:
        d = self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        [(_, on_provider, _, lookup)] = self.router.lookups
        self.clock.advance(1)
        on_provider(provider(4))
        self.clock.advance(LOOKUP_TIMEOUT - 1 - 0.001)
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.treq.flush()
        code, _, body = self.successResultOf(d)
        self.assertEqual(code, 200)
        answer = json.loads(body)
        self.assertTrue(answer["timed_out"])
        self.assertAlmostEqual(answer["seconds"], LOOKUP_TIMEOUT)
        self.assertEqual([p["host"] for p in answer["providers"]], ["10.0.1.4"])
        self.assertAlmostEqual(answer["providers"][0]["seconds"], 1.0)
        # The lookup itself was stopped, not left running in the DHT.
        self.assertEqual(self.router.cancelled, [DIGEST])

    def test_lookup_timeout_with_nothing_found(self) -> None:
        d = self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        self.clock.advance(LOOKUP_TIMEOUT)
        self.treq.flush()
        answer = json.loads(self.successResultOf(d)[2])
        self.assertEqual((answer["providers"], answer["timed_out"]), ([], True))

    def test_lookup_failure(self) -> None:
        d = self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        self.router.lookups[0][3].errback(RuntimeError("socket gone"))
        self.treq.flush()
        self.assertJSONError(self.successResultOf(d), 502, "LOOKUP_FAILED")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_lookups_at_once_are_bounded(self) -> None:
        pending = [self.start("/debug/web/lookup", params={"key": DIGEST})
                   for _ in range(MAX_CONCURRENT_LOOKUPS)]
        self.treq.flush()
        self.assertJSONError(
            self.get("/debug/web/lookup", params={"key": DIGEST}), 503, "TOO_MANY_LOOKUPS"
        )
        self.assertEqual(len(self.router.lookups), MAX_CONCURRENT_LOOKUPS)
        for _, _, _, lookup in self.router.lookups:
            lookup.callback([])
        self.treq.flush()
        for d in pending:
            self.assertEqual(self.successResultOf(d)[0], 200)
        # Finished lookups make room again.
        self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        self.assertEqual(len(self.router.lookups), MAX_CONCURRENT_LOOKUPS + 1)

    def test_client_leaving_cancels_the_lookup(self) -> None:
        d = self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        self.assertEqual(len(self.router.lookups), 1)
        d.cancel()  # the client hangs up
        self.treq.flush()
        self.failureResultOf(d)
        self.assertEqual(self.router.cancelled, [DIGEST])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Its slot is free again.
        for _ in range(MAX_CONCURRENT_LOOKUPS):
            self.start("/debug/web/lookup", params={"key": DIGEST})
        self.treq.flush()
        self.assertEqual(len(self.router.lookups), 1 + MAX_CONCURRENT_LOOKUPS)


class ParseKeyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        self.assertEqual(parse_key([DIGEST.encode()]), DIGEST)
        self.assertEqual(parse_key([b"ghcr.io/a/b:c"]), "ghcr.io/a/b:c")
        for values in [None, [], [b""], [b"a/b"], [b"sha256:"], [b"docker.io/x:1", b"docker.io/y:2"]]:
            with self.subTest(values=values):
                self.assertRaises(KeyInvalid, parse_key, values)


class FlagTests(SynchronousTestCase):
    """
    C{--debug-web-enabled}, as the reference takes it: bare, or with a value.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_default_off(self) -> None:
        self.assertFalse(self.parse().node.debug_web_enabled)

    def test_forms(self) -> None:
        cases = [
            (["--debug-web-enabled"], True),
            (["--debug-web-enabled=true"], True),
            (["--debug-web-enabled=True"], True),
            (["--debug-web-enabled=1"], True),
            (["--debug-web-enabled=false"], False),
            (["--debug-web-enabled=0"], False),
            # The last mention wins.
            (["--debug-web-enabled", "--debug-web-enabled=false"], False),
            (["--debug-web-enabled=false", "--debug-web-enabled"], True),
        ]
        for argv, enabled in cases:
            with self.subTest(argv=argv):
                options = self.parse("--log-level", "debug", *argv)
                self.assertEqual(options.node.debug_web_enabled, enabled)
                self.assertEqual(options["log-level"].name, "debug")

    def test_value_of_another_flag_is_left_alone(self) -> None:
        options = self.parse("--data-dir", "--debug-web-enabled=x")
        self.assertEqual(options.node.data_dir, "--debug-web-enabled=x")
        self.assertFalse(options.node.debug_web_enabled)

    def test_bad_value_fails_with_one_line(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as exited:
            self.parse("--debug-web-enabled=maybe")
        self.assertEqual(exited.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "spegel: error: --debug-web-enabled: 'maybe' is not true or false\n",
        )

    def test_parse_bool(self) -> None:
        self.assertTrue(flags.parse_bool(" YES "))
        self.assertFalse(flags.parse_bool("off"))
        self.assertRaises(ValueError, flags.parse_bool, "")

    def metrics_root(self, *argv: str) -> Resource:
        options = self.parse("--data-dir", "", *argv)
        node = makeService(options, MemoryReactorClock())
        assert isinstance(node, MultiService)
        for service in node:
            resource = getattr(getattr(service, "factory", None), "resource", None)
            if resource is not None and b"metrics" in resource.children:
                return resource
        self.fail("no site serves /metrics")

    def test_make_service_mounts_debug_under_metrics(self) -> None:
        root = self.metrics_root("--debug-web-enabled")
        self.assertIn(b"debug", root.children)
        treq = StubTreq(root)
        d = treq.get("http://node:9090/debug/web/peers")
        treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        d = treq.json_content(response)
        treq.flush()
        answer = self.successResultOf(d)
        self.assertEqual(answer["registry_address"], ":5000")
        self.assertEqual(answer["router_address"], "not listening")
        self.assertEqual(answer["contacts"], [])

    def test_make_service_without_the_flag(self) -> None:
        root = self.metrics_root()
        self.assertNotIn(b"debug", root.children)
        treq = StubTreq(root)
        d = treq.get("http://node:9090/debug/web/")
        treq.flush()
        self.assertEqual(self.successResultOf(d).code, 404)
