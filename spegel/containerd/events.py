# -*- test-case-name: tests.unit.test_containerd_events -*-
"""
containerd's image and content events, delivered to the reactor, across containerd restarts.

L{EventSubscriber} keeps one C{Subscribe} stream open to containerd's events service.  The
stream blocks forever, so it is iterated on a thread of its own (not the client's call pool,
which it would starve); every event is decoded there and handed to the reactor with
C{callFromThread}.  When the stream breaks (containerd restarted, or not up yet) it is opened
again after an exponential backoff scheduled on the reactor.

Events published while no stream was open are lost, so after every subscription that is known
to be live the subscriber calls C{on_resubscribed}, and the owner resynchronises in full.  A
stream that was merely opened is not known to be live: containerd answers nothing until the
first event, and registers the subscription on its side some time after the request arrives.
So the subscriber also subscribes to a topic of its own, C{/spegel/subscribed/<token>}, and
publishes an empty event there until it comes back on the stream; from then on no event of the
namespace can be missed.  Other subscribers of the namespace (C{ctr events}) may see these
marker events: one per (re)subscription, or a few when containerd is slow to register it.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from attrs import define, field, frozen
from google.protobuf.message import DecodeError
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from spegel.containerd.api import content_events_pb2, events_pb2, image_events_pb2
from spegel.containerd.client import ContainerdClient, ContainerdError, EventStream, quote_filter_value

_log = Logger()

#: Topics containerd publishes image events on, with the action and payload type of each.
_IMAGE_TOPICS: dict[str, tuple[str, Any]] = {
    "/images/create": ("create", image_events_pb2.ImageCreate),
    "/images/update": ("update", image_events_pb2.ImageUpdate),
    "/images/delete": ("delete", image_events_pb2.ImageDelete),
}

#: Content events; C{/content/create} is sent by containerd 2.1 and later only.
_CONTENT_TOPICS: dict[str, tuple[str, Any]] = {
    "/content/create": ("create", content_events_pb2.ContentCreate),
    "/content/delete": ("delete", content_events_pb2.ContentDelete),
}

_MARKER_TOPIC_PREFIX = "/spegel/subscribed/"

#: Seconds between publications of the marker event while waiting for it to come back.
MARKER_INTERVAL = 0.2

#: Marker publications before giving up on seeing one and declaring the stream live anyway
#: (so a containerd refusing Publish still gets resyncs, just without the guarantee).
MARKER_ATTEMPTS = 25


@frozen
class ImageEvent:
    """
    An image was created, updated (retagged to another target) or deleted.
    """

    action: str
    name: str


@frozen
class ContentEvent:
    """
    A blob was added to (containerd 2.1+) or removed from the content store.
    """

    action: str
    digest: str


Event = ImageEvent | ContentEvent


class UnknownEvent(ValueError):
    """
    An envelope whose topic or payload spegel does not handle.
    """


def _type_name(type_url: str) -> str:
    # containerd's typeurl sends the bare message name; other publishers may prefix
    # "types.googleapis.com/" as protobuf's Any.Pack does.
    return type_url.rsplit("/", 1)[-1]


def decode_envelope(envelope: events_pb2.Envelope) -> Event:
    """
    The event carried by C{envelope}.

    @raise UnknownEvent: for a topic other than containerd's image and content topics, a
        payload of another type than the topic's, or a payload that does not parse.
    """
    topic = envelope.topic
    known = _IMAGE_TOPICS.get(topic) or _CONTENT_TOPICS.get(topic)
    if known is None:
        raise UnknownEvent(f"unhandled topic {topic!r}")
    action, message_type = known
    if _type_name(envelope.event.type_url) != message_type.DESCRIPTOR.full_name:
        raise UnknownEvent(f"topic {topic!r} carries unexpected type {envelope.event.type_url!r}")
    try:
        payload = message_type.FromString(envelope.event.value)
    except DecodeError as e:
        raise UnknownEvent(f"undecodable {envelope.event.type_url!r} payload on {topic!r}: {e}") from None
    if topic in _IMAGE_TOPICS:
        return ImageEvent(action=action, name=payload.name)
    return ContentEvent(action=action, digest=payload.digest)


class _Thread(Protocol):
    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


@define(eq=False)
class _Attempt:
    """
    One opened C{Subscribe} stream and the thread reading it.
    """

    stream: EventStream
    marker_topic: str
    thread: _Thread | None = None
    live: bool = False
    markers_sent: int = 0
    marker_call: Any = None
    ended: Deferred[None] = field(factory=Deferred)


class EventSubscriber(Service):
    """
    Delivers containerd's image and content events of the client's namespace to C{on_event}, and
    calls C{on_resubscribed} each time a subscription (the first one included) becomes live.

    Both callbacks run in the reactor thread; an exception they raise is logged and dropped.
    containerd being down is never fatal: the subscriber keeps retrying, backing off from
    C{initial_backoff} to C{max_backoff} seconds, and goes back to C{initial_backoff} once a
    subscription is live.  The default cap is half a second: an attempt is one call on a local
    socket, and content pulled right after containerd comes back must be advertised at once,
    not after a long backoff (every event in between is lost and waits for the resync the new
    subscription triggers).  While containerd stays down, only the first failure is a warning.

    Add it to the application after its L{ContainerdClient}, so it stops first.
    """

    def __init__(
        self,
        reactor: Any,
        client: ContainerdClient,
        on_event: Callable[[Event], None],
        on_resubscribed: Callable[[], None],
        *,
        initial_backoff: float = 0.1,
        max_backoff: float = 0.5,
        thread_factory: Callable[..., _Thread] = threading.Thread,
    ) -> None:
        """
        @param reactor: an C{IReactorTime} and C{IReactorFromThreads} provider.
        @param thread_factory: called like L{threading.Thread} with C{target}, C{args}, C{name}
            and C{daemon}; tests pass one that runs the target when they choose.
        """
        self._reactor = reactor
        self._client = client
        self._on_event = on_event
        self._on_resubscribed = on_resubscribed
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._thread_factory = thread_factory
        self._backoff = initial_backoff
        # Failures since the last live subscription; only the first is logged as a warning.
        self._failures = 0
        self._attempt: _Attempt | None = None
        self._reconnect_call: Any = None

    @property
    def subscribed(self) -> bool:
        """
        Whether a live subscription is delivering events right now.
        """
        return self._attempt is not None and self._attempt.live

    def startService(self) -> None:
        super().startService()
        self._backoff = self._initial_backoff
        self._subscribe()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return None
        self._cancel_marker(attempt)
        attempt.stream.cancel()
        if attempt.thread is None:
            return None
        thread = attempt.thread
        # The reader thread reports its end through the reactor just before returning, so this
        # join waits for a thread that has already finished its work.
        return attempt.ended.addCallback(lambda _: thread.join())

    def _filters(self, marker_topic: str) -> list[str]:
        namespace = f"namespace=={quote_filter_value(self._client.namespace)}"
        return [
            f"{namespace},topic~={quote_filter_value('^/images/')}",
            f"{namespace},topic~={quote_filter_value('^/content/')}",
            f"{namespace},topic=={quote_filter_value(marker_topic)}",
        ]

    def _subscribe(self) -> None:
        self._reconnect_call = None
        marker_topic = _MARKER_TOPIC_PREFIX + secrets.token_hex(8)
        try:
            stream = self._client.subscribe_events(self._filters(marker_topic))
        except ContainerdError as e:
            _log.warn("Cannot subscribe to containerd events: {error}", error=e)
            self._schedule_reconnect()
            return
        attempt = _Attempt(stream=stream, marker_topic=marker_topic)
        self._attempt = attempt
        attempt.thread = self._thread_factory(
            target=self._read_stream, args=(attempt,), name="spegel-containerd-events", daemon=True
        )
        attempt.thread.start()
        self._publish_marker(attempt)

    def _read_stream(self, attempt: _Attempt) -> None:
        """
        Iterate the stream until it breaks or is cancelled.  Runs on the attempt's own thread.
        """
        error: BaseException | None = None
        try:
            for envelope in attempt.stream:
                if envelope.topic == attempt.marker_topic:
                    self._reactor.callFromThread(self._went_live, attempt)
                    continue
                try:
                    event = decode_envelope(envelope)
                except UnknownEvent as e:
                    _log.debug("Ignoring containerd event: {reason}", reason=str(e))
                    continue
                if envelope.namespace != self._client.namespace:
                    _log.debug("Ignoring event of namespace {namespace}", namespace=envelope.namespace)
                    continue
                self._reactor.callFromThread(self._deliver, attempt, event)
        except grpc.RpcError as e:
            error = e
        except Exception as e:
            # Whatever else breaks the stream must not leave the subscriber waiting forever.
            error = e
        self._reactor.callFromThread(self._stream_ended, attempt, error)

    def _current(self, attempt: _Attempt) -> bool:
        return bool(self.running) and attempt is self._attempt

    def _deliver(self, attempt: _Attempt, event: Event) -> None:
        if not self._current(attempt):
            return
        try:
            self._on_event(event)
        except Exception:
            _log.failure("Handling containerd event {event} failed", event=event)

    def _publish_marker(self, attempt: _Attempt) -> None:
        attempt.marker_call = None
        if not self._current(attempt) or attempt.live:
            return
        if attempt.markers_sent >= MARKER_ATTEMPTS:
            _log.warn(
                "The subscription marker never came back from containerd; assuming the "
                "event stream is live without that guarantee"
            )
            self._went_live(attempt)
            return
        attempt.markers_sent += 1
        d = self._client.publish_event(attempt.marker_topic)
        d.addErrback(lambda f: _log.debug("Publishing the subscription marker failed: {f}", f=f.value))

        def again(_: object) -> None:
            if self._current(attempt) and not attempt.live:
                attempt.marker_call = self._reactor.callLater(MARKER_INTERVAL, self._publish_marker, attempt)

        d.addCallback(again)

    def _cancel_marker(self, attempt: _Attempt) -> None:
        if attempt.marker_call is not None and attempt.marker_call.active():
            attempt.marker_call.cancel()
        attempt.marker_call = None

    def _went_live(self, attempt: _Attempt) -> None:
        if not self._current(attempt) or attempt.live:
            return
        attempt.live = True
        self._cancel_marker(attempt)
        self._backoff = self._initial_backoff
        self._failures = 0
        _log.info("Subscribed to containerd events in namespace {namespace}", namespace=self._client.namespace)
        try:
            self._on_resubscribed()
        except Exception:
            _log.failure("Handling a containerd resubscription failed")

    def _stream_ended(self, attempt: _Attempt, error: BaseException | None) -> None:
        attempt.ended.callback(None)
        if not self._current(attempt):
            return
        self._attempt = None
        self._cancel_marker(attempt)
        attempt.stream.cancel()
        if attempt.thread is not None:
            attempt.thread.join()
        code = error.code() if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)) else None
        self._failures += 1
        (_log.warn if self._failures == 1 else _log.debug)(
            "containerd event stream ended ({reason}); subscribing again in {delay}s",
            reason=(code.name if isinstance(code, grpc.StatusCode) else error) or "closed by containerd",
            delay=self._backoff,
        )
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)
        self._reconnect_call = self._reactor.callLater(delay, self._subscribe)
