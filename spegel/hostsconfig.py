# -*- test-case-name: tests.unit.test_hostsconfig -*-
"""
containerd registry host configuration: the ``hosts.toml`` files that make containerd on a node
try spegel first for every mirrored registry.

containerd reads ``<config_path>/<host[:port]>/hosts.toml`` (or ``_default/hosts.toml``) each
time it resolves or fetches from a registry; see containerd's docs/hosts.md. For every mirrored
registry spegel writes one such file whose ``[host.'<target>']`` tables point at the spegel
instances on the node, and whose ``server`` is the real registry, containerd's last resort::

    server = 'https://registry-1.docker.io'

    [host.'http://10.0.0.5:30020']
    capabilities = ['pull', 'resolve']
    dial_timeout = '200ms'

This module is the pure layer: it validates URLs (with L{spegel.addresses}, the grammar the
node uses too) and renders text (`parse_registry_url`, `render_hosts_toml`,
`plan_configuration`), and is tested without a disk. The I/O layer, `configure` and `cleanup`,
is L{spegel.hostsfiles}.

Our files start with a marker line (`MARKER`); that is how a later run and cleanup tell our
directories from the operator's.

The TOML writer stays hand-written (about 80 lines): tomllib only reads, and tomli-w writes
only basic ``"..."`` strings and keys, where containerd's docs and the reference write the
literal ``'...'`` strings above (which operators compare with, and end-to-end tests check);
tomlkit could, at the price of a runtime dependency larger than spegel for three value types.
"""

from __future__ import annotations

import math
import re
import tomllib
from datetime import date, datetime, time
from typing import Any, Iterable, Mapping

from attrs import field, frozen

from spegel import addresses
from spegel.addresses import RegistryURL

BACKUP_DIR = "_backup"
# Where a directory of ours is assembled before it is renamed into place; a leftover of a
# killed run is removed by the next.
STAGING_DIR = "_spegel.staging"

# The first line of every hosts.toml spegel writes: how a later run, and cleanup, tell our
# directories from the operator's, and how an operator reading the file learns who wrote it.
MARKER = "# Written by 'spegel configuration'; 'spegel cleanup' restores what was here before."
MARKER_BYTES = MARKER.encode("ascii")

# containerd's name for the configuration that applies to every registry without its own.
DEFAULT_HOST_DIR = "_default"
HOSTS_FILE = "hosts.toml"
DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d"

# Docker Hub's images are named docker.io/..., but its registry API lives elsewhere.
_DOCKER_HUB_HOST = "docker.io"
_DOCKER_HUB_SERVER = "https://registry-1.docker.io"

# A failed connection to a dead local instance must not hold up a pull: containerd moves on to
# the next host (finally the real registry) after this long.
MIRROR_DIAL_TIMEOUT = "200ms"

_HOSTS_FILE_MODE = 0o644

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML literal strings cannot hold a quote or control characters (tab is allowed).
_LITERAL_SAFE = re.compile(r"[^'\x00-\x08\x0a-\x1f\x7f]*")


class HostsConfigError(Exception):
    """
    The mirror configuration cannot be written or cleaned up; the message says why.
    """


class InvalidRegistryURL(HostsConfigError, ValueError):
    """
    A registry or mirror target URL is not ``http(s)://host[:port]``.
    """


class InvalidMirrorConfiguration(HostsConfigError, ValueError):
    """
    The set of registries and targets, taken together, cannot be written (duplicates, no target).
    """


class ExistingConfigError(HostsConfigError):
    """
    The operator's previous ``hosts.toml`` could not be read for ``--prepend-existing``.
    """


@frozen
class FileContent:
    """
    Bytes to write and the permission bits to give them.
    """

    data: bytes
    mode: int = _HOSTS_FILE_MODE


def parse_registry_url(text: str, *, role: str = "registry") -> RegistryURL:
    """
    Validate and normalise one URL (L{spegel.addresses.parse_registry_url}: the node reads
    C{--mirrored-registries} with the same parser).

    @param role: what the URL is for (``mirrored registry``, ``mirror target``), used in the
        error message so the operator knows which flag to fix.
    @raise InvalidRegistryURL: unless C{text} is ``http(s)://host[:port]`` with no credentials,
        path, query or fragment.
    """
    try:
        return addresses.parse_registry_url(text, role=role)
    except addresses.InvalidAddress as e:
        raise InvalidRegistryURL(str(e)) from None


def _parse_distinct(texts: Iterable[str], role: str) -> tuple[RegistryURL, ...]:
    urls: list[RegistryURL] = []
    for text in texts:
        url = parse_registry_url(text, role=role)
        if url in urls:
            raise InvalidMirrorConfiguration(f"{role} {str(url)!r} is listed twice")
        urls.append(url)
    return tuple(urls)


def _no_duplicate_directories(
    instance: MirrorConfiguration, attribute: Any, value: tuple[RegistryURL, ...]
) -> None:
    seen: dict[str, RegistryURL] = {}
    for url in value:
        # http://r:5000 and https://r:5000 would both be written to r:5000/hosts.toml.
        if url.netloc in seen:
            raise InvalidMirrorConfiguration(
                f"mirrored registries {str(seen[url.netloc])!r} and {str(url)!r} "
                f"share the configuration directory {url.netloc!r}"
            )
        seen[url.netloc] = url


def _at_least_one_target(
    instance: MirrorConfiguration, attribute: Any, value: tuple[RegistryURL, ...]
) -> None:
    if not value:
        raise InvalidMirrorConfiguration("at least one mirror target is required")


def _url_tuple(urls: Iterable[RegistryURL]) -> tuple[RegistryURL, ...]:
    # A typed converter: attrs' mypy plugin cannot type a bare `tuple` as one.
    return tuple(urls)


@frozen
class MirrorConfiguration:
    """
    What to write: which registries to mirror, where the mirrors are, and how.

    @ivar mirrored_registries: registries to write a ``hosts.toml`` for; empty means one
        ``_default/hosts.toml`` that applies to every registry.
    @ivar mirror_targets: spegel endpoints containerd should try, in order.
    @ivar resolve_tags: let the mirrors resolve tags to digests (``resolve`` capability).
        Without it tags always go to the real registry, only content comes from the mirrors.
    @ivar prepend_existing: put our hosts in front of the ``[host]`` entries the operator had,
        instead of replacing them.
    """

    mirrored_registries: tuple[RegistryURL, ...] = field(
        converter=_url_tuple, validator=_no_duplicate_directories
    )
    mirror_targets: tuple[RegistryURL, ...] = field(converter=_url_tuple, validator=_at_least_one_target)
    resolve_tags: bool = True
    prepend_existing: bool = False

    @classmethod
    def from_strings(
        cls,
        mirrored_registries: Iterable[str],
        mirror_targets: Iterable[str],
        *,
        resolve_tags: bool = True,
        prepend_existing: bool = False,
    ) -> MirrorConfiguration:
        """
        Validate URLs as given on a command line.

        @raise HostsConfigError: naming the first bad URL, or the duplicate.
        """
        return cls(
            mirrored_registries=_parse_distinct(mirrored_registries, "mirrored registry"),
            mirror_targets=_parse_distinct(mirror_targets, "mirror target"),
            resolve_tags=resolve_tags,
            prepend_existing=prepend_existing,
        )

    def directories(self) -> tuple[str, ...]:
        """
        The directories under config_path this configuration writes a ``hosts.toml`` into.
        """
        if not self.mirrored_registries:
            return (DEFAULT_HOST_DIR,)
        return tuple(host_directory(r) for r in self.mirrored_registries)


def host_directory(registry: RegistryURL | None) -> str:
    """
    The directory containerd reads the configuration of C{registry} from; C{None} is the
    catch-all ``_default``.
    """
    return DEFAULT_HOST_DIR if registry is None else registry.netloc


def upstream_server(registry: RegistryURL) -> str:
    """
    The URL containerd falls back to when no mirror has the content.
    """
    if registry == RegistryURL("https", _DOCKER_HUB_HOST):
        return _DOCKER_HUB_SERVER
    return str(registry)


# ---------------------------------------------------------------------------------------------
# TOML rendering. tomllib only reads, and hosts.toml needs few types, so the writer is here.


