# -*- test-case-name: tests.unit.test_preflight, tests.e2e.test_preflight_real -*-
"""
What containerd is configured with and what it runs with, as the preflight (L{spegel.preflight})
compares them.

  - Its configuration file, when it is mounted (with the files it C{imports}), in either format
    (C{version = 2} with C{plugins."io.containerd.grpc.v1.cri"} for 1.x, C{version = 3} with
    C{plugins."io.containerd.cri.v1.images"} for 2.x; a C{version = 2} file on 2.x is migrated
    by containerd, and read the same way here): L{read_containerd_config},
    L{image_pull_settings}.  Only the file tells C{use_local_image_pull}.
  - containerd itself over its socket: its version, its images, and the settings it runs with,
    where it says them (the introspection exports of the C{io.containerd.cri.v1.images} plugin on
    2.2+, the CRI's verbose C{Status} on 1.6/1.7): L{probe_containerd}.

The readers do blocking I/O: the C{spegel configuration} command calls them directly, the node
from a thread.
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
from attrs import frozen
from google.protobuf import empty_pb2

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

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"

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
    for imported_pattern in imports:
        # Relative to the importing file; an absolute pattern comes out of join unchanged.
        pattern = os.path.join(os.path.dirname(path), imported_pattern)
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
    containerd = config.get("containerd")
    if not isinstance(containerd, dict):
        containerd = {}
    path = config["registry"].get("configPath")
    return ImagePullSettings(
        config_path=path if isinstance(path, str) and path else None,
        discard_unpacked_layers=containerd.get("discardUnpackedLayers") is True,
        local_pull_forced_by=None,
        source="containerd's running configuration",
        local_pull_known=False,
    )


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
    plugins: Iterable[introspection_pb2.Plugin]
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
