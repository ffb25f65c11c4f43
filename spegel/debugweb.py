# -*- test-case-name: tests.unit.test_debugweb -*-
"""
Read-only debug pages for an operator, mounted at C{/debug/} on the metrics address when the
node runs with C{--debug-web-enabled} (the reference serves its debug page beside its metrics
too, away from the registry port containerd and the peers use).

 - C{/debug/web/}: one self-contained HTML page: this node's DHT id and addresses, whether it
   has joined the cluster, its routing table, how many keys it provides and the peers the
   mirror has put aside.
 - C{/debug/web/peers}: the same as JSON.
 - C{/debug/web/lookup?key=<digest or registry/repo:tag>}: one fresh provider lookup, with the
   time at which each provider arrived, bounded by L{LOOKUP_TIMEOUT}.

Nothing here changes what the node decides. (A lookup, like every lookup the mirror runs,
refreshes the routing table with the nodes that answer and caches the providers it finds.)
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from klein import Klein
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from twisted.web.template import Tag, flattenString, tags
from werkzeug.exceptions import MethodNotAllowed, NotFound

from spegel.dht.ids import Provider
from spegel.dht.routing import sort_by_distance
from spegel.interfaces import IDebugRouter
from spegel.oci import OCIError, UnparseableImageName, Unsupported, is_digest, parse_image_name
from spegel.peerhealth import PutAside
from spegel.registry import write_oci_error

# Long enough for a lookup that asks every one of the k closest nodes of a large cluster (the
# whole lookup of an unprovided key takes tens of milliseconds), short enough for a person
# waiting at a browser.
LOOKUP_TIMEOUT = 5.0
# The page is reachable by anyone who reaches the metrics port; each lookup sends datagrams to
# up to k nodes, so a reloading browser (or a loop of curl) must not flood the cluster.
MAX_CONCURRENT_LOOKUPS = 4

# The page loads nothing and runs nothing: whatever a field holds, it cannot become a script.
_CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"


class KeyInvalid(OCIError):
    status, code = 400, "KEY_INVALID"


class PageNotFound(OCIError):
    status, code = 404, "NOT_FOUND"


class TooManyLookups(OCIError):
    status, code = 503, "TOO_MANY_LOOKUPS"


class LookupFailed(OCIError):
    status, code = 502, "LOOKUP_FAILED"


@frozen
class PutAsidePeer:
    """
    A peer the mirror does not ask for now.

    @ivar seconds_left: until it may be asked again.
    """

    host: str
    registry_port: int
    seconds_left: float


def put_aside_peers(put_aside: PutAside) -> list[PutAsidePeer]:
    """
    The peers the mirror holds back now, soonest released first.
    """
    return [PutAsidePeer(host, port, round(left, 3)) for host, port, left in put_aside.listing()]


def parse_key(values: list[bytes] | None) -> str:
    """
    The DHT key of a C{?key=} parameter: a digest (C{sha256:<64 hex>}) or a tag key
    (C{registry/repo:tag}), exactly as nodes announce them.

    @param values: the parameter's values, as C{request.args} holds them.
    @raise KeyInvalid: when there is not exactly one such key.
    """
    if not values or not values[0]:
        raise KeyInvalid("missing key: ?key=sha256:<64 hex> or ?key=registry/repo:tag")
    if len(values) > 1:
        raise KeyInvalid("one key at a time")
    try:
        key = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise KeyInvalid("the key is not UTF-8") from None
    if is_digest(key):
        return key
    try:
        reference = parse_image_name(key)
    except UnparseableImageName:
        reference = None
    # Only the exact form nodes announce: a tag, no digest, nothing a parser would normalise.
    if reference is None or reference.tag is None or reference.digest is not None or (
        reference.tag_key != key
    ):
        raise KeyInvalid(
            "not a digest (sha256:<64 hex>) or a tag key (registry/repo:tag)", {"key": key[:300]}
        )
    return key


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DebugWeb:
    """
    The debug pages' Klein application, bound to one node.

    @param clock: times lookups and bounds them.
    @param router: the node's DHT.
    @param put_aside: the mirror's L{spegel.selection.PutAside}, read only.
    @param registry_address: the registry's listening address, as configured.
    @param lookup_timeout: how long a lookup may run before its answer is what was found so far.
    """

    app = Klein()
    # "/debug/web//peers" is not a page: a 404, not a redirect to one.
    app.url_map.merge_slashes = False
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        router: IDebugRouter,
        put_aside: PutAside,
        *,
        registry_address: tuple[str, int],
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ):
        self._clock = clock
        self._router = router
        self._put_aside = put_aside
        self._registry_address = registry_address
        self._lookup_timeout = lookup_timeout
        self._lookups = 0

    def resource(self) -> Any:
        """
        The resource to mount as the C{debug} child of the metrics site.
        """
        return self.app.resource()

    # -- what the pages show ------------------------------------------------------------

    def _router_address(self) -> str:
        try:
            host, port = self._router.address
        except RuntimeError:
            # Not listening (yet, or any more): say so rather than fail the page.
            return "not listening"
        return _host_port(host, port)

    def _contacts(self) -> list[dict[str, Any]]:
        routing = self._router.node.routing
        # Closest first: the deepest buckets are this node's neighbourhood, where the keys it
        # stores for others live.
        return [
            {
                "node_id": contact.node_id.hex(),
                "host": contact.host,
                "port": contact.port,
                "bucket": routing.bucket_index(contact.node_id),
            }
            for contact in sort_by_distance(self._router.node_id, routing)
        ]

    def _state(self) -> dict[str, Any]:
        aside = put_aside_peers(self._put_aside)
        return {
            "node_id": self._router.node_id.hex(),
            "router_address": self._router_address(),
            "registry_address": _host_port(*self._registry_address),
            "ready": bool(self._router.ready),
            "provided_keys": self._router.provided_keys_count(),
            "contacts": self._contacts(),
            "put_aside": [
                {"host": p.host, "registry_port": p.registry_port, "seconds_left": p.seconds_left}
                for p in aside
            ],
        }

    # -- routes -------------------------------------------------------------------------

    @app.route("/web/", methods=["GET"])
    async def index(self, request: Request) -> bytes:
        body = await render_page(self._state())
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        request.setHeader("Content-Security-Policy", _CONTENT_SECURITY_POLICY)
        _no_store(request)
        return body

    @app.route("/web/peers", methods=["GET"])
    def peers(self, request: Request) -> bytes:
        return _json(request, self._state())

    @app.route("/web/lookup", methods=["GET"])
    async def lookup(self, request: Request) -> bytes:
        key = parse_key(request.args.get(b"key"))
        if request.method == b"HEAD":
            # werkzeug routes HEAD with GET; a HEAD must not send datagrams to the cluster.
            request.setHeader("Content-Type", "application/json")
            return b""
        if self._lookups >= MAX_CONCURRENT_LOOKUPS:
            raise TooManyLookups(f"{MAX_CONCURRENT_LOOKUPS} lookups are running; try again")
        started = self._clock.seconds()
        found: list[dict[str, Any]] = []

        def arrived(provider: Provider) -> None:
            found.append(
                {
                    "node_id": provider.node_id.hex(),
                    "host": provider.host,
                    "registry_port": provider.registry_port,
                    "seconds": round(self._clock.seconds() - started, 6),
                }
            )

        # Fresh from the cluster: a cached answer would say nothing about the DHT now.
        lookup = self._router.find_providers(key, on_provider=arrived, use_cache=False)
        # The timeout cancels the lookup itself; a client that leaves cancels it too (Klein
        # cancels this coroutine, which cancels what it awaits).
        lookup.addTimeout(self._lookup_timeout, self._clock)
        self._lookups += 1
        timed_out = False
        try:
            await lookup
        except TimeoutError:
            timed_out = True
        except CancelledError:
            raise  # the client left: nobody to answer, nothing went wrong
        except Exception as e:
            self._log.failure("Debug lookup of {key} failed", key=key)
            raise LookupFailed(f"the lookup failed: {e}") from None
        finally:
            self._lookups -= 1
        return _json(
            request,
            {
                "key": key,
                "providers": list(found),
                "seconds": round(self._clock.seconds() - started, 6),
                "timed_out": timed_out,
            },
        )

    # -- errors, all as the registry's JSON ---------------------------------------------

    @app.handle_errors(OCIError)
    def _oci_error(self, request: IRequest, failure: Failure) -> bytes:
        error: OCIError = failure.value  # type: ignore[assignment]
        return write_oci_error(request, error)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return write_oci_error(request, PageNotFound("no such debug page"))

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return write_oci_error(request, Unsupported("the debug pages are read-only"))


def _no_store(request: Request) -> None:
    request.setHeader("Cache-Control", "no-store")


def _json(request: Request, value: Any) -> bytes:
    request.setHeader("Content-Type", "application/json")
    _no_store(request)
    return json.dumps(value, indent=2).encode("utf-8") + b"\n"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
code, td { font-family: monospace; font-size: 0.9em; }
.muted { color: #777; }
"""


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> Tag:
    return tags.table(
        tags.tr(*(tags.th(name) for name in header)),
        *(tags.tr(*(tags.td(str(cell)) for cell in row)) for row in rows),
    )


