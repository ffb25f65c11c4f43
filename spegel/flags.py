# -*- test-case-name: tests.test_tap -*-
"""
Parsers for the values of spegel's command-line flags. Each raises L{ValueError} with a message
that names what is wrong, which the options classes turn into one line on stderr.
"""

from __future__ import annotations

import re

from spegel import addresses
# Re-exported: the node's and the spegel command's flags are read with these.
from spegel.addresses import ListenAddress, parse_listen_address  # noqa: F401

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# The spellings the one-shot commands take too (spegel.cli.parse_bool).
_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0"})


def parse_duration(text: str) -> float:
    """
    Parse a Go-style duration (C{20ms}, C{1.5s}, C{1m30s}) into seconds.
    """
    position, total = 0, 0.0
    text = text.strip()
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"{text!r} is not a duration such as 20ms, 1.5s or 1m30s")
    return total


def parse_bool(text: str) -> bool:
    """
    Parse the value of a boolean flag written C{--flag=true} or C{--flag=false}, as the
    reference's manifests pass them (C{1}/C{0}, C{yes}/C{no}, C{on}/C{off} too, in any case).
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_list(text: str) -> list[str]:
    """
    Split a comma-separated flag value, dropping blanks.
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_registry_url(text: str) -> str:
    """
    Validate a registry URL (C{https://docker.io}, C{http://127.0.0.1:5000}) with the grammar
    C{spegel configuration} uses (L{spegel.addresses}) and return the host the registry is
    known by in C{?ns=} and in image names (C{docker.io}, C{127.0.0.1:5000}).
    """
    return addresses.parse_registry_url(text).netloc


def parse_regexes(texts: list[str]) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for text in texts:
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            raise ValueError(f"{text!r} is not a valid regular expression: {e}") from None
    return tuple(patterns)
