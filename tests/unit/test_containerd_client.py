# -*- test-case-name: tests.unit.test_containerd_client -*-
"""
L{spegel.containerd.client}, socket-free: a fake gRPC channel answers with protobuf messages or
gRPC errors, a synchronous thread pool runs the blocking calls, and a fake reactor delivers
results at once.

The fakes here are shared with L{tests.unit.test_containerd_events}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from spegel.containerd.api import content_pb2, images_pb2, introspection_pb2, types_pb2, version_pb2
from spegel.containerd.client import (
    MAX_READ_SIZE,
    NAMESPACE_METADATA_KEY,
    ContainerdClient,
    ContainerdError,
    ContainerdUnavailable,
    ContentInfo,
    ContentNotFound,
    Descriptor,
    Image,
    ImageNotFound,
    content_path_for,
    quote_filter_value,
)

SHA256_HEX = "a" * 64
SHA256 = "sha256:" + SHA256_HEX


class FakeReactor(Clock):
    """
    A clock that also runs C{callFromThread} calls at once and keeps system event triggers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.triggers: dict[int, tuple[str, str, Callable[..., Any]]] = {}
        self._next_trigger = 0

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[..., Any], *args: Any) -> int:
        self._next_trigger += 1
        self.triggers[self._next_trigger] = (phase, event, f)
        return self._next_trigger

    def removeSystemEventTrigger(self, trigger_id: int) -> None:
        del self.triggers[trigger_id]


class SynchronousThreadPool:
    """
    The part of L{twisted.python.threadpool.ThreadPool} that C{deferToThreadPool} uses, running
    each function in the calling thread.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        if self.stopped:
            raise AssertionError("stopped twice")
        self.stopped = True

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        assert self.started and not self.stopped, "work submitted to a pool that is not running"
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeRpcError(grpc.RpcError):
    """
    What grpc raises for a failed call: an error that is also the call, with a status.
    """

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeStreamCall:
    """
    A server-streaming call over a fixed list of responses (an exception in the list is
    raised when reached).  Cancelling makes the rest of the iteration raise CANCELLED.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = list(items)
        self.cancelled = False
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        while self.items:
            if self.cancelled:
                raise FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            item = self.items.pop(0)
            self.consumed += 1
            if isinstance(item, BaseException):
                raise item
            yield item
        if self.cancelled:
            raise FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeChannel:
    """
    A gRPC channel whose methods are answered by C{handlers}: method path to a function of the
    request returning the response (for streams, a L{FakeStreamCall} or an iterable) or raising.

    @ivar calls: (method path, request, metadata, timeout) of every call made.
    """

    def __init__(self, handlers: dict[str, Callable[[Any], Any]] | None = None) -> None:
        self.handlers = dict(handlers or {})
        self.calls: list[tuple[str, Any, Any, Any]] = []
        self.closed = False
        self.target: str | None = None

    def _invoke(self, path: str, request: Any, metadata: Any, timeout: Any) -> Any:
        if self.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        self.calls.append((path, request, metadata, timeout))
        handler = self.handlers.get(path)
        if handler is None:
            raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}")
        return handler(request)

    def unary_unary(self, path: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any) -> Callable[..., Any]:
        def call(request: Any, metadata: Any = None, timeout: Any = None, **kw: Any) -> Any:
            request_serializer(request)  # a request that cannot be serialized fails here, as in grpc
            response = self._invoke(path, request, metadata, timeout)
            # Round-trip the response through the wire format, as grpc would.
            return response_deserializer(response.SerializeToString())

        return call

    def unary_stream(self, path: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any) -> Callable[..., Any]:
        def call(request: Any, metadata: Any = None, timeout: Any = None, **kw: Any) -> Any:
            try:
                result = self._invoke(path, request, metadata, timeout)
            except grpc.RpcError as e:
                # grpc reports a failed stream when it is iterated, not when it is opened.
                return FakeStreamCall([e])
            return result if isinstance(result, FakeStreamCall) else FakeStreamCall(result)

        return call

    def close(self) -> None:
        self.closed = True


