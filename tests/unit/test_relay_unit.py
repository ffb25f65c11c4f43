"""
Unit tests for L{spegel.relay.SpliceRelay}'s state machine, deterministic and without sockets.

splice(2) and tee(2) work between pipes as well as between a socket and a pipe, so here pipes
stand in for both connections: the peer is the read end of a pipe the test writes the peer's
bytes into, and the client is the write end of a pipe the test reads what the relay sent from.
Both are non-blocking, so an empty peer pipe reads as EAGAIN and a full client pipe as a full
socket; closing the peer pipe's write end is the peer closing its connection, and closing the
client pipe's read end makes the next splice to it fail with EPIPE, as a reset socket would.

Everything else the relay touches is faked so that the test decides when each thing happens:
the reactor is a L{Clock} that only records the registered reader and writer (the test calls
C{doRead} itself once it has written bytes, and the digest pipe's C{doWrite} once a hashing job
has emptied it), hashing jobs wait in a list until the test runs them, and the client's
transport models Twisted's write buffer (what it holds, and pausing its producer when that
exceeds C{bufferSize}). L{tests.e2e.test_relay} covers the same relay over real TCP connections.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import select
import struct
import termios
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import TransportProxyProducer
from twisted.web.test.requesthelper import DummyRequest

from spegel.bodies import BodyInterrupted, client_socket
from spegel import relaypipes
from spegel.relay import (
    HELD_BACK,
    PIPE_SIZE,
    DigestMismatch,
    RelayResult,
    SpliceRelay,
    available,
    peer_socket,
)

MiB = 1 << 20
IDLE = 30.0
_F_SETPIPE_SZ = 1031


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Pipe:
    """
    A non-blocking pipe as large as the relay's own, closed at the end of the test unless the
    test closed an end first.
    """

    def __init__(self, case: SynchronousTestCase):
        self.read_end, self.write_end = os.pipe()
        case.addCleanup(self.close)
        for fd in (self.read_end, self.write_end):
            os.set_blocking(fd, False)
        fcntl.fcntl(self.write_end, _F_SETPIPE_SZ, PIPE_SIZE)

    def write_all(self, data: bytes) -> None:
        """
        Put all of C{data} in the pipe, which must have room for it.
        """
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_end, view) :]

    def pending(self) -> int:
        """
        How many bytes wait in the pipe.
        """
        return int(struct.unpack("i", fcntl.ioctl(self.read_end, termios.FIONREAD, b"\0" * 4))[0])

    def close_read(self) -> None:
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1

    def close_write(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def close(self) -> None:
        self.close_read()
        self.close_write()


class FakePeer:
    """
    The peer's connection: only its descriptor matters to the relay.
    """

    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class FakeClient:
    """
    The client's transport: the relay splices into its descriptor when its write buffer is
    empty, and writes through it (via the request) otherwise.

    C{received} is what the client got, in order: bytes spliced into the pipe are collected when
    the test drains it, and before every write, since they were on the socket before it.
    """

    def __init__(self, pipe: _Pipe):
        self.pipe = pipe
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.bufferSize = 65536
        self.received = bytearray()
        self.producer: Any = None
        self.producer_paused = False

    def fileno(self) -> int:
        return self.pipe.write_end

    def drain(self) -> None:
        """
        Collect what has been spliced into the pipe.
        """
        if self.pipe.read_end < 0:
            return
        while True:
            try:
                chunk = os.read(self.pipe.read_end, MiB)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.received += chunk

    def write(self, data: bytes) -> None:
        """
        Queue C{data}, pausing the producer past C{bufferSize} as L{FileDescriptor.write} does.
        """
        self.drain()
        self.received += data
        self._tempDataLen += len(data)
        pending = len(self.dataBuffer) - self.offset + self._tempDataLen
        if pending > self.bufferSize and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def flush(self) -> None:
        """
        The socket took everything Twisted held: resume the producer if the buffer paused it.
        """
        self._tempDataLen = 0
        if self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()


class FakeRequest:
    """
    The client's request: counts what it sends, like L{twisted.web.server.Request.write}.
    """

    def __init__(self, client: FakeClient):
        self.client = client
        self.startedWriting = 1
        self.sentLength = 0
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.startedWriting = 1
        self.writes.append(data)
        self.sentLength += len(data)
        self.client.write(data)


class FakeReactor(Clock):
    """
    A clock that records the readers registered with it instead of polling them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


class SpliceRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Jobs run on the test's thread, where nothing could fill the pipe while one waits.
        self.patch(relaypipes, "HASH_JOB_LINGER", 0)
        self.reactor = FakeReactor()
        self.peer = _Pipe(self)
        self.client = FakeClient(_Pipe(self))
        self.request = FakeRequest(self.client)
        self.jobs: list[tuple[Callable[[], None], Deferred[None]]] = []
        self.jobs_requested = 0
        self.counted: list[int] = []

    # Harness.
    def hash_executor(self, job: Callable[[], None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.jobs.append((job, d))
        self.jobs_requested += 1
        return d

    def start(
        self,
        count: int,
        *,
        digest: str | None = None,
        hashed: bool = True,
        executor: Callable[[Callable[[], None]], Deferred[None]] | None = None,
        hasher: Any = None,
    ) -> Deferred[RelayResult]:
        """
        Make and start a relay of C{count} bytes, hashing them with SHA-256 (or C{hasher}) unless
        not C{hashed}.
        """
        self.hasher = (hasher or hashlib.sha256()) if hashed else None
        self.relay = SpliceRelay(
            self.reactor,
            self.request,  # type: ignore[arg-type]
            FakePeer(self.peer.read_end),  # type: ignore[arg-type]
            self.client,  # type: ignore[arg-type]
            count,
            hasher=self.hasher,
            digest=digest,
            hash_executor=executor or self.hash_executor,
            idle_timeout=IDLE,
            on_bytes=self.counted.append,
        )
        self.client.producer = self.relay
        self.done = self.relay.start()
        self.addCleanup(self._stop)
        return self.done

    def _stop(self) -> None:
        # A test that failed half-way still closes the relay's pipes.
        self.relay.stopProducing()
        self.done.addErrback(lambda _: None)
        self.run_jobs()

    def hashed(self) -> str | None:
        return self.hasher.hexdigest() if self.hasher is not None else None

    def run_one_job(self) -> None:
        job, d = self.jobs.pop(0)
        job()
        d.callback(None)
        # The job emptied the digest's pipe: the reactor finds it writable now.
        for writer in list(self.reactor.writers):
            writer.doWrite()
        self.client.drain()

    def run_jobs(self) -> None:
        while self.jobs:
            self.run_one_job()

    def pump(self, hashing: bool = True) -> None:
        """
        Play the reactor and the hashing thread until nothing moves: the relay reads what the
        peer sent while it is registered for reading, and (when C{hashing}) jobs run as soon as
        they are asked for.
        """
        for _ in range(10_000):
            moved = False
            if self.reading() and self.peer.pending():
                before = self.peer.pending()
                self.relay.doRead()
                moved = self.peer.pending() != before
            self.client.drain()
            if hashing and self.jobs:
                self.run_one_job()
                moved = True
            if not moved:
                return
        self.fail("the relay never settled")

    def reading(self) -> bool:
        return self.relay in self.reactor.readers

    def feed(self, data: bytes) -> None:
        """
        The peer sends C{data} and the reactor finds its socket readable.
        """
        self.peer.write_all(data)
        self.relay.doRead()
        self.client.drain()

    def stream(self, data: bytes, step: int) -> None:
        """
        The peer sends C{data} in steps of C{step} bytes, each once its socket (pipe) has room
        for it, while the relay reads and hashing jobs run as soon as they are asked for.
        """
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            while PIPE_SIZE - self.peer.pending() < len(piece):
                before = self.peer.pending()
                self.pump()
                self.assertNotEqual(self.peer.pending(), before, "the relay stopped reading")
            self.peer.write_all(piece)
            self.pump()

    def assert_pipes_closed(self) -> None:
        self.assertEqual((self.relay._pipe_r, self.relay._pipe_w, self.relay._out_r, self.relay._out_w), (-1,) * 4)
        if self.relay._copy is not None:
            self.assertEqual((self.relay._copy.read_end, self.relay._copy.write_end), (-1, -1))

    def assert_waits_for_nothing(self) -> None:
        self.assertFalse(self.reading())
        self.assertEqual(self.reactor.writers, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    # A whole blob.
    def test_whole_blob_held_back_until_hashed(self) -> None:
        """
        The relay sends a verified blob whole and in order, all but its final bytes by splice as
        they come, and those final bytes only once the worker has hashed everything before them.
        """
        data = os.urandom(3 * MiB + 12345)
        count = len(data)
        done = self.start(count, digest=sha256(data))
        self.assertTrue(self.reading())
        self.stream(data[:-100_000], 700_000)
        self.peer.write_all(data[-100_000:])
        self.pump(hashing=False)
        self.assertFalse(self.reading(), "every byte is in")
        self.assertTrue(self.jobs)
        self.assertNoResult(done)
        self.assertEqual(bytes(self.client.received), data[: count - HELD_BACK])
        self.run_jobs()
        self.assertEqual(self.successResultOf(done), RelayResult(moved=count, peer_error=None))
        self.assertEqual(bytes(self.client.received), data)
        self.assertEqual(self.request.writes, [data[-HELD_BACK:]])
        self.assertEqual(self.relay.bytes_spliced, count - HELD_BACK)
        self.assertEqual(self.request.sentLength, count)
        self.assertEqual(sum(self.counted), count)
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_one_job_hashes_what_was_teed_meanwhile(self) -> None:
        """
        While a hashing job waits or runs, the relay keeps reading and sending, and asks for no
        other: the job takes every byte teed by the time it runs, in one hand-off.
        """
        data = os.urandom(900_000)
        done = self.start(len(data) + HELD_BACK, digest=sha256(data))
        for offset in range(0, len(data), 100_000):
            self.assertTrue(self.reading())
            self.feed(data[offset : offset + 100_000])
        self.assertEqual(bytes(self.client.received), data)
        self.assertEqual(self.jobs_requested, 1)
        self.run_one_job()
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.jobs, [], "nothing was left to hash")
        self.assertNoResult(done)

    def test_job_keeps_hashing_while_bytes_come(self) -> None:
        """
        A job goes on for as long as it finds bytes: those teed while it hashes are hashed by
        the same job.
        """
        data = os.urandom(300_000)
        done = self.start(len(data), digest=None, hasher=_TeeingMeanwhile(self, data[100_000:]))
        self.feed(data[:100_000])
        self.run_one_job()
        self.assertEqual(self.jobs_requested, 1)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())

    def test_job_lingers_for_more(self) -> None:
        """
        A job that finds the digest's pipe empty waits up to L{relaypipes.HASH_JOB_LINGER} for more
        before it ends, and hashes what the reactor tees meanwhile.
        """
        self.patch(relaypipes, "HASH_JOB_LINGER", 0.02)
        data = os.urandom(300_000)
        waits: list[int] = []
        case = self

        class Poll:
            def register(self, fd: int, events: int) -> None:
                self.fd = fd

            def poll(self, timeout: int) -> list[tuple[int, int]]:
                waits.append(timeout)
                if len(waits) > 1:
                    return []
                case.feed(data[100_000:])  # the reactor tees more while the worker waits
                return [(self.fd, select.POLLIN)]

        self.patch(relaypipes.select, "poll", Poll)
        done = self.start(len(data), digest=None)
        self.feed(data[:100_000])
        self.run_one_job()
        self.assertEqual(waits, [20, 20])
        self.assertEqual(self.jobs_requested, 1)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())

    def test_jobs_take_turns(self) -> None:
        """
        A job stops after L{relaypipes.HASH_JOB_LIMIT} bytes even when there are more, and the relay
        asks for the next: relays sharing the hashing threads take turns.
        """
        self.patch(relaypipes, "HASH_JOB_LIMIT", 1)
        data = os.urandom(300_000)
        done = self.start(len(data), digest=None, hasher=_TeeingMeanwhile(self, data[100_000:]))
        self.feed(data[:100_000])
        self.run_one_job()
        self.assertEqual(self.jobs_requested, 2, "the first job left bytes behind")
        self.run_jobs()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())

    def test_only_teed_bytes_go_out(self) -> None:
        """
        A byte leaves for the client only once the digest's pipe has a copy of it: while no job
        empties that pipe, the relay fills it and its own pipe, then stops reading the peer (the
        socket staying readable must not spin the reactor) and waits for the reactor to say the
        digest's pipe has room again.
        """
        data = os.urandom(3 * MiB)
        done = self.start(len(data), digest=sha256(data))
        self.peer.write_all(data[:MiB])
        self.pump(hashing=False)
        self.peer.write_all(data[MiB : 2 * MiB])
        self.pump(hashing=False)
        sent = len(self.client.received)
        self.assertLessEqual(sent, PIPE_SIZE)
        self.assertEqual(bytes(self.client.received), data[:sent])
        self.assertFalse(self.reading(), "the relay's pipe is full")
        self.assertEqual(len(self.reactor.writers), 1, "waiting for room in the digest's pipe")
        self.assertEqual(self.jobs_requested, 1)
        self.run_one_job()
        self.assertGreater(len(self.client.received), sent)
        self.stream(data[2 * MiB :], MiB)
        self.pump()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)
        self.assert_waits_for_nothing()

    def test_hashing_goes_on_while_paused(self) -> None:
        """
        Bytes read before the client paused the relay are still teed for the digest and passed
        on to the outgoing pipe while it is paused: hashing does not wait for the client.
        """
        data = os.urandom(MiB + 600_000)
        done = self.start(len(data) + MiB, digest=sha256(data))
        self.feed(data[:MiB])
        self.feed(data[MiB:])
        self.assertEqual(self.relay._in_pipe(), 600_000, "the digest's pipe is full")
        self.relay.pauseProducing()
        self.run_one_job()
        self.assertEqual(self.relay._in_pipe(), 0)
        self.assertEqual(bytes(self.client.received), data[:MiB])
        self.run_jobs()
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())
        self.relay.resumeProducing()
        self.client.drain()
        self.assertEqual(bytes(self.client.received), data)
        self.assertNoResult(done)

    def test_copy_room_before_the_job_ends(self) -> None:
        """
        The reactor may see room in the digest's pipe (the worker read it) before the job's
        result arrives: the relay carries on either way.
        """
        data = os.urandom(2 * MiB + 10)
        done = self.start(len(data), digest=sha256(data))
        self.peer.write_all(data[:MiB])
        self.pump(hashing=False)
        self.peer.write_all(data[MiB : 2 * MiB])
        self.pump(hashing=False)
        (copy,) = self.reactor.writers
        job, d = self.jobs.pop(0)
        job()
        copy.doWrite()
        self.client.drain()
        self.assertEqual(self.reactor.writers, set())
        d.callback(None)
        self.stream(data[2 * MiB :], MiB)
        self.pump()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)

    def test_digest_pipe_dropped(self) -> None:
        """
        The reactor giving up on the digest's pipe (shutting down) ends the relay.
        """
        data = os.urandom(2 * MiB)
        done = self.start(len(data), digest=sha256(data))
        self.peer.write_all(data[:MiB])
        self.pump(hashing=False)
        self.peer.write_all(data[MiB:])
        self.pump(hashing=False)
        (copy,) = self.reactor.writers
        self.reactor.removeWriter(copy)
        copy.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, BodyInterrupted)
        self.run_jobs()
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_headers_written_first(self) -> None:
        """
        When the response has not started, the relay writes nothing first, so that Twisted
        queues the status line and headers before any splice touches the socket.
        """
        self.request.startedWriting = 0
        data = os.urandom(1000)
        done = self.start(len(data), hashed=False)
        self.assertEqual(self.request.writes, [b""])
        self.feed(data)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.request.writes, [b""])
        self.assertEqual(bytes(self.client.received), data)

    def test_started_response_not_written(self) -> None:
        data = os.urandom(1000)
        done = self.start(len(data), hashed=False)
        self.feed(data)
        self.successResultOf(done)
        self.assertEqual(self.request.writes, [])

    def test_small_blob_held_back_entirely(self) -> None:
        """
        A blob smaller than L{HELD_BACK} reaches the client only after it is verified, which
        the reactor does itself: there is nothing for a worker.
        """
        data = os.urandom(5000)
        done = self.start(len(data), digest=sha256(data))
        self.feed(data)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.request.writes, [data])
        self.assertEqual(self.relay.bytes_spliced, 0)
        self.assertEqual(self.jobs_requested, 0)

    def test_small_wrong_blob_not_sent(self) -> None:
        data = os.urandom(5000)
        done = self.start(len(data), digest=sha256(data[:-1]))
        self.feed(data)
        self.failureResultOf(done, DigestMismatch)
        self.assertEqual(bytes(self.client.received), b"")
        self.assert_pipes_closed()

    def test_short_last_read_still_held_back(self) -> None:
        """
        When the last read from the peer is short, at least the blob's last byte still waits
        for the digest.
        """
        data = os.urandom(MiB + 10)
        done = self.start(len(data), digest=sha256(data[:-1] + b"x"))
        self.stream(data, MiB)
        self.pump()
        self.failureResultOf(done, DigestMismatch)
        received = bytes(self.client.received)
        self.assertLess(len(received), len(data))
        self.assertEqual(received, data[: len(received)])

    def test_wrong_bytes(self) -> None:
        """
        Bytes that do not hash to the digest (here only the last byte differs) fail the relay,
        and the client never gets the bytes held back.
        """
        expected = os.urandom(2 * MiB + 777)
        data = expected[:-1] + bytes([expected[-1] ^ 1])
        count = len(data)
        done = self.start(count, digest=sha256(expected))
        self.stream(data, 600_000)
        self.pump()
        self.failureResultOf(done, DigestMismatch)
        self.assertEqual(bytes(self.client.received), data[: count - HELD_BACK])
        self.assertEqual(self.request.writes, [])
        self.assertEqual(self.request.sentLength, count - HELD_BACK)
        self.assertLess(sum(self.counted), count)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_synchronous_executor(self) -> None:
        """
        A hash executor whose Deferreds have already fired works too.
        """

        def at_once(job: Callable[[], None]) -> Deferred[None]:
            job()
            return succeed(None)

        data = os.urandom(2 * MiB + 5)
        done = self.start(len(data), digest=sha256(data), executor=at_once)
        for offset in range(0, len(data), 500_000):
            self.assertTrue(self.reading())
            self.feed(data[offset : offset + 500_000])
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)
        self.assert_pipes_closed()

    # A range: nothing to verify.
    def test_unhashed_range_sent_as_it_comes(self) -> None:
        data = os.urandom(2 * MiB + 4321)
        # A digest without a hasher is ignored: nothing could check it.
        done = self.start(len(data), digest=sha256(b"other"), hashed=False)
        for offset in range(0, len(data), 300_000):
            self.assertTrue(self.reading())
            self.feed(data[offset : offset + 300_000])
            self.assertEqual(bytes(self.client.received), data[: offset + 300_000])
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.jobs_requested, 0)
        self.assertEqual(self.request.writes, [])
        self.assertEqual(self.relay.bytes_spliced, len(data))
        self.assertEqual(self.request.sentLength, len(data))
        self.assertIsNone(self.relay._copy)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_hashed_without_digest(self) -> None:
        """
        Hashed bytes with no digest to match are sent as they come, and the relay ends once the
        hasher has seen them all (the caller checks the digest of the parts).
        """
        data = os.urandom(MiB + 100)
        done = self.start(len(data), digest=None)
        self.stream(data[:MiB], 400_000)
        self.feed(data[MiB:])
        self.assertEqual(bytes(self.client.received), data)
        self.assertTrue(self.jobs)
        self.assertNoResult(done)
        self.run_jobs()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(self.hashed(), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.request.writes, [])

    def test_never_reads_past_count(self) -> None:
        data = os.urandom(100_000)
        done = self.start(len(data) - 100, hashed=False)
        self.feed(data)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data) - 100))
        self.assertEqual(self.peer.pending(), 100)
        self.assertEqual(bytes(self.client.received), data[:-100])

    # The peer stopping early.
    def test_peer_closes_midway(self) -> None:
        """
        What the peer sent before closing reaches the client, none of it held back (the blob's
        end was not reached), and the relay reports it once it is all hashed.
        """
        data = os.urandom(3 * MiB)
        sent = MiB + MiB // 2
        done = self.start(len(data), digest=sha256(data))
        self.stream(data[:sent - 1000], MiB)
        self.feed(data[sent - 1000 : sent])
        self.peer.close_write()
        self.relay.doRead()
        self.assertEqual(bytes(self.client.received), data[:sent])
        self.assertTrue(self.jobs, "a hashing job is still under way")
        self.assertNoResult(done)
        self.run_jobs()
        result = self.successResultOf(done)
        self.assertEqual(result.moved, sent)
        self.assertTrue(result.peer_error)
        self.assertEqual(bytes(self.client.received), data[:sent])
        self.assertEqual(self.relay.bytes_spliced, sent)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_peer_closes_within_the_held_back_bytes(self) -> None:
        """
        When the peer stops among the final bytes of the blob, those it sent are hashed and sent
        too: the caller resumes from another peer after them.
        """
        data = os.urandom(2 * MiB)
        got = len(data) - HELD_BACK // 2
        done = self.start(len(data), digest=sha256(data))
        self.stream(data[:got], MiB)
        self.peer.close_write()
        self.relay.doRead()
        self.pump()
        result = self.successResultOf(done)
        self.assertEqual(result.moved, got)
        self.assertIn("closed", result.peer_error or "")
        self.assertEqual(bytes(self.client.received), data[:got])
        self.assertEqual(self.request.writes, [data[len(data) - HELD_BACK : got]])
        self.assertEqual(self.hashed(), hashlib.sha256(data[:got]).hexdigest())
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_keeps_reading_among_the_held_back_bytes(self) -> None:
        """
        The final bytes leave the pipe as they come, so a wake-up with nothing to read (or a
        peer sending them in pieces) never finds the relay's pipe in the way.
        """
        data = os.urandom(MiB + 100_000)
        done = self.start(len(data), digest=sha256(data))
        self.stream(data[: len(data) - 1000], MiB)
        self.assertEqual(self.relay._in_pipe(), 0)
        self.relay.doRead()  # nothing there: EAGAIN
        self.assertTrue(self.reading())
        for offset in range(len(data) - 1000, len(data), 100):
            self.feed(data[offset : offset + 100])
        self.pump()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)

    def test_wake_up_with_nothing_to_read(self) -> None:
        """
        A wake-up finding the peer's socket empty changes nothing while the pipe is empty.
        """
        data = os.urandom(300_000)
        done = self.start(len(data), digest=sha256(data))
        self.feed(data[:100_000])
        self.relay.doRead()
        self.assertTrue(self.reading())
        self.assertEqual(self.reactor.getDelayedCalls()[0].getTime(), IDLE)
        self.stream(data[100_000:], 100_000)
        self.pump()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))

    def test_peer_socket_dropped(self) -> None:
        data = os.urandom(10_000)
        done = self.start(100_000, hashed=False)
        self.feed(data)
        # As the reactor does (posixbase._disconnectSelectable): remove, then tell.
        self.reactor.removeReader(self.relay)
        self.relay.connectionLost(Failure(ConnectionLost()))
        result = self.successResultOf(done)
        self.assertEqual(result.moved, len(data))
        self.assertIn("dropped", result.peer_error or "")
        self.assert_waits_for_nothing()

    def test_peer_silent_from_the_start(self) -> None:
        done = self.start(MiB, digest=sha256(b"x"))
        self.reactor.advance(IDLE - 0.1)
        self.assertNoResult(done)
        self.reactor.advance(0.2)
        result = self.successResultOf(done)
        self.assertEqual(result.moved, 0)
        self.assertIn("silent", result.peer_error or "")
        self.assertEqual(self.jobs_requested, 0)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_idle_timeout_counts_silence(self) -> None:
        """
        The timeout is for one silence, not the whole relay: each read starts it again. When it
        fires, the relay reports the bytes it got, once they are hashed.
        """
        data = os.urandom(2 * MiB)
        done = self.start(len(data), digest=sha256(data))
        got = 0
        for _ in range(4):
            self.reactor.advance(IDLE * 0.9)
            if not self.reading():
                self.run_one_job()
            self.feed(data[got : got + 100_000])
            got += 100_000
        self.assertNoResult(done)
        if not self.reading():
            self.run_one_job()
        self.reactor.advance(IDLE + 0.1)
        self.assertFalse(self.reading())
        self.assertNoResult(done)  # the last chunk is still being hashed
        self.run_jobs()
        result = self.successResultOf(done)
        self.assertEqual(result.moved, got)
        self.assertIn("silent", result.peer_error or "")
        self.assertEqual(bytes(self.client.received), data[:got])
        self.assert_pipes_closed()

    def test_no_timeout_while_paused(self) -> None:
        """
        A relay paused by its client is not waiting for the peer: the peer's silence meanwhile
        is no failure, and hashing finishing does not restart reading.
        """
        data = os.urandom(MiB + 50_000)
        done = self.start(len(data), digest=sha256(data))
        self.feed(data[:200_000])
        self.relay.pauseProducing()
        self.assertFalse(self.reading())
        self.reactor.advance(IDLE * 10)
        self.assertNoResult(done)
        self.run_jobs()
        self.assertFalse(self.reading())
        self.reactor.advance(IDLE * 10)
        self.assertNoResult(done)
        self.relay.resumeProducing()
        self.assertTrue(self.reading())
        self.reactor.advance(IDLE - 1)
        self.stream(data[200_000:], 500_000)
        self.run_jobs()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)

    # The client's side.
    def test_pause_stops_reading(self) -> None:
        data = os.urandom(5000)
        done = self.start(len(data), hashed=False)
        self.feed(data[:1000])
        self.relay.pauseProducing()
        self.assertFalse(self.reading())
        # The reactor may still call doRead once, for readiness it saw before the pause.
        self.feed(data[1000:])
        self.assertEqual(self.peer.pending(), 4000)
        self.assertEqual(bytes(self.client.received), data[:1000])
        self.assertNoResult(done)
        self.relay.resumeProducing()
        self.assertTrue(self.reading())
        self.relay.doRead()
        self.client.drain()
        self.assertEqual(self.peer.pending(), 0)
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)

    def test_queued_bytes_sent_through_transport(self) -> None:
        """
        While Twisted holds bytes for the client's socket the relay may not splice past them:
        it writes one chunk through the transport, a byte more than its buffer, which pauses
        the relay until the transport has sent it all.
        """
        data = os.urandom(300_000)
        self.client._tempDataLen = 10
        done = self.start(len(data), hashed=False)
        self.feed(data)
        self.assertEqual(self.request.writes, [data[: self.client.bufferSize + 1]])
        self.assertEqual(self.relay.bytes_spliced, 0)
        self.assertEqual(sum(self.counted), self.client.bufferSize + 1)
        self.assertNoResult(done)
        self.client.flush()
        self.client.drain()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)
        self.assertEqual(self.relay.bytes_spliced, len(data) - self.client.bufferSize - 1)
        self.assertEqual(self.request.sentLength, len(data))

    def test_full_client_socket(self) -> None:
        """
        When the client's socket is full, the relay hands one chunk to the transport, whose
        buffer then pauses it until the socket drains.
        """
        data = os.urandom(MiB + 200_000)
        done = self.start(len(data), hashed=False)
        self.peer.write_all(data[:MiB])
        self.relay.doRead()  # fills the client's pipe: nothing drains it
        self.assertEqual(self.client.pipe.pending(), MiB)
        self.feed(data[MiB:])
        self.assertEqual(self.request.writes, [data[MiB : MiB + self.client.bufferSize + 1]])
        self.assertTrue(self.client.producer_paused)
        self.assertNoResult(done)
        self.client.flush()
        self.client.drain()
        self.assertEqual(self.successResultOf(done), RelayResult(len(data)))
        self.assertEqual(bytes(self.client.received), data)

    def test_client_goes_away(self) -> None:
        data = os.urandom(100_000)
        done = self.start(MiB, hashed=False)
        self.feed(data)
        self.client.pipe.close_read()
        self.feed(data)
        self.failureResultOf(done, BodyInterrupted)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()

    def test_stop(self) -> None:
        data = os.urandom(100_000)
        done = self.start(MiB, hashed=False)
        self.feed(data)
        self.relay.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()
        # Nothing happens on a late doRead.
        self.feed(data)
        self.assertEqual(self.peer.pending(), len(data))

    def test_stop_while_hashing(self) -> None:
        """
        A worker thread may be reading the digest's pipe when the client goes away: the relay
        fails at once but closes its pipes only when that job is done, and starts no other.
        """
        data = os.urandom(2 * MiB)
        done = self.start(len(data), digest=sha256(data))
        self.feed(data[:MiB])
        self.feed(data[MiB:])
        self.assertEqual(len(self.jobs), 1)
        self.relay.stopProducing()
        self.failureResultOf(done, BodyInterrupted)
        self.assert_waits_for_nothing()
        assert self.relay._copy is not None
        for fd in (self.relay._copy.read_end, self.relay._copy.write_end):
            self.assertNotEqual(fd, -1)
            os.fstat(fd)
        self.run_one_job()
        self.assertEqual(self.jobs, [], "the queued chunk is not hashed")
        self.assertEqual(self.jobs_requested, 1)
        self.assert_pipes_closed()

    def test_hashing_fails(self) -> None:
        data = os.urandom(100_000)
        done = self.start(MiB, digest=sha256(data))
        self.feed(data)
        _, d = self.jobs.pop()
        d.errback(Failure(MemoryError()))
        self.failureResultOf(done, BodyInterrupted)
        self.assert_pipes_closed()
        self.assert_waits_for_nothing()


