# -*- test-case-name: tests.unit.test_relay_unit, tests.e2e.test_relay -*-
"""
The kernel pipes under L{spegel.relay.SpliceRelay}, and the threads that hash what goes through
them.

  - L{available}: whether C{splice(2)} and C{tee(2)} (from the C library, via ctypes) work in
    this process, tried once on pipes;
  - L{open_pipe}: a non-blocking pipe, as large as Linux lets an unprivileged process make one;
  - L{CopyPipe}: the pipe the relay tees bytes into for the digest, and the job a worker thread
    runs to empty it into the hasher;
  - L{HashingPool}: those worker threads (hashlib lets go of the GIL while it works).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

if TYPE_CHECKING:
    from spegel.relay import SpliceRelay

# One step of the relay moves at most this much: the pipes' capacity. Linux lets an unprivileged
# process size a pipe up to /proc/sys/fs/pipe-max-size, 1 MiB by default.
PIPE_SIZE = 1 << 20
# One hashing job stops after this many bytes even if there are more, so that relays sharing
# the hashing threads take turns; a busy relay hands work to the pool once per this many bytes.
HASH_JOB_LIMIT = 16 * PIPE_SIZE
# A hashing job that finds the digest's pipe empty waits this long (seconds) for more before it
# ends: the reactor tees the next bytes within a fraction of that while the relay is busy, and
# a job that carries on is ready for them at once, where a new one needs the reactor and a
# thread of the pool to wake up first.
HASH_JOB_LINGER = 0.02

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
SPLICE_F_NONBLOCK = 2

HashExecutor = Callable[[Callable[[], None]], "Deferred[None]"]


def _load_tee() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tee = libc.tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    tee.restype = ctypes.c_ssize_t
    return tee


_tee = _load_tee()
_available: bool | None = None


def available() -> bool:
    """
    Whether this process can relay with splice and tee: tried once on a pipe pair.
    """
    global _available
    if _available is None:
        _available = _try_splice_and_tee()
    return _available


def _try_splice_and_tee() -> bool:
    if _tee is None or not hasattr(os, "splice"):
        return False
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(open_pipe())
        source_r, source_w, copy_r, copy_w, sink_r, sink_w = fds
        os.write(source_w, b"spegel")
        if _tee(source_r, copy_w, 6, SPLICE_F_NONBLOCK) != 6:
            return False
        if os.splice(source_r, sink_w, 6, flags=SPLICE_F_NONBLOCK) != 6:
            return False
        return os.read(sink_r, 6) == b"spegel" and os.read(copy_r, 6) == b"spegel"
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def open_pipe() -> tuple[int, int]:
    # Non-blocking: the relay only reads bytes it knows are there, and a mistake there must
    # fail loudly rather than block the reactor.
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        # A smaller pipe still works, in smaller steps.
        pass
    return read_end, write_end


class HashingPool(Service):
    """
    The worker threads that hash relayed bytes: hashlib lets go of the GIL while it works, so
    the digest of one chunk is computed while the reactor sends it and reads the next. A node
    relays few large blobs at once and hashing is bound by CPU, so two threads do.
    """

    def __init__(self, reactor: Any, size: int = 2):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="spegel-hashing")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()

    def run(self, job: Callable[[], None]) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, job)


@implementer(IWriteDescriptor)
class CopyPipe:
    """
    The pipe the relay tees bytes into for the digest, and the buffer a worker thread empties it
    into. The reactor watches its write end while the relay waits for room in it.
    """

    def __init__(self, relay: SpliceRelay, read_end: int, write_end: int, size: int):
        self._relay = relay
        self.read_end, self.write_end = read_end, write_end
        self._buffer = memoryview(bytearray(size))
        # Bytes hashed so far, written by the worker thread only while a job runs: the reactor
        # reads it once the job has ended.
        self.hashed = 0

    @classmethod
    def open(cls, relay: SpliceRelay, size: int) -> "CopyPipe":
        """
        A copy pipe with room for C{size} bytes, as much as the relay's pipe holds.
        """
        read_end, write_end = open_pipe()
        if fcntl.fcntl(write_end, F_GETPIPE_SZ) < size:
            os.close(read_end)
            os.close(write_end)
            raise OSError(errno.ENOMEM, "the pipes for the relay came out of different sizes")
        return cls(relay, read_end, write_end, size)

    def tee_from(self, source: int, count: int) -> int:
        """
        Duplicate up to C{count} bytes from the head of pipe C{source}, as many as there is room
        for here.

        @return: how many were duplicated; 0 when this pipe is full.
        """
        assert _tee is not None
        copied = _tee(source, self.write_end, count, SPLICE_F_NONBLOCK)
        if copied < 0:
            error = ctypes.get_errno()
            if error == errno.EAGAIN:
                return 0
            raise OSError(error, f"tee failed: {os.strerror(error)}")
        if copied == 0:
            # The source holds the bytes (the relay counted them in): failing loudly beats
            # waiting for room that is there.
            raise OSError(errno.EIO, "tee found no bytes to copy")
        return copied

    def hash_job(self, hasher: Any) -> Callable[[], None]:
        """
        A job for a worker thread: feed C{hasher} what this pipe holds, until it stays empty
        for L{HASH_JOB_LINGER} or L{HASH_JOB_LIMIT} bytes have gone by.
        """

        def job() -> None:
            read_end, buffer, hashed = self.read_end, self._buffer, 0
            waiting = select.poll()
            waiting.register(read_end, select.POLLIN)
            linger = int(HASH_JOB_LINGER * 1000)
            while hashed < HASH_JOB_LIMIT:
                try:
                    got = os.readv(read_end, [buffer])
                except BlockingIOError:
                    if linger > 0 and waiting.poll(linger):
                        continue
                    break
                if got == 0:
                    break
                hasher.update(buffer[:got])
                hashed += got
            self.hashed += hashed

        return job

    # IWriteDescriptor: the reactor says the pipe has room.
    def fileno(self) -> int:
        return self.write_end

    def logPrefix(self) -> str:
        return "SpliceRelay digest pipe"

    def doWrite(self) -> None:
        self._relay.copy_room()

    def connectionLost(self, reason: Failure) -> None:
        self._relay.copy_lost(reason)

    def close(self) -> None:
        if self.read_end >= 0:
            os.close(self.read_end)
            os.close(self.write_end)
            self.read_end = self.write_end = -1