def make_client(
    handlers: dict[str, Callable[[Any], Any]] | None = None,
    *,
    socket_path: str = "/run/containerd/containerd.sock",
    namespace: str = "k8s.io",
    start: bool = True,
) -> tuple[ContainerdClient, FakeChannel, FakeReactor, list[SynchronousThreadPool]]:
    """
    A client on a fake channel, synchronous pool and fake reactor, started unless told not to.
    """
    reactor = FakeReactor()
    channel = FakeChannel(handlers)
    pools: list[SynchronousThreadPool] = []

    def channel_factory(target: str) -> FakeChannel:
        channel.target = target
        return channel

    def pool_factory(size: int) -> SynchronousThreadPool:
        pools.append(SynchronousThreadPool(size))
        return pools[-1]

    client = ContainerdClient(
        reactor,
        socket_path,
        namespace,
        threadpool_size=3,
        call_timeout=7.5,
        channel_factory=channel_factory,  # type: ignore[arg-type]  # a fake grpc.Channel
        threadpool_factory=pool_factory,  # type: ignore[arg-type]  # runs calls at once
    )
    if start:
        client.startService()
    return client, channel, reactor, pools


def image_message(name: str, digest: str = SHA256, **labels: str) -> images_pb2.Image:
    return images_pb2.Image(
        name=name,
        labels=labels,
        target=types_pb2.Descriptor(
            media_type="application/vnd.oci.image.index.v1+json",
            digest=digest,
            size=1234,
            annotations={"org.opencontainers.image.ref.name": "v1"},
        ),
    )


def raising(error: BaseException) -> Callable[[Any], Any]:
    def handler(request: Any) -> Any:
        raise error

    return handler


LIST = "/containerd.services.images.v1.Images/List"
GET = "/containerd.services.images.v1.Images/Get"
INFO = "/containerd.services.content.v1.Content/Info"
READ = "/containerd.services.content.v1.Content/Read"
VERSION = "/containerd.services.version.v1.Version/Version"
PLUGINS = "/containerd.services.introspection.v1.Introspection/Plugins"


class LifecycleTests(SynchronousTestCase):
    """
    Starting opens the channel and pool; stopping closes both; calls outside that window fail.
    """

    def test_target_is_absolute_unix_path(self) -> None:
        client, channel, _, _ = make_client(socket_path="run/c.sock")
        self.assertEqual(channel.target, "unix://" + os.path.join(os.getcwd(), "run/c.sock"))
        self.assertEqual(client.target, channel.target)

    def test_pool_size_and_start(self) -> None:
        _, _, reactor, pools = make_client()
        self.assertEqual(len(pools), 1)
        self.assertEqual(pools[0].size, 3)
        self.assertTrue(pools[0].started)
        self.assertEqual([t[:2] for t in reactor.triggers.values()], [("during", "shutdown")])

    def test_stop_closes_channel_and_pool(self) -> None:
        client, channel, reactor, pools = make_client()
        client.stopService()
        self.assertTrue(channel.closed)
        self.assertTrue(pools[0].stopped)
        self.assertEqual(reactor.triggers, {})

    def test_shutdown_trigger_stops_pool_once(self) -> None:
        """
        The reactor shutting down without stopService stops the pool; a later stopService does
        not stop it twice.
        """
        client, _, reactor, pools = make_client()
        [(_, _, trigger)] = reactor.triggers.values()
        trigger()
        self.assertTrue(pools[0].stopped)
        self.failureResultOf(client.version(), ContainerdUnavailable)
        client.stopService()  # SynchronousThreadPool.stop raises if called twice

    def test_call_before_start(self) -> None:
        client, channel, _, _ = make_client({VERSION: lambda r: version_pb2.VersionResponse(version="1")}, start=False)
        self.failureResultOf(client.version(), ContainerdUnavailable)
        self.failureResultOf(client.read_content(SHA256, 0, 0), ContainerdUnavailable)
        self.assertEqual(channel.calls, [])

    def test_call_after_stop(self) -> None:
        client, channel, _, _ = make_client({VERSION: lambda r: version_pb2.VersionResponse(version="1")})
        client.stopService()
        self.failureResultOf(client.version(), ContainerdUnavailable)
        self.assertRaises(ContainerdUnavailable, client.subscribe_events, [])
        self.assertEqual(channel.calls, [])

    def test_stopped_during_call(self) -> None:
        """
        A call that finds the channel closed under it (grpc's ValueError) fails as unavailable.
        """
        client: ContainerdClient

        def stop_then_call(request: Any) -> Any:
            client.stopService()
            raise ValueError("Cannot invoke RPC on closed channel!")

        client, _, _, _ = make_client({VERSION: stop_then_call})
        self.failureResultOf(client.version(), ContainerdUnavailable)

    def test_other_value_error_is_not_hidden(self) -> None:
        client, _, _, _ = make_client({VERSION: raising(ValueError("a bug"))})
        self.failureResultOf(client.version(), ValueError)