class _TeeingMeanwhile:
    """
    A SHA-256 hasher during whose first update the peer sends C{more} and the relay reads and
    tees it: what happens on the reactor thread while a worker hashes.
    """

    def __init__(self, case: SpliceRelayTests, more: bytes):
        self._case, self._more, self._hasher = case, more, hashlib.sha256()

    def update(self, data: Any) -> None:
        self._hasher.update(data)
        if self._more:
            more, self._more = self._more, b""
            self._case.feed(more)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class HelperTests(SynchronousTestCase):
    def test_available(self) -> None:
        self.assertTrue(available())

    def test_peer_socket(self) -> None:
        self.assertIsNone(peer_socket(object()))
        self.assertIsNone(peer_socket(TransportProxyProducer(StringTransport())))
        connection = tcp.Connection.__new__(tcp.Connection)
        connection.connected = 1
        self.assertIs(peer_socket(TransportProxyProducer(connection)), connection)
        connection.disconnecting = 1
        self.assertIsNone(peer_socket(TransportProxyProducer(connection)))
        connection.disconnecting = 0
        connection.TLS = True
        self.assertIsNone(peer_socket(TransportProxyProducer(connection)))

    def test_client_socket(self) -> None:
        self.assertIsNone(client_socket(DummyRequest([b""])))  # type: ignore[arg-type]

    def test_epipe_on_a_pipe(self) -> None:
        """
        The stand-in for a client going away behaves as the relay expects of a socket.
        """
        pipe = _Pipe(self)
        pipe.close_read()
        with self.assertRaises(OSError) as caught:
            os.write(pipe.write_end, b"x")
        self.assertEqual(caught.exception.errno, errno.EPIPE)
