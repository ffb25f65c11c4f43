# -*- test-case-name: tests.unit.test_containerd_client -*-
"""
A Twisted-friendly client for the parts of containerd's gRPC API spegel uses.

grpcio's synchronous API blocks, so every call runs on a thread pool owned by
L{ContainerdClient} and comes back to the reactor as a L{Deferred}.  Results are plain attrs
values (L{Image}, L{Descriptor}, L{ContentInfo}); gRPC errors become L{ContainerdError}
subclasses, so callers never see grpc types.

containerd scopes images and content by namespace: every call carries the client's namespace in
the C{containerd-namespace} gRPC metadata, as containerd's own clients do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from attrs import field, frozen
from google.protobuf import any_pb2, empty_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from spegel.containerd.api import (
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    version_pb2_grpc,
)

_T = TypeVar("_T")

#: The gRPC metadata key containerd reads the namespace from.
NAMESPACE_METADATA_KEY = "containerd-namespace"

#: The largest read L{ContainerdClient.read_content} accepts: callers stream blobs in pieces of
#: at most this size, so no call ever buffers a whole layer.
MAX_READ_SIZE = 4 * 1024 * 1024

# A node with many images gets one ListImagesResponse holding all of them; grpc's default 4 MiB
# receive limit would turn a big image store into an error.  containerd's own client uses 16 MiB.
_MAX_RECEIVE_MESSAGE_LENGTH = 64 * 1024 * 1024

# grpc backs off reconnection up to 2 minutes by default; a restarted local containerd should be
# found again within a second (a reconnection is a connect on a local socket: cheap to retry).
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_RECEIVE_MESSAGE_LENGTH),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)

_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")


@frozen
class Descriptor:
    """
    An OCI content descriptor, as containerd stores an image's target.
    """

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(factory=dict)


@frozen
class Image:
    """
    A named image in containerd's image store: C{name} (e.g. C{docker.io/library/alpine:3.20})
    pointing at C{target}, its root manifest or index.
    """

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(factory=dict)


@frozen
class ContentInfo:
    """
    What containerd knows about one blob in its content store.
    """

    digest: str
    size: int
    labels: Mapping[str, str] = field(factory=dict)


class ContainerdError(Exception):
    """
    containerd refused or failed a call; the message carries its gRPC status and details.
    """


class ImageNotFound(ContainerdError):
    """
    No image of that name in the namespace.
    """


class ContentNotFound(ContainerdError):
    """
    No blob with that digest in the namespace's content store.
    """


class ContainerdUnavailable(ContainerdError):
    """
    containerd cannot be reached: socket missing, daemon down or restarting, or no answer within
    the call timeout.  Worth retrying later.
    """


class EventStream(Protocol):
    """
    An open C{Subscribe} call: iterating blocks for the next envelope and raises
    L{grpc.RpcError} when the stream breaks; C{cancel} ends it from any thread.
    """

    def __iter__(self) -> Iterator[events_pb2.Envelope]: ...

    def cancel(self) -> bool: ...


def content_path_for(content_root: str, digest: str) -> str:
    """
    The file holding blob C{digest} in a containerd content store rooted at C{content_root}
    (the C{io.containerd.content.v1.content} directory): C{<root>/blobs/<algorithm>/<hex>}.

    @raise ValueError: unless C{digest} is C{sha256:} or C{sha512:} followed by the right number
        of lowercase hex digits, so no request can name a path outside the store.
    """
    # fullmatch: "$" would let a trailing newline through.
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(f"not a sha256 or sha512 digest: {digest!r}")
    algorithm, hexdigest = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return os.path.join(content_root, "blobs", algorithm, hexdigest)


def quote_filter_value(value: str) -> str:
    """
    C{value} as a double-quoted string for a containerd filter, where an unquoted C{.} or C{/}
    would otherwise be read as syntax (C{namespace==k8s.io} does not parse as meant).
    """
    # containerd unquotes with Go's strconv rules, which accept JSON's escapes for ASCII.
    return json.dumps(value, ensure_ascii=True)


def _translate(error: grpc.RpcError, not_found: type[ContainerdError] = ContainerdError) -> ContainerdError:
    """
    The typed error for a failed gRPC call.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = f"{name}: {details or error}"
    if code is grpc.StatusCode.NOT_FOUND:
        return not_found(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ContainerdUnavailable(message)
    return ContainerdError(message)


def _descriptor(message: Any) -> Descriptor:
    return Descriptor(
        media_type=message.media_type,
        digest=message.digest,
        size=message.size,
        annotations=dict(message.annotations),
    )


def _image(message: images_pb2.Image) -> Image:
    return Image(name=message.name, target=_descriptor(message.target), labels=dict(message.labels))


def _default_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)


def _default_threadpool(size: int) -> ThreadPool:
    return ThreadPool(minthreads=0, maxthreads=size, name="spegel-containerd")


