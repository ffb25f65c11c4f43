# -*- test-case-name: tests.e2e.test_debugweb_browser -*-
"""
A real headless browser for end-to-end tests: Debian's C{chromium-headless-shell}, driven from
the reactor over the DevTools protocol on a pipe (C{--remote-debugging-pipe}: commands go to the
browser's fd 3, answers and events come back on its fd 4, each a JSON text ended by a NUL).

A pipe rather than C{--dump-dom}: a test can then type into a form and click its button as a
person would, and read what the browser made of the page it was led to.  Nothing blocks the
reactor; every command and every wait has a deadline.  The browser runs in its own session (so
its renderer and helper processes are killed with it) with a fresh profile directory, both
removed by L{HeadlessBrowser.close}; if the test process dies, the browser sees its pipe close
and exits by itself.

Page scripts do not matter here: what a test evaluates goes through DevTools, which a page's
Content-Security-Policy does not restrict.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

BROWSER = "/usr/bin/chromium-headless-shell"
SETSID = "/usr/bin/setsid"

# Generous: a browser starting on a loaded two-core machine takes seconds, not milliseconds.
COMMAND_TIMEOUT = 60.0
_OUTPUT_KEPT = 16 * 1024


class BrowserMissing(Exception):
    """
    The browser is not installed.
    """


class BrowserFailed(Exception):
    """
    The browser exited, refused a command or did not answer in time.  The message carries the
    end of what it printed.
    """


class _DevToolsPipe(ProcessProtocol):
    """
    The DevTools protocol over the browser's fds 3 (to it) and 4 (from it): commands matched to
    their answers by id, events handed to whoever waits for them.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._next_id = 0
        self._answers: dict[int, Deferred[dict[str, Any]]] = {}
        self._waiting: list[tuple[str, str | None, Deferred[dict[str, Any]]]] = []
        self._ended: list[Deferred[None]] = []
        self.output = b""
        self.exit: Failure | None = None

    def output_tail(self) -> str:
        return self.output.decode("utf-8", "replace")[-4000:]

    def command(
        self, method: str, params: dict[str, Any], session: str | None
    ) -> Deferred[dict[str, Any]]:
        if self.exit is not None:
            raise BrowserFailed(f"{method}: the browser has exited ({self.exit.value})")
        assert self.transport is not None
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        def forget(_: Deferred[dict[str, Any]]) -> None:
            self._answers.pop(message["id"], None)

        answer: Deferred[dict[str, Any]] = Deferred(forget)
        self._answers[message["id"]] = answer
        self.transport.writeToChild(3, json.dumps(message).encode("utf-8") + b"\0")
        return answer

    def event(self, method: str, session: str | None) -> Deferred[dict[str, Any]]:
        """
        The params of the next event C{method} (of C{session}) that arrives from now on.
        """
        if self.exit is not None:
            raise BrowserFailed(f"waiting for {method}: the browser has exited ({self.exit.value})")
        entry: tuple[str, str | None, Deferred[dict[str, Any]]]
        waiter: Deferred[dict[str, Any]] = Deferred(lambda d: self._waiting.remove(entry))
        entry = (method, session, waiter)
        self._waiting.append(entry)
        return waiter

    def ended(self) -> Deferred[None]:
        """
        Fires once the browser has exited (at once if it has).
        """
        if self.exit is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._ended.remove(waiter))
        self._ended.append(waiter)
        return waiter

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 4:
            self.output = (self.output + data)[-_OUTPUT_KEPT:]
            return
        self._buffer += data
        while b"\0" in self._buffer:
            text, self._buffer = self._buffer.split(b"\0", 1)
            self._dispatch(json.loads(text))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            answer = self._answers.pop(message["id"], None)
            if answer is None:
                return  # answered after its caller gave up
            if "error" in message:
                answer.errback(BrowserFailed(f"the browser refused a command: {message['error']}"))
            else:
                answer.callback(message.get("result", {}))
            return
        method, session = message.get("method"), message.get("sessionId")
        for entry in list(self._waiting):
            if entry[0] == method and entry[1] == session:
                self._waiting.remove(entry)
                entry[2].callback(message.get("params", {}))

    def processEnded(self, reason: Failure) -> None:
        self.exit = reason
        error = BrowserFailed(f"the browser exited ({reason.value}):\n{self.output_tail()}")
        pending = [*self._answers.values(), *(waiter for _, _, waiter in self._waiting)]
        self._answers.clear()
        self._waiting.clear()
        for d in pending:
            d.errback(error)
        ended, self._ended = self._ended, []
        for waiter in ended:
            waiter.callback(None)


