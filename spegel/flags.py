# -*- test-case-name: tests.unit.test_flags -*-
"""
spegel's command lines: one set of converters for flag values, and L{CommandOptions}, the
C{usage.Options} both the node (C{twistd spegel}, L{spegel.tap}) and the C{spegel} command's
subcommands (L{spegel.cli}) are built on.

A converter takes the flag's text and returns its value or raises L{ValueError} saying what is
wrong; L{parameter} binds one to a flag as C{usage.Options}' C{coerce}, so the error becomes one
line that names the flag (C{--registry-addr: ':0' is not ...}). Hosts, ports and URLs are
parsed by L{spegel.addresses}, the grammar every entry point shares.

Flag forms both commands accept, as the reference's manifests write them:
  - boolean flags: C{--flag}, C{--flag=false}, C{--flag false} (any of L{parse_bool}'s
    spellings); the last mention wins;
  - lists: comma-separated, and also several words after the flag or the flag repeated
    (C{--flag a,b --flag c d} is C{a, b, c, d}); C{--flag=} alone is the empty list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from twisted.python import reflect, usage, util

from spegel import addresses

# Re-exported: both commands read addresses with these.
from spegel.addresses import ListenAddress, parse_listen_address  # noqa: F401

T = TypeVar("T")

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A byte rate: a number, a decimal (k, M, G: powers of 1000) or binary (Ki, Mi, Gi: of 1024)
# multiplier, an optional B, an optional /s.  Bits are not taken: a lower-case b is refused.
_BYTE_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(k|K|M|G|Ki|Mi|Gi)?B?(?:/s)?")
_BYTE_MULTIPLIERS = {
    None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3,
}
_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0"})


# --- converters: text -> value, or ValueError ----------------------------------------------------


def parse_duration(text: str) -> float:
    """
    Parse a Go-style duration (C{20ms}, C{1.5s}, C{1m30s}) into seconds.

    Kept by hand: Go's duration syntax is what the reference's flags and the chart's values
    schema use, and no maintained Python library parses exactly it (pytimeparse and
    isodate read other grammars).
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


def byte_rate(minimum: float) -> Callable[[str], float]:
    """
    A converter for a rate in bytes per second (C{100MiB}, C{12.5MB/s}, C{1Gi}, C{500000}):
    C{0} for none, else at least C{minimum}.

    Kept by hand, like L{parse_duration}: the chart's values schema checks the same grammar
    with a regular expression, which a lenient library's (humanfriendly's) could not match.
    """

    def convert(text: str) -> float:
        match = _BYTE_RATE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"{text!r} is not a rate in bytes per second such as 100MiB, 12.5MB/s or 0 "
                "(units k, M, G or Ki, Mi, Gi, then an optional B and /s)"
            )
        rate = float(match.group(1)) * _BYTE_MULTIPLIERS[match.group(2)]
        if 0 < rate < minimum:
            raise ValueError(f"{text!r} is below the lowest cap, {minimum / 1024:g}KiB/s (0: no cap)")
        return rate

    convert.coerceDoc = "Bytes per second such as 100MiB or 12.5MB/s; 0: none."  # type: ignore[attr-defined]
    return convert


