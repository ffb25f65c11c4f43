# -*- test-case-name: tests.unit.test_rig, tests.e2e.test_rig_real -*-
"""
Test images built from random bytes: OCI or Docker media types, one platform or an index.

Everything is deterministic in the C{seed}: the same arguments give the same digests, so a test
can build an image twice (for example in two processes) and compare.  Layers are real tar
archives (gzip'd, or plain C{tar} when C{compress=False}) so containerd can unpack them, and each
config lists the real diff_ids (the SHA-256 of the uncompressed tar) as containerd checks them.

Layers are built as a stream: random bytes are generated in fixed-size chunks, fed through tar
(and gzip), hashed on the way, and written either to memory or, when a C{directory} is given, to a
file.  A 1 GiB benchmark layer therefore costs a chunk of memory, not a gigabyte.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from attrs import frozen

# Random bytes are generated in units of this size whatever the reader asks for, which keeps
# layer bytes independent of tar's and gzip's buffer sizes.
_RANDOM_CHUNK = 1 << 20


class MediaFormat(enum.Enum):
    """
    The two families of media types registries and containerd speak.
    """

    OCI = "oci"
    DOCKER = "docker"


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

_MEDIA_TYPES = {
    MediaFormat.OCI: {
        "manifest": OCI_MANIFEST,
        "index": OCI_INDEX,
        "config": OCI_CONFIG,
        "layer-gzip": OCI_LAYER_GZIP,
        "layer-tar": OCI_LAYER_TAR,
    },
    MediaFormat.DOCKER: {
        "manifest": DOCKER_MANIFEST,
        "index": DOCKER_LIST,
        "config": DOCKER_CONFIG,
        "layer-gzip": DOCKER_LAYER_GZIP,
        "layer-tar": DOCKER_LAYER_TAR,
    },
}

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST})


@frozen
class Platform:
    """
    An OCI platform (C{os}/C{architecture}).
    """

    os: str = "linux"
    architecture: str = "amd64"

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}"


LINUX_AMD64 = Platform("linux", "amd64")
LINUX_ARM64 = Platform("linux", "arm64")
DEFAULT_PLATFORMS = (LINUX_AMD64, LINUX_ARM64)


@frozen
class Blob:
    """
    One piece of content: its descriptor fields and its bytes, held in memory (C{data}) or in a
    file (C{path}).
    """

    media_type: str
    digest: str
    size: int
    data: bytes | None = None
    path: str | None = None

    def open(self) -> BinaryIO:
        """
        A binary file object over the bytes, for streaming them.
        """
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")

    def read(self) -> bytes:
        """
        All the bytes.  Meant for small blobs; stream big ones with L{open}.
        """
        if self.data is not None:
            return self.data
        with self.open() as f:
            return f.read()

    def descriptor(self) -> dict[str, object]:
        """
        The OCI descriptor JSON object pointing at this blob.
        """
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@frozen
class PlatformImage:
    """
    One single-platform image: a manifest, its config and its layers.

    @ivar diff_ids: SHA-256 digests of each layer's uncompressed tar, as listed in the config.
    """

    platform: Platform
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]


@frozen
class TestImage:
    """
    A built image: the C{root} (a manifest, or an index over C{platform_images}) and everything
    below it.
    """

    format: MediaFormat
    root: Blob
    platform_images: tuple[PlatformImage, ...]

    @property
    def digest(self) -> str:
        return self.root.digest

    @property
    def media_type(self) -> str:
        return self.root.media_type

    @property
    def is_index(self) -> bool:
        return self.root.media_type in (OCI_INDEX, DOCKER_LIST)

    @property
    def manifests(self) -> tuple[Blob, ...]:
        """
        The single-platform manifests (for a single-platform image, just the root).
        """
        return tuple(p.manifest for p in self.platform_images)

    @property
    def configs(self) -> tuple[Blob, ...]:
        return tuple(p.config for p in self.platform_images)

    @property
    def layers(self) -> tuple[Blob, ...]:
        return tuple(layer for p in self.platform_images for layer in p.layers)

    def blobs(self) -> tuple[Blob, ...]:
        """
        Every distinct blob, in an order a registry accepts when pushed first to last: layers and
        configs, then manifests, then the index if there is one.
        """
        ordered: dict[str, Blob] = {}
        for blob in (*self.layers, *self.configs, *self.manifests, self.root):
            ordered.setdefault(blob.digest, blob)
        return tuple(ordered.values())

    def digests(self, platform: Platform | None = None) -> set[str]:
        """
        The digests of every blob of the image, or with C{platform} only those a pull of that
        one platform fetches (the root, and that platform's manifest, config and layers).
        """
        if platform is None:
            return {b.digest for b in self.blobs()}
        image = self.for_platform(platform)
        return {self.root.digest, image.manifest.digest, image.config.digest, *(b.digest for b in image.layers)}

    def blob(self, digest: str) -> Blob:
        """
        The blob with C{digest}.

        @raise KeyError: when the image has none.
        """
        for b in self.blobs():
            if b.digest == digest:
                return b
        raise KeyError(digest)

    def for_platform(self, platform: Platform) -> PlatformImage:
        """
        The single-platform image for C{platform}.

        @raise KeyError: when the image has none for it.
        """
        for p in self.platform_images:
            if p.platform == platform:
                return p
        raise KeyError(str(platform))

    def total_size(self) -> int:
        """
        The sum of all blob sizes.
        """
        return sum(b.size for b in self.blobs())


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_blob(media_type: str, value: object) -> Blob:
    data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8")
    return Blob(media_type=media_type, digest=_sha256(data), size=len(data), data=data)


class _RandomReader:
    """
    A readable file of C{size} pseudo-random bytes determined by C{seed}.
    """

    def __init__(self, seed: str, size: int) -> None:
        self._random = random.Random(seed)
        self._remaining = size
        self._buffer = b""

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._remaining + len(self._buffer)
        while len(self._buffer) < n and self._remaining > 0:
            chunk = min(_RANDOM_CHUNK, self._remaining)
            self._buffer += self._random.randbytes(chunk)
            self._remaining -= chunk
        result, self._buffer = self._buffer[:n], self._buffer[n:]
        return result


class _HashingWriter:
    """
    A writable file that hashes and counts what passes through to C{sink}.
    """

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def build_layer(
    seed: str,
    payload_size: int,
    *,
    format: MediaFormat = MediaFormat.OCI,
    compress: bool = True,
    directory: str | None = None,
) -> tuple[Blob, str]:
    """
    Build one layer: a tar archive holding one file of C{payload_size} random bytes.

    @param compress: gzip the tar (the usual C{+gzip} media type); otherwise the layer is the
        plain tar and its digest equals its diff_id.
    @param directory: write the layer to a file there instead of keeping it in memory.
    @return: the layer blob and its diff_id.
    """
    kind = "layer-gzip" if compress else "layer-tar"
    media_type = _MEDIA_TYPES[format][kind]
    sink: BinaryIO
    if directory is None:
        sink = io.BytesIO()
        path = None
    else:
        os.makedirs(directory, exist_ok=True)
        # Named by digest once known: a temporary name until then.
        path = os.path.join(directory, f".partial-{os.getpid()}-{hashlib.sha256(seed.encode()).hexdigest()[:16]}")
        sink = open(path, "wb")
    try:
        compressed = _HashingWriter(sink)
        gzipper = gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) if compress else None
        uncompressed = _HashingWriter(gzipper if gzipper is not None else compressed)  # type: ignore[arg-type]
        info = tarfile.TarInfo(name=f"spegel-test/{hashlib.sha256(seed.encode()).hexdigest()[:12]}.bin")
        info.size = payload_size
        info.mtime = 0
        info.mode = 0o644
        with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
            archive.addfile(info, _RandomReader(seed, payload_size))
        if gzipper is not None:
            gzipper.close()
    finally:
        if directory is not None:
            sink.close()
    data = sink.getvalue() if isinstance(sink, io.BytesIO) else None
    if path is not None:
        final = os.path.join(os.path.dirname(path), compressed.digest.replace(":", "-"))
        os.replace(path, final)
        path = final
    blob = Blob(media_type=media_type, digest=compressed.digest, size=compressed.size, data=data, path=path)
    return blob, uncompressed.digest


def _platform_image(
    seed: str,
    layer_sizes: Sequence[int],
    format: MediaFormat,
    platform: Platform,
    compress: bool,
    directory: str | None,
) -> PlatformImage:
    layers = []
    diff_ids = []
    for index, size in enumerate(layer_sizes):
        layer, diff_id = build_layer(
            f"{seed}/{platform}/{index}", size, format=format, compress=compress, directory=directory
        )
        layers.append(layer)
        diff_ids.append(diff_id)
    config = _json_blob(
        _MEDIA_TYPES[format]["config"],
        {
            "architecture": platform.architecture,
            "os": platform.os,
            "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Labels": {"spegel.test.seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": f"spegel test layer {i}"}
                for i in range(len(layer_sizes))
            ],
        },
    )
    manifest = _json_blob(
        _MEDIA_TYPES[format]["manifest"],
        {
            "schemaVersion": 2,
            "mediaType": _MEDIA_TYPES[format]["manifest"],
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
    )
    return PlatformImage(
        platform=platform, manifest=manifest, config=config, layers=tuple(layers), diff_ids=tuple(diff_ids)
    )


def build_image(
    *,
    seed: int | str = 0,
    layer_sizes: Sequence[int] = (64 * 1024, 16 * 1024),
    format: MediaFormat = MediaFormat.OCI,
    platform: Platform = LINUX_AMD64,
    compress: bool = True,
    directory: str | None = None,
) -> TestImage:
    """
    Build a single-platform image whose root is its manifest.

    @param layer_sizes: random payload bytes in each layer (the blobs are a little larger: tar
        headers, gzip framing).
    @param compress: gzip'd layers when true, plain tar layers otherwise.
    @param directory: where to write layers as files (for large layers); in memory when L{None}.
    """
    image = _platform_image(f"image/{seed}", layer_sizes, format, platform, compress, directory)
    return TestImage(format=format, root=image.manifest, platform_images=(image,))


def build_index(
    *,
    seed: int | str = 0,
    layer_sizes: Sequence[int] = (64 * 1024, 16 * 1024),
    format: MediaFormat = MediaFormat.OCI,
    platforms: Iterable[Platform] = DEFAULT_PLATFORMS,
    compress: bool = True,
    directory: str | None = None,
) -> TestImage:
    """
    Build a multi-platform image: an index (OCI) or manifest list (Docker) over one
    single-platform image per platform, each with its own random layers.
    """
    images = tuple(
        _platform_image(f"index/{seed}", layer_sizes, format, platform, compress, directory)
        for platform in platforms
    )
    index = _json_blob(
        _MEDIA_TYPES[format]["index"],
        {
            "schemaVersion": 2,
            "mediaType": _MEDIA_TYPES[format]["index"],
            "manifests": [
                {
                    **image.manifest.descriptor(),
                    "platform": {"architecture": image.platform.architecture, "os": image.platform.os},
                }
                for image in images
            ],
        },
    )
    return TestImage(format=format, root=index, platform_images=images)


def iter_chunks(blob: Blob, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """
    The bytes of C{blob} in chunks, without reading it all at once.
    """
    with blob.open() as f:
        while chunk := f.read(chunk_size):
            yield chunk
