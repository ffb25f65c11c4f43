# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
Child processes of the test rig: each in its own process group, output to a log file, always
killed at the end.

The rig is plain synchronous Python (subprocess and polling) so that trial tests, benchmarks and
scripts can all drive it without a reactor.  Every process started here is remembered until it is
stopped; an C{atexit} hook kills whatever is left, so a failing test or a Ctrl-C in a script never
leaves a containerd or registry running.  Whole process groups are signalled because a daemon may
have children of its own.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

from attrs import define, field


class ProcessFailed(Exception):
    """
    A rig process exited or never became ready.  The message carries the tail of its log.
    """


class CommandFailed(Exception):
    """
    A one-shot command (ctr, spegel configuration) exited non-zero.

    @ivar command: the command line.
    @ivar returncode: its exit status.
    @ivar stdout: what it printed.
    @ivar stderr: what it printed on stderr.
    """

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.command = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{' '.join(args)} exited {returncode}: {stderr.strip()[-2000:]}")


_live: dict[int, "ManagedProcess"] = {}

# prctl(PR_SET_PDEATHSIG, SIGKILL) in the child makes the kernel kill it when the thread that
# started it dies, so even a SIGKILLed test run (no atexit) leaves no daemon behind.  libc is
# loaded here, in the parent: the child between fork and exec should do as little as possible.
_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def kill_all() -> None:
    """
    SIGKILL every rig process still running in this Python process.  Registered with C{atexit}.
    """
    for process in list(_live.values()):
        process.kill()


atexit.register(kill_all)


def live_processes() -> list["ManagedProcess"]:
    """
    The rig processes started and not yet reaped, for tests that check clean-up.
    """
    return [p for p in _live.values() if p.running]


def read_log(path: str) -> str:
    """
    The whole text of the log at C{path}; empty when there is none yet.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no output)"


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "(no output)"


def failure_line(error: CommandFailed | ProcessFailed, command_words: int = 6) -> str:
    """
    One line saying why a rig step failed, for a script's error message: the command and the
    last line it printed on stderr, or the first and last lines of a process failure (the
    message, then the tail of the process's log).
    """
    if isinstance(error, CommandFailed):
        command = " ".join(error.command[:command_words])
        return f"{command} ... exited {error.returncode}: {last_line(error.stderr)}"
    text = str(error)
    return f"{first_line(text)} (last log line: {last_line(text)})"


def tail(path: str, lines: int = 40) -> str:
    """
    The last C{lines} lines of the text file at C{path}, or a note that it does not exist.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def run(args: Sequence[str], *, timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    """
    Run a one-shot command to completion and return its stdout.

    @raise CommandFailed: when it exits non-zero (the message carries its stderr).
    """
    completed = subprocess.run(
        list(args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=env,
    )
    stdout = completed.stdout.decode("utf-8", "replace")
    stderr = completed.stderr.decode("utf-8", "replace")
    if completed.returncode != 0:
        raise CommandFailed(args, completed.returncode, stdout, stderr)
    return stdout


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str,
    process: "ManagedProcess | None" = None,
) -> None:
    """
    Poll C{condition} until it is true.

    @param process: when given, give up early if it exits, reporting its log tail.
    @raise ProcessFailed: on timeout or when C{process} died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if process is not None and not process.running:
            raise ProcessFailed(
                f"{process.name} exited ({process.returncode}) while waiting for {what}:\n"
                f"{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            detail = f":\n{process.log_tail()}" if process is not None else ""
            raise ProcessFailed(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


@define(eq=False)
class ManagedProcess:
    """
    One long-running child: its own session (so its process group can be signalled as a whole),
    stdin closed, stdout and stderr appended to C{log_path}.

    @ivar name: short label used in error messages.
    @ivar args: command line.
    @ivar log_path: file that receives stdout and stderr, appended to across restarts.
    @ivar env: environment, or L{None} to inherit ours.
    @ivar cwd: working directory, or L{None} for ours.
    @ivar die_with_parent: have the kernel SIGKILL the process when the thread that started it
        exits.  Leave it on unless you start processes from a short-lived thread.
    """

    name: str
    args: Sequence[str]
    log_path: str
    env: dict[str, str] | None = None
    cwd: str | None = None
    die_with_parent: bool = True
    _popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def start(self) -> None:
        """
        Start the process.  Starting a running process is an error.
        """
        if self.running:
            raise ProcessFailed(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"==== starting: {' '.join(self.args)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                list(self.args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                # Only a prctl() runs between fork and exec: no lock a thread could hold.
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509 - prctl() only
            )
        _live[self._popen.pid] = self

    def _signal_group(self, signum: int) -> None:
        assert self._popen is not None
        try:
            os.killpg(self._popen.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM the process group and wait for the leader; SIGKILL if it is still there after
        C{timeout} seconds.  Stopping a stopped process does nothing.
        """
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait()
        # Children that outlived their leader must not outlive the test.
        self._signal_group(signal.SIGKILL)
        _live.pop(self._popen.pid, None)

    def kill(self) -> None:
        """
        SIGKILL the whole process group at once and reap the leader.
        """
        if self._popen is None:
            return
        self._signal_group(signal.SIGKILL)
        self._popen.wait()
        _live.pop(self._popen.pid, None)

    def wait(self, timeout: float) -> int:
        """
        Wait for the process to exit by itself and return its exit status.

        @raise ProcessFailed: when it is still running after C{timeout} seconds (it is then
            killed, with its log tail in the message).
        """
        if self._popen is None:
            raise ProcessFailed(f"{self.name} was never started")
        try:
            returncode = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProcessFailed(f"{self.name} still running after {timeout}s:\n{self.log_tail()}") from None
        # Children that outlived their leader must not outlive the test.
        self._signal_group(signal.SIGKILL)
        _live.pop(self._popen.pid, None)
        return returncode

    def pause(self) -> None:
        """
        SIGSTOP the process group: it stops reading and writing until L{resume}, so a transfer it
        takes part in stalls (its peers block on full socket buffers) without failing.
        """
        if self.running:
            self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """
        SIGCONT the process group after L{pause}.
        """
        if self.running:
            self._signal_group(signal.SIGCONT)

    def log_text(self) -> str:
        """
        Everything the process wrote to its log so far.
        """
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        """
        The last lines of this process's log.
        """
        return f"---- {self.name} log ({self.log_path}) ----\n{tail(self.log_path, lines)}"


class RunsOneProcess:
    """
    What every rig component that runs one L{ManagedProcess} (in C{_process}) tells about it.
    """

    __slots__ = ()
    _process: ManagedProcess | None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid
