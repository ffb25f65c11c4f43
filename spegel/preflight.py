# -*- test-case-name: tests.unit.test_preflight, tests.e2e.test_preflight_real -*-
"""
Can this node's containerd work with spegel?  A preflight that says what is wrong, one line
each, with the fix.

A node is only useful to spegel when its containerd reads the mirror configuration spegel
writes, keeps the layers it pulls, and actually pulls through the mirror.  Each of those can be
switched off in containerd's configuration, silently:

- C{config_path} unset, or naming another folder than the one spegel writes: containerd never
  reads spegel's C{hosts.toml}, so nothing goes through spegel (fatal).
- C{discard_unpacked_layers = true}: layers are deleted once unpacked, so the node has nothing
  to share (a warning: the node still pulls through its peers).
- containerd 2.1+ with a C{:}-separated C{config_path} list: the CRI plugin pulls through the
  transfer service, which takes C{config_path} as one folder, so the mirrors are silently
  ignored, unless C{use_local_image_pull = true} or another setting the transfer service lacks
  sends the CRI back to its local pull path (fatal).
- the namespace spegel serves holds no images: a wrong C{--containerd-namespace}, or a new node
  (a warning).

What it reads: containerd itself over its socket (its version, its images, and the settings
it runs with, where it says them: the introspection exports of the C{io.containerd.cri.v1.images}
plugin on 2.2+, the CRI's verbose C{Status} on 1.6/1.7); and containerd's configuration file,
when it is mounted (with the files it C{imports}), in either format (C{version = 2} with
C{plugins."io.containerd.grpc.v1.cri"} for 1.x, C{version = 3} with
C{plugins."io.containerd.cri.v1.images"} for 2.x; a C{version = 2} file on 2.x is migrated by
containerd, and read the same way here).  What containerd runs with wins over the file (a file
changed without a restart is reported as such); the file alone tells C{use_local_image_pull}.
What it cannot read it says it could not check, rather than guess.

`check_configuration` and `check_containerd` are pure; `read_containerd_config` and
`probe_containerd` do the I/O (blocking: the C{spegel configuration} command calls them
directly, the node from a thread).

About 580 lines, on purpose in one module: the checks, the two readers whose facts they
compare (file and running containerd) and the two callers (command, node service) change
together whenever containerd moves a setting; split, each change would touch three modules.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from attrs import evolve, frozen
from google.protobuf import empty_pb2
from prometheus_client import Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from spegel.containerd.api import (
    cri_pb2,
    cri_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    version_pb2_grpc,
)
from spegel.containerd.client import NAMESPACE_METADATA_KEY

_log = Logger()

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"

#: Every check's name, as the C{check} label of C{spegel_preflight_problems}.
CHECKS = (
    "config_unreadable",
    "config_path_unset",
    "config_path_elsewhere",
    "config_path_list_ignored",
    "discard_unpacked_layers",
    "config_not_applied",
    "containerd_unreachable",
    "containerd_version_unknown",
    "no_images",
)

preflight_problems = Gauge(
    "spegel_preflight_problems",
    "1 for each check of the node's containerd that found a problem at start, 0 for those that "
    "did not (see the node's log for the line with the fix).",
    ("check",),
)

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

# containerd follows imports this deep at most; a cycle stops here too.
_MAX_IMPORT_DEPTH = 8

_CRI_V1 = ("plugins", "cri")
_CRI_V2 = ("plugins", "io.containerd.grpc.v1.cri")
_IMAGES_V3 = ("plugins", "io.containerd.cri.v1.images")


class PreflightError(Exception):
    """
    containerd's configuration could not be read; the message says which file and why.
    """


@frozen
class Problem:
    """
    One thing wrong, as one line with the fix.

    @ivar check: which check (one of L{CHECKS}).
    @ivar fatal: spegel cannot work on this node until it is fixed.
    """

    check: str
    fatal: bool
    message: str

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.message}"


@frozen
class ImagePullSettings:
    """
    What the CRI plugin's image service was configured with (containerd's defaults where the
    file says nothing).

    @ivar config_path: the registry C{config_path}, or L{None} when unset.
    @ivar local_pull_forced_by: the setting that makes containerd 2.1+ pull on its local path
        instead of the transfer service (C{use_local_image_pull}, or one the transfer service
        lacks), or L{None}.
    @ivar local_pull_known: whether C{local_pull_forced_by} was read (containerd does not say
        it; only its configuration file does).
    """

    config_path: str | None
    discard_unpacked_layers: bool
    local_pull_forced_by: str | None
    source: str
    local_pull_known: bool = True


@frozen
class ContainerdFacts:
    """
    What containerd said over its socket.

    @ivar version: its version string (C{1.6.20~ds1}, C{2.4.2}).
    @ivar images: how many images the namespace holds.
    @ivar running: the CRI image settings it runs with, where it says them.
    """

    version: str
    images: int
    running: ImagePullSettings | None = None


def parse_version(text: str) -> tuple[int, int] | None:
    """
    C{(major, minor)} of a containerd version string (C{v2.1.4}, C{1.6.20~ds1},
    C{2.4.2+unknown}), or L{None} when it has none.
    """
    match = _VERSION.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _table(document: Mapping[str, Any], path: Iterable[str]) -> Mapping[str, Any]:
    table: Any = document
    for key in path:
        table = table.get(key) if isinstance(table, Mapping) else None
        if table is None:
            return {}
    return table if isinstance(table, Mapping) else {}


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """
    containerd's merge of an imported file: tables merge key by key, the rest is replaced.
    """
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise PreflightError(f"cannot read containerd's configuration {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PreflightError(f"containerd's configuration {path} is not valid TOML: {e}") from None


def read_containerd_config(path: str, _depth: int = 0) -> dict[str, Any]:
    """
    containerd's configuration file merged with the files it imports (C{imports}: paths or
    globs, relative to the file's folder), as containerd merges them.

    @raise PreflightError: if a file cannot be read or parsed.
    """
    document = _load(path)
    imports = document.pop("imports", [])
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise PreflightError(f"containerd's configuration {path}: 'imports' is not a list of paths")
    if _depth >= _MAX_IMPORT_DEPTH:
        return document
    for pattern in imports:
        if not os.path.isabs(pattern):
            pattern = os.path.join(os.path.dirname(path), pattern)
        for imported in sorted(glob.glob(pattern)):
            document = _merge(document, read_containerd_config(imported, _depth + 1))
    return document


def image_pull_settings(document: Mapping[str, Any], source: str = "config.toml") -> ImagePullSettings:
    """
    The CRI image settings of a parsed configuration, in whichever format it is.
    """
    version = document.get("version", 1)
    if version == 3:
        images = _table(document, _IMAGES_V3)
        registry = _table(images, ("registry",))
        discard = images.get("discard_unpacked_layers", False)
        use_local = images.get("use_local_image_pull", False)
        extra = images
    else:
        cri = _table(document, _CRI_V2 if version == 2 else _CRI_V1)
        registry = _table(cri, ("registry",))
        discard = _table(cri, ("containerd",)).get("discard_unpacked_layers", False)
        use_local = cri.get("use_local_image_pull", False)
        extra = cri
    config_path = registry.get("config_path") or None
    # containerd 2.1+ falls back to its local pull path when any of these is set
    # (CheckLocalImagePullConfigs in its CRI configuration).
    forced_by = None
    if use_local is True:
        forced_by = "use_local_image_pull = true"
    elif discard is True:
        forced_by = "discard_unpacked_layers = true"
    else:
        for key in ("mirrors", "configs", "auths"):
            if registry.get(key):
                forced_by = f"registry.{key}"
                break
        else:
            if extra.get("max_concurrent_downloads", 3) != 3:
                forced_by = "max_concurrent_downloads"
            elif extra.get("image_pull_with_sync_fs") is True:
                forced_by = "image_pull_with_sync_fs = true"
    return ImagePullSettings(
        config_path=config_path if isinstance(config_path, str) else None,
        discard_unpacked_layers=discard is True,
        local_pull_forced_by=forced_by,
        source=source,
    )


def _same_folder(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def check_configuration(
    settings: ImagePullSettings, certs_dir: str, version: tuple[int, int] | None
) -> list[Problem]:
    """
    What is wrong with containerd's CRI image settings for a spegel writing C{certs_dir}.

    @param version: containerd's C{(major, minor)}, or L{None} when unknown (the checks that
        depend on it then assume the stricter 2.1+).
    """
    problems = []
    config_path = settings.config_path
    if config_path is None:
        problems.append(
            Problem(
                "config_path_unset",
                True,
                f"containerd's registry config_path is not set in {settings.source}, so it never "
                f"reads the hosts.toml spegel writes: set config_path = '{certs_dir}' under "
                f"{_registry_section(version)} and restart containerd",
            )
        )
    else:
        folders = config_path.split(":")
        if not any(_same_folder(folder, certs_dir) for folder in folders):
            problems.append(
                Problem(
                    "config_path_elsewhere",
                    True,
                    f"containerd reads registry configuration from {config_path!r} "
                    f"({settings.source}), not from {certs_dir!r} where spegel writes: point "
                    "--containerd-registry-config-path at the former, or config_path at the latter",
                )
            )
        elif len(folders) > 1 and (version is None or version >= (2, 1)) and settings.local_pull_forced_by is None:
            known = settings.local_pull_known
            problems.append(
                Problem(
                    "config_path_list_ignored",
                    known,
                    f"config_path {config_path!r} is a list; containerd 2.1+ pulls through its "
                    "transfer service, which takes one folder only, so the mirrors are ignored"
                    + ("" if known else " (unless use_local_image_pull is set: the configuration file was not readable)")
                    + f": set config_path = '{certs_dir}', or use_local_image_pull = true under "
                    "[plugins.'io.containerd.cri.v1.images']",
                )
            )
    if settings.discard_unpacked_layers:
        problems.append(
            Problem(
                "discard_unpacked_layers",
                False,
                f"discard_unpacked_layers = true ({settings.source}): containerd deletes layers "
                "once unpacked, so this node has nothing to share with its peers: set it to "
                f"false under {_discard_section(version)}",
            )
        )
    return problems


def _registry_section(version: tuple[int, int] | None) -> str:
    if version is not None and version < (2, 0):
        return "[plugins.\"io.containerd.grpc.v1.cri\".registry]"
    return "[plugins.'io.containerd.cri.v1.images'.registry]"


def _discard_section(version: tuple[int, int] | None) -> str:
    if version is not None and version < (2, 0):
        return "[plugins.\"io.containerd.grpc.v1.cri\".containerd]"
    return "[plugins.'io.containerd.cri.v1.images']"


def check_containerd(facts: ContainerdFacts, namespace: str) -> list[Problem]:
    """
    What is doubtful in what containerd said.
    """
    problems = []
    if parse_version(facts.version) is None:
        problems.append(
            Problem(
                "containerd_version_unknown",
                False,
                f"cannot tell containerd's version from {facts.version!r}: checking as for 2.1+",
            )
        )
    if facts.images == 0:
        problems.append(
            Problem(
                "no_images",
                False,
                f"containerd's namespace {namespace!r} holds no images: on a node that has run "
                "pods, --containerd-namespace is wrong (the kubelet's is k8s.io)",
            )
        )
    return problems


def check_applied(running: ImagePullSettings, configured: ImagePullSettings) -> list[Problem]:
    """
    Whether containerd runs with what its configuration file says (it reads it only at start).
    """
    differences = []
    if (running.config_path or None) != (configured.config_path or None):
        differences.append(f"config_path {running.config_path!r}, the file {configured.config_path!r}")
    if running.discard_unpacked_layers != configured.discard_unpacked_layers:
        differences.append(
            f"discard_unpacked_layers = {str(running.discard_unpacked_layers).lower()}, "
            f"the file {str(configured.discard_unpacked_layers).lower()}"
        )
    if not differences:
        return []
    return [
        Problem(
            "config_not_applied",
            False,
            f"containerd runs with {'; '.join(differences)} ({configured.source}): restart "
            "containerd to apply its configuration",
        )
    ]


def running_settings_from_exports(exports: Mapping[str, str]) -> ImagePullSettings | None:
    """
    The settings containerd 2.2+ exports for its C{io.containerd.cri.v1.images} plugin, or
    L{None} when it exports none (2.0, 2.1).
    """
    if "RegistryConfigPath" not in exports and "DiscardUnpackedLayers" not in exports:
        return None
    return ImagePullSettings(
        config_path=exports.get("RegistryConfigPath") or None,
        discard_unpacked_layers=exports.get("DiscardUnpackedLayers", "false").lower() == "true",
        local_pull_forced_by=None,
        source="containerd's running configuration",
        local_pull_known=False,
    )


def running_settings_from_cri_status(info: Mapping[str, str]) -> ImagePullSettings | None:
    """
    The settings in the C{config} of the CRI's verbose C{Status} (containerd 1.6/1.7; 2.x leaves
    the image settings out of it), or L{None}.
    """
    try:
        config = json.loads(info.get("config", ""))
    except ValueError:
        return None
    if not isinstance(config, dict) or not isinstance(config.get("registry"), dict):
        return None
    containerd = config.get("containerd") if isinstance(config.get("containerd"), dict) else {}
    path = config["registry"].get("configPath")
    return ImagePullSettings(
        config_path=path if isinstance(path, str) and path else None,
        discard_unpacked_layers=containerd.get("discardUnpackedLayers") is True,
        local_pull_forced_by=None,
        source="containerd's running configuration",
        local_pull_known=False,
    )


def unreachable(socket_path: str, why: str) -> Problem:
    return Problem(
        "containerd_unreachable",
        False,
        f"cannot ask containerd at {socket_path}: {why}; is --containerd-sock containerd's socket?",
    )


def unreadable(error: PreflightError) -> Problem:
    return Problem("config_unreadable", False, f"{error}; its settings were not checked")


def probe_containerd(socket_path: str, namespace: str, timeout: float = 5.0) -> ContainerdFacts:
    """
    Ask containerd at C{socket_path} its version and how many images C{namespace} holds.
    Blocking.

    @raise PreflightError: when nothing answers there as containerd does.
    """
    if not os.path.exists(socket_path):
        raise PreflightError("no such socket")
    channel = grpc.insecure_channel("unix://" + os.path.abspath(socket_path))
    metadata = ((NAMESPACE_METADATA_KEY, namespace),)
    try:
        version = version_pb2_grpc.VersionStub(channel).Version(
            empty_pb2.Empty(), metadata=metadata, timeout=timeout
        )
        images = images_pb2_grpc.ImagesStub(channel).List(
            images_pb2.ListImagesRequest(), metadata=metadata, timeout=timeout
        )
        running = _running_settings(channel, metadata, timeout)
    except grpc.RpcError as e:
        # Unary calls raise errors that are also the Call, with a status and details.
        why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)
        raise PreflightError(why) from None
    finally:
        channel.close()
    return ContainerdFacts(version=version.version, images=len(images.images), running=running)


def _running_settings(channel: grpc.Channel, metadata: Any, timeout: float) -> ImagePullSettings | None:
    """
    What containerd says it runs with: introspection first (2.2+), else the CRI's status (1.x);
    L{None} when neither says (2.0/2.1, or the CRI plugin disabled).
    """
    request = introspection_pb2.PluginsRequest(filters=["type==io.containerd.cri.v1,id==images"])
    try:
        plugins = introspection_pb2_grpc.IntrospectionStub(channel).Plugins(
            request, metadata=metadata, timeout=timeout
        ).plugins
    except grpc.RpcError:
        plugins = []
    for plugin in plugins:
        settings = running_settings_from_exports(dict(plugin.exports))
        if settings is not None:
            return settings
    try:
        status = cri_pb2_grpc.RuntimeServiceStub(channel).Status(
            cri_pb2.StatusRequest(verbose=True), timeout=timeout
        )
    except grpc.RpcError:
        return None
    return running_settings_from_cri_status(dict(status.info))


def run_preflight(
    *,
    config_file: str | None,
    certs_dir: str,
    socket_path: str | None,
    namespace: str,
) -> list[Problem]:
    """
    Every check that can be made with what is at hand: the configuration file when it exists
    (a missing file is skipped: it may not be mounted), containerd when its socket is given.
    Blocking.
    """
    problems: list[Problem] = []
    facts = None
    if socket_path:
        try:
            facts = probe_containerd(socket_path, namespace)
        except PreflightError as e:
            problems.append(unreachable(socket_path, str(e)))
    version = parse_version(facts.version) if facts is not None else None
    configured = None
    if config_file and os.path.exists(config_file):
        try:
            configured = image_pull_settings(read_containerd_config(config_file), config_file)
        except PreflightError as e:
            problems.append(unreadable(e))
    running = facts.running if facts is not None else None
    if running is not None:
        if configured is not None:
            problems.extend(check_applied(running, configured))
            running = evolve(running, local_pull_forced_by=configured.local_pull_forced_by, local_pull_known=True)
        problems.extend(check_configuration(running, certs_dir, version))
    elif configured is not None:
        problems.extend(check_configuration(configured, certs_dir, version))
    if facts is not None:
        problems.extend(check_containerd(facts, namespace))
    return problems


class PreflightService(Service):
    """
    The node's preflight: run once at start, off the reactor thread (it reads files and asks
    containerd over a socket of its own), each problem logged as one line and exported as
    C{spegel_preflight_problems{check=...}} (1 when found, 0 when checked and fine), so an
    operator sees on a dashboard which nodes cannot work with spegel and why.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        config_file: str | None,
        certs_dir: str,
        socket_path: str,
        namespace: str,
        gauge: Any = None,
    ) -> None:
        self._reactor = reactor
        self._arguments = dict(
            config_file=config_file, certs_dir=certs_dir, socket_path=socket_path, namespace=namespace
        )
        self._gauge = gauge if gauge is not None else preflight_problems
        self.done: Deferred[list[Problem]] | None = None

    def startService(self) -> None:
        super().startService()
        self.done = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), lambda: run_preflight(**self._arguments)  # type: ignore[arg-type]
        )
        self.done.addCallback(self._report)
        self.done.addErrback(lambda f: _log.failure("The preflight failed", f))

    def _report(self, problems: list[Problem]) -> list[Problem]:
        found = {p.check for p in problems}
        for check in CHECKS:
            self._gauge.labels(check).set(1 if check in found else 0)
        for problem in problems:
            if problem.fatal:
                _log.error("Preflight: {problem}", problem=problem.message)
            else:
                _log.warn("Preflight: {problem}", problem=problem.message)
        if not problems:
            _log.info("Preflight: containerd's configuration and state look right for spegel")
        return problems