class CallTests(SynchronousTestCase):
    """
    Each call sends the right request with the namespace and timeout, and maps the response.
    """

    def assert_sent(self, channel: FakeChannel, path: str, request: Any) -> None:
        [(sent_path, sent_request, metadata, timeout)] = channel.calls
        self.assertEqual(sent_path, path)
        self.assertEqual(sent_request, request)
        self.assertEqual(metadata, ((NAMESPACE_METADATA_KEY, "k8s.io"),))
        self.assertEqual(timeout, 7.5)

    def test_list_images(self) -> None:
        response = images_pb2.ListImagesResponse(
            images=[image_message("docker.io/library/a:1", team="x"), image_message("b:2", "sha256:" + "b" * 64)]
        )
        client, channel, _, _ = make_client({LIST: lambda r: response})
        images = self.successResultOf(client.list_images(['name~="^docker.io/"']))
        self.assert_sent(channel, LIST, images_pb2.ListImagesRequest(filters=['name~="^docker.io/"']))
        self.assertEqual(
            images,
            [
                Image(
                    name="docker.io/library/a:1",
                    target=Descriptor(
                        media_type="application/vnd.oci.image.index.v1+json",
                        digest=SHA256,
                        size=1234,
                        annotations={"org.opencontainers.image.ref.name": "v1"},
                    ),
                    labels={"team": "x"},
                ),
                Image(
                    name="b:2",
                    target=Descriptor(
                        media_type="application/vnd.oci.image.index.v1+json",
                        digest="sha256:" + "b" * 64,
                        size=1234,
                        annotations={"org.opencontainers.image.ref.name": "v1"},
                    ),
                    labels={},
                ),
            ],
        )

    def test_list_images_empty(self) -> None:
        client, channel, _, _ = make_client({LIST: lambda r: images_pb2.ListImagesResponse()})
        self.assertEqual(self.successResultOf(client.list_images()), [])
        self.assert_sent(channel, LIST, images_pb2.ListImagesRequest())

    def test_get_image(self) -> None:
        client, channel, _, _ = make_client(
            {GET: lambda r: images_pb2.GetImageResponse(image=image_message(r.name))}
        )
        image = self.successResultOf(client.get_image("registry.local:5000/team/app:v3"))
        self.assert_sent(channel, GET, images_pb2.GetImageRequest(name="registry.local:5000/team/app:v3"))
        self.assertEqual(image.name, "registry.local:5000/team/app:v3")
        self.assertEqual(image.target.digest, SHA256)
        self.assertEqual(image.target.size, 1234)

    def test_get_image_not_found(self) -> None:
        client, _, _, _ = make_client({GET: raising(FakeRpcError(grpc.StatusCode.NOT_FOUND, 'image "x": not found'))})
        failure = self.failureResultOf(client.get_image("x"), ImageNotFound)
        self.assertIn('image "x": not found', str(failure.value))

    def test_content_info(self) -> None:
        info = content_pb2.Info(
            digest=SHA256, size=99, labels={"containerd.io/distribution.source.docker.io": "library/a"}
        )
        client, channel, _, _ = make_client({INFO: lambda r: content_pb2.InfoResponse(info=info)})
        result = self.successResultOf(client.content_info(SHA256))
        self.assert_sent(channel, INFO, content_pb2.InfoRequest(digest=SHA256))
        self.assertEqual(
            result,
            ContentInfo(
                digest=SHA256, size=99, labels={"containerd.io/distribution.source.docker.io": "library/a"}
            ),
        )

    def test_content_info_not_found(self) -> None:
        client, _, _, _ = make_client({INFO: raising(FakeRpcError(grpc.StatusCode.NOT_FOUND, "content digest x"))})
        self.failureResultOf(client.content_info(SHA256), ContentNotFound)

    def test_version(self) -> None:
        client, channel, _, _ = make_client(
            {VERSION: lambda r: version_pb2.VersionResponse(version="1.6.20~ds1", revision="abc")}
        )
        self.assertEqual(self.successResultOf(client.version()), "1.6.20~ds1")
        [(path, _, metadata, _)] = channel.calls
        self.assertEqual(path, VERSION)
        self.assertEqual(metadata, ((NAMESPACE_METADATA_KEY, "k8s.io"),))

    def test_namespace_metadata(self) -> None:
        client, channel, _, _ = make_client(
            {VERSION: lambda r: version_pb2.VersionResponse(version="2.1.0")}, namespace="moby"
        )
        self.successResultOf(client.version())
        self.assertEqual(channel.calls[0][2], ((NAMESPACE_METADATA_KEY, "moby"),))

    def test_content_root(self) -> None:
        plugin = introspection_pb2.Plugin(
            type="io.containerd.content.v1", id="content", exports={"root": "/var/lib/containerd/c"}
        )
        client, channel, _, _ = make_client({PLUGINS: lambda r: introspection_pb2.PluginsResponse(plugins=[plugin])})
        self.assertEqual(self.successResultOf(client.content_root()), "/var/lib/containerd/c")
        self.assertEqual(
            list(channel.calls[0][1].filters), ['type=="io.containerd.content.v1",id=="content"']
        )

    def test_content_root_missing(self) -> None:
        client, _, _, _ = make_client({PLUGINS: lambda r: introspection_pb2.PluginsResponse()})
        self.failureResultOf(client.content_root(), ContainerdError)