def toml_string(text: str) -> str:
    """
    A TOML string for C{text}: a literal ``'...'`` string, as containerd's docs write them,
    unless it holds a quote or control character, then an escaped basic ``"..."`` string.
    """
    if _LITERAL_SAFE.fullmatch(text):
        return f"'{text}'"
    escaped = []
    for c in text:
        if c == '"' or c == "\\":
            escaped.append("\\" + c)
        elif c in _BASIC_ESCAPES:
            escaped.append(_BASIC_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            escaped.append(f"\\u{ord(c):04x}")
        else:
            escaped.append(c)
    return '"' + "".join(escaped) + '"'


_BASIC_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_key(key: str) -> str:
    """
    A TOML key: bare when TOML allows it, quoted otherwise (URLs always are).
    """
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    """
    An inline TOML value for anything tomllib can return.

    @raise TypeError: for a Python value TOML has no syntax for.
    """
    # bool first: it is also an int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # Only inside arrays: tables elsewhere get their own [header].
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML syntax for {type(value).__name__}")


def _render_table(path: tuple[str, ...], table: Mapping[str, Any]) -> list[str]:
    """
    A table and its sub-tables as ``[a.'b']`` blocks, one string per block.
    """
    lines = ["[" + ".".join(toml_key(p) for p in path) + "]"]
    lines.extend(
        f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
    )
    blocks = ["\n".join(lines)]
    for key, value in table.items():
        if isinstance(value, dict):
            blocks.extend(_render_table(path + (key,), value))
    return blocks


def parse_existing_hosts(text: str, *, source: str = "hosts.toml") -> dict[str, Any]:
    """
    Read the operator's previous ``hosts.toml``.

    @raise ExistingConfigError: if it is not TOML, or its ``host`` entries are not tables.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExistingConfigError(f"cannot parse {source}: {e}") from None
    hosts = document.get("host", {})
    if not isinstance(hosts, dict) or not all(isinstance(h, dict) for h in hosts.values()):
        raise ExistingConfigError(f"cannot use {source}: its 'host' entries are not tables")
    return document


def render_hosts_toml(
    registry: RegistryURL | None,
    mirror_targets: Iterable[RegistryURL],
    *,
    resolve_tags: bool = True,
    existing: Mapping[str, Any] | None = None,
) -> str:
    """
    The ``hosts.toml`` for one mirrored registry.

    @param registry: the mirrored registry; C{None} for ``_default``, which has no ``server``
        (containerd then uses the registry named in the image reference).
    @param existing: the operator's previous file, parsed (`parse_existing_hosts`), to keep
        behind ours. Its ``[host]`` tables follow ours, except any for one of our targets:
        a table defined twice would make the whole file invalid, and ours are the point.
        Its server-level settings (``ca``, ``client``, ``header``...) are kept too, since
        containerd needs them to reach the real registry when no mirror has the content; its
        ``server`` is replaced by ours.
    """
    capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
    existing = existing or {}
    head = [MARKER]
    if registry is not None:
        head.append(f"server = {toml_string(upstream_server(registry))}")
    head.extend(
        f"{toml_key(k)} = {toml_value(v)}"
        for k, v in existing.items()
        if k not in ("server", "host") and not isinstance(v, dict)
    )
    blocks = ["\n".join(head)]
    ours = []
    for target in mirror_targets:
        ours.append(str(target))
        blocks.extend(
            _render_table(
                ("host", str(target)),
                {"capabilities": capabilities, "dial_timeout": MIRROR_DIAL_TIMEOUT},
            )
        )
    for name, table in existing.get("host", {}).items():
        if name not in ours:
            blocks.extend(_render_table(("host", name), table))
    for key, value in existing.items():
        if key not in ("server", "host") and isinstance(value, dict):
            blocks.extend(_render_table((key,), value))
    return "\n\n".join(blocks) + "\n"


def plan_configuration(
    configuration: MirrorConfiguration, backup: Mapping[str, FileContent]
) -> dict[str, FileContent]:
    """
    Every file the configuration consists of, by path relative to config_path.

    @param backup: the operator's original files, by path relative to ``_backup``. Only read
        with C{prepend_existing}: then a registry's old ``hosts.toml`` is merged into ours,
        and the other files in its directory (certificates its hosts refer to) are kept.
    @raise ExistingConfigError: if an old ``hosts.toml`` to merge cannot be parsed.
    """
    registries: tuple[RegistryURL | None, ...] = configuration.mirrored_registries or (None,)
    files: dict[str, FileContent] = {}
    for registry in registries:
        directory = host_directory(registry)
        hosts_path = f"{directory}/{HOSTS_FILE}"
        existing = None
        if configuration.prepend_existing and hosts_path in backup:
            old = backup[hosts_path].data
            try:
                text = old.decode("utf-8")
            except UnicodeDecodeError:
                raise ExistingConfigError(
                    f"cannot parse {BACKUP_DIR}/{hosts_path}: not UTF-8"
                ) from None
            existing = parse_existing_hosts(text, source=f"{BACKUP_DIR}/{hosts_path}")
            for path, content in backup.items():
                if path.startswith(directory + "/") and path != hosts_path:
                    files[path] = content
        rendered = render_hosts_toml(
            registry,
            configuration.mirror_targets,
            resolve_tags=configuration.resolve_tags,
            existing=existing,
        )
        files[hosts_path] = FileContent(rendered.encode("utf-8"))
    return files
