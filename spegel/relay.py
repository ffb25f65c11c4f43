# -*- test-case-name: tests.e2e.test_relay, tests.unit.test_relay_unit -*-
"""
Relaying a blob from a peer's socket to a client's socket through kernel pipes.

Relayed through Python, every byte of a blob is copied out of the peer's socket, hashed, and
copied into the client's socket, and the reactor thread does all three: on a small machine that
caps a relay well below what the disk-serving peer and the client can do. Here the bytes never
enter Python on their way through:

  - C{splice(2)} moves them from the peer's socket into a pipe, from there (once teed) into an
    outgoing pipe, and from that into the client's socket (page references, not copies);
  - C{tee(2)} duplicates them into the digest's pipe, from which a worker thread reads them and
    feeds the digest (the one copy left), while the reactor sends the same bytes on; the thread
    empties that pipe for as long as it finds bytes there, and the reactor learns that it has
    room again by watching it, so the two do not hand work to each other chunk by chunk;
  - the final bytes of a whole blob are held back until the digest matches, so a client never
    receives every byte of wrong content.

The relay takes a peer connection over from Twisted's HTTP client once the response headers and
whatever body bytes came with them have been read (L{peer_socket}): Twisted stops reading it, the
relay reads exactly the rest of the body, and the connection is closed afterwards (the HTTP
client never saw the body, so it cannot be reused). Only plain TCP on both sides qualifies; on
anything else (TLS, other kernels, tests' in-memory transports) the caller streams through
Python as before.

This is Linux-specific: C{os.splice} (Python 3.10+) and C{tee} from the C library via ctypes.
L{available} says whether both work here, once.  The pipes, the digest's pipe with its hashing
jobs, and the hashing threads are in L{spegel.relaypipes}; its public names are importable from
here too.

About 560 lines, on purpose in one module: L{SpliceRelay} is one state machine whose every step
reads the same counters (received >= teed >= passed >= sent, hashed <= teed); split across
modules, each step would have to be read in two places to check that order holds.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable

from attrs import frozen
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from spegel.bodies import BodyInterrupted, transport_buffer_empty
from spegel.oci import hashed_digest

from spegel.relaypipes import (
    F_GETPIPE_SZ,
    PIPE_SIZE,
    SPLICE_F_NONBLOCK,
    CopyPipe,
    HashExecutor,
    HashingPool,
    available,
    open_pipe,
)

# The relay's callers (streaming, the node's wiring, tests) import these from here, including
# those now defined in relaypipes.
__all__ = [
    "HELD_BACK", "PIPE_SIZE", "RELAY_MIN", "DigestMismatch", "HashExecutor", "HashingPool", "RelayResult",
    "SpliceRelay", "available", "peer_socket",
]

# Of a whole blob, this many final bytes (all of a smaller one) stay in the pipe until the digest
# matches, so a client never has every byte of a wrong blob; the reactor hashes them itself.
HELD_BACK = 64 * 1024
# Below this many bytes left, taking a connection over costs more than it saves.
RELAY_MIN = PIPE_SIZE

# The peer's end of a connection failed in one of these ways: the copy resumes elsewhere.
_PEER_ERRNOS = (errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO)


class DigestMismatch(Exception):
    """
    The relayed bytes do not hash to the blob's digest; the final bytes were not sent.
    """


@frozen
class RelayResult:
    """
    How a relay ended without failing the client.

    @ivar moved: bytes taken from the peer, every one of them hashed and sent to the client.
    @ivar peer_error: why the peer stopped early ("it went silent"), or L{None} when every
        byte was moved (and, for a whole blob, verified).
    """

    moved: int
    peer_error: str | None = None


def peer_socket(transport: object) -> tcp.Connection | None:
    """
    The plain TCP connection under the transport Twisted's HTTP client gives a response body's
    protocol, if that is what it is.
    """
    # twisted.web._newclient hands body protocols a TransportProxyProducer over the connection.
    connection = getattr(transport, "_producer", None)
    if not isinstance(connection, tcp.Connection) or getattr(connection, "TLS", False):
        return None
    if not connection.connected or connection.disconnecting:
        return None
    return connection


@implementer(IReadDescriptor)
class SpliceRelay(TimeoutMixin):
    """
    Move the next C{count} bytes of a peer's response body from its socket to the client's.

    The caller has already sent the response headers' worth of state to C{request} (status,
    headers) and registered itself as the request's producer; it forwards C{pauseProducing},
    C{resumeProducing} and C{stopProducing} here. Twisted must not be reading C{peer} (the caller
    calls C{stopReading} on it) and the caller closes C{peer} after the relay ends.

    The bytes flow without stopping at chunk boundaries: the peer's socket stays registered with
    the reactor while the relay's pipe has room, each byte is teed into the digest's pipe before
    it may leave for the client, and a worker thread empties the digest's pipe for as long as it
    finds bytes there, so a busy relay hands work to the thread pool once per many MiB, not once
    per chunk. The reactor hears that the digest's pipe has room again from the pipe itself (the
    reactor watches it for writing), not from the thread.

    @param hasher: fed every byte moved, from a worker thread (through C{hash_executor}), or
        L{None} to move bytes unhashed (a range of a blob).
    @param digest: when the C{count} bytes complete a whole blob, its digest: the final bytes are
        held back until C{hasher} matches it. L{None} to send everything as it comes.
    @param hash_executor: runs a hashing job, returning a L{Deferred} that fires when it is done.
    @param idle_timeout: the peer failed when it sends nothing this long while the relay waits
        for it.
    @param on_bytes: told of every byte count handed to the client.
    @param on_spliced: told of every byte count of those that went by splice.
    @raise OSError: when the relay's pipes cannot be made (nothing was taken over yet).
    """

    def __init__(
        self,
        reactor: Any,
        request: Request,
        peer: tcp.Connection,
        client: tcp.Connection,
        count: int,
        *,
        hasher: Any,
        digest: str | None,
        hash_executor: HashExecutor,
        idle_timeout: float,
        on_bytes: Callable[[int], None] = lambda n: None,
        on_spliced: Callable[[int], None] = lambda n: None,
    ):
        self._reactor: IReactorFDSet = reactor
        self._clock: IReactorTime = reactor
        self._request = request
        self._peer_fd = peer.fileno()
        self._client = client
        self._client_fd = client.fileno()
        self._count = count
        self._hasher = hasher
        self._digest = digest if hasher is not None else None
        self._hash_executor = hash_executor
        self._idle_timeout = idle_timeout
        self._on_bytes = on_bytes
        self._on_spliced = on_spliced
        # Bytes go: peer socket -> pipe (received) -> teed into the digest's pipe (teed) ->
        # passed on to the outgoing pipe (passed) -> client (sent), and from the digest's pipe
        # into the hasher (hashed). tee copies from the head of a pipe, so bytes leave the first
        # pipe once teed, and the next can be teed whatever the client's pace. Unhashed bytes
        # go to the client straight from the first pipe (passed = received). The last
        # HELD_BACK bytes of a whole blob are never teed: they wait here (held), and the reactor
        # hashes them itself once the worker has hashed the rest.
        self._received = 0
        self._teed = 0
        self._passed = 0
        self._sent = 0
        self._hashed = 0
        self._held = bytearray()
        self._tee_limit = count - min(HELD_BACK, count) if self._digest is not None else count
        self._hashing: Deferred[None] | None = None
        self._copy: CopyPipe | None = None
        self._waiting_for_copy_room = False
        self._paused = False
        self._reading = False
        self._stepping = False
        self._peer_error: str | None = None
        self._done: Deferred[RelayResult] = Deferred()
        self._outcome: Failure | RelayResult | None = None
        self._pipe_r = self._pipe_w = -1
        self._out_r = self._out_w = -1
        self._pipe_size = PIPE_SIZE
        self.bytes_spliced = 0
        # Made here, so that a caller whose relay cannot be built still has the connection.
        try:
            self._pipe_r, self._pipe_w = open_pipe()
            self._pipe_size = fcntl.fcntl(self._pipe_w, F_GETPIPE_SZ)
            if self._hasher is not None:
                self._copy = CopyPipe.open(self, self._pipe_size)
                self._out_r, self._out_w = open_pipe()
        except OSError:
            self._close_pipes()
            raise

    def start(self) -> Deferred[RelayResult]:
        if not self._request.startedWriting:
            # twisted.web writes the status line and headers with the first write; they must
            # be queued on the transport before a splice may touch the socket.
            self._request.write(b"")
        self._step()
        return self._done

    # Driven by the caller, on behalf of the client's transport.
    def pauseProducing(self) -> None:
        self._paused = True
        self._stop_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        self._step()

    def stopProducing(self) -> None:
        self._end(Failure(BodyInterrupted("the client went away")))

    # IReadDescriptor: the peer's socket has bytes.
    def fileno(self) -> int:
        return self._peer_fd

    def logPrefix(self) -> str:
        return "SpliceRelay"

    def connectionLost(self, reason: Failure) -> None:
        # The reactor gave up on the descriptor (it is shutting down, or the socket is gone).
        self._reading = False
        self._peer_failed(f"its socket was dropped: {reason.getErrorMessage()}")

    def doRead(self) -> None:
        if not self._may_read():
            self._stop_reading()
            return
        in_pipe = self._in_pipe()
        try:
            moved = os.splice(
                self._peer_fd, self._pipe_w, min(self._pipe_size - in_pipe, self._count - self._received),
                flags=SPLICE_F_NONBLOCK,
            )
        except BlockingIOError:
            if in_pipe:
                # The pipe counts its room in pages, not bytes: it is full with fewer bytes than
                # its size when the socket's bytes came in pieces smaller than a page. The socket
                # stays readable, so keep away from it until some of the pipe has gone out (bytes
                # in the pipe are always on their way: see _hold_back).
                self._stop_reading()
            return
        except OSError as e:
            self._peer_failed(f"reading from it failed: {e}")
            return
        if moved == 0:
            self._peer_failed("it closed the connection")
            return
        self._received += moved
        if self._copy is None:
            self._passed = self._received
        # Silence is counted afresh from each read.
        self.resetTimeout()
        self._step()

    # The relay's state machine.
    def _step(self) -> None:
        if self._stepping or self._outcome is not None:
            return
        self._stepping = True
        try:
            self._step_until_waiting()
        except OSError as e:
            self._end(Failure(BodyInterrupted(f"the relay failed: {e}")))
        finally:
            self._stepping = False

    def _step_until_waiting(self) -> None:
        while self._outcome is None:
            if self._sent < self._passed and not self._paused:
                self._send(self._passed - self._sent)
            elif not (self._pass_on() or self._tee() or self._hold_back()):
                break
        if self._outcome is not None:
            return
        self._hash_next()
        if self._may_read():
            self._start_reading()
        else:
            self._stop_reading()
        if self._hashing_pending() or self._sent < self._passed or self._passed + len(self._held) < self._received:
            return
        if self._peer_error is not None:
            # Report how far the peer got only once the digest has every byte it sent.
            self._release_held()
            if self._outcome is None:
                self._end(RelayResult(self._received, self._peer_error))
        elif self._received == self._count:
            self._finish()

    def _in_pipe(self) -> int:
        """
        How many bytes are in the first pipe.
        """
        left = self._sent if self._copy is None else self._passed
        return self._received - left - len(self._held)

    def _pass_on(self) -> bool:
        """
        Move the bytes teed from the first pipe to the outgoing one (page references, not
        copies), as many as it has room for.

        @return: whether any moved.
        """
        if self._copy is None or self._passed >= self._teed:
            return False
        try:
            moved = os.splice(self._pipe_r, self._out_w, self._teed - self._passed, flags=SPLICE_F_NONBLOCK)
        except BlockingIOError:
            # Full: the client taking some of it steps again.
            return False
        if moved == 0:
            raise OSError(errno.EIO, "the relay's pipe ran dry")
        self._passed += moved
        return True

    def _tee(self) -> bool:
        """
        Duplicate the bytes at the head of the first pipe, as many as the digest's pipe takes,
        for the worker thread to hash: only once every byte teed before has been passed on (tee
        copies from the head of the pipe).

        @return: whether anything was teed.
        """
        if self._copy is None or self._passed != self._teed:
            return False
        # The final bytes of a whole blob stay out of it (see _hold_back).
        end = min(self._received, self._tee_limit)
        if self._teed >= end:
            return False
        copied = self._copy.tee_from(self._pipe_r, end - self._teed)
        if copied == 0:
            # Full: the reactor says when the worker has made room.
            self._wait_for_copy_room()
            return False
        self._teed += copied
        self._hash_next()
        return True

    def _hold_back(self) -> bool:
        """
        Take the final bytes of a whole blob out of the first pipe as they come, once every
        byte before them has been passed on: at most L{HELD_BACK} bytes, kept here until the
        digest is checked, so that they never fill the pipe (which counts its room in pages:
        bytes in tiny pieces fill it long before its size) while more must be read.

        @return: whether any were taken.
        """
        if self._tee_limit == self._count or self._passed < self._tee_limit:
            return False
        pending = self._received - self._passed - len(self._held)
        if pending <= 0:
            return False
        chunk = os.read(self._pipe_r, pending)
        if not chunk:
            raise OSError(errno.EIO, "the relay's pipe ran dry")
        self._held += chunk
        return True

    def _release_held(self) -> None:
        """
        Hash and send the bytes held back, of a blob that will not be complete: the peer
        failed, and the caller carries on from another.
        """
        if self._held:
            assert self._hasher is not None
            # At most HELD_BACK bytes, and no worker holds the hasher now.
            self._hasher.update(self._held)
            self._send_held()

    def _send_held(self) -> None:
        held, self._held = bytes(self._held), bytearray()
        self._advance(len(held))
        self._request.write(held)

    def _hashing_pending(self) -> bool:
        return self._hashing is not None or self._hashed < self._teed

    def _may_read(self) -> bool:
        return (
            self._outcome is None
            and self._peer_error is None
            and not self._paused
            and self._received < self._count
            and self._in_pipe() < self._pipe_size
        )

    def _send(self, sendable: int) -> None:
        """
        Hand up to C{sendable} bytes from the pipe to the client: by splice when Twisted has
        nothing queued for the socket, else (or when the socket is full) one chunk through the
        transport, a little more than its buffer holds, so that it pauses the relay and resumes
        it once the socket drains: the wake-up the next splice needs.
        """
        outgoing = self._pipe_r if self._copy is None else self._out_r
        if transport_buffer_empty(self._client):
            try:
                moved = os.splice(outgoing, self._client_fd, sendable, flags=SPLICE_F_NONBLOCK)
            except BlockingIOError:
                moved = 0
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._end(Failure(BodyInterrupted("the client went away")))
                    return
                raise
            if moved > 0:
                self.bytes_spliced += moved
                self._on_spliced(moved)
                # request.write counts what it sends; the access log should see these too.
                self._request.sentLength += moved
                self._advance(moved)
                return
        chunk = os.read(outgoing, min(sendable, getattr(self._client, "bufferSize", 65536) + 1))
        if not chunk:
            raise OSError(errno.EIO, "the relay's pipe ran dry")
        self._advance(len(chunk))
        self._request.write(chunk)

    def _advance(self, count: int) -> None:
        self._sent += count
        self._on_bytes(count)

    def _finish(self) -> None:
        """
        Every byte is in and every teed byte hashed: hash the bytes held back, check the digest,
        then release them.
        """
        if self._held:
            assert self._hasher is not None
            # At most HELD_BACK bytes, and no worker holds the hasher now.
            self._hasher.update(self._held)
        if self._digest is not None and hashed_digest(self._hasher) != self._digest:
            self._end(Failure(DigestMismatch(f"the relayed bytes do not match {self._digest}")))
            return
        if self._held:
            self._send_held()
        self._end(RelayResult(self._received))

    # Hashing, on a worker thread: one job empties the digest's pipe for as long as it finds
    # bytes there (up to a limit, so that relays sharing the pool take turns).
    def _hash_next(self) -> None:
        if self._hashing is not None or self._hashed >= self._teed or self._outcome is not None:
            return
        assert self._copy is not None
        hashing = self._hashing = self._hash_executor(self._copy.hash_job(self._hasher))
        hashing.addCallbacks(self._hashed_some, self._hash_failed)

    def _hashed_some(self, _: object) -> None:
        self._hashing = None
        assert self._copy is not None
        self._hashed = self._copy.hashed
        if self._outcome is not None:
            self._close_pipes()
            return
        if self._hashed > self._teed:
            self._end(Failure(BodyInterrupted("the digest's pipe gave more bytes than were teed into it")))
            return
        self._step()

    def _hash_failed(self, failure: Failure) -> None:
        self._hashing = None
        self._end(Failure(BodyInterrupted(f"hashing the relayed bytes failed: {failure.getErrorMessage()}")))
        self._close_pipes()

    def _wait_for_copy_room(self) -> None:
        if not self._waiting_for_copy_room and self._copy is not None:
            self._waiting_for_copy_room = True
            self._reactor.addWriter(self._copy)

    def _stop_waiting_for_copy_room(self) -> None:
        if self._waiting_for_copy_room and self._copy is not None:
            self._waiting_for_copy_room = False
            self._reactor.removeWriter(self._copy)

    def copy_room(self) -> None:
        """
        The digest's pipe has room again (the reactor says so of its write end).
        """
        self._stop_waiting_for_copy_room()
        self._step()

    def copy_lost(self, reason: Failure) -> None:
        """
        The reactor gave up on the digest's pipe (it is shutting down).
        """
        self._waiting_for_copy_room = False
        self._end(Failure(BodyInterrupted(f"the digest's pipe was dropped: {reason.getErrorMessage()}")))

    # The peer's side.
    def _start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._reactor.addReader(self)
        # Silence is counted from when the relay starts waiting, not from each call.
        if self.timeOut is None:
            self.setTimeout(self._idle_timeout)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)
        self.setTimeout(None)

    # TimeoutMixin, on the relay's clock.
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.setTimeout(None)
        if self._reading:
            self._peer_failed("it went silent")

    def _peer_failed(self, why: str) -> None:
        """
        The peer will send no more: pass on what it did send, then report how far it got.
        """
        if self._outcome is not None or self._peer_error is not None:
            return
        self._stop_reading()
        self._peer_error = why
        self._step()

    # The end.
    def _end(self, outcome: Failure | RelayResult) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._stop_reading()
        self._stop_waiting_for_copy_room()
        if self._hashing is None:
            self._close_pipes()
        # else: a worker thread is reading the digest's pipe; it is closed when the job ends.
        if isinstance(outcome, Failure):
            self._done.errback(outcome)
        else:
            self._done.callback(outcome)

    def _close_pipes(self) -> None:
        for name in ("_pipe_r", "_pipe_w", "_out_r", "_out_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._copy is not None:
            self._copy.close()
