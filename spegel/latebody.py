# -*- test-case-name: tests.unit.test_mirror_swarm -*-
"""
A blob answer whose headers leave before its bytes are at hand.

In a rollout of a large image every holder may be busy for longer than containerd 2.4 waits
for response headers (30 s, C{ResponseHeaderTimeout} in C{core/remotes/docker/registry.go});
past that it asks the upstream registry for the whole layer. When the mirror knows the blob's
size (a manifest a peer served names it), it can answer at once with the headers a holder
would send, and the bytes when a holder is free.

If none serves it in the end, the connection is cut before the announced length: containerd
reads that as an unexpected EOF and asks its hosts again for the rest (C{httpReadSeeker}, in
1.6 as in 2.x), this node first; the mirror then answers that request with a 404 at once
(L{spegel.mirror.Mirror}), and containerd goes upstream, as it would have.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from spegel.bodies import BodyInterrupted
from spegel.interfaces import IResponseBody, Upstream
from spegel.metrics import Metrics
from spegel.oci import BlobUnknown


@implementer(IResponseBody)
class LateBody:
    """
    The body of a whole blob whose headers were sent before a holder answered.

    @param answer: the mirror's answer to the request, when a holder gives one: a 200 whose body
        is the whole blob, verified as it goes; fails with L{BlobUnknown} when no holder served.
    @param length: the blob's size, announced in the headers.
    @param on_unserved: called when no holder served it: containerd is about to ask again.
    """

    _log = Logger()

    def __init__(
        self, answer: Deferred[Upstream], digest: str, length: int, *, on_unserved: Callable[[], None], metrics: Metrics
    ) -> None:
        self._answer = answer
        self._digest = digest
        self.length = length
        self._on_unserved = on_unserved
        self._metrics = metrics

    def write_to(self, request: Request) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run(request))

    async def _run(self, request: Request) -> None:
        request.write(b"")  # the headers, now
        try:
            upstream = await self._answer
        except BlobUnknown:
            self._metrics.mirror_early_headers_total.labels("cut").inc()
            self._on_unserved()
            raise BodyInterrupted("no holder served it") from None
        body = upstream.body
        if upstream.code != 200 or isinstance(body, bytes) or body.length != self.length:
            # The mirror accepts only whole answers of this length (L{spegel.mirror}): a bug.
            raise BodyInterrupted(f"the answer ({upstream.code}) does not match the headers sent")
        self._metrics.mirror_early_headers_total.labels("served").inc()
        self._log.debug("{digest}: a holder is serving the body of early headers", digest=self._digest)
        await body.write_to(request)
