# -*- test-case-name: tests.test_hostsconfig -*-
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

The module has two layers. The pure one validates URLs and renders text
(`parse_registry_url`, `render_hosts_toml`, `plan_configuration`) and can be tested without a
disk. The I/O layer (`configure`, `cleanup`) touches only the directories of the registries it
mirrors: the operator's directory for such a registry is moved to ``_backup/`` once, ours is
written in its place, and cleanup puts the original back byte for byte. Every other entry under
``config_path`` (a private registry's own ``hosts.toml`` and certificates, say) is never
touched, so configuring spegel cannot break pulls from registries it does not mirror.

Our files start with a marker line (`MARKER`); that is how a later run and cleanup tell our
directories from the operator's. Every step can be interrupted (the node reboots, the init
container is killed) and run again without losing the operator's files: a directory is moved
to ``_backup`` by one rename, and ours is assembled aside and renamed into place, so each
registry's directory is at any moment absent, the operator's, or ours in full.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import stat
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Iterable, Mapping

from attrs import field, frozen
from twisted.logger import Logger

from spegel import addresses
from spegel.addresses import RegistryURL

log = Logger()

BACKUP_DIR = "_backup"
# Where a directory of ours is assembled before it is renamed into place; a leftover of a
# killed run is removed by the next.
STAGING_DIR = "_spegel.staging"
_OUR_DIRS = frozenset({BACKUP_DIR, STAGING_DIR})

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
_DIR_MODE = 0o755

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
        converter=tuple, validator=_no_duplicate_directories
    )
    mirror_targets: tuple[RegistryURL, ...] = field(converter=tuple, validator=_at_least_one_target)
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


# ---------------------------------------------------------------------------------------------
# The I/O layer. Blocking on purpose: it runs in a one-shot command, never in the reactor.


@frozen
class ConfigurationResult:
    """
    What `configure` did, paths relative to config_path.

    @ivar backed_up: the operator's directories moved to ``_backup`` by this run.
    @ivar removed: our directories removed because their registry is no longer mirrored.
    @ivar restored: the operator's directories moved back from ``_backup`` for those.
    @ivar written: every file of ours written.
    @ivar untouched: the other registries' directories, left exactly as they were. When
        every registry is mirrored (``_default``), containerd reads these instead of
        ``_default`` for their registries: pulls from them do not go through spegel.
    """

    backed_up: tuple[str, ...]
    removed: tuple[str, ...]
    written: tuple[str, ...]
    restored: tuple[str, ...] = ()
    untouched: tuple[str, ...] = ()


@frozen
class CleanupResult:
    """
    What `cleanup` did, paths relative to config_path.
    """

    removed: tuple[str, ...]
    restored: tuple[str, ...]


def configure(
    config_path: str | os.PathLike[str], configuration: MirrorConfiguration
) -> ConfigurationResult:
    """
    Make the directories of C{configuration}'s registries under C{config_path} hold exactly
    our files, and leave every other entry of C{config_path} as it was.

    The operator's directory for a registry we now mirror is moved to ``_backup`` first (once:
    a later run finds ours in its place); ours for a registry no longer mirrored is removed
    and the operator's original, if any, moved back.

    @raise HostsConfigError: if the directory cannot be read or written, an old
        ``hosts.toml`` cannot be merged, or an operator's directory and its backup are both
        there. Whatever was done before stays consistent: running again finishes the job,
        `cleanup` undoes it.
    """
    root = Path(config_path)
    try:
        root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        _remove(root / STAGING_DIR)
        wanted = configuration.directories()
        owned = _owned_directories(root)
        backed_up = tuple(d for d in wanted if d not in owned and _back_up(root, d))
        removed = tuple(sorted(owned - set(wanted)))
        restored = tuple(d for d in removed if _remove_ours(root, d))
        backup = (
            _read_backup(root / BACKUP_DIR, wanted) if configuration.prepend_existing else {}
        )
        planned = plan_configuration(configuration, backup)
        for directory in wanted:
            _install_directory(root, directory, planned)
        _remove_if_empty(root / BACKUP_DIR)
        untouched = tuple(
            sorted(
                entry.name
                for entry in root.iterdir()
                if entry.name not in _OUR_DIRS and entry.name not in wanted
            )
        )
    except OSError as e:
        raise _os_failure(e) from None
    return ConfigurationResult(
        backed_up=backed_up,
        removed=removed,
        written=tuple(sorted(planned)),
        restored=restored,
        untouched=untouched,
    )