class HeadlessBrowser:
    """
    One running browser.  Start it with L{start}, open pages with L{open}, and always
    L{close} it (a test adds that as a clean-up right after L{start}).
    """

    def __init__(
        self, reactor: Any, pipe: _DevToolsPipe, pid: int, profile: str, timeout: float
    ) -> None:
        self._reactor = reactor
        self._pipe = pipe
        self._pid = pid
        self._profile = profile
        self.timeout = timeout

    @classmethod
    def start(
        cls, reactor: Any, executable: str = BROWSER, *, timeout: float = COMMAND_TIMEOUT
    ) -> "HeadlessBrowser":
        """
        Start the browser; it is ready for commands at once (they wait in the pipe).

        @param reactor: an L{IReactorProcess} and L{IReactorTime}.
        @param timeout: how long any one command, or any wait for a page, may take.
        @raise BrowserMissing: when C{executable} is not there.
        """
        if not os.access(executable, os.X_OK):
            raise BrowserMissing(
                f"{executable} is missing: install Debian's chromium-headless-shell "
                "(bash .ci/setup does)"
            )
        profile = tempfile.mkdtemp(prefix="spegel-browser-")
        pipe = _DevToolsPipe()
        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        try:
            # setsid: Debian's command is a shell script that does not exec the browser, and the
            # browser forks helpers; in a session of their own they all go with one killpg.
            process = reactor.spawnProcess(
                pipe,
                SETSID,
                [SETSID, *args],
                env=dict(os.environ),
                childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
            )
        except BaseException:
            shutil.rmtree(profile, ignore_errors=True)
            raise
        process.closeStdin()
        return cls(reactor, pipe, process.pid, profile, timeout)

    def output_tail(self) -> str:
        """
        The end of what the browser printed, for a failing test's message.
        """
        return self._pipe.output_tail()

    async def within_timeout(self, d: Deferred[Any], what: str) -> Any:
        """
        The result of C{d}, which gets L{timeout} seconds.

        @raise BrowserFailed: when time runs out (C{d} is cancelled then), naming C{what}.
        """
        d.addTimeout(self.timeout, self._reactor)
        try:
            return await d
        except TimeoutError:
            raise BrowserFailed(
                f"{what}: no answer from the browser after {self.timeout}s:\n{self.output_tail()}"
            ) from None

    async def command(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        """
        Send one DevTools command and return its result.

        @raise BrowserFailed: when the browser refuses it, exits or does not answer in time.
        """
        return await self.within_timeout(self._pipe.command(method, params or {}, session), method)

    async def open(self, url: str) -> "Page":
        """
        A new tab showing C{url}, loaded.
        """
        target = await self.command("Target.createTarget", {"url": "about:blank"})
        attached = await self.command(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.command("Page.enable")
        await page.goto(url)
        return page

    async def close(self) -> None:
        """
        Ask the browser to quit, kill what is left of its session, and remove its profile.
        """
        try:
            if self._pipe.exit is None:
                try:
                    await self.command("Browser.close")
                    await self.within_timeout(self._pipe.ended(), "quitting")
                except BrowserFailed:
                    # Gone before it answered (then this does nothing), or hanging.
                    self._kill()
                    await self._pipe.ended()
        finally:
            # Helpers that outlived the browser must not outlive the test.
            self._kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def _kill(self) -> None:
        try:
            os.killpg(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def event(self, method: str, session: str) -> Deferred[dict[str, Any]]:
        """
        The params of the next event C{method} of C{session} from now on.
        """
        return self._pipe.event(method, session)


class Page:
    """
    One tab of a L{HeadlessBrowser}.
    """

    def __init__(self, browser: HeadlessBrowser, session: str) -> None:
        self._browser = browser
        self._session = session

    async def command(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self._browser.command(method, params, self._session)

    async def _until_loaded(self, action: Any, what: str) -> None:
        # Listen before acting: the load event may come before the action's answer.
        loaded = self._browser.event("Page.loadEventFired", self._session)
        try:
            await action()
        except BaseException:
            loaded.cancel()
            loaded.addErrback(lambda f: None)
            raise
        await self._browser.within_timeout(loaded, what)

    async def goto(self, url: str) -> None:
        """
        Load C{url} in this tab, as typing it in the address bar would.

        @raise BrowserFailed: when it cannot be loaded at all (an HTTP error status still loads).
        """

        async def navigate() -> None:
            answer = await self.command("Page.navigate", {"url": url})
            if answer.get("errorText"):
                raise BrowserFailed(f"{url}: {answer['errorText']}")

        await self._until_loaded(navigate, f"loading {url}")

    async def evaluate(self, expression: str) -> Any:
        """
        The value of the JavaScript C{expression} in the page, as JSON would carry it.
        """
        answer = await self.command(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in answer:
            raise BrowserFailed(f"{expression!r} raised: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def _node(self, selector: str) -> int:
        document = await self.command("DOM.getDocument", {"depth": 0})
        found = await self.command(
            "DOM.querySelector", {"nodeId": document["root"]["nodeId"], "selector": selector}
        )
        if not found.get("nodeId"):
            raise BrowserFailed(f"nothing on the page matches {selector!r}")
        return int(found["nodeId"])

    async def type_into(self, selector: str, text: str) -> None:
        """
        Focus the field C{selector} and type C{text} into it, as a keyboard would.
        """
        await self.command("DOM.focus", {"nodeId": await self._node(selector)})
        await self.command("Input.insertText", {"text": text})

    async def click_to_load(self, selector: str) -> None:
        """
        Click the middle of the element C{selector} with the mouse, and wait until the page that
        click leads to has loaded.
        """
        node = await self._node(selector)
        await self.command("DOM.scrollIntoViewIfNeeded", {"nodeId": node})
        quad = (await self.command("DOM.getBoxModel", {"nodeId": node}))["model"]["content"]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4

        async def click() -> None:
            for kind in ("mousePressed", "mouseReleased"):
                await self.command(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                )

        await self._until_loaded(click, f"the page {selector!r} leads to")


__all__ = ["BROWSER", "BrowserFailed", "BrowserMissing", "HeadlessBrowser", "Page"]
