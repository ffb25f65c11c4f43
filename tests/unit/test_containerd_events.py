# -*- test-case-name: tests.unit.test_containerd_events -*-
"""
L{spegel.containerd.events}, socket-free and deterministic.

A fake events service stands in for containerd: C{Subscribe} opens a scripted stream, and
C{Publish} echoes the event into every open stream, as containerd does for a subscriber whose
filters match.  The reader "thread" is a fake whose C{run} the test calls when it wants the
stream consumed; since a scripted stream cannot block, running it consumes what is queued and
then ends the stream the way the test chose.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf import any_pb2, empty_pb2
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from spegel.containerd import events as events_module
from spegel.containerd.api import content_events_pb2, events_pb2, image_events_pb2
from spegel.containerd.events import (
    MARKER_ATTEMPTS,
    MARKER_INTERVAL,
    ContentEvent,
    EventSubscriber,
    ImageEvent,
    UnknownEvent,
    decode_envelope,
)
from tests.unit.test_containerd_client import FakeRpcError, FakeStreamCall, make_client

SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"
PUBLISH = "/containerd.services.events.v1.Events/Publish"
DIGEST = "sha256:" + "c" * 64


def envelope(topic: str, payload: Any, namespace: str = "k8s.io", type_url: str | None = None) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        namespace=namespace,
        topic=topic,
        event=any_pb2.Any(
            type_url=payload.DESCRIPTOR.full_name if type_url is None else type_url,
            value=payload.SerializeToString(),
        ),
    )


class FakeThread:
    """
    Records what L{threading.Thread} would be given; runs the target only when told.
    """

    def __init__(self, target: Any, args: tuple[Any, ...] = (), name: str | None = None, daemon: bool = False) -> None:
        self.target = target
        self.args = args
        self.name = name
        self.daemon = daemon
        self.started = False
        self.finished = False
        self.joined = False

    def start(self) -> None:
        self.started = True

    def run(self) -> None:
        assert self.started and not self.finished
        self.target(*self.args)
        self.finished = True

    def join(self, timeout: float | None = None) -> None:
        self.joined = True


class FakeEventsService:
    """
    containerd's events service: streams, publishing with echo, and being down.
    """

    def __init__(self) -> None:
        self.down = False
        self.echo = True
        self.streams: list[FakeStreamCall] = []
        self.subscribe_requests: list[events_pb2.SubscribeRequest] = []
        self.published: list[str] = []

    def subscribe(self, request: events_pb2.SubscribeRequest) -> FakeStreamCall:
        self.subscribe_requests.append(request)
        if self.down:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        self.streams.append(FakeStreamCall([]))
        return self.streams[-1]

    def publish(self, request: events_pb2.PublishRequest) -> empty_pb2.Empty:
        if self.down:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        self.published.append(request.topic)
        if self.echo:
            for stream in self.streams:
                if not stream.cancelled:
                    stream.items.append(
                        events_pb2.Envelope(namespace="k8s.io", topic=request.topic, event=request.event)
                    )
        return empty_pb2.Empty()

    def end_stream(self, index: int = -1, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """
        The stream breaks (containerd died) once what is queued on it has been read.
        """
        self.streams[index].items.append(FakeRpcError(code, "socket closed"))


class DecodeTests(SynchronousTestCase):
    """
    Envelopes become L{ImageEvent}/L{ContentEvent}; anything else raises L{UnknownEvent}.
    """

    def test_image_events(self) -> None:
        self.assertEqual(
            decode_envelope(envelope("/images/create", image_events_pb2.ImageCreate(name="docker.io/a:1"))),
            ImageEvent("create", "docker.io/a:1"),
        )
        self.assertEqual(
            decode_envelope(envelope("/images/update", image_events_pb2.ImageUpdate(name="b:2", labels={"x": "y"}))),
            ImageEvent("update", "b:2"),
        )
        self.assertEqual(
            decode_envelope(envelope("/images/delete", image_events_pb2.ImageDelete(name="c:3"))),
            ImageEvent("delete", "c:3"),
        )

    def test_content_events(self) -> None:
        self.assertEqual(
            decode_envelope(envelope("/content/delete", content_events_pb2.ContentDelete(digest=DIGEST))),
            ContentEvent("delete", DIGEST),
        )
        self.assertEqual(
            decode_envelope(
                envelope("/content/create", content_events_pb2.ContentCreate(digest=DIGEST, size=5, mediaType="x"))
            ),
            ContentEvent("create", DIGEST),
        )

    def test_prefixed_type_url(self) -> None:
        self.assertEqual(
            decode_envelope(
                envelope(
                    "/images/delete",
                    image_events_pb2.ImageDelete(name="c:3"),
                    type_url="types.googleapis.com/containerd.services.images.v1.ImageDelete",
                )
            ),
            ImageEvent("delete", "c:3"),
        )

    def test_unknown_topic(self) -> None:
        self.assertRaises(UnknownEvent, decode_envelope, envelope("/tasks/exit", image_events_pb2.ImageDelete(name="x")))
        self.assertRaises(UnknownEvent, decode_envelope, envelope("/images", image_events_pb2.ImageDelete(name="x")))

    def test_wrong_payload_type(self) -> None:
        self.assertRaises(
            UnknownEvent, decode_envelope, envelope("/images/create", image_events_pb2.ImageDelete(name="x"))
        )
        self.assertRaises(
            UnknownEvent, decode_envelope, envelope("/content/delete", image_events_pb2.ImageDelete(name="x"))
        )

    def test_undecodable_payload(self) -> None:
        bad = events_pb2.Envelope(
            topic="/images/create",
            event=any_pb2.Any(type_url="containerd.services.images.v1.ImageCreate", value=b"\xff\xff\xff"),
        )
        self.assertRaises(UnknownEvent, decode_envelope, bad)


class SubscriberTests(SynchronousTestCase):
    """
    L{EventSubscriber} with a real L{ContainerdClient} over the fake events service.
    """

    def setUp(self) -> None:
        self.service = FakeEventsService()
        self.client, self.channel, self.reactor, _ = make_client(
            {SUBSCRIBE: self.service.subscribe, PUBLISH: self.service.publish}
        )
        self.threads: list[FakeThread] = []
        self.events: list[Any] = []
        self.resubscribed = 0
        self.subscriber = self.make_subscriber()

    def make_subscriber(self, **kwargs: Any) -> EventSubscriber:
        def thread_factory(**kw: Any) -> FakeThread:
            self.threads.append(FakeThread(**kw))
            return self.threads[-1]

        def on_resubscribed() -> None:
            self.resubscribed += 1

        kwargs.setdefault("initial_backoff", 0.5)
        kwargs.setdefault("max_backoff", 4.0)
        # None: the subscriber's own default.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return EventSubscriber(
            self.reactor,
            self.client,
            self.events.append,
            on_resubscribed,
            thread_factory=thread_factory,
            **kwargs,
        )

    def queue(self, *envelopes: events_pb2.Envelope, index: int = -1) -> None:
        self.service.streams[index].items.extend(envelopes)

    def test_subscribe_request(self) -> None:
        """
        One stream with filters for our namespace's image and content topics and the marker, its
        own daemon thread, and the marker published once.
        """
        self.subscriber.startService()
        [request] = self.service.subscribe_requests
        [marker] = self.service.published
        self.assertTrue(marker.startswith("/spegel/subscribed/"))
        self.assertEqual(
            list(request.filters),
            [
                'namespace=="k8s.io",topic~="^/images/"',
                'namespace=="k8s.io",topic~="^/content/"',
                f'namespace=="k8s.io",topic=="{marker}"',
            ],
        )
        [(_, _, metadata, timeout)] = [c for c in self.channel.calls if c[0] == SUBSCRIBE]
        self.assertEqual(metadata, (("containerd-namespace", "k8s.io"),))
        self.assertIsNone(timeout, "a subscription must not have a deadline")
        [thread] = self.threads
        self.assertTrue(thread.started)
        self.assertTrue(thread.daemon)
        self.assertEqual(self.resubscribed, 0, "live only once the marker comes back")

    def test_events_delivered_in_order(self) -> None:
        self.subscriber.startService()
        self.queue(
            envelope("/images/create", image_events_pb2.ImageCreate(name="a:1")),
            envelope("/tasks/exit", image_events_pb2.ImageDelete(name="ignored")),
            envelope("/content/delete", content_events_pb2.ContentDelete(digest=DIGEST)),
            envelope("/images/delete", image_events_pb2.ImageDelete(name="other-ns"), namespace="moby"),
            envelope("/images/delete", image_events_pb2.ImageDelete(name="a:1")),
        )
        self.service.end_stream()
        self.threads[0].run()
        self.assertEqual(
            self.events,
            [ImageEvent("create", "a:1"), ContentEvent("delete", DIGEST), ImageEvent("delete", "a:1")],
        )
        self.assertEqual(self.resubscribed, 1)
        self.assertTrue(self.threads[0].joined)

    def test_marker_seen_once(self) -> None:
        """
        A marker published twice (the first was not yet seen) goes live once.
        """
        self.subscriber.startService()
        self.reactor.advance(MARKER_INTERVAL)
        self.assertEqual(len(self.service.published), 2)
        self.assertEqual(len(self.service.streams[0].items), 2)
        self.service.end_stream()
        self.threads[0].run()
        self.assertEqual(self.resubscribed, 1)
        self.assertEqual(self.events, [])

    def test_marker_republished_until_seen(self) -> None:
        self.service.echo = False
        self.subscriber.startService()
        for _ in range(3):
            self.reactor.advance(MARKER_INTERVAL)
        self.assertEqual(len(self.service.published), 4)
        self.assertEqual(len(set(self.service.published)), 1, "one marker topic per subscription")
        # Now containerd echoes it: the stream goes live and publishing stops.
        self.queue(envelope(self.service.published[0], empty_pb2.Empty()))
        self.service.end_stream()
        self.threads[0].run()
        self.assertEqual(self.resubscribed, 1)

    def test_stream_live_without_marker_after_attempts(self) -> None:
        """
        A containerd that never echoes the marker still gets resyncs, after a bounded wait.
        """
        self.service.echo = False
        self.subscriber.startService()
        for _ in range(MARKER_ATTEMPTS * 2):
            self.reactor.advance(MARKER_INTERVAL)
        self.assertEqual(len(self.service.published), MARKER_ATTEMPTS)
        self.assertEqual(self.resubscribed, 1)
        self.assertTrue(self.subscriber.subscribed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_backoff_schedule(self) -> None:
        """
        While containerd is down, attempts follow 0.5, 1, 2, 4, 4 s; a live subscription resets it.
        """
        self.service.down = True
        self.subscriber.startService()
        delays = []
        for _ in range(6):
            self.threads[-1].run()
            [call] = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0])
        self.assertEqual(len(self.service.subscribe_requests), 7)
        self.assertEqual(self.resubscribed, 0)
        self.assertEqual(self.events, [])

        # containerd is back: the 7th attempt goes live, then breaks; the retry comes quickly.
        self.service.down = False
        self.threads[-1].run()  # the 7th attempt was made while down
        self.reactor.advance(4.0)
        self.assertEqual(len(self.service.streams), 1)
        self.service.end_stream()
        self.threads[-1].run()
        self.assertEqual(self.resubscribed, 1)
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 0.5)

    def test_resubscribe_after_break(self) -> None:
        """
        After the stream breaks, the next live subscription calls C{on_resubscribed} again and
        its events arrive.
        """
        self.subscriber.startService()
        self.queue(envelope("/images/create", image_events_pb2.ImageCreate(name="before:1")))
        self.service.end_stream()
        self.threads[0].run()
        self.assertEqual(self.resubscribed, 1)
        self.assertFalse(self.subscriber.subscribed)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.service.streams), 2)
        self.assertNotEqual(self.service.published[0], self.service.published[-1], "fresh marker per attempt")
        self.queue(envelope("/images/create", image_events_pb2.ImageCreate(name="after:1")))
        self.service.end_stream()
        self.threads[1].run()
        self.assertEqual(self.resubscribed, 2)
        self.assertEqual(self.events, [ImageEvent("create", "before:1"), ImageEvent("create", "after:1")])

    def test_stream_closed_by_server(self) -> None:
        """
        A stream that simply ends (containerd shutting down cleanly) is reopened too.
        """
        self.subscriber.startService()
        self.threads[0].run()  # the echoed marker, then the end of the stream
        self.assertEqual(self.resubscribed, 1)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.service.streams), 2)

    def test_stop_cancels_and_joins(self) -> None:
        self.subscriber.startService()
        stream = self.service.streams[0]
        d = self.subscriber.stopService()
        assert d is not None
        self.assertTrue(stream.cancelled)
        self.assertNoResult(d)
        # The reader thread sees the cancellation; nothing queued is delivered after stop.
        self.queue(envelope("/images/create", image_events_pb2.ImageCreate(name="late:1")))
        self.threads[0].run()
        self.successResultOf(d)
        self.assertTrue(self.threads[0].joined)
        self.assertEqual(self.events, [])
        self.assertEqual(self.resubscribed, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(60)
        self.assertEqual(len(self.service.subscribe_requests), 1)

    def test_default_backoff_is_prompt_and_quiet(self) -> None:
        """
        By default attempts come 0.1, 0.2, 0.4 s apart, then every half second while containerd
        is down (so content pulled right after it comes back is advertised within about a
        second), and only the first failure is a warning.
        """
        subscriber = self.make_subscriber(initial_backoff=None, max_backoff=None)
        events: list[dict[str, Any]] = []
        self.patch(events_module, "_log", Logger(observer=cast(ILogObserver, events.append)))
        self.service.down = True
        subscriber.startService()
        delays = []
        for _ in range(7):
            self.threads[-1].run()
            [call] = self.reactor.getDelayedCalls()
            delays.append(round(call.getTime() - self.reactor.seconds(), 3))
            self.reactor.advance(delays[-1])
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5])
        levels = [e["log_level"] for e in events if "stream ended" in e.get("log_format", "")]
        self.assertEqual(levels, [LogLevel.warn] + [LogLevel.debug] * 6)

    def test_stop_during_backoff(self) -> None:
        self.service.down = True
        self.subscriber.startService()
        self.threads[0].run()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.assertIsNone(self.subscriber.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_client_not_running(self) -> None:
        """
        A stopped client is one more reason to retry, not to crash.
        """
        self.client.stopService()
        self.subscriber.startService()
        self.assertEqual(self.threads, [])
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime(), 0.5)

    def test_callback_errors_are_logged(self) -> None:
        def broken(event: Any) -> None:
            self.events.append(event)
            raise RuntimeError("handler bug")

        def broken_resubscribed() -> None:
            raise RuntimeError("resync bug")

        def new_thread(**kw: Any) -> FakeThread:
            self.threads.append(FakeThread(**kw))
            return self.threads[-1]

        self.subscriber = EventSubscriber(
            self.reactor,
            self.client,
            broken,
            broken_resubscribed,
            thread_factory=new_thread,
        )
        self.subscriber.startService()
        self.queue(
            envelope("/images/create", image_events_pb2.ImageCreate(name="a:1")),
            envelope("/images/create", image_events_pb2.ImageCreate(name="b:1")),
        )
        self.service.end_stream()
        self.threads[0].run()
        self.assertEqual(self.events, [ImageEvent("create", "a:1"), ImageEvent("create", "b:1")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1, "still reconnecting")

    def test_unexpected_reader_error(self) -> None:
        """
        Any exception breaking the reader is treated as a broken stream, never left hanging.
        """
        self.subscriber.startService()
        self.service.streams[0].items.append(RuntimeError("grpc internals"))
        self.threads[0].run()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)


class ClientEventCallsTests(SynchronousTestCase):
    """
    The client methods the subscriber uses.
    """

    def test_publish_event(self) -> None:
        service = FakeEventsService()
        client, channel, _, _ = make_client({PUBLISH: service.publish})
        self.successResultOf(client.publish_event("/spegel/subscribed/x"))
        [(path, request, metadata, timeout)] = channel.calls
        self.assertEqual(path, PUBLISH)
        self.assertEqual(request.topic, "/spegel/subscribed/x")
        self.assertEqual(metadata, (("containerd-namespace", "k8s.io"),))
        self.assertEqual(timeout, 7.5)
