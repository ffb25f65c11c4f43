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

A node also keeps to a fair share of each blob (L{UploadShares}).  In a rollout the first node to
hold a layer would otherwise serve it all along: its slots fill while it downloads, and once it
is whole it is the fastest holder, so every slot it frees is taken at once.  So an asking mirror
says how many other holders it could ask instead, at hand or busy for a moment, not counting
nodes about to download it with nothing of it yet (C{Spegel-Alternatives}); a node that has
already sent peers L{FAIR_SHARE_COPIES} copies of the blob lately answers one that has any with
429 and C{Spegel-Deferred: true}.  The asking mirror asks those others first, the busy ones
again when they are due, and this node again after them (L{spegel.selection.deferral_delay},
about 2 s), naming the holders under their share it still waits for: while there are any, this
node defers it again (the asker asks them again, and this node after them; only their busy
answers spend its patience); once every holder left deferred it, it names none, and is served.
An asker that names no other holder is deferred too, once (the node remembers it for
L{DEFERRED_ASKER_FOR}): it looks for holders afresh, and the peers this node has served the blob
to hold it by then, whole or arriving; if it finds none, it asks again and is served.

A peer that stops reading an upload loses it after L{UPLOAD_STALL_TIMEOUT}.
"""

from __future__ import annotations

from attrs import define, field
from cachetools import TTLCache
from twisted.internet.interfaces import IReactorTime

from spegel.metrics import Metrics
from spegel.pacing import UNPACED, IPacer, TokenBucket

UPLOADS_HEADER = "Spegel-Uploads"
# A peer that takes nothing of an upload for this long loses it (L{spegel.bodies}): a peer that
# asks and stops reading would otherwise hold one of the --max-uploads slots for good. An honest
# one is paused by its own client at most that long, and resumes elsewhere with a Range request.
UPLOAD_STALL_TIMEOUT = 60.0
# On a blob answer served from a download still under way (L{spegel.ingest}): its bytes come as
# fast as this node receives them, so the asking mirror does not fetch pieces of it in parallel.
PARTIAL_HEADER = "Spegel-Partial"
# Its value on a 429 from a node about to download the blob, with none of it written yet.
PARTIAL_STARTING = "starting"
# Sent by an asking mirror: how many other holders of the blob it could ask now, instead.
ALTERNATIVES_HEADER = "Spegel-Alternatives"
# On a 429 from a node that has served its fair share of the blob (L{UploadShares}): ask the
# others first, and this node again after them.
DEFERRED_HEADER = "Spegel-Deferred"
# Copies of one blob a node sends peers before it leaves the next asker that has other holders
# to them.  Two keeps the first holder of an image near the mean in a rollout (it sends at most
# these, plus what nobody else could serve), and costs a node-to-node round trip per deferral.
FAIR_SHARE_COPIES = 2
# A blob's count starts again after this long without a peer asking for it: the share is about
# one rollout, not the node's lifetime.
SHARE_WINDOW = 600.0
# A peer deferred is asked back within seconds (L{spegel.selection.deferral_delay}): within
# this long, its request naming no other holder is its request asked again.
DEFERRED_ASKER_FOR = 30.0
MAX_SHARED_DIGESTS = 4096
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


def parse_alternatives(value: str | None) -> int | None:
    """
    The other holders an asking mirror could ask (L{ALTERNATIVES_HEADER}); L{None} when absent
    or unreadable: a client that does not speak of them (another version, a person with curl)
    is never deferred.
    """
    if not value or not value.isdigit() or len(value) > 6:
        return None
    return int(value)


@define
class UploadShares:
    """
    How much of each blob this node has sent peers lately, to keep to a fair share of it (see
    the module's docstring).  Counted are the bytes promised, each answer's length when it
    starts: an upload under way counts in full, one cut short counts too (it was the slot's).
    """

    clock: IReactorTime
    fair_copies: int = FAIR_SHARE_COPIES
    # digest -> (bytes promised to peers, when last); oldest first.
    _promised: dict[str, tuple[int, float]] = field(factory=dict)
    # (asking host, digest) deferred lately: its next request naming no other holder is served.
    _deferred: TTLCache[tuple[str, str], bool] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._deferred = TTLCache(maxsize=MAX_SHARED_DIGESTS, ttl=DEFERRED_ASKER_FOR, timer=self.clock.seconds)

    def should_defer(self, digest: str, size: int, alternatives: int | None, asker: str) -> bool:
        """
        Whether to leave a peer's request for C{digest} to other holders: this node has sent
        peers its share of the blob lately, and the asker named other holders, or named none and
        was not deferred a moment ago.  An asker that does not say (L{None}) is served.  A deferral makes the asker look for holders afresh, and
        the nodes this node has been serving the blob to are holders by then; if it finds none,
        it asks again, and is served.
        """
        if alternatives is None or not self.over(digest, size):
            return False
        key = (asker, digest)
        if alternatives == 0 and key in self._deferred:
            return False
        self._deferred[key] = True
        return True

    def _current(self, digest: str) -> int:
        promised = self._promised.get(digest)
        if promised is None or self.clock.seconds() - promised[1] >= SHARE_WINDOW:
            return 0
        return promised[0]

    def over(self, digest: str, size: int) -> bool:
        """
        Whether this node has sent peers its fair share of C{digest} (of C{size} bytes) lately.
        """
        return self.fair_copies > 0 and self._current(digest) >= self.fair_copies * max(size, 1)

    def promise(self, digest: str, length: int) -> None:
        """An answer of C{length} bytes of C{digest} to a peer starts."""
        total = self._current(digest) + length
        self._promised.pop(digest, None)
        if len(self._promised) >= MAX_SHARED_DIGESTS:
            del self._promised[next(iter(self._promised))]  # the one asked for longest ago
        self._promised[digest] = (total, self.clock.seconds())
