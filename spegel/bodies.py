# -*- test-case-name: tests.unit.test_bodies, tests.e2e.test_bodies_real -*-
"""
Response bodies that stream content to an HTTP request without holding it in memory.

L{FileBodyProducer} sends a byte range of a file of containerd's content store. On a plain TCP
connection it hands the bytes to the kernel with C{os.sendfile}, so they never enter Python;
elsewhere (TLS, tests' in-memory transports) it reads and writes chunks. L{ChunkedReadProducer}
pulls a byte range through an asynchronous reader, for when the content store is not readable
from this process and containerd's Read API must serve it.

Both are push producers registered on the request: the transport pauses them when its buffer
fills and resumes them when it drains, so a slow client slows the reads and memory stays flat.
Both also ask a pacer (L{spegel.pacing.IPacer}) before each chunk or sendfile call; a body sent
to a peer under C{--max-upload-rate} is paced by the node's token bucket, and waits for its
tokens the way it waits for a full socket: it stops producing until called back.

A body sent to a peer ends when the peer takes nothing for C{stall_timeout} (its transport
paused us that long): a peer that asks and stops reading would hold one of the node's
C{--max-uploads} for good. The peer resumes elsewhere with a C{Range} request.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

from spegel.pacing import UNPACED, IPacer

# Userland chunk size: large enough to amortise Python overhead, small enough to stay flat.
READ_CHUNK = 256 * 1024
# At most this much is handed to sendfile in one turn of the reactor, so one fast client on
# loopback cannot starve every other connection.
SENDFILE_TURN_BUDGET = 8 * 1024 * 1024


class _StallGuard:
    """
    Ends a body whose client has kept its transport paused (taken nothing) for C{timeout}
    seconds, by calling C{on_stall}; 0: never.
    """

    def __init__(self, clock: IReactorTime | None, timeout: float, on_stall: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_stall = on_stall
        self._timer: IDelayedCall | None = None

    def paused(self) -> None:
        if self._clock is not None and self._timeout > 0 and self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._stalled)

    def resumed(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        self._on_stall()


def _stalled_client(timeout: float) -> Failure:
    return Failure(BodyInterrupted(f"the client took nothing for {timeout:.0f} s"))


class BodyInterrupted(Exception):
    """
    The body stopped before its last byte: the client went away or the source failed.
    """


def client_socket(request: Request) -> tcp.Connection | None:
    """
    The connection C{request} is answered on when it is a plain TCP socket that the kernel can
    write to directly (sendfile, splice), else L{None}.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not transport.connected or transport.disconnecting:
        return None
    return transport


def _plain_tcp_socket_fd(request: Request) -> int | None:
    transport = client_socket(request)
    if transport is None:
        return None
    try:
        return transport.getHandle().fileno()
    except (AttributeError, OSError):
        return None


def transport_buffer_empty(transport: object) -> bool:
    """
    Whether Twisted has written out everything handed to C{transport.write}. Bytes sent by
    sendfile must not overtake bytes still waiting in that buffer (the response headers, a
    previous chunk).
    """
    try:
        pending = len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return pending == 0


