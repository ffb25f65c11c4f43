# -*- test-case-name: tests.unit.test_hostsconfig -*-
"""
The I/O layer of containerd's registry host configuration (L{spegel.hostsconfig} renders
what is written): `configure` and `cleanup`. Blocking on purpose: it runs in a one-shot
command, never in the reactor.

It touches only the directories of the registries it mirrors: the operator's directory for
such a registry is moved to ``_backup/`` once, ours is written in its place, and cleanup puts
the original back byte for byte. Every other entry under ``config_path`` (a private registry's
own ``hosts.toml`` and certificates, say) is never touched, so configuring spegel cannot break
pulls from registries it does not mirror.

Every step can be interrupted (the node reboots, the init container is killed) and run again
without losing the operator's files: a directory is moved to ``_backup`` by one rename, and
ours is assembled aside and renamed into place, so each registry's directory is at any moment
absent, the operator's, or ours in full.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Iterable, Mapping

from attrs import frozen
from twisted.logger import Logger

from spegel.hostsconfig import (
    BACKUP_DIR,
    HOSTS_FILE,
    MARKER_BYTES,
    STAGING_DIR,
    FileContent,
    HostsConfigError,
    MirrorConfiguration,
    plan_configuration,
)

log = Logger()

_OUR_DIRS = frozenset({BACKUP_DIR, STAGING_DIR})
_DIR_MODE = 0o755



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
