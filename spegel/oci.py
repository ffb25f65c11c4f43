# -*- test-case-name: tests.unit.test_oci -*-
"""
The OCI distribution vocabulary spegel speaks: digests, repository names, tags, byte ranges,
manifest media types, image names as containerd stores them, what a manifest or index refers
to, and the errors the distribution spec defines.

Everything here is pure: no I/O, no reactor. The registry resource validates every piece of a
request with these functions before it touches containerd or the disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

from attrs import field, frozen
from werkzeug.http import parse_range_header

from spegel.addresses import InvalidAddress, parse_netloc

# Media types a registry hands out for manifests. containerd stores none for content, so the
# registry sniffs them from the bytes (see sniff_manifest_media_type).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

# The distribution registry refuses manifests larger than this; anything bigger is not a
# manifest we would ever be asked for, so it is never read into memory.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_DIGEST_PATTERNS = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
# From the distribution spec: path components of lowercase alphanumerics joined by
# separators; no empty component, no "." or ".." component can match it.
_REPOSITORY_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_REPOSITORY_COMPONENT}(?:/{_REPOSITORY_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_REPOSITORY_LENGTH = 255


class OCIError(Exception):
    """
    An error with an OCI distribution error code, rendered as the spec's JSON body.

    @ivar status: the HTTP status code of the response.
    @ivar code: the distribution spec's error code.
    """

    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, detail: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = dict(detail or {})

    def to_json(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode("utf-8")


class BlobUnknown(OCIError):
    status, code = 404, "BLOB_UNKNOWN"


class ManifestUnknown(OCIError):
    status, code = 404, "MANIFEST_UNKNOWN"


class NameUnknown(OCIError):
    status, code = 404, "NAME_UNKNOWN"


class NameInvalid(OCIError):
    status, code = 400, "NAME_INVALID"


class DigestInvalid(OCIError):
    status, code = 400, "DIGEST_INVALID"


class TagInvalid(OCIError):
    status, code = 400, "TAG_INVALID"


class RangeNotSatisfiable(OCIError):
    """
    The Range header is malformed, asks for several ranges, or lies outside the content.
    (The distribution spec has no code for this; the name says what went wrong.)
    """

    status, code = 416, "RANGE_INVALID"

    def __init__(self, message: str, size: int | None = None):
        super().__init__(message, {"size": size} if size is not None else None)
        self.size = size


class Unsupported(OCIError):
    status, code = 405, "UNSUPPORTED"


class HeadersTooLarge(OCIError):
    status, code = 431, "UNSUPPORTED"


class MalformedRequest(OCIError):
    status, code = 400, "UNSUPPORTED"


class RequestTimeout(OCIError):
    status, code = 408, "UNSUPPORTED"


class TooManyConnections(OCIError):
    status, code = 429, "TOOMANYREQUESTS"


class TooManyUploads(OCIError):
    """This node is serving as many peers as --max-uploads allows: ask another, or again soon."""

    status, code = 429, "TOOMANYREQUESTS"


def parse_digest(text: str) -> str:
    """
    Validate a content digest (C{sha256:<64 hex>} or C{sha512:<128 hex>}, lowercase).

    @raise DigestInvalid: for anything else.
    """
    algorithm, sep, encoded = text.partition(":")
    pattern = _DIGEST_PATTERNS.get(algorithm)
    if not sep or pattern is None or not pattern.fullmatch(encoded):
        raise DigestInvalid("invalid digest", {"digest": text[:200]})
    return text


def new_hasher(digest: str) -> Any:
    """
    A hash object of C{digest}'s algorithm, to check content against it.
    """
    return hashlib.new(digest.partition(":")[0])


def hashed_digest(hasher: Any) -> str:
    """
    The digest (C{algorithm:hex}) of what C{hasher} has seen.
    """
    return f"{hasher.name}:{hasher.hexdigest()}"


def digest_matches(digest: str, data: bytes) -> bool:
    hasher = new_hasher(digest)
    hasher.update(data)
    return hashed_digest(hasher) == digest


def is_digest(text: str) -> bool:
    try:
        parse_digest(text)
    except DigestInvalid:
        return False
    return True


def parse_repository(text: str) -> str:
    """
    Validate a repository name as the distribution spec defines it. Path traversal (C{..}),
    empty components, upper case and stray characters are all rejected here.

    @raise NameInvalid: when the name does not match.
    """
    if len(text) > MAX_REPOSITORY_LENGTH or not _REPOSITORY.fullmatch(text):
        raise NameInvalid("invalid repository name", {"name": text[:300]})
    return text


def parse_tag(text: str) -> str:
    """
    @raise TagInvalid: when C{text} is not a valid tag.
    """
    if not _TAG.fullmatch(text):
        raise TagInvalid("invalid tag", {"tag": text[:200]})
    return text


def parse_registry_host(text: str) -> str:
    """
    Validate the registry named by C{?ns=} (or by an image name): C{host[:port]} as containerd
    sends it, by the grammar every entry point shares (L{spegel.addresses.parse_netloc}), so the
    node refuses what C{spegel configuration} and the flags refuse (port 0, a URL).

    @return: C{text} as given, not normalised: it must match the image names containerd keeps.
    @raise NameInvalid: when it is not one, saying why.
    """
    try:
        parse_netloc(text)
    except InvalidAddress as e:
        raise NameInvalid(f"invalid registry in ns parameter: {e}", {"ns": text[:300]}) from None
    return text


@frozen
class Reference:
    """
    What a manifest request names: a tag or a digest, in a repository of a registry.

    @ivar registry: the registry host from C{?ns=}, or L{None} when the client sent none.
    """

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def tag_key(self) -> str:
        """
        The key a tag is known by across the cluster: C{registry/repo:tag}.
        """
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def image_name(self) -> str:
        """
        The name containerd gives the image the tag points to.
        """
        return self.tag_key

    @property
    def filter_subject(self) -> str:
        """
        The string the registry filters are matched against: C{registry/repo[:tag]}.
        """
        base = f"{self.registry or ''}/{self.repository}"
        return f"{base}:{self.tag}" if self.tag is not None else base


def parse_reference(registry: str | None, repository: str, reference: str) -> Reference:
    """
    Parse the C{<reference>} of C{/v2/<repo>/manifests/<reference>}: a digest when it
    contains a colon, a tag otherwise.
    """
    repository = parse_repository(repository)
    if ":" in reference:
        return Reference(registry, repository, digest=parse_digest(reference))
    return Reference(registry, repository, tag=parse_tag(reference))


@frozen
class ByteRange:
    """
    An inclusive byte range C{first..last} of content of C{size} bytes.
    """

    first: int
    last: int
    size: int = field()

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


def range_to_honour(range_header: str | None, if_range: str | None, digest: str) -> str | None:
    """
    The C{Range} header to serve, given the request's C{If-Range} (RFC 9110, 13.1.5): with an
    C{If-Range} that is not the blob's strong ETag (C{"<digest>"}, the one spegel sends), the
    range is ignored and the whole blob served, so a client resuming a download of something
    else never gets a piece of this one spliced onto it.  A date never matches: blobs carry no
    C{Last-Modified}.
    """
    if range_header is None or if_range is None:
        return range_header
    return range_header if if_range.strip() == f'"{digest}"' else None


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """
    Parse a C{Range} header against content of C{size} bytes.

    @return: L{None} when there is no header (serve everything), else the one range asked for,
        clamped to the content as RFC 9110 says.
    @raise RangeNotSatisfiable: for a malformed header, several ranges, or a range that starts
        past the end. Rejecting rather than ignoring makes a broken client visible.
    """
    if header is None:
        return None
    parsed = parse_range_header(header.strip())
    if parsed is None or parsed.units != "bytes":
        raise RangeNotSatisfiable("malformed Range header", size)
    if len(parsed.ranges) != 1:
        raise RangeNotSatisfiable("only a single byte range is supported", size)
    first, stop = parsed.ranges[0]
    if stop is None:
        # "bytes=-N": the last N bytes, all of them when N is larger than the blob (RFC 9110;
        # werkzeug's range_for_length refuses that case, so the range is resolved here).
        first = max(0, size + first) if first < 0 else first
        stop = size
    if first >= min(stop, size):
        raise RangeNotSatisfiable("range not satisfiable", size)
    return ByteRange(first, min(stop, size) - 1, size)


def sniff_manifest_media_type(data: bytes) -> str | None:
    """
    Tell which kind of manifest C{data} is, for content containerd stored without a media type.

    The document's own C{mediaType} wins when it is one we know; otherwise its shape decides:
    C{manifests} makes an index, C{config} plus C{layers} a manifest.

    @return: the media type, or L{None} when C{data} is not a manifest at all.
    """
    if len(data) > MAX_MANIFEST_SIZE or not data.lstrip().startswith(b"{"):
        return None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    declared = document.get("mediaType")
    if declared in MANIFEST_MEDIA_TYPES:
        return declared
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("config"), dict) and isinstance(document.get("layers"), list):
        return OCI_MANIFEST
    return None


# Image names and manifests ------------------------------------------------------------------


class UnparseableImageName(ValueError):
    """
    An image name that does not look like C{registry/repository[:tag][@digest]}, such as the
    C{sha256:...} image ids the CRI plugin also stores as names.
    """


class InvalidManifest(ValueError):
    """
    Content that should be a manifest or index but is not one spegel can read.
    """


def parse_image_name(name: str) -> Reference:
    """
    Split a containerd image name into registry (the first path component), repository, tag
    (after the last C{:} of the last component) and digest (after C{@}).

    @raise UnparseableImageName: for anything that is not such a name.
    """
    rest, at, digest_text = name.partition("@")
    registry, slash, path = rest.partition("/")
    if not slash:
        raise UnparseableImageName(f"no registry in image name {name!r}")
    tag = None
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        path, tag = path[:colon], path[colon + 1 :]
    try:
        parse_registry_host(registry)
        parse_repository(path)
        if tag is not None:
            parse_tag(tag)
        digest = parse_digest(digest_text) if at else None
    except OCIError as e:
        raise UnparseableImageName(f"{e.message} in image name {name!r}") from None
    return Reference(registry, path, tag=tag, digest=digest)


def whole_blob_headers(digest: str, size: int) -> tuple[tuple[bytes, bytes], ...]:
    """
    The headers of the whole blob C{digest} of C{size} bytes, as (name, value) pairs: what this
    node sends with its own content, and with a peer's before it is at hand (L{spegel.latebody}).
    """
    return (
        (b"Content-Type", b"application/octet-stream"),
        (b"Accept-Ranges", b"bytes"),
        (b"Docker-Content-Digest", digest.encode("ascii")),
        (b"ETag", f'"{digest}"'.encode("ascii")),
        (b"Content-Length", str(size).encode("ascii")),
    )


@frozen
class ManifestReferences:
    """
    What one manifest or index refers to.

    @ivar manifests: an index's children, as C{(digest, media type or None)}.
    @ivar blobs: a manifest's config and layers.
    @ivar blob_sizes: the size each of C{blobs} has by its descriptor (L{None} where the
        descriptor gives none that is a whole number).
    @ivar skipped: descriptors left out because they carried no valid digest.
    """

    manifests: tuple[tuple[str, str | None], ...] = ()
    blobs: tuple[str, ...] = ()
    blob_sizes: tuple[int | None, ...] = ()
    skipped: int = 0


def _descriptor_digest(entry: object) -> str | None:
    if isinstance(entry, dict):
        digest = entry.get("digest")
        if isinstance(digest, str) and is_digest(digest):
            return digest
    return None


def _descriptor_size(entry: dict[str, object]) -> int | None:
    size = entry.get("size")
    # JSON's true is a Python int too, and no size.
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


def manifest_references(data: bytes, media_type: str | None) -> ManifestReferences:
    """
    The digests an index or image manifest refers to.

    @param media_type: the descriptor's media type; when it is not a manifest type (containerd
        may store none), the document's own shape decides.
    @raise InvalidManifest: when C{data} is not a JSON index or manifest.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InvalidManifest(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise InvalidManifest("not a JSON object")
    kind = media_type if media_type in MANIFEST_MEDIA_TYPES else sniff_manifest_media_type(data)
    if kind is None:
        raise InvalidManifest("neither an index nor an image manifest")
    skipped = 0
    if kind in INDEX_MEDIA_TYPES:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifest("index without a manifests list")
        manifests = []
        for entry in entries:
            digest = _descriptor_digest(entry)
            if digest is None:
                skipped += 1
                continue
            child_type = entry.get("mediaType")
            manifests.append((digest, child_type if isinstance(child_type, str) else None))
        return ManifestReferences(manifests=tuple(manifests), skipped=skipped)
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("manifest without a layers list")
    blobs = []
    sizes = []
    for entry in [document.get("config"), *layers]:
        digest = _descriptor_digest(entry)
        if digest is None:
            skipped += 1
        else:
            blobs.append(digest)
            sizes.append(_descriptor_size(entry))
    return ManifestReferences(blobs=tuple(blobs), blob_sizes=tuple(sizes), skipped=skipped)