@implementer(IPushProducer)
class FileBodyProducer:
    """
    Write C{length} bytes of the open file C{fd}, from C{offset}, as the body of C{request}.

    The producer owns C{fd} and closes it when done. L{start} returns a L{Deferred} that fires
    when the last byte was handed to the transport, and fails with L{BodyInterrupted} when the
    connection goes away first.

    Every sendfile call and every chunk is reserved from C{pacer} first: with a cap, sendfile
    moves at most what the cap allows, so the bytes stay zero-copy and paced at once.

    How sendfile and Twisted's buffered writes are interleaved: whenever Twisted's buffer is
    empty, C{os.sendfile} writes straight to the socket until the kernel's send buffer is full
    (C{EAGAIN}) or the turn's budget is spent; then one chunk a little larger than the
    transport's buffer size goes through C{request.write}. That overfills Twisted's buffer on
    purpose: the transport pauses this producer and resumes it once the socket has drained,
    which is exactly the wake-up sendfile needs, without a second reader on the socket.
    """

    def __init__(
        self,
        request: Request,
        fd: int,
        offset: int,
        length: int,
        *,
        allow_sendfile: bool = True,
        on_bytes: Callable[[int], None] = lambda n: None,
        pacer: IPacer = UNPACED,
        clock: IReactorTime | None = None,
        stall_timeout: float = 0.0,
    ):
        self._request = request
        self._stall = _StallGuard(clock, stall_timeout, lambda: self._finish(_stalled_client(stall_timeout)))
        self._fd = fd
        self._offset = offset
        self._remaining = length
        self._on_bytes = on_bytes
        self._pacer = pacer
        self._socket_fd = _plain_tcp_socket_fd(request) if allow_sendfile else None
        self._paused = False
        # Waiting for the pacer's tokens, as _paused is waiting for the transport to drain.
        self._throttled = False
        self._producing = False
        self._done: Deferred[None] = Deferred(self._cancel)
        self.bytes_by_sendfile = 0

    def start(self) -> Deferred[None]:
        if self._remaining == 0:
            self._finish(None)
            return self._done
        self._request.registerProducer(self, True)
        if not self._request.startedWriting:
            # twisted.web writes the status line and headers with the first body write; they
            # must be in the transport's buffer before sendfile may touch the socket.
            try:
                self._write_chunk(READ_CHUNK)
            except OSError as e:
                self._finish(Failure(BodyInterrupted(f"reading the content failed: {e}")))
        self._produce()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True
        self._stall.paused()

    def resumeProducing(self) -> None:
        self._paused = False
        self._stall.resumed()
        self._produce()

    def stopProducing(self) -> None:
        self._finish(Failure(BodyInterrupted("the client went away")))

    def _cancel(self, d: Deferred[None]) -> None:
        self._finish(Failure(CancelledError()), fire=False)

    def _produce(self) -> None:
        # resumeProducing can be called from inside request.write (re-entrantly); the outer
        # loop carries on, so the inner call has nothing to do.
        if self._producing or self._done.called or self._fd < 0:
            return
        self._producing = True
        try:
            self._produce_until_paused()
        except OSError as e:
            self._finish(Failure(BodyInterrupted(f"reading the content failed: {e}")))
        finally:
            self._producing = False

    def _unthrottled(self) -> None:
        self._throttled = False
        self._produce()

    def _throttle(self) -> None:
        self._throttled = True
        self._pacer.wait(self._unthrottled)

    def _produce_until_paused(self) -> None:
        budget = SENDFILE_TURN_BUDGET
        transport = getattr(getattr(self._request, "channel", None), "transport", None)
        while not self._paused and not self._throttled and self._remaining > 0 and not self._done.called:
            if (
                self._socket_fd is not None
                and budget > 0
                # The headers go by the first write (in start, unless the pacer held it back).
                and self._request.startedWriting
                and transport_buffer_empty(transport)
            ):
                sent = self._sendfile(min(self._remaining, budget))
                budget -= sent
                if self._remaining == 0 or self._throttled:
                    break
                if sent > 0 and budget > 0:
                    continue
            # The socket is full (or sendfile is not possible here): write one chunk the
            # ordinary way. With sendfile it is sized to pause us until the socket drains.
            chunk_size = READ_CHUNK
            if self._socket_fd is not None and transport is not None:
                chunk_size = getattr(transport, "bufferSize", 65536) + 1
            self._write_chunk(chunk_size)
        if self._remaining == 0:
            self._finish(None)

    def _write_chunk(self, size: int) -> None:
        granted = self._pacer.take(min(size, self._remaining))
        if not granted:
            self._throttle()
            return
        try:
            data = os.pread(self._fd, granted, self._offset)
        except OSError:
            self._pacer.give_back(granted)
            raise
        self._pacer.give_back(granted - len(data))
        if not data:
            raise OSError(errno.EIO, "file ended before the expected length")
        self._advance(len(data))
        self._request.write(data)

    def _sendfile(self, count: int) -> int:
        granted = self._pacer.take(count)
        if not granted:
            self._throttle()
            return 0
        sent = 0
        try:
            sent = self._sendfile_granted(granted)
        finally:
            self._pacer.give_back(granted - sent)
        return sent

    def _sendfile_granted(self, count: int) -> int:
        try:
            sent = os.sendfile(self._socket_fd, self._fd, self._offset, count)  # type: ignore[arg-type]
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                # This file system or socket cannot sendfile: stream the rest normally.
                self._socket_fd = None
                return 0
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                self._finish(Failure(BodyInterrupted("the client went away")))
                return 0
            raise
        if sent == 0:
            raise OSError(errno.EIO, "file ended before the expected length")
        self.bytes_by_sendfile += sent
        # request.write counts what it sends; the access log should see these too.
        self._request.sentLength += sent
        self._advance(sent)
        return sent

    def _advance(self, count: int) -> None:
        self._offset += count
        self._remaining -= count
        self._on_bytes(count)

    def _finish(self, result: Failure | None, fire: bool = True) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        self._stall.resumed()
        self._pacer.stop()
        if self._request.producer is self:
            self._request.unregisterProducer()
        if fire and not self._done.called:
            if result is None:
                self._done.callback(None)
            else:
                self._done.errback(result)


