# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
A fixture shared by the tests of one module, started on first use and stopped at exit.

trial does not call C{setUpClass}/C{tearDownClass} or module fixtures, yet starting a registry,
containerds and nodes for every test would make end-to-end modules slow.  A L{Shared} is created
lazily by the first test that asks for it; its clean-up runs when the test process exits (and
every process it started is SIGKILLed by L{spegel_testing.process.kill_all} even if that clean-up
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

    The factory may take arguments (which containerd a cluster runs, say): L{get} with other
    arguments than the live value was made with cleans that one up and makes a new one, so
    tests generated per containerd (run one class after another) keep one alive at a time.
    """

    def __init__(self, factory: Callable[..., T], cleanup: Callable[[T], None]) -> None:
        self._factory = factory
        self._cleanup = cleanup
        self._value: T | None = None
        self._args: tuple[object, ...] = ()
        self._errors: dict[tuple[object, ...], BaseException] = {}
        self._created = False

    def get(self, *args: object) -> T:
        """
        The value made by C{factory(*args)}, created on the first call with these arguments.

        @raise BaseException: whatever creating it raised (then and on every later call with
            the same arguments).
        """
        if args in self._errors:
            raise self._errors[args]
        if self._created and args != self._args:
            self.close()
        if not self._created:
            try:
                self._value = self._factory(*args)
            except BaseException as e:
                self._errors[args] = e
                raise
            self._args = args
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
