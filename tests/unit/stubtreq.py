"""
treq's L{treq.testing.StubTreq}, with the methods it sets on itself at run time declared, so
that mypy checks the tests' calls to it (and sees it fit L{spegel.peerresponse.HTTPClient}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from treq import testing
from twisted.internet.defer import Deferred


class StubTreq(testing.StubTreq):
    # treq.__all__: the client's methods, then treq's body readers.
    head: Callable[..., Deferred[Any]]
    get: Callable[..., Deferred[Any]]
    post: Callable[..., Deferred[Any]]
    put: Callable[..., Deferred[Any]]
    patch: Callable[..., Deferred[Any]]
    delete: Callable[..., Deferred[Any]]
    request: Callable[..., Deferred[Any]]
    collect: Callable[..., Deferred[None]]
    content: Callable[..., Deferred[bytes]]
    text_content: Callable[..., Deferred[str]]
    json_content: Callable[..., Deferred[Any]]