class ContainerdClient(Service):
    """
    containerd's images, content, version, introspection and events services, from the reactor.

    Start it (C{startService}) before calling: that starts its thread pool and opens the channel.
    C{stopService} closes the channel, which cancels calls in flight, and stops the pool.  Add it
    to the application before the services that call it, so it starts before and stops after them.

    Every method returns a L{Deferred} that fails with a L{ContainerdError}; none raises.
    """

    def __init__(
        self,
        reactor: Any,
        socket_path: str,
        namespace: str,
        *,
        threadpool_size: int = 8,
        call_timeout: float = 10.0,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
        threadpool_factory: Callable[[int], ThreadPool] | None = None,
    ) -> None:
        """
        @param reactor: an C{IReactorFromThreads} and C{IReactorCore} provider.
        @param socket_path: containerd's gRPC socket, e.g. C{/run/containerd/containerd.sock}.
        @param namespace: the containerd namespace (C{k8s.io} for the kubelet's images).
        @param threadpool_size: the most calls in flight at once.
        @param call_timeout: seconds before a unary call (or a whole read) fails with
            L{ContainerdUnavailable}.
        @param channel_factory: makes the gRPC channel from a target string; tests pass a fake.
        @param threadpool_factory: makes the thread pool from its size; tests pass a synchronous one.
        """
        self._reactor = reactor
        self.socket_path = os.path.abspath(socket_path)
        self.namespace = namespace
        self.target = "unix://" + self.socket_path
        self._call_timeout = call_timeout
        self._metadata = ((NAMESPACE_METADATA_KEY, namespace),)
        self._channel_factory = channel_factory or _default_channel
        self._pool = (threadpool_factory or _default_threadpool)(threadpool_size)
        self._pool_running = False
        self._shutdown_trigger: Any = None
        self._channel: grpc.Channel | None = None
        self._images: images_pb2_grpc.ImagesStub | None = None
        self._content: content_pb2_grpc.ContentStub | None = None
        self._version: version_pb2_grpc.VersionStub | None = None
        self._introspection: introspection_pb2_grpc.IntrospectionStub | None = None
        self._events: events_pb2_grpc.EventsStub | None = None

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._pool_running = True
        # Outside a service hierarchy nobody would call stopService, and a pool that is never
        # stopped keeps the process alive at exit.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
        self._channel = self._channel_factory(self.target)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._version = version_pb2_grpc.VersionStub(self._channel)
        self._introspection = introspection_pb2_grpc.IntrospectionStub(self._channel)
        self._events = events_pb2_grpc.EventsStub(self._channel)

    def stopService(self) -> None:
        super().stopService()
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        # Closing first cancels calls in flight, so stopping the pool does not wait for them.
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self._pool_running:
            self._pool_running = False
            self._pool.stop()

    def _call(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run the blocking C{function(*args)} on the pool; errors are translated there too.
        """
        # The pool may also have been stopped by the reactor's shutdown trigger alone.
        if self._channel is None or not self._pool_running:
            return fail(ContainerdUnavailable("the containerd client is not running"))
        return deferToThreadPool(self._reactor, self._pool, self._guarded, function, *args)

    def _guarded(self, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return function(*args)
        except ValueError:
            # grpc raises ValueError for a call on a channel closed by stopService meanwhile.
            if self._channel is None:
                raise ContainerdUnavailable("the containerd client stopped") from None
            raise

    # The methods below run on a pool thread.

    def _blocking_list_images(self, filters: Sequence[str]) -> list[Image]:
        assert self._images is not None
        try:
            response = self._images.List(
                images_pb2.ListImagesRequest(filters=list(filters)),
                metadata=self._metadata,
                timeout=self._call_timeout,
            )
        except grpc.RpcError as e:
            raise _translate(e) from None
        return [_image(image) for image in response.images]

    def _blocking_get_image(self, name: str) -> Image:
        assert self._images is not None
        try:
            response = self._images.Get(
                images_pb2.GetImageRequest(name=name), metadata=self._metadata, timeout=self._call_timeout
            )
        except grpc.RpcError as e:
            raise _translate(e, ImageNotFound) from None
        return _image(response.image)

    def _blocking_content_info(self, digest: str) -> ContentInfo:
        assert self._content is not None
        try:
            response = self._content.Info(
                content_pb2.InfoRequest(digest=digest), metadata=self._metadata, timeout=self._call_timeout
            )
        except grpc.RpcError as e:
            raise _translate(e, ContentNotFound) from None
        info = response.info
        return ContentInfo(digest=info.digest, size=info.size, labels=dict(info.labels))

    def _blocking_read_content(self, digest: str, offset: int, size: int) -> bytes:
        assert self._content is not None
        chunks = []
        remaining = size
        call = self._content.Read(
            content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self._metadata,
            timeout=self._call_timeout,
        )
        try:
            for response in call:
                data = response.data[:remaining]
                chunks.append(data)
                remaining -= len(data)
                if remaining <= 0:
                    break
        except grpc.RpcError as e:
            raise _translate(e, ContentNotFound) from None
        finally:
            # Leaving the stream early (or on an error) must not leave it open on the server.
            call.cancel()
        return b"".join(chunks)

    def _blocking_version(self) -> str:
        assert self._version is not None
        try:
            response = self._version.Version(empty_pb2.Empty(), metadata=self._metadata, timeout=self._call_timeout)
        except grpc.RpcError as e:
            raise _translate(e) from None
        return response.version

    def _blocking_plugin_exports(self, plugin_type: str, plugin_id: str) -> dict[str, str]:
        assert self._introspection is not None
        filters = [f"type=={quote_filter_value(plugin_type)},id=={quote_filter_value(plugin_id)}"]
        request = introspection_pb2.PluginsRequest(filters=filters)
        try:
            response = self._introspection.Plugins(request, metadata=self._metadata, timeout=self._call_timeout)
        except grpc.RpcError as e:
            raise _translate(e) from None
        for plugin in response.plugins:
            if plugin.type == plugin_type and plugin.id == plugin_id:
                return dict(plugin.exports)
        raise ContainerdError(f"containerd has no plugin {plugin_type}.{plugin_id}")

    def _blocking_publish(self, topic: str) -> None:
        assert self._events is not None
        # containerd stores the payload without decoding it; an empty Any is the smallest event.
        request = events_pb2.PublishRequest(
            topic=topic, event=any_pb2.Any(type_url="types.googleapis.com/google.protobuf.Empty")
        )
        try:
            self._events.Publish(request, metadata=self._metadata, timeout=self._call_timeout)
        except grpc.RpcError as e:
            raise _translate(e) from None

    # The public API, for the reactor thread.

    def list_images(self, filters: Sequence[str] = ()) -> Deferred[list[Image]]:
        """
        Every image in the namespace, or those matching any of C{filters} (containerd's filter
        syntax, e.g. C{'name~="^docker.io/"'}).
        """
        return self._call(self._blocking_list_images, tuple(filters))

    def get_image(self, name: str) -> Deferred[Image]:
        """
        The image named C{name}; fails with L{ImageNotFound}.
        """
        return self._call(self._blocking_get_image, name)

    def content_info(self, digest: str) -> Deferred[ContentInfo]:
        """
        What containerd knows about blob C{digest}; fails with L{ContentNotFound}.
        """
        return self._call(self._blocking_content_info, digest)

    def read_content(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        """
        At most C{size} bytes of blob C{digest} from C{offset}: fewer only at the end of the blob.

        @param size: at most L{MAX_READ_SIZE}; 0 gives C{b""} without asking containerd (which
            would read to the end).
        @return: fails with L{ContentNotFound} if the blob is absent, L{ValueError} for a negative
            offset or size or one above L{MAX_READ_SIZE}, L{ContainerdError} for an offset past
            the end.
        """
        if offset < 0 or size < 0:
            return fail(ValueError(f"offset and size must not be negative: {offset}, {size}"))
        if size > MAX_READ_SIZE:
            return fail(ValueError(f"read of {size} bytes exceeds the {MAX_READ_SIZE}-byte limit"))
        if size == 0:
            if self._channel is None:
                return fail(ContainerdUnavailable("the containerd client is not running"))
            return succeed(b"")
        return self._call(self._blocking_read_content, digest, offset, size)

    def version(self) -> Deferred[str]:
        """
        containerd's version string, e.g. C{1.6.20~ds1}.
        """
        return self._call(self._blocking_version)

    def content_root(self) -> Deferred[str]:
        """
        The directory of containerd's content store (the C{root} export of its content plugin),
        as containerd sees it: inside a container it may be mounted elsewhere.
        """
        d = self._call(self._blocking_plugin_exports, "io.containerd.content.v1", "content")

        def root(exports: dict[str, str]) -> str:
            if "root" not in exports:
                raise ContainerdError("containerd's content plugin exports no root")
            return exports["root"]

        return d.addCallback(root)

    # For spegel.containerd.events.

    def publish_event(self, topic: str) -> Deferred[None]:
        """
        Publish an empty event on C{topic} in the client's namespace.
        """
        return self._call(self._blocking_publish, topic)

    def subscribe_events(self, filters: Sequence[str]) -> EventStream:
        """
        Open a C{Subscribe} stream (no deadline) for envelopes matching any of C{filters}.

        Opening does not block; iterate the result on a thread of your own, since it blocks
        until the next event, possibly forever.

        @raise ContainerdUnavailable: if the client is not running.
        """
        if self._events is None or self._channel is None:
            raise ContainerdUnavailable("the containerd client is not running")
        return self._events.Subscribe(events_pb2.SubscribeRequest(filters=list(filters)), metadata=self._metadata)