def _page(state: dict[str, Any]) -> Tag:
    """
    The HTML page for C{state} (what L{DebugWeb._state} returns), as a twisted.web.template tree:
    the flattener escapes every string it holds (hosts come from the network, and a page must not
    run what it shows), so no value reaches the page unescaped by omission.
    """
    contacts = state["contacts"]
    aside = state["put_aside"]
    summary = [
        ("DHT node id", state["node_id"]),
        ("Router address", state["router_address"]),
        ("Registry address", state["registry_address"]),
        ("DHT ready", "yes" if state["ready"] else "no"),
        ("Keys provided", state["provided_keys"]),
        ("Contacts", len(contacts)),
    ]
    if contacts:
        contact_table = _table(
            ("bucket", "node id", "host", "router port"),
            [(c["bucket"], c["node_id"], c["host"], c["port"]) for c in contacts],
        )
    else:
        contact_table = tags.p("No contacts: this node knows no other node.", class_="muted")
    if aside:
        aside_table = _table(
            ("host", "registry port", "seconds left"),
            [(p["host"], p["registry_port"], p["seconds_left"]) for p in aside],
        )
    else:
        aside_table = tags.p("None.", class_="muted")
    # Links are relative to /debug/web/, so the page works behind any path prefix.
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.title("spegel debug: ", state["node_id"][:16]),
            tags.style(_STYLE),
        ),
        tags.body(
            tags.h1("spegel debug"),
            tags.table(*(tags.tr(tags.th(name), tags.td(str(value))) for name, value in summary)),
            tags.h2(f"Routing table ({len(contacts)} contacts, closest first)"),
            contact_table,
            tags.h2("Peers put aside by the mirror"),
            aside_table,
            tags.h2("Provider lookup"),
            tags.form(
                tags.input(name="key", size="80", placeholder="sha256:<64 hex> or registry/repo:tag"),
                tags.button("Look up", type="submit"),
                action="lookup",
                method="get",
            ),
            tags.p(
                "JSON: ",
                tags.a("peers", href="peers"),
                " (this page's data), ",
                tags.code("lookup?key=<key>"),
                " (the form above).",
            ),
        ),
        lang="en",
    )


async def render_page(state: dict[str, Any]) -> bytes:
    """
    The page for C{state}, flattened to UTF-8 HTML with its doctype.
    """
    return b"<!DOCTYPE html>\n" + await flattenString(None, _page(state))
