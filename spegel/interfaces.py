# -*- test-case-name: tests.unit.test_interfaces -*-
"""
The collaborators several modules share, each declared once.

  - L{IRouter}: finds providers of a key (the DHT: L{spegel.dht.service.DHTService}); the mirror
    and the pull coalescer ask it.
  - L{IAnnouncer}: says which keys this node provides; the advertiser and the coalescer use it.
  - L{IDebugRouter}: what the debug pages read of the DHT besides lookups.
  - L{ILocalContent}: this node's own content (L{spegel.store.ContainerdContent}).
  - L{IMirror}: where the registry turns on a local miss (L{spegel.mirror.Mirror}); it answers
    with an L{Upstream}, a value the registry writes, and never sees the request.

Fakes in tests are checked against these with C{verifyObject}, so they cannot drift from the
real classes.
"""

from __future__ import annotations

from typing import Union

from attrs import frozen
from zope.interface import Attribute, Interface

# Set on every request a node sends to a peer: the peer answers from its own content only and
# never asks the cluster in turn (the loop guard).
MIRRORED_HEADER = "X-Spegel-Mirrored"


class IRouter(Interface):
    """
    Finds the nodes that provide a key.
    """

    def find_providers(key, *, on_provider=None, limit=20, use_cache=True):  # type: ignore[no-untyped-def]
        """
        Look up the providers of C{key}, calling C{on_provider} with each as it is found.

        @param limit: stop after this many.
        @param use_cache: whether a recent lookup's answer (which may be a miss) will do.
        @return: a L{Deferred} firing with every provider found, when the lookup ends.
        """


class IAnnouncer(Interface):
    """
    Says in the cluster which keys this node provides.
    """

    def provide(keys):  # type: ignore[no-untyped-def]
        """
        Start providing C{keys} (an iterable of strings).
        """

    def withdraw(keys):  # type: ignore[no-untyped-def]
        """
        Stop providing C{keys}.
        """


class ICoalescingRouter(IRouter, IAnnouncer):
    """
    Lookups and announcements both: what the pull coalescer needs.
    """


class IDebugRouter(IRouter):
    """
    What the debug pages read from the DHT: lookups as the mirror makes them, and its state.
    """

    node_id = Attribute("This node's id (bytes).")
    node = Attribute("The DHT node; its C{routing} is the routing table.")
    ready = Attribute("Whether the node has joined the cluster.")
    address = Attribute("The (host, port) the DHT listens on.")

    def provided_keys_count():  # type: ignore[no-untyped-def]
        """
        How many keys this node provides.
        """


class ILocalContent(Interface):
    """
    The registry's view of this node's own content (L{spegel.content}).
    """

    def resolve_tag(reference):  # type: ignore[no-untyped-def]
        """
        @return: a coroutine of the L{spegel.content.TagTarget} the tag points to.
        @raise ManifestUnknown: the tag is not known here.
        """

    def manifest(digest, media_type=None):  # type: ignore[no-untyped-def]
        """
        @return: a coroutine of the L{spegel.content.ManifestContent}.
        @raise ManifestUnknown: no such manifest here.
        """

    def blob(digest):  # type: ignore[no-untyped-def]
        """
        @return: a coroutine of the L{spegel.content.BlobContent}.
        @raise BlobUnknown: no such blob here.
        """

    def read(digest, offset, size):  # type: ignore[no-untyped-def]
        """
        Read at most C{size} bytes of a blob from C{offset}, through containerd.

        @return: a L{Deferred} of the bytes.
        """


class IResponseBody(Interface):
    """
    A body too large to hand over as bytes, verified as it goes.
    """

    length = Attribute("How many bytes the body holds.")

    def write_to(request):  # type: ignore[no-untyped-def]
        """
        Write the body to C{request}, whose status and headers are set, with backpressure.

        @return: a L{Deferred} that fires when the last byte was handed over, and fails with
            L{spegel.bodies.BodyInterrupted} when the body could not be completed: the caller
            then cuts the response short, which is how HTTP/1.1 says it is not whole.
        """


@frozen
class Upstream:
    """
    An answer obtained from elsewhere, for the registry to write.

    @ivar code: the HTTP status.
    @ivar headers: (name, value) pairs to set on the response, in order (a later one wins).
    @ivar body: the whole body (empty for C{HEAD}), or an L{IResponseBody}.
    """

    code: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: Union[bytes, IResponseBody]


class IMirror(Interface):
    """
    Where a request goes that this node cannot answer from its own content.
    """

    def manifest(reference, *, method, accept):  # type: ignore[no-untyped-def]
        """
        Get a manifest from a peer.

        @param method: C{"GET"} or C{"HEAD"}.
        @param accept: the client's C{Accept} header, or L{None}.
        @return: a coroutine of an L{Upstream} whose body is the whole, verified manifest.
        @raise ManifestUnknown: no peer served it.
        """

    def blob(reference, *, method, byte_range):  # type: ignore[no-untyped-def]
        """
        Get a blob, or one range of it, from peers.

        @param byte_range: the C{Range} header to forward (already checked against C{If-Range}),
            or L{None} for the whole blob.
        @return: a coroutine of an L{Upstream}.
        @raise BlobUnknown: no peer served it.
        """