@implementer(IPushProducer)
class ChunkedReadProducer:
    """
    Write C{length} bytes from C{offset}, read chunk by chunk through C{read(offset, size)}
    (which returns a L{Deferred} of at most C{size} bytes), as the body of C{request}.

    Only one read is in flight at a time and none starts while the transport has paused us,
    so memory holds at most one chunk per response. Each read is as large as C{pacer} allows
    (its bytes are reserved before the read starts), and none starts while it holds us back.

    With C{ready}, a source still being written (L{spegel.ingest.GrowingFile}) is waited for
    before each read: C{ready(offset)} returns L{None} when the byte at C{offset} can be read,
    else a L{Deferred} that fires when it can. No pacer tokens are held while it waits.
    """

    def __init__(
        self,
        request: Request,
        read: Callable[[int, int], Deferred[bytes]],
        offset: int,
        length: int,
        *,
        chunk_size: int = 1024 * 1024,
        on_bytes: Callable[[int], None] = lambda n: None,
        pacer: IPacer = UNPACED,
        ready: Callable[[int], Deferred[None] | None] | None = None,
        clock: IReactorTime | None = None,
        stall_timeout: float = 0.0,
    ):
        self._request = request
        self._stall = _StallGuard(clock, stall_timeout, lambda: self._stop(_stalled_client(stall_timeout)))
        self._read = read
        self._ready = ready
        self._waiting: Deferred[None] | None = None
        self._offset = offset
        self._remaining = length
        self._chunk_size = chunk_size
        self._on_bytes = on_bytes
        self._pacer = pacer
        self._paused = False
        self._throttled = False
        self._reading: Deferred[bytes] | None = None
        # Bytes reserved from the pacer for the read in flight.
        self._reserved = 0
        self._done: Deferred[None] = Deferred(lambda d: self._stop(None, fire=False))

    def start(self) -> Deferred[None]:
        if self._remaining == 0:
            self._done.callback(None)
            return self._done
        self._request.registerProducer(self, True)
        self._read_next()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True
        self._stall.paused()

    def resumeProducing(self) -> None:
        self._paused = False
        self._stall.resumed()
        if self._reading is None:
            self._read_next()

    def stopProducing(self) -> None:
        self._stop(Failure(BodyInterrupted("the client went away")))

    def _read_next(self) -> None:
        if self._paused or self._throttled or self._done.called or self._remaining == 0:
            return
        if self._waiting is not None:
            return
        if self._ready is not None:
            waiting = self._ready(self._offset)
            if waiting is not None:
                self._waiting = waiting
                waiting.addCallbacks(self._now_ready, self._read_failed)
                return
        size = self._pacer.take(min(self._chunk_size, self._remaining))
        if not size:
            self._throttled = True
            self._pacer.wait(self._unthrottled)
            return
        self._reserved = size
        reading = self._reading = self._read(self._offset, size)
        reading.addCallbacks(self._got_chunk, self._read_failed)

    def _unthrottled(self) -> None:
        self._throttled = False
        if self._reading is None:
            self._read_next()

    def _now_ready(self, _: None) -> None:
        self._waiting = None
        if self._reading is None:
            self._read_next()

    def _unreserve(self, sent: int) -> None:
        reserved, self._reserved = self._reserved, 0
        self._pacer.give_back(reserved - sent)

    def _got_chunk(self, data: bytes) -> None:
        self._reading = None
        self._unreserve(min(len(data), self._reserved))
        if self._done.called:
            return
        if not data or len(data) > self._remaining:
            self._stop(Failure(BodyInterrupted("the content source returned the wrong length")))
            return
        self._offset += len(data)
        self._remaining -= len(data)
        self._on_bytes(len(data))
        self._request.write(data)
        if self._remaining == 0:
            self._stop(None)
        else:
            self._read_next()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = self._waiting = None
        self._unreserve(0)
        if not self._done.called and not failure.check(CancelledError):
            self._stop(Failure(BodyInterrupted(f"reading the content failed: {failure.value}")))

    def _stop(self, result: Failure | None, fire: bool = True) -> None:
        if self._request.producer is self:
            self._request.unregisterProducer()
        self._stall.resumed()
        self._pacer.stop()
        if self._reading is not None:
            reading, self._reading = self._reading, None
            reading.cancel()
            self._unreserve(0)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if fire and not self._done.called:
            if result is None:
                self._done.callback(None)
            else:
                self._done.errback(result)


