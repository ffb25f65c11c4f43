# -*- test-case-name: tests.unit.test_registry -*-
"""
The pull-only OCI registry every node serves to its own containerd and to its peers.

Manifests (by tag or digest) and blobs (by digest, whole or one byte range) come from this
node's containerd. What it does not hold is handed to the mirror (the P2P lookup) unless the
request came from a peer (C{X-Spegel-Mirrored: true}, the loop guard); with no mirror, or when
the mirror finds nothing, the answer is a 404 that sends containerd on to the next host.

Every error leaves as the distribution spec's JSON body, from one place (L{_oci_error}).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence
from urllib.parse import unquote_to_bytes

from attrs import frozen
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from spegel.bodies import BodyInterrupted, ChunkedReadProducer, FileBodyProducer
from spegel.oci import (
    BlobUnknown,
    ByteRange,
    MalformedRequest,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    OCIError,
    Reference,
    Unsupported,
    parse_digest,
    parse_range,
    parse_reference,
    parse_registry_host,
    parse_repository,
    range_to_honour,
    TooManyUploads,
)
from spegel.content import BlobContent
from spegel.ingest import GrowingFile, NotYet, PartialPulls
from spegel.interfaces import MIRRORED_HEADER, ILocalContent, IMirror
from spegel.metrics import Metrics
from spegel.pacing import UNPACED, IPacer
from spegel.uploads import (
    ALTERNATIVES_HEADER,
    DEFERRED_HEADER,
    PARTIAL_HEADER,
    PARTIAL_STARTING,
    RETRY_AFTER_SECONDS,
    UPLOADS_HEADER,
    UPLOAD_STALL_TIMEOUT,
    UploadShares,
    UploadSlots,
    parse_alternatives,
)
from spegel.responses import (
    abort_response,
    request_header as _header,
    set_blob_headers,
    write_oci_error,
    write_upstream,
)

# Importers of these from here predate spegel.responses and spegel.interfaces.
__all__ = [
    "MIRRORED_HEADER",
    "RegistryFilter",
    "RegistryResource",
    "abort_response",
    "ask_mirror",
    "set_blob_headers",
    "write_oci_error",
]


@frozen
class RegistryFilter:
    """
    Which requests this node serves at all.

    @ivar mirrored_registries: the registry hosts (C{host[:port]}) that may be asked for; empty
        means every registry.
    @ivar patterns: regexes searched in C{registry/repo[:tag]}; a match filters the request out.
    """

    mirrored_registries: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()

    def check(self, reference: Reference) -> None:
        """
        @raise NameUnknown: when the request is filtered out: a 404, as for any miss.
        """
        if (
            self.mirrored_registries
            and reference.registry is not None
            and reference.registry not in self.mirrored_registries
        ):
            raise NameUnknown("registry is not mirrored", {"registry": reference.registry})
        subject = reference.filter_subject
        for pattern in self.patterns:
            if pattern.search(subject):
                raise NameUnknown("repository is filtered", {"name": subject})


def _client_host(request: Request) -> str:
    """The asking host (a peer's node), as its connection says."""
    return str(getattr(request.getClientAddress(), "host", ""))


async def ask_mirror(mirror: IMirror, request: Request, ref: Reference, kind: str) -> bytes | None:
    """
    Answer C{request} for the manifest or blob (C{kind}) C{ref} with what C{mirror} gets from
    the cluster.

    @raise ManifestUnknown: (or L{BlobUnknown}) no peer served it.
    """
    method = request.method.decode("ascii")
    if kind == "manifest":
        upstream = await mirror.manifest(ref, method=method, accept=_header(request, "Accept"))
    else:
        byte_range = range_to_honour(_header(request, "Range"), _header(request, "If-Range"), ref.digest)  # type: ignore[arg-type]
        upstream = await mirror.blob(ref, method=method, byte_range=byte_range)
    return await write_upstream(request, upstream)


def _observed(handler: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """
    Record the HTTP metrics of every request a route handles.
    """

    def decorate(route: Callable[..., Any]) -> Callable[..., Any]:
        def observe(self: "RegistryResource", request: Request, **kwargs: Any) -> Any:
            started = self._clock.seconds()
            method = request.method.decode("ascii", "replace")
            inflight = self._metrics.http_requests_inflight.labels(handler)
            inflight.inc()

            def finished(result: object) -> None:
                inflight.dec()
                code = str(request.code)
                labels = (handler, method, code)
                self._metrics.http_request_duration_seconds.labels(*labels).observe(
                    self._clock.seconds() - started
                )
                size = request.sentLength
                if not isinstance(result, Failure) and method != "HEAD":
                    size = max(size, int(request.responseHeaders.getRawHeaders(
                        b"content-length", [b"0"])[0] or 0))
                self._metrics.http_response_size_bytes.labels(*labels).observe(size)

            request.notifyFinish().addBoth(finished)
            return route(self, request, **kwargs)

        observe.__name__ = route.__name__
        observe.__doc__ = route.__doc__
        return observe

    return decorate


class RegistryResource:
    """
    The registry's Klein application, bound to this node's content.

    @param clock: for timing requests.
    @param content: what this node's containerd holds.
    @param ready: tells whether the node is ready (C{/readyz}).
    @param mirror: what to ask on a local miss; L{None} answers every miss with a 404.
    @param uploads: the slots and the bandwidth cap blob bodies sent to peers share.
    @param shares: how much of each blob this node sent peers lately (its fair share).
    @param partials: the blobs this node's containerd is downloading, said in the DHT and served
        to peers from their ingests as they arrive; L{None}: a blob is served once it is whole.
    @param metrics: where the node's figures are recorded.
    """

    app = Klein()
    # Repository names never contain "//": such a path is malformed and gets a 4xx, not a
    # redirect to a path the client did not ask for.
    app.url_map.merge_slashes = False
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        content: ILocalContent,
        registry_filter: RegistryFilter = RegistryFilter(),
        *,
        ready: Callable[[], bool] = lambda: True,
        mirror: IMirror | None = None,
        uploads: UploadSlots | None = None,
        shares: UploadShares | None = None,
        partials: PartialPulls | None = None,
        metrics: Metrics,
    ):
        self._clock = clock
        self._content = content
        self._filter = registry_filter
        self._ready = ready
        self._mirror = mirror
        self._metrics = metrics
        self._uploads = uploads if uploads is not None else UploadSlots(metrics=metrics)
        self._shares = shares if shares is not None else UploadShares(clock)
        self._partials = partials

    def resource(self) -> Any:
        return UTF8Only(self.app.resource())

    @app.route("/livez", methods=["GET", "HEAD"])
    @_observed("livez")
    def livez(self, request: Request) -> bytes:
        return b""

    @app.route("/readyz", methods=["GET", "HEAD"])
    @_observed("readyz")
    def readyz(self, request: Request) -> bytes:
        if not self._ready():
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            return b"not ready\n"
        return b""

    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2", methods=["GET", "HEAD"])
    @_observed("v2")
    def v2(self, request: Request) -> bytes:
        request.setHeader("Docker-Distribution-API-Version", "registry/2.0")
        return b""

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
    @_observed("manifest")
    async def manifest(self, request: Request, name: str, reference: str) -> bytes | None:
        ref = self._reference(request, name, reference)
        try:
            if ref.digest is not None:
                found = await self._content.manifest(ref.digest)
            else:
                target = await self._content.resolve_tag(ref)
                found = await self._content.manifest(target.digest, target.media_type)
        except ManifestUnknown:
            return await self._miss(request, ref, "manifest")
        self._count(request, ref, "hit")
        request.setHeader("Content-Type", found.media_type)
        request.setHeader("Content-Length", str(len(found.data)))
        request.setHeader("Docker-Content-Digest", found.digest)
        request.setHeader("ETag", f'"{found.digest}"')
        if request.method == b"HEAD":
            return b""
        self._metrics.served_bytes_total.labels("local").inc(len(found.data))
        return found.data

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD"])
    @_observed("blob")
    async def blob(self, request: Request, name: str, digest: str) -> bytes | None:
        registry = self._registry(request)
        blob_digest = parse_digest(digest)
        ref = Reference(registry, parse_repository(name), digest=blob_digest)
        self._filter.check(ref)
        to_peer = _header(request, MIRRORED_HEADER) == "true"
        if to_peer:
            request.setHeader(UPLOADS_HEADER, self._uploads.header_value())
        upload = to_peer and request.method == b"GET"
        if upload and not self._uploads.take():
            # At once, before looking at the content: a busy node says so in microseconds, and
            # the asking mirror tries another holder.
            raise TooManyUploads("serving as many peers as --max-uploads allows", {"limit": self._uploads.limit})
        growing: GrowingFile | None = None
        try:
            try:
                found = await self._content.blob(blob_digest)
            except BlobUnknown:
                growing = await self._being_pulled(request, blob_digest) if to_peer else None
                if growing is None:
                    if self._partials is None or to_peer or request.method != b"GET":
                        return await self._miss(request, ref, "blob")
                    # containerd downloads it next, through the mirror or upstream: peers may
                    # fetch it from here as it arrives.
                    self._partials.started(blob_digest)
                    try:
                        return await self._miss(request, ref, "blob")
                    finally:
                        self._partials.answered(blob_digest)
                found = BlobContent(blob_digest, growing.total, None)
            return await self._serve_blob(request, ref, found, upload, growing)
        finally:
            if growing is not None:
                growing.close()
            if upload:
                self._uploads.give_back()

    async def _being_pulled(self, request: Request, digest: str) -> GrowingFile | None:
        """
        What this node's containerd has written so far of C{digest}, which it is downloading,
        for a peer; L{None} when it is not downloading it.
        """
        if self._partials is None:
            return None
        try:
            return await self._partials.open(digest)
        except NotYet:
            # Its download starts in a moment; the asking mirror takes a 429 as "ask another
            # holder, or this one again shortly".
            request.setHeader(PARTIAL_HEADER, PARTIAL_STARTING)
            raise TooManyUploads("this node is about to download the blob: ask again shortly", {"digest": digest}) from None

    async def _serve_blob(
        self, request: Request, ref: Reference, found: BlobContent, upload: bool, growing: GrowingFile | None
    ) -> bytes | None:
        """
        Send C{found}, whole or the range asked for; C{upload}: to a peer, holding an upload slot.
        """
        if upload and self._shares.should_defer(
            found.digest, found.size, parse_alternatives(_header(request, ALTERNATIVES_HEADER)), _client_host(request)
        ):
            self._metrics.uploads_deferred_total.inc()
            request.setHeader(DEFERRED_HEADER, "true")
            raise TooManyUploads(
                "this node has served its share of the blob: ask the other holders first", {"digest": found.digest}
            )
        self._count(request, ref, "hit")
        byte_range = parse_range(range_to_honour(_header(request, "Range"), _header(request, "If-Range"), found.digest), found.size)
        if upload:
            self._shares.promise(found.digest, byte_range.length if byte_range else found.size)
        if growing is not None:
            request.setHeader(PARTIAL_HEADER, "true")
        # Only uploads share the cap (--max-upload-rate): this node's containerd is never held back.
        pacer = self._uploads.pacer() if upload else UNPACED
        try:
            return await self._send_blob(request, found, byte_range, pacer, upload, growing)
        finally:
            pacer.stop()

    async def _send_blob(
        self,
        request: Request,
        found: BlobContent,
        byte_range: ByteRange | None,
        pacer: IPacer,
        upload: bool,
        growing: GrowingFile | None,
    ) -> bytes | None:
        set_blob_headers(request, found.digest, found.size, byte_range)
        if request.method == b"HEAD":
            return b""
        first = byte_range.first if byte_range else 0
        length = byte_range.length if byte_range else found.size
        served = self._uploads.sent if upload else self._metrics.served_bytes_total.labels("local").inc
        # Only a peer that stops reading is cut: this node's containerd holds no upload slot.
        stall_timeout = UPLOAD_STALL_TIMEOUT if upload else 0.0
        producer: FileBodyProducer | ChunkedReadProducer | None = None
        if growing is not None:
            # The headers now, not with the first byte, which may be seconds away (the asking
            # mirror gives up on a peer that sends no headers within its deadline).
            request.write(b"")
            producer = ChunkedReadProducer(
                request, growing.read, first, length, on_bytes=served, pacer=pacer, ready=growing.wait_for,
                clock=self._clock, stall_timeout=stall_timeout,
            )
        elif found.path is not None:
            try:
                fd = os.open(found.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self._log.warn("cannot open {path}, reading through containerd: {e}",
                               path=found.path, e=e)
            else:
                producer = FileBodyProducer(
                    request, fd, first, length, on_bytes=served, pacer=pacer, clock=self._clock, stall_timeout=stall_timeout
                )
        if producer is None:
            producer = ChunkedReadProducer(
                request,
                lambda offset, size: self._content.read(found.digest, offset, size),
                first,
                length,
                on_bytes=served,
                pacer=pacer,
                clock=self._clock,
                stall_timeout=stall_timeout,
            )
        try:
            await producer.start()
        except BodyInterrupted as e:
            self._log.info("blob {digest} interrupted: {e}", digest=found.digest, e=e)
            abort_response(request)
        return None

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD"])
    @_observed("unknown")
    def unknown_path(self, request: Request, rest: str) -> bytes:
        raise NameUnknown("not a registry API path", {"path": rest[:300]})

    @app.route("/v2/<path:rest>", methods=["PUT", "POST", "PATCH", "DELETE"])
    @_observed("unsupported")
    def unsupported(self, request: Request, rest: str) -> bytes:
        raise Unsupported("this registry is a pull-only mirror")

    @app.handle_errors(OCIError)
    def _oci_error(self, request: IRequest, failure: Failure) -> bytes:
        error: OCIError = failure.value  # type: ignore[assignment]
        if isinstance(error, TooManyUploads):
            # Every 429 to a peer (at the limit, about to download, over its share): the asking
            # mirror asks another holder, or this one again after this.
            request.setHeader("Retry-After", str(RETRY_AFTER_SECONDS))
        return write_oci_error(request, error)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return write_oci_error(request, NameUnknown("not found"))

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return write_oci_error(request, Unsupported("method not allowed"))

    @app.handle_errors(HTTPException)
    def _other_http_error(self, request: IRequest, failure: Failure) -> bytes:
        # Whatever else routing raises (a redirect, a bad request) still answers in JSON.
        error = MalformedRequest(failure.getErrorMessage())
        return write_oci_error(request, error)

    def _registry(self, request: Request) -> str | None:
        values: Sequence[bytes] | None = request.args.get(b"ns")
        if not values:
            return None
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            text = repr(values[0])
        return parse_registry_host(text)

    def _reference(self, request: Request, name: str, reference: str) -> Reference:
        ref = parse_reference(self._registry(request), name, reference)
        self._filter.check(ref)
        if ref.tag is not None and ref.registry is None:
            # A tag means nothing without its registry: docker.io/x:latest is not quay.io/x:latest.
            raise ManifestUnknown("a tag request needs ?ns=<registry>")
        return ref

    async def _miss(self, request: Request, ref: Reference, kind: str) -> bytes | None:
        """
        This node does not hold C{ref}: ask the cluster, unless a peer is asking.
        """
        if self._mirror is not None and _header(request, MIRRORED_HEADER) != "true":
            try:
                result = await ask_mirror(self._mirror, request, ref, kind)
            except (ManifestUnknown, BlobUnknown):
                pass
            except CancelledError:
                # The client went away (Klein cancels the request's Deferred): nothing to answer.
                self._log.info("client left while {ref} was mirrored", ref=ref)
                raise
            except Exception:
                # A bug in the mirror must not turn a miss into a 5xx: containerd would stall
                # instead of falling back. A response already under way can only be cut short.
                self._log.failure("mirroring {ref} failed", ref=ref)
                if request.startedWriting:
                    abort_response(request)
                    return None
            else:
                self._count(request, ref, "hit")
                return result
        self._count(request, ref, "miss")
        if kind == "manifest":
            raise ManifestUnknown("manifest unknown", {"reference": ref.digest or ref.tag})
        raise BlobUnknown("blob unknown", {"digest": ref.digest})

    def _count(self, request: Request, ref: Reference, cache: str) -> None:
        # Only containerd's own requests count; a peer's request is part of another node's.
        if _header(request, MIRRORED_HEADER) != "true":
            self._metrics.mirror_requests_total.labels(ref.registry or "", cache).inc()


class UTF8Only(Resource):
    """
    Answers a request whose path or query is not UTF-8 with the OCI error JSON before it
    reaches Klein, which would log a traceback and answer in plain text.  No image name,
    reference or registry is anything but ASCII, so nothing valid is refused.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Request) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            for name, values in request.args.items():
                name.decode("utf-8")
                for value in values:
                    value.decode("utf-8")
        except UnicodeDecodeError:
            return write_oci_error(request, NameInvalid("the request's path or query is not UTF-8"))
        return self._inner.render(request)