_SIZE = re.compile(r"([0-9]+)(Ki|Mi|Gi)?")
_SIZE_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def parse_size(text: str) -> int:
    """
    Parse a size in bytes written as Kubernetes quantities are (C{32Mi}, C{512Ki}, C{1Gi}, or
    plain bytes).
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 32Mi, 512Ki or 1048576")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


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


def list_of(convert: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """
    A converter for a comma-separated list whose items C{convert} reads.
    """

    def convert_list(text: str) -> tuple[T, ...]:
        return tuple(convert(item) for item in parse_list(text))

    convert_list.coerceDoc = getattr(convert, "coerceDoc", "")  # type: ignore[attr-defined]
    return convert_list


def optional(convert: Callable[[str], T]) -> Callable[[str], T | None]:
    """
    A converter that reads the empty text as L{None} (the flag's "not set").
    """

    def convert_optional(text: str) -> T | None:
        return convert(text) if text else None

    return convert_optional


def whole_number(low: int, high: int, note: str = "") -> Callable[[str], int]:
    """
    A converter for a decimal number from C{low} to C{high}.
    """

    def convert(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}{note}, not {text!r}")
        return int(text)

    return convert


class Choice(Generic[T]):
    """
    A converter for one of a few names, each standing for a value.
    """

    def __init__(self, values: dict[str, T], *, fold_case: bool = False) -> None:
        self._values = values
        self._fold_case = fold_case
        self.coerceDoc = "One of " + ", ".join(name for name in values if name) + "."

    def __call__(self, text: str) -> T:
        key = text.lower() if self._fold_case else text
        if key not in self._values:
            shown = ", ".join(name for name in self._values if name)
            raise ValueError(f"must be one of {shown}, not {text!r}")
        return self._values[key]


def choice(*names: str) -> Choice[str]:
    return Choice({name: name for name in names})


def non_empty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


parse_duration.coerceDoc = "A duration such as 20ms, 1.5s or 1m30s."  # type: ignore[attr-defined]
parse_size.coerceDoc = "A size such as 32Mi, 512Ki, 1Gi or bytes."  # type: ignore[attr-defined]
parse_bool.coerceDoc = "true or false."  # type: ignore[attr-defined]
parse_listen_address.coerceDoc = "[host]:port"  # type: ignore[attr-defined]


# --- the options classes -----------------------------------------------------------------------


def parameter(
    name: str, default: str | None, doc: str, convert: Callable[[str], Any] = str
) -> list[Any]:
    """
    An C{optParameters} entry whose value C{convert} reads; its error names the flag.
    """

    def coerce(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as e:
            # A UsageError passes CoerceParameter untouched: one line that names the flag,
            # not "Parameter type enforcement failed".
            raise usage.UsageError(f"--{name}: {e}") from None

    coerce.coerceDoc = getattr(convert, "coerceDoc", "")  # type: ignore[attr-defined]
    coerce.convert = convert  # type: ignore[attr-defined]
    return [name, None, default, doc, coerce]


class CommandOptions(usage.Options):
    """
    C{usage.Options} with spegel's flag forms (see the module docstring) and converted
    defaults: C{self[name]} is always the converted value, given or not (L{None} for a default
    of L{None}, the flag's "required" or "not set").

    @cvar booleans: the flags that take an optional C{=BOOL}; declare them as parameters whose
        converter is L{parse_bool}.
    @cvar lists: the flags whose values are collected as lists.
    """

    booleans: frozenset[str] = frozenset()
    lists: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        for name, default, coerce in self._parameters():
            if default is not None and hasattr(coerce, "convert"):
                self[name] = coerce.convert(default)

    def _parameters(self) -> Iterable[tuple[str, Any, Any]]:
        entries: list[Any] = []
        reflect.accumulateClassList(type(self), "optParameters", entries)
        for entry in entries:
            name, _short, default, _doc, coerce = util.padTo(5, entry)
            yield name, default, coerce

    def parseOptions(self, options: list[str] | None = None) -> None:
        super().parseOptions(None if options is None else self.normalised(options))

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unrecognized arguments: {' '.join(args)}")

    def opt_help(self) -> None:
        """
        Display this help and exit.
        """
        raise ShowText(str(self))

    def opt_version(self) -> None:
        """
        Display spegel's version and exit.
        """
        import spegel

        raise ShowText(spegel.__version__)

    def normalised(self, argv: list[str]) -> list[str]:
        """
        C{argv} in the one form getopt reads: C{--flag=value} for L{booleans} (C{--flag}
        alone is C{=true}) and one C{--flag=a,b,c} per list flag, where it first appeared.
        """
        takes_value = {name for name, _, _ in self._parameters()}
        lists: dict[str, list[str]] = {}
        out: list[str | tuple[str]] = []  # a 1-tuple: where list flag's collected value goes
        index = 0
        while index < len(argv):
            arg = argv[index]
            index += 1
            if arg == "--":
                out.extend(argv[index - 1 :])
                break
            name, sep, value = arg.partition("=")
            flag = name[2:] if name.startswith("--") else ""
            if flag in self.booleans and not sep:
                # The next word is the value when it is true or false (argparse's nargs="?").
                if index < len(argv) and _is_bool(argv[index]):
                    value = argv[index]
                    index += 1
                out.append(f"--{flag}={value or 'true'}")
            elif flag in self.lists:
                if flag not in lists:
                    lists[flag] = []
                    out.append((flag,))
                if sep:
                    lists[flag].append(value)
                while not sep and index < len(argv) and not argv[index].startswith("-"):
                    lists[flag].append(argv[index])
                    index += 1
            else:
                out.append(arg)
                if flag in takes_value and not sep and index < len(argv):
                    # "--data-dir --x": --x is the directory, not a flag.
                    out.append(argv[index])
                    index += 1
        return [
            f"--{item[0]}=" + ",".join(lists[item[0]]) if isinstance(item, tuple) else item
            for item in out
        ]


def _is_bool(text: str) -> bool:
    try:
        parse_bool(text)
    except ValueError:
        return False
    return True


class ShowText(Exception):
    """
    C{--help} or C{--version}: print the text and exit 0 (the caller decides where to).
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
