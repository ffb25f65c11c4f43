# -*- test-case-name: tests.test_rig -*-
"""
A fixture shared by the tests of one module, started on first use and stopped at exit.

trial does not call C{setUpClass}/C{tearDownClass} or module fixtures, yet starting a registry,
containerds and nodes for every test would make end-to-end modules slow.  A L{Shared} is created
lazily by the first test that asks for it; its clean-up runs when the test process exits (and
every process it started is SIGKILLed by L{spegel.testing.process.kill_all} even if that clean-up
fails).  A failure to create it is remembered and re-raised to every later test, rather than
retried once per test.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    """
    A lazily created value with a clean-up at interpreter exit.
    """

    def __init__(self, factory: Callable[[], T], cleanup: Callable[[T], None]) -> None:
        self._factory = factory
        self._cleanup = cleanup
        self._value: T | None = None
        self._error: BaseException | None = None
        self._created = False

    def get(self) -> T:
        """
        The value, created on the first call.

        @raise BaseException: whatever creating it raised (then and on every later call).
        """
        if self._error is not None:
            raise self._error
        if not self._created:
            try:
                self._value = self._factory()
            except BaseException as e:
                self._error = e
                raise
            self._created = True
            atexit.register(self.close)
        return self._value  # type: ignore[return-value]

    def close(self) -> None:
        """
        Clean the value up now (a later L{get} creates a new one).
        """
        if self._created:
            self._created = False
            value, self._value = self._value, None
            atexit.unregister(self.close)
            self._cleanup(value)  # type: ignore[arg-type]