class ReadContentTests(SynchronousTestCase):
    """
    C{read_content} joins the streamed chunks and never returns more than asked.
    """

    def test_joins_chunks(self) -> None:
        chunks = [content_pb2.ReadContentResponse(offset=i * 3, data=d) for i, d in enumerate([b"abc", b"def", b"g"])]
        client, channel, _, _ = make_client({READ: lambda r: chunks})
        self.assertEqual(self.successResultOf(client.read_content(SHA256, 10, 7)), b"abcdefg")
        [(path, request, metadata, timeout)] = channel.calls
        self.assertEqual(request, content_pb2.ReadContentRequest(digest=SHA256, offset=10, size=7))
        self.assertEqual(metadata, ((NAMESPACE_METADATA_KEY, "k8s.io"),))
        self.assertEqual(timeout, 7.5)

    def test_short_at_end_of_blob(self) -> None:
        client, _, _, _ = make_client({READ: lambda r: [content_pb2.ReadContentResponse(data=b"xy")]})
        self.assertEqual(self.successResultOf(client.read_content(SHA256, 0, 100)), b"xy")

    def test_never_more_than_size(self) -> None:
        """
        A server sending more than asked is cut at C{size}, and the stream is left (cancelled)
        without reading the rest.
        """
        stream = FakeStreamCall([content_pb2.ReadContentResponse(data=d) for d in (b"abcd", b"efgh", b"ijkl")])
        client, _, _, _ = make_client({READ: lambda r: stream})
        self.assertEqual(self.successResultOf(client.read_content(SHA256, 0, 6)), b"abcdef")
        self.assertEqual(stream.consumed, 2)
        self.assertTrue(stream.cancelled)

    def test_not_found(self) -> None:
        client, _, _, _ = make_client({READ: raising(FakeRpcError(grpc.StatusCode.NOT_FOUND, "blob"))})
        self.failureResultOf(client.read_content(SHA256, 0, 10), ContentNotFound)

    def test_error_mid_stream(self) -> None:
        stream = FakeStreamCall(
            [content_pb2.ReadContentResponse(data=b"ab"), FakeRpcError(grpc.StatusCode.UNAVAILABLE, "gone")]
        )
        client, _, _, _ = make_client({READ: lambda r: stream})
        self.failureResultOf(client.read_content(SHA256, 0, 10), ContainerdUnavailable)

    def test_past_end(self) -> None:
        client, _, _, _ = make_client({READ: raising(FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "read past"))})
        failure = self.failureResultOf(client.read_content(SHA256, 500, 10), ContainerdError)
        self.assertNotIsInstance(failure.value, ContentNotFound)
        self.assertIn("OUT_OF_RANGE", str(failure.value))

    def test_zero_size_asks_nothing(self) -> None:
        """
        containerd reads to the end of the blob for size 0; a zero-byte read must not.
        """
        client, channel, _, _ = make_client({READ: lambda r: [content_pb2.ReadContentResponse(data=b"x" * 10)]})
        self.assertEqual(self.successResultOf(client.read_content(SHA256, 0, 0)), b"")
        self.assertEqual(channel.calls, [])

    def test_bad_arguments(self) -> None:
        client, channel, _, _ = make_client({READ: lambda r: []})
        self.failureResultOf(client.read_content(SHA256, -1, 10), ValueError)
        self.failureResultOf(client.read_content(SHA256, 0, -10), ValueError)
        self.failureResultOf(client.read_content(SHA256, 0, MAX_READ_SIZE + 1), ValueError)
        self.assertEqual(channel.calls, [])

    def test_max_size_allowed(self) -> None:
        client, _, _, _ = make_client({READ: lambda r: [content_pb2.ReadContentResponse(data=b"z")]})
        self.assertEqual(self.successResultOf(client.read_content(SHA256, 0, MAX_READ_SIZE)), b"z")