def cleanup(config_path: str | os.PathLike[str]) -> CleanupResult:
    """
    Remove our directories from C{config_path} and put the operator's originals back, byte
    for byte. Nothing to do (C{config_path} never configured, or already cleaned) is not an
    error.

    @raise HostsConfigError: if the directory cannot be read or written, or something that is
        not ours took the place of an original (the original then stays in ``_backup``);
        running again finishes the job.
    """
    root = Path(config_path)
    try:
        if not root.is_dir():
            return CleanupResult(removed=(), restored=())
        _remove(root / STAGING_DIR)
        removed = tuple(sorted(_owned_directories(root)))
        restored = tuple(d for d in removed if _remove_ours(root, d))
        backup = root / BACKUP_DIR
        # Originals whose directory of ours was already removed by an interrupted run.
        leftovers = sorted(e.name for e in backup.iterdir()) if backup.is_dir() else []
        blocked = []
        for name in leftovers:
            if (root / name).exists() or (root / name).is_symlink():
                blocked.append(name)
            else:
                _move_back(root, name)
                restored += (name,)
        _remove_if_empty(backup)
    except OSError as e:
        raise _os_failure(e) from None
    if blocked:
        raise HostsConfigError(
            f"kept {', '.join(str(backup / n) for n in blocked)} in the backup: "
            f"{', '.join(str(root / n) for n in blocked)} exists and is not spegel's; "
            "move one of them away and run cleanup again"
        )
    if not removed and not restored:
        log.info("nothing to clean up in {root}", root=str(root))
    return CleanupResult(removed=removed, restored=tuple(sorted(restored)))


def is_ours(directory: Path) -> bool:
    """
    Whether C{directory} is one spegel wrote: a real directory whose ``hosts.toml`` starts
    with our marker line.
    """
    hosts = directory / HOSTS_FILE
    if directory.is_symlink() or not directory.is_dir() or hosts.is_symlink() or not hosts.is_file():
        return False
    with open(hosts, "rb") as f:
        return f.read(len(MARKER_BYTES)) == MARKER_BYTES


def _owned_directories(root: Path) -> set[str]:
    return {
        entry.name
        for entry in root.iterdir()
        if entry.name not in _OUR_DIRS and is_ours(entry)
    }


def _os_failure(e: OSError) -> HostsConfigError:
    where = f"{e.filename}: " if e.filename else ""
    return HostsConfigError(f"{where}{e.strerror or e}")


def _back_up(root: Path, name: str) -> bool:
    """
    Move the operator's C{root/name} into ``_backup``, if there is one.

    @return: whether something was moved.
    """
    original = root / name
    if not (original.exists() or original.is_symlink()):
        return False
    backup = root / BACKUP_DIR
    if backup.is_symlink() or (backup.exists() and not backup.is_dir()):
        raise HostsConfigError(f"{backup} exists but is not a directory; move it away first")
    if (backup / name).exists() or (backup / name).is_symlink():
        raise HostsConfigError(
            f"{original} is not spegel's, and {backup / name} already holds an earlier "
            "original; move one of them away first"
        )
    backup.mkdir(mode=_DIR_MODE, exist_ok=True)
    os.rename(original, backup / name)
    _fsync_directory(backup)
    _fsync_directory(root)
    log.info("backed up {path} to {backup}", path=str(original), backup=str(backup / name))
    return True


def _remove_ours(root: Path, name: str) -> bool:
    """
    Remove our C{root/name} and move the operator's original back, if there is one.

    @return: whether an original was moved back.
    """
    shutil.rmtree(root / name)
    log.info("removed {path}", path=str(root / name))
    backup = root / BACKUP_DIR / name
    if backup.exists() or backup.is_symlink():
        _move_back(root, name)
        return True
    _fsync_directory(root)
    return False


def _move_back(root: Path, name: str) -> None:
    os.rename(root / BACKUP_DIR / name, root / name)
    _fsync_directory(root)
    log.info("restored {path}", path=str(root / name))


def _remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
        directory.rmdir()


def _read_backup(backup: Path, directories: Iterable[str]) -> dict[str, FileContent]:
    files = {}
    for directory in directories:
        top = backup / directory
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                path = Path(dirpath) / name
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                files[path.relative_to(backup).as_posix()] = FileContent(
                    path.read_bytes(), stat.S_IMODE(info.st_mode)
                )
    return files


def _install_directory(root: Path, name: str, planned: Mapping[str, FileContent]) -> None:
    """
    Make C{root/name} hold exactly the planned files under C{name/}.

    The directory is assembled aside and renamed into place, so containerd (which may read it
    at any moment) and a run that is killed half-way only ever find no directory, ours in
    full, or the operator's: never a ``hosts.toml`` whose certificates are not written yet,
    nor one of ours without its marker.
    """
    staging = root / STAGING_DIR
    staging.mkdir(mode=_DIR_MODE, exist_ok=True)
    try:
        fresh = staging / name
        for path, content in planned.items():
            if path.startswith(name + "/"):
                _write_synced(staging / path, content)
        _fsync_directory(fresh)
        target = root / name
        if target.exists() or target.is_symlink():
            # Ours from an earlier run (the operator's was backed up before this was called).
            old = staging / (name + ".old")
            os.rename(target, old)
            os.rename(fresh, target)
        else:
            os.rename(fresh, target)
    finally:
        # Only ever ours in here; a failure above leaves the folder ours or absent, never half.
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_directory(root)
    log.info("wrote {path}", path=str(target))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_synced(path: Path, content: FileContent) -> None:
    path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    with open(path, "xb") as f:
        os.fchmod(f.fileno(), content.mode)
        f.write(content.data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
