# -*- test-case-name: tests.test_uploads -*-
"""
Blob uploads to peers: how many this node serves at once, and how busy it says it is.

In a rollout every node asks the first holders of an image for its layers at the same moment.
Served all at once, each upload gets a sliver of the holder's uplink and CPU, every pull takes
as long as the slowest share, and nodes that finished early sit idle with the image.  With
C{--max-uploads N} a node streams at most N blob bodies to peers at a time; the next peer is
answered at once with 429 Too Many Requests and C{Retry-After}, which the asking node's mirror
takes as "busy": it asks another holder, or this one again shortly (L{spegel.hedging}), never a
failure that puts the peer aside.  Uploads finish sooner, their receivers become holders sooner,
and the load spreads over the swarm.

Every blob answer to a peer also carries C{Spegel-Uploads: <active>/<limit>}, so the asking node
prefers idle holders (L{spegel.selection.PeerLoad}).  The value is advice, not trusted: a node
lying about it can only attract or repel requests it could refuse anyway.

With C{--max-upload-rate} the uploads also share a bandwidth cap (L{spegel.pacing.TokenBucket}):
each gets its pacer here, L{UploadSlots.pacer}.
"""

from __future__ import annotations

from attrs import define, field

from spegel.metrics import Metrics
from spegel.pacing import UNPACED, IPacer, TokenBucket

UPLOADS_HEADER = "Spegel-Uploads"
# On a blob answer served from a download still under way (L{spegel.ingest}): its bytes come as
# fast as this node receives them, so the asking mirror does not fetch pieces of it in parallel.
PARTIAL_HEADER = "Spegel-Partial"
# What a busy node asks a peer to wait before asking again: short, as uploads of layers finish
# in seconds on a LAN; the asking mirror jitters it.
RETRY_AFTER_SECONDS = 1


@define
class UploadSlots:
    """
    @ivar limit: blob bodies served to peers at once; 0: no limit.
    @ivar active: those being served now.
    @ivar bandwidth: the cap they share (C{--max-upload-rate}); L{None}: no cap.
    @ivar metrics: where the refusals, the active count and the bytes sent are recorded.
    """

    limit: int = 0
    active: int = 0
    bandwidth: TokenBucket | None = None
    metrics: Metrics = field(kw_only=True, repr=False)

    def take(self) -> bool:
        """
        Start an upload if a slot is free; L{False} (and counted) when the node is at its limit.
        """
        if self.limit and self.active >= self.limit:
            self.metrics.uploads_refused_total.inc()
            return False
        self.active += 1
        self.metrics.uploads_active.set(self.active)
        return True

    def give_back(self) -> None:
        self.active -= 1
        self.metrics.uploads_active.set(self.active)

    def sent(self, count: int) -> None:
        """
        Count C{count} body bytes sent to a peer: served from local content, and uploaded.
        """
        self.metrics.served_bytes_total.labels("local").inc(count)
        self.metrics.uploaded_bytes_total.inc(count)

    def pacer(self) -> IPacer:
        """
        How fast one more upload may go: its share of L{bandwidth}.
        """
        return self.bandwidth.upload() if self.bandwidth is not None else UNPACED

    def header_value(self) -> str:
        """C{active/limit} (C{active/0} without a limit), for L{UPLOADS_HEADER}."""
        return f"{self.active}/{self.limit}"


def parse_uploads_header(value: str | None) -> tuple[int, int] | None:
    """
    (active, limit) from a peer's L{UPLOADS_HEADER}; L{None} when absent or unreadable (a peer
    of another version, or one sending garbage: neither counts as busy).
    """
    if not value:
        return None
    active, _, limit = value.partition("/")
    if not (active.isdigit() and limit.isdigit()) or len(active) > 6 or len(limit) > 6:
        return None
    return int(active), int(limit)