class ErrorMappingTests(SynchronousTestCase):
    """
    gRPC status codes become typed errors carrying containerd's message.
    """

    def failure_for(self, code: grpc.StatusCode, method: str = VERSION) -> ContainerdError:
        client, _, _, _ = make_client({method: raising(FakeRpcError(code, "containerd says no"))})
        calls: dict[str, Callable[[], Deferred[Any]]] = {VERSION: client.version, LIST: client.list_images}
        call = calls[method]
        failure = self.failureResultOf(call(), ContainerdError)
        self.assertIn("containerd says no", str(failure.value))
        return failure.value

    def test_unavailable(self) -> None:
        self.assertIsInstance(self.failure_for(grpc.StatusCode.UNAVAILABLE), ContainerdUnavailable)

    def test_deadline(self) -> None:
        self.assertIsInstance(self.failure_for(grpc.StatusCode.DEADLINE_EXCEEDED, LIST), ContainerdUnavailable)

    def test_other_codes(self) -> None:
        for code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT):
            error = self.failure_for(code, LIST)
            self.assertIs(type(error), ContainerdError)
            self.assertIn(code.name, str(error))

    def test_not_found_outside_lookups(self) -> None:
        """
        NOT_FOUND from a call that looks nothing up by name is a plain error.
        """
        self.assertIs(type(self.failure_for(grpc.StatusCode.NOT_FOUND)), ContainerdError)


class ContentPathTests(SynchronousTestCase):
    """
    C{content_path_for} builds blob paths from valid digests only.
    """

    def test_sha256(self) -> None:
        self.assertEqual(
            content_path_for("/var/lib/containerd/io.containerd.content.v1.content", SHA256),
            f"/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256/{SHA256_HEX}",
        )

    def test_sha512(self) -> None:
        hexdigest = "0123456789abcdef" * 8
        self.assertEqual(content_path_for("/c", "sha512:" + hexdigest), "/c/blobs/sha512/" + hexdigest)

    def test_invalid(self) -> None:
        for digest in (
            "",
            SHA256_HEX,
            "sha256:" + "A" * 64,
            "sha256:" + "a" * 63,
            "sha256:" + "a" * 65,
            "sha512:" + "a" * 64,
            "md5:" + "a" * 32,
            "sha256:../../../../etc/passwd",
            "sha256:" + "a" * 63 + "/",
            "sha256:" + "a" * 64 + "\n",
            "../sha256:" + "a" * 64,
        ):
            self.assertRaises(ValueError, content_path_for, "/c", digest)


class QuoteTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(quote_filter_value("k8s.io"), '"k8s.io"')
        self.assertEqual(quote_filter_value('a"b\\c'), '"a\\"b\\\\c"')
