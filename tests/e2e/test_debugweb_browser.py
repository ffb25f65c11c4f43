# -*- test-case-name: tests.e2e.test_debugweb_browser -*-
"""
End-to-end: the debug pages of a real node, opened in a real headless browser (Debian's
C{chromium-headless-shell}, L{spegel_testing.browser}).

Two nodes with C{--debug-web-enabled} bootstrap from each other (static), each beside its own
containerd, with one upstream registry (L{spegel_testing.cluster.Cluster}).  Node 1's containerd
pulls an image, so node 1 advertises its digests; once node 0 finds them, the browser loads node
0's page and the test reads what the browser shows: node 0's id and router address, node 1 in the
routing table; then it types a digest into the page's lookup form, clicks "Look up", and reads
the answer the browser shows (node 1 as the provider; no provider for a digest nobody has).

The pages run no script (their Content-Security-Policy forbids it): the lookup is a plain form
whose answer is JSON, so what a user sees is that JSON as the browser shows it.  The expected
values come from elsewhere: the node ids from the id files in the nodes' data directories, the
addresses from the rig.  Blocking rig calls run on the reactor's thread pool; the browser is
driven from the reactor; everything is cleaned up whatever happens.  A missing browser fails the
test, it is never skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from spegel.dht.ids import NODE_ID_FILE
from spegel_testing.browser import BrowserFailed, BrowserMissing, HeadlessBrowser, Page
from spegel_testing.cluster import Cluster, static_bootstrap
from spegel_testing.images import build_image
from spegel_testing.process import CommandFailed, ProcessFailed

REPO = "e2e/debugweb"
IMAGE = build_image(seed="e2e-debugweb", layer_sizes=(32 * 1024,))
# A well-formed digest that nothing in the cluster holds.
UNKNOWN = "sha256:" + hashlib.sha256(b"spegel debug page: pushed nowhere").hexdigest()

# Generous for a loaded two-core machine; polled, so a fast machine does not wait for them.
FINDABLE_WITHIN = 60.0

# Every table as the browser shows it (rendered text of each cell), with the heading above it.
_TABLES = """
[...document.querySelectorAll("table")].map(table => {
  let heading = table.previousElementSibling;
  while (heading && !/^H[1-6]$/.test(heading.tagName)) heading = heading.previousElementSibling;
  return {
    heading: heading ? heading.innerText : null,
    rows: [...table.rows].map(row => [...row.cells].map(cell => cell.innerText)),
  };
})
"""
_SHOWN = "({url: location.href, title: document.title, text: document.body.innerText})"


def _with_debug_pages(index: int, cluster: Cluster) -> list[str]:
    return [*static_bootstrap(index, cluster), "--debug-web-enabled=true"]


def _node_id(cluster: Cluster, index: int) -> str:
    """
    The node's DHT id as it persisted it, read beside the pages rather than from them.
    """
    with open(os.path.join(cluster.nodes[index].data_dir, NODE_ID_FILE), encoding="ascii") as f:
        return f.read().strip()


class DebugPagesInABrowserTests(TestCase):
    # The per-test limit, far above what the test takes, only so that a hang ends.
    timeout = 600

    async def test_node_routing_table_and_lookups(self) -> None:
        """
        Node 0's page, in a browser, shows its id and router address and node 1 as its only
        contact; the page's lookup form, filled in and submitted with the mouse, shows node 1 as
        the provider of a digest node 1 holds, and no provider for a digest nobody holds.
        """
        try:
            self.browser = HeadlessBrowser.start(reactor)
        except BrowserMissing as e:
            self.fail(str(e))
        self.addCleanup(lambda: Deferred.fromCoroutine(self.browser.close()))

        self.cluster = await deferToThread(Cluster, 2, node_args=_with_debug_pages, wait_ready=True)
        self.addCleanup(deferToThread, self.cluster.stop)
        try:
            await self.checkPages()
        except (self.failureException, BrowserFailed, CommandFailed, ProcessFailed) as e:
            logs = await deferToThread(self.cluster.dump_logs)
            raise self.failureException(
                f"{e}\n{logs}\n---- browser output ----\n{self.browser.output_tail()}"
            ) from e

    async def checkPages(self) -> None:
        cluster = self.cluster
        await deferToThread(cluster.start)
        node0, node1 = cluster.nodes
        ids = [_node_id(cluster, 0), _node_id(cluster, 1)]
        self.assertNotEqual(ids[0], ids[1])

        # Node 1 holds the image; node 0 finding all of it means the DHT carries node 1's keys.
        ref = await deferToThread(cluster.registry.push_image, REPO, "v1", IMAGE)
        await deferToThread(cluster.pull, 1, ref)
        await deferToThread(cluster.wait_findable, [0], REPO, IMAGE, tag="v1", timeout=FINDABLE_WITHIN)

        index = f"http://{node0.metrics_addr}/debug/web/"
        page = await self.browser.open(index)
        shown = await page.evaluate(_SHOWN)
        self.assertEqual(shown["url"], index)
        self.assertIn(ids[0][:16], shown["title"])
        tables = await page.evaluate(_TABLES)
        self.assertTrue(tables, shown)

        # The node: the summary table under the page's title.
        self.assertEqual(tables[0]["heading"], "spegel debug", tables)
        summary = {row[0]: row[1] for row in tables[0]["rows"] if len(row) == 2}
        self.assertEqual(summary.get("DHT node id"), ids[0], summary)
        self.assertEqual(summary.get("Router address"), node0.router_addr, summary)
        self.assertEqual(summary.get("Registry address"), node0.registry_addr, summary)
        self.assertEqual(summary.get("DHT ready"), "yes", summary)
        self.assertEqual(summary.get("Contacts"), "1", summary)

        # The routing table: node 1, at its router address, and nobody else (not node 0 itself).
        routing = [t for t in tables if (t["heading"] or "").startswith("Routing table")]
        self.assertEqual(len(routing), 1, tables)
        header, *contacts = routing[0]["rows"]
        self.assertEqual(header, ["bucket", "node id", "host", "router port"])
        self.assertEqual(
            [(row[1], row[2], row[3]) for row in contacts],
            [(ids[1], "127.0.0.1", str(node1.router_port))],
        )

        # A lookup of a digest node 1 holds, through the form as a person would use it.
        digest = IMAGE.layers[0].digest
        answer = await self.lookUp(page, digest)
        self.assertEqual(
            [(p["node_id"], p["host"], p["registry_port"]) for p in answer["providers"]],
            [(ids[1], "127.0.0.1", node1.registry_port)],
            answer,
        )

        # And of a digest nobody holds, from the page again.
        await page.goto(index)
        answer = await self.lookUp(page, UNKNOWN)
        self.assertEqual(answer["providers"], [], answer)

    async def lookUp(self, page: Page, key: str) -> Any:
        """
        Type C{key} into the page's lookup field, click "Look up", and return the answer the
        browser shows, checked to be that key's.
        """
        await page.type_into("form input[name=key]", key)
        await page.click_to_load("form button[type=submit]")
        shown = await page.evaluate(_SHOWN)
        url = urllib.parse.urlsplit(shown["url"])
        self.assertEqual(url.path, "/debug/web/lookup", shown)
        self.assertEqual(urllib.parse.parse_qs(url.query), {"key": [key]}, shown)
        try:
            answer = json.loads(shown["text"])
        except ValueError:
            self.fail(f"the lookup page does not show JSON: {shown!r}")
        self.assertIsInstance(answer, dict, shown)
        self.assertIn("providers", answer, shown)
        self.assertEqual(answer.get("key"), key, answer)
        return answer
