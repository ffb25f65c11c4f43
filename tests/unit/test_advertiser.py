# -*- test-case-name: tests.unit.test_advertiser -*-
"""
Tests for L{spegel.advertiser}: an in-memory containerd, a router that records what it is told,
and a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from spegel import advertiser, imagewalk
from spegel.advertiser import Advertiser
from spegel.containerd.client import (
    ContainerdError,
    ContainerdUnavailable,
    ContentInfo,
    ContentNotFound,
    Descriptor,
    Image,
    ImageNotFound,
)
from spegel.containerd.events import ContentEvent, ImageEvent
from spegel.metrics import Metrics
from spegel.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    InvalidManifest,
    Reference,
    UnparseableImageName,
    manifest_references,
    parse_image_name,
)
from spegel.registry import RegistryFilter

_T = TypeVar("_T")

REGISTRY_HOST = "127.0.0.1:5000"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_json(config: str, layers: Iterable[str], media_type: str | None = OCI_MANIFEST) -> bytes:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": 1} for d in layers],
    }
    if media_type is not None:
        document["mediaType"] = media_type
    return json.dumps(document).encode()


def index_json(children: Iterable[str], media_type: str = OCI_INDEX, child_type: str = OCI_MANIFEST) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": child_type, "digest": d, "size": 1, "platform": {"os": "linux", "architecture": f"a{i}"}}
                for i, d in enumerate(children)
            ],
        }
    ).encode()


class FakeContainerd:
    """
    containerd's images and content in memory.  Answers are computed when asked; methods named
    in C{held} keep their Deferreds in C{pending} until the test fires them.
    """

    def __init__(self) -> None:
        self.images: dict[str, Image] = {}
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.unavailable = False
        self.calls: Counter[str] = Counter()
        self.held: set[str] = set()
        self.pending: list[tuple[str, Deferred[Any], Callable[[Deferred[Any]], None]]] = []
        self.raise_once: dict[str, Exception] = {}

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def tag(self, name: str, digest: str, media_type: str = OCI_MANIFEST) -> Image:
        image = Image(name=name, target=Descriptor(media_type, digest, len(self.blobs.get(digest, b""))))
        self.images[name] = image
        return image

    def release(self, method: str | None = None) -> None:
        """
        Fire the first held call (of C{method}).
        """
        for i, (name, d, fire) in enumerate(self.pending):
            if method is None or name == method:
                del self.pending[i]
                fire(d)
                return
        raise AssertionError(f"no held call of {method}")

    def _answer(self, method: str, compute: Callable[[], _T]) -> Deferred[_T]:
        self.calls[method] += 1
        if method in self.raise_once:
            raise self.raise_once.pop(method)
        try:
            if self.unavailable:
                raise ContainerdUnavailable("UNAVAILABLE: connection refused")
            result: _T = compute()
        except ContainerdError as e:
            error = e
            outcome: Callable[[Deferred[Any]], None] = lambda d: d.errback(error)
            immediate: Callable[[], Deferred[_T]] = lambda: fail(error)
        else:
            outcome = lambda d: d.callback(result)
            immediate = lambda: succeed(result)
        if method in self.held:
            d: Deferred[_T] = Deferred()
            self.pending.append((method, d, outcome))
            return d
        return immediate()

    def list_images(self, filters: Iterable[str] = ()) -> Deferred[list[Image]]:
        return self._answer("list_images", lambda: list(self.images.values()))

    def get_image(self, name: str) -> Deferred[Image]:
        def get() -> Image:
            if name not in self.images:
                raise ImageNotFound(f"NOT_FOUND: image {name}")
            return self.images[name]

        return self._answer("get_image", get)

    def content_info(self, digest: str) -> Deferred[ContentInfo]:
        def info() -> ContentInfo:
            if digest not in self.blobs:
                raise ContentNotFound(f"NOT_FOUND: content {digest}")
            return ContentInfo(digest, len(self.blobs[digest]), dict(self.labels.get(digest, {})))

        return self._answer("content_info", info)

    def read_content(self, digest: str, offset: int, size: int) -> Deferred[bytes]:
        def read() -> bytes:
            if digest not in self.blobs:
                raise ContentNotFound(f"NOT_FOUND: content {digest}")
            return self.blobs[digest][offset : offset + size]

        return self._answer("read_content", read)


class RecordingRouter:
    """
    Records every call and keeps the resulting set of keys, as L{DHTService} does.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.keys: set[str] = set()

    def provide(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.calls.append(("provide", keys))
        self.keys.update(keys)

    def withdraw(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.calls.append(("withdraw", keys))
        self.keys.difference_update(keys)

    def provided(self) -> list[str]:
        return [k for method, keys in self.calls if method == "provide" for k in keys]

    def withdrawn(self) -> list[str]:
        return [k for method, keys in self.calls if method == "withdraw" for k in keys]


class SingleImage:
    """
    A one-platform image put in C{containerd}: config and layers stored unless told otherwise.
    """

    def __init__(self, containerd: FakeContainerd, seed: str, layers: int = 2, stored_layers: int | None = None):
        self.config = containerd.put(f"config {seed}".encode())
        layer_data = [f"layer {seed} {i}".encode() for i in range(layers)]
        stored = layers if stored_layers is None else stored_layers
        self.layers = [containerd.put(d) if i < stored else sha256(d) for i, d in enumerate(layer_data)]
        self.manifest = containerd.put(manifest_json(self.config, self.layers))

    @property
    def digests(self) -> set[str]:
        return {self.manifest, self.config, *self.layers}


class AdvertiserTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.containerd = FakeContainerd()
        self.router = RecordingRouter()
        self.metrics = Metrics()
        self.log_events: list[dict[str, Any]] = []
        # The walk logs from its own module.
        for module in (advertiser, imagewalk):
            self.patch(module, "_log", Logger(observer=cast(ILogObserver, self.log_events.append)))

    def make(self, registry_filter: RegistryFilter = RegistryFilter(), **kwargs: Any) -> Advertiser:
        return Advertiser(self.clock, self.containerd, self.router, registry_filter, metrics=self.metrics, **kwargs)  # type: ignore[arg-type]

    def resync(self, a: Advertiser) -> None:
        self.assertIsNone(self.successResultOf(a.resync()))

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events if text in e.get("log_format", "")]


class ParseImageNameTests(SynchronousTestCase):
    def test_registry_with_port(self) -> None:
        self.assertEqual(
            parse_image_name("127.0.0.1:5000/team/app:v1"), Reference("127.0.0.1:5000", "team/app", tag="v1")
        )

    def test_docker_hub(self) -> None:
        self.assertEqual(
            parse_image_name("docker.io/library/nginx:1.25"), Reference("docker.io", "library/nginx", tag="1.25")
        )

    def test_digest_only(self) -> None:
        digest = sha256(b"x")
        self.assertEqual(
            parse_image_name(f"docker.io/library/nginx@{digest}"),
            Reference("docker.io", "library/nginx", digest=digest),
        )

    def test_tag_and_digest(self) -> None:
        digest = sha256(b"x")
        self.assertEqual(
            parse_image_name(f"ghcr.io/a/b:v2@{digest}"), Reference("ghcr.io", "a/b", tag="v2", digest=digest)
        )

    def test_no_tag(self) -> None:
        self.assertEqual(parse_image_name("ghcr.io/a/b"), Reference("ghcr.io", "a/b"))

    def test_unparseable(self) -> None:
        for name in [
            sha256(b"image id"),
            "nginx:1.25",
            "docker.io/Library/nginx:1",
            "docker.io/library/nginx:bad tag",
            "docker.io/library/nginx@sha256:short",
            "docker.io//nginx:1",
            "bad host!/repo:1",
            "",
        ]:
            with self.subTest(name=name):
                self.assertRaises(UnparseableImageName, parse_image_name, name)


class ManifestReferencesTests(SynchronousTestCase):
    def test_manifest(self) -> None:
        config, layers = sha256(b"c"), [sha256(b"l1"), sha256(b"l2")]
        references = manifest_references(manifest_json(config, layers), OCI_MANIFEST)
        self.assertEqual(references.blobs, (config, *layers))
        self.assertEqual(references.blob_sizes, (1, 1, 1))
        self.assertEqual(references.manifests, ())

    def test_sizes_that_are_no_size(self) -> None:
        """A descriptor's size is its blob's only when it is a whole number: JSON's true is not."""
        layers = [sha256(b"l%d" % n) for n in range(5)]
        sizes = [7, -1, True, "7", None]
        data = json.dumps({
            "config": {"digest": layers[0], "size": 0},
            "layers": [{"digest": d, "size": s} for d, s in zip(layers, sizes)],
        }).encode()
        references = manifest_references(data, OCI_MANIFEST)
        self.assertEqual(references.blob_sizes, (0, 7, None, None, None, None))

    def test_index(self) -> None:
        children = [sha256(b"m1"), sha256(b"m2")]
        references = manifest_references(index_json(children), OCI_INDEX)
        self.assertEqual(references.manifests, tuple((c, OCI_MANIFEST) for c in children))
        self.assertEqual(references.blobs, ())

    def test_sniffed_when_media_type_unknown(self) -> None:
        children = [sha256(b"m1")]
        data = index_json(children, DOCKER_MANIFEST_LIST)
        self.assertEqual(manifest_references(data, None).manifests, ((children[0], OCI_MANIFEST),))
        config = sha256(b"c")
        self.assertEqual(manifest_references(manifest_json(config, [], None), "").blobs, (config,))

    def test_bad_descriptors_skipped(self) -> None:
        good = sha256(b"l")
        data = json.dumps(
            {"config": {"digest": "md5:abc"}, "layers": [{"digest": good}, "junk", {"digest": 7}, {}]}
        ).encode()
        references = manifest_references(data, DOCKER_MANIFEST)
        self.assertEqual(references.blobs, (good,))
        self.assertEqual(references.skipped, 4)

    def test_invalid(self) -> None:
        for data, media_type in [
            (b"not json", OCI_MANIFEST),
            (b"[1, 2]", OCI_INDEX),
            (b'{"manifests": {}}', OCI_INDEX),
            (b'{"config": {}, "layers": "x"}', OCI_MANIFEST),
            (b'{"hello": "world"}', None),
            (b"[" * 100000, OCI_MANIFEST),
        ]:
            with self.subTest(data=data[:20]):
                self.assertRaises(InvalidManifest, manifest_references, data, media_type)


class WalkTests(AdvertiserTestCase):
    def test_single_manifest_image(self) -> None:
        """
        Every digest of a one-platform image and its tag key are provided.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag(f"{REGISTRY_HOST}/team/app:v1", image.manifest)
        a = self.make()
        self.resync(a)
        expected = image.digests | {f"{REGISTRY_HOST}/team/app:v1"}
        self.assertEqual(a.advertised_keys, expected)
        self.assertEqual(self.router.keys, expected)
        self.assertEqual(sorted(self.router.provided()), sorted(expected))

    def test_index_with_missing_platform(self) -> None:
        """
        Only the platforms present are walked; the missing one and its blobs are not provided.
        """
        present = SingleImage(self.containerd, "amd64")
        absent = SingleImage(self.containerd, "arm64")
        for digest in absent.digests:
            del self.containerd.blobs[digest]
        index = self.containerd.put(index_json([present.manifest, absent.manifest]))
        self.containerd.tag("docker.io/library/nginx:1.25", index, OCI_INDEX)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, {index, "docker.io/library/nginx:1.25"} | present.digests)

    def test_every_present_platform(self) -> None:
        platforms = [SingleImage(self.containerd, str(i)) for i in range(3)]
        index = self.containerd.put(index_json([p.manifest for p in platforms]))
        self.containerd.tag("docker.io/library/nginx:1.25", index, OCI_INDEX)
        a = self.make()
        self.resync(a)
        self.assertEqual(
            a.advertised_keys,
            {index, "docker.io/library/nginx:1.25"}.union(*(p.digests for p in platforms)),
        )

    def test_missing_layer_skipped(self) -> None:
        """
        A missing layer is not provided, and neither is the tag: a peer resolving it here could
        not pull the image from here.  The digests present are.
        """
        image = SingleImage(self.containerd, "a", layers=3, stored_layers=2)
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, image.digests - {image.layers[2]})
        # The layer arrives (2.1+ says so with /content/create): now the tag goes out too.
        self.containerd.put(b"layer a 2")
        a.on_event(ContentEvent("create", image.layers[2]))
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})

    def test_index_tag_needs_a_complete_platform(self) -> None:
        """
        An index whose only present platform lacks a layer (a pull in progress) advertises
        its digests but not its tag; one complete platform is enough, beside a platform that
        is absent or present without its layers (containerd 2.x fetches other platforms'
        manifests and configs).
        """
        partial = SingleImage(self.containerd, "partial", layers=2, stored_layers=1)
        index = self.containerd.put(index_json([partial.manifest]))
        self.containerd.tag("docker.io/library/multi:1", index, OCI_INDEX)
        a = self.make()
        self.resync(a)
        self.assertNotIn("docker.io/library/multi:1", a.advertised_keys)
        self.assertIn(index, a.advertised_keys)
        whole = SingleImage(self.containerd, "whole")
        absent = SingleImage(self.containerd, "absent")
        for digest in absent.digests:
            del self.containerd.blobs[digest]
        layerless = SingleImage(self.containerd, "layerless", layers=2, stored_layers=0)
        other = self.containerd.put(index_json([whole.manifest, absent.manifest, layerless.manifest]))
        self.containerd.tag("docker.io/library/multi:2", other, OCI_INDEX)
        self.resync(a)
        self.assertIn("docker.io/library/multi:2", a.advertised_keys)

    def test_missing_root(self) -> None:
        """
        An image whose root is not in the store advertises nothing, not even its tag.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        del self.containerd.blobs[image.manifest]
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, frozenset())
        self.assertEqual(self.router.calls, [])

    def test_sniffed_docker_manifest_list(self) -> None:
        """
        A target stored without a media type is recognised from its bytes.
        """
        image = SingleImage(self.containerd, "a")
        index = self.containerd.put(index_json([image.manifest], DOCKER_MANIFEST_LIST))
        self.containerd.tag("docker.io/library/app:1", index, "")
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, image.digests | {index, "docker.io/library/app:1"})

    def test_bad_json_subtree_skipped(self) -> None:
        """
        A child manifest that is not JSON is left out with everything under it; the rest of the
        image is advertised, and the failure is logged once, not at every resync.
        """
        good = SingleImage(self.containerd, "good")
        bad = self.containerd.put(b"{not json")
        index = self.containerd.put(index_json([good.manifest, bad]))
        self.containerd.tag("docker.io/library/app:1", index, OCI_INDEX)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, good.digests | {index, "docker.io/library/app:1"})
        self.resync(a)
        self.assertEqual(len(self.logged("not a manifest spegel can read")), 1)

    def test_torn_read_not_advertised(self) -> None:
        """
        Bytes that do not hash to their digest make the manifest unadvertised, and are read
        again next time rather than remembered.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        original = self.containerd.blobs[image.manifest]
        self.containerd.blobs[image.manifest] = original.replace(b"schemaVersion", b"schemaVersioN")
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, frozenset())
        self.containerd.blobs[image.manifest] = original
        self.resync(a)
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})

    def test_oversized_manifest_not_read(self) -> None:
        big = sha256(b"big")
        self.containerd.blobs[big] = b" " * (4 * 1024 * 1024 + 1)
        self.containerd.tag("docker.io/library/big:1", big)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, frozenset())
        self.assertEqual(self.containerd.calls["read_content"], 0)

    def test_manifests_read_once(self) -> None:
        """
        A resync re-checks presence but reads no manifest it has already read.
        """
        platforms = [SingleImage(self.containerd, str(i)) for i in range(2)]
        index = self.containerd.put(index_json([p.manifest for p in platforms]))
        self.containerd.tag("docker.io/library/app:1", index, OCI_INDEX)
        a = self.make()
        self.resync(a)
        self.assertEqual(self.containerd.calls["read_content"], 3)
        infos = self.containerd.calls["content_info"]
        self.resync(a)
        self.assertEqual(self.containerd.calls["read_content"], 3)
        self.assertEqual(self.containerd.calls["content_info"], 2 * infos)

    def test_shared_content_asked_once_per_resync(self) -> None:
        """
        The CRI plugin names each image by tag and by digest: one walk serves both.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.containerd.tag(f"docker.io/library/app@{image.manifest}", image.manifest)
        self.containerd.tag(image.manifest, image.manifest)  # the image id, as CRI stores it
        a = self.make()
        self.resync(a)
        self.assertEqual(self.containerd.calls["content_info"], len(image.digests))
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})

    def test_nested_index_depth_limited(self) -> None:
        image = SingleImage(self.containerd, "a")
        digest = image.manifest
        chain = []
        for i in range(imagewalk.MAX_INDEX_DEPTH + 1):
            digest = self.containerd.put(index_json([digest], child_type=OCI_INDEX if i else OCI_MANIFEST))
            chain.append(digest)
        self.containerd.tag("docker.io/library/deep:1", digest, OCI_INDEX)
        a = self.make()
        self.resync(a)
        # The root is at depth 0; the index at MAX_INDEX_DEPTH is advertised, not followed (so
        # no manifest is reached, and the tag is not advertised).
        self.assertEqual(a.advertised_keys, set(chain))
        self.assertEqual(len(self.logged("nested more than")), 1)


class FilterTests(AdvertiserTestCase):
    def test_registry_not_mirrored(self) -> None:
        mirrored = SingleImage(self.containerd, "m")
        other = SingleImage(self.containerd, "o")
        self.containerd.tag("docker.io/library/app:1", mirrored.manifest)
        self.containerd.tag("quay.io/team/app:1", other.manifest)
        a = self.make(RegistryFilter(frozenset({"docker.io"})))
        self.resync(a)
        self.assertEqual(a.advertised_keys, mirrored.digests | {"docker.io/library/app:1"})

    def test_pattern_refuses(self) -> None:
        allowed = SingleImage(self.containerd, "a")
        refused = SingleImage(self.containerd, "r")
        self.containerd.tag("docker.io/library/app:1", allowed.manifest)
        self.containerd.tag("docker.io/secret/app:1", refused.manifest)
        a = self.make(RegistryFilter(patterns=(re.compile("/secret/"),)))
        self.resync(a)
        self.assertEqual(a.advertised_keys, allowed.digests | {"docker.io/library/app:1"})
        # An event for a refused image changes nothing either.
        a.on_event(ImageEvent("create", "docker.io/secret/app:1"))
        self.assertEqual(a.advertised_keys, allowed.digests | {"docker.io/library/app:1"})

    def test_refused_image_shares_digest(self) -> None:
        """
        A blob both images have stays advertised for the allowed one only; nothing of the
        refused one leaks.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.containerd.tag("docker.io/secret/app:1", image.manifest)
        a = self.make(RegistryFilter(patterns=(re.compile("/secret/"),)))
        self.resync(a)
        self.assertNotIn("docker.io/secret/app:1", a.advertised_keys)
        self.containerd.images.pop("docker.io/library/app:1")
        a.on_event(ImageEvent("delete", "docker.io/library/app:1"))
        self.assertEqual(a.advertised_keys, frozenset())

    def test_unparseable_names_skipped_digest_refs_kept(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag(image.manifest, image.manifest)
        self.containerd.tag("localimage", image.manifest)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, frozenset())
        self.containerd.tag(f"docker.io/library/app@{image.manifest}", image.manifest)
        self.resync(a)
        self.assertEqual(a.advertised_keys, image.digests)

    def test_tag_with_digest_gives_no_tag_key(self) -> None:
        """
        A name pinned by digest cannot be found by tag here, so its tag is not advertised.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag(f"docker.io/library/app:1@{image.manifest}", image.manifest)
        a = self.make()
        self.resync(a)
        self.assertEqual(a.advertised_keys, image.digests)


class EventTests(AdvertiserTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.make()
        self.resync(self.a)

    def test_image_create(self) -> None:
        """
        A created image is provided at once, without waiting for a resync.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        lists = self.containerd.calls["list_images"]
        self.a.on_event(ImageEvent("create", "docker.io/library/app:1"))
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})
        self.assertEqual(self.containerd.calls["list_images"], lists)

    def test_image_update(self) -> None:
        """
        A tag moved to another image: what only the old one had is withdrawn, the new provided,
        the shared kept.
        """
        old = SingleImage(self.containerd, "old")
        self.containerd.tag("docker.io/library/app:latest", old.manifest)
        self.a.on_event(ImageEvent("create", "docker.io/library/app:latest"))
        new_layer = self.containerd.put(b"new layer")
        new_manifest = self.containerd.put(manifest_json(old.config, [old.layers[0], new_layer]))
        self.containerd.tag("docker.io/library/app:latest", new_manifest)
        del self.router.calls[:]
        self.a.on_event(ImageEvent("update", "docker.io/library/app:latest"))
        self.assertEqual(sorted(self.router.withdrawn()), sorted([old.manifest, old.layers[1]]))
        self.assertEqual(sorted(self.router.provided()), sorted([new_manifest, new_layer]))
        self.assertEqual(
            self.router.keys,
            {new_manifest, old.config, old.layers[0], new_layer, "docker.io/library/app:latest"},
        )

    def test_image_delete(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.a.on_event(ImageEvent("create", "docker.io/library/app:1"))
        del self.containerd.images["docker.io/library/app:1"]
        self.a.on_event(ImageEvent("delete", "docker.io/library/app:1"))
        self.assertEqual(self.router.keys, set())
        self.assertEqual(sorted(self.router.withdrawn()), sorted(image.digests | {"docker.io/library/app:1"}))

    def test_create_of_deleted_image(self) -> None:
        """
        An image deleted before its create event was handled is not advertised.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.resync(self.a)
        del self.containerd.images["docker.io/library/app:1"]
        self.a.on_event(ImageEvent("update", "docker.io/library/app:1"))
        self.assertEqual(self.router.keys, set())

    def test_shared_digests_delete_one(self) -> None:
        """
        Deleting one of two images sharing content withdraws only what the other lacks.
        """
        first = SingleImage(self.containerd, "first")
        second_layer = self.containerd.put(b"second's own layer")
        second = self.containerd.put(manifest_json(first.config, [first.layers[0], second_layer]))
        self.containerd.tag("docker.io/library/first:1", first.manifest)
        self.containerd.tag("docker.io/library/second:1", second)
        self.containerd.tag("docker.io/library/first:alias", first.manifest)
        self.resync(self.a)
        del self.containerd.images["docker.io/library/first:1"]
        self.a.on_event(ImageEvent("delete", "docker.io/library/first:1"))
        self.assertEqual(self.router.withdrawn(), ["docker.io/library/first:1"])
        del self.containerd.images["docker.io/library/first:alias"]
        self.a.on_event(ImageEvent("delete", "docker.io/library/first:alias"))
        self.assertEqual(
            sorted(self.router.withdrawn()),
            sorted(["docker.io/library/first:1", "docker.io/library/first:alias", first.manifest, first.layers[1]]),
        )
        self.assertEqual(
            self.router.keys, {second, first.config, first.layers[0], second_layer, "docker.io/library/second:1"}
        )

    def test_content_delete(self) -> None:
        """
        Deleted content is withdrawn at once, and provided again by a resync if it came back.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.resync(self.a)
        data = self.containerd.blobs.pop(image.layers[0])
        self.a.on_event(ContentEvent("delete", image.layers[0]))
        self.assertNotIn(image.layers[0], self.router.keys)
        self.assertIn(image.layers[1], self.router.keys)
        self.containerd.blobs[image.layers[0]] = data
        self.resync(self.a)
        self.assertIn(image.layers[0], self.router.keys)

    def test_root_content_delete_withdraws_tag(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.resync(self.a)
        del self.containerd.blobs[image.manifest]
        self.a.on_event(ContentEvent("delete", image.manifest))
        self.assertEqual(self.router.keys, {image.config, *image.layers})

    def test_content_delete_unknown(self) -> None:
        self.a.on_event(ContentEvent("delete", sha256(b"unknown")))
        self.assertEqual(self.router.calls, [])

    def test_content_create(self) -> None:
        """
        A layer that arrives for a known image is provided at once.
        """
        layer_data = b"late layer"
        layer = sha256(layer_data)
        config = self.containerd.put(b"config")
        manifest = self.containerd.put(manifest_json(config, [layer]))
        self.containerd.tag("docker.io/library/app:1", manifest)
        self.resync(self.a)
        self.assertNotIn(layer, self.router.keys)
        self.containerd.blobs[layer] = layer_data
        self.a.on_event(ContentEvent("create", layer))
        self.assertIn(layer, self.router.keys)

    def test_content_create_platform(self) -> None:
        """
        A platform manifest that arrives is walked, with its blobs.
        """
        present = SingleImage(self.containerd, "amd64")
        late = SingleImage(self.containerd, "arm64")
        manifest_data = self.containerd.blobs.pop(late.manifest)
        index = self.containerd.put(index_json([present.manifest, late.manifest]))
        self.containerd.tag("docker.io/library/app:1", index, OCI_INDEX)
        self.resync(self.a)
        self.assertFalse(late.digests & self.router.keys)
        self.containerd.blobs[late.manifest] = manifest_data
        self.a.on_event(ContentEvent("create", late.manifest))
        self.assertEqual(self.router.keys, present.digests | late.digests | {index, "docker.io/library/app:1"})

    def test_content_create_unknown(self) -> None:
        """
        A blob no image refers to and that no registry pull labelled (see L{LooseContentTests})
        is looked at, not walked as part of an image, and not advertised.
        """
        digest = self.containerd.put(b"unrelated")
        calls = self.containerd.calls["content_info"]
        self.a.on_event(ContentEvent("create", digest))
        for wait in advertiser.LOOSE_LABEL_WAITS:
            self.clock.advance(wait)
        self.assertEqual(self.router.calls, [])
        self.assertEqual(self.containerd.calls["content_info"], calls + len(advertiser.LOOSE_LABEL_WAITS))
        self.assertEqual(self.containerd.calls["read_content"], 0)


class ResyncTests(AdvertiserTestCase):
    def test_stale_keys_withdrawn(self) -> None:
        """
        An image gone without an event (its event lost) is withdrawn by the next resync.
        """
        kept = SingleImage(self.containerd, "kept")
        gone = SingleImage(self.containerd, "gone")
        self.containerd.tag("docker.io/library/kept:1", kept.manifest)
        self.containerd.tag("docker.io/library/gone:1", gone.manifest)
        a = self.make()
        self.resync(a)
        del self.containerd.images["docker.io/library/gone:1"]
        for digest in gone.digests - kept.digests:
            del self.containerd.blobs[digest]
        del self.router.calls[:]
        self.resync(a)
        self.assertEqual(sorted(self.router.withdrawn()), sorted(gone.digests | {"docker.io/library/gone:1"}))
        self.assertEqual(self.router.provided(), [])
        self.assertEqual(a.advertised_keys, kept.digests | {"docker.io/library/kept:1"})

    def test_unchanged_resync_is_silent(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.resync(a)
        del self.router.calls[:]
        self.resync(a)
        self.assertEqual(self.router.calls, [])

    def test_serialized(self) -> None:
        """
        Resyncs never overlap: those asked for during one run once after it.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.containerd.held.add("list_images")
        a = self.make()
        first = a.resync()
        second = a.resync()
        third = a.resync()
        self.assertEqual(self.containerd.calls["list_images"], 1)
        self.assertNoResult(first)
        self.containerd.release("list_images")
        self.successResultOf(first)
        # The follow-up run lists again: the first listed before the others were asked for.
        self.assertEqual(self.containerd.calls["list_images"], 2)
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.containerd.release("list_images")
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(self.containerd.calls["list_images"], 2)
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})

    def test_event_during_resync_survives(self) -> None:
        """
        An image created after a slow resync listed stays advertised when that resync applies.
        """
        a = self.make()
        self.containerd.held.add("list_images")
        d = a.resync()
        self.containerd.held.clear()
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a.on_event(ImageEvent("create", "docker.io/library/app:1"))
        self.assertIn("docker.io/library/app:1", self.router.keys)
        self.containerd.release("list_images")  # lists no images
        self.successResultOf(d)
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})
        self.assertEqual(self.router.withdrawn(), [])

    def test_delete_during_resync_survives(self) -> None:
        """
        An image deleted after a slow resync listed it is not brought back by that resync.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.containerd.held.add("list_images")
        d = a.resync()
        self.containerd.held.clear()
        del self.containerd.images["docker.io/library/app:1"]
        a.on_event(ImageEvent("delete", "docker.io/library/app:1"))
        self.containerd.release("list_images")
        self.successResultOf(d)
        self.assertEqual(a.advertised_keys, frozenset())
        self.assertEqual(self.router.keys, set())

    def test_content_deleted_during_resync(self) -> None:
        """
        A blob a slow resync found present but deleted before it applied is not provided.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.containerd.held.add("content_info")
        d = a.resync()
        self.containerd.release("content_info")  # the manifest
        self.containerd.held.clear()
        pending = len(self.containerd.pending)
        self.assertEqual(pending, len(image.digests) - 1)
        del self.containerd.blobs[image.layers[1]]
        a.on_event(ContentEvent("delete", image.layers[1]))
        while self.containerd.pending:
            self.containerd.release()
        self.successResultOf(d)
        # The tag too is held back while a layer is missing.
        self.assertEqual(a.advertised_keys, image.digests - {image.layers[1]})
        # Created again: the image is walked again and the layer, and the tag, provided.
        self.containerd.put(b"layer a 1")
        a.on_event(ContentEvent("create", image.layers[1]))
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})

    def test_older_event_walk_loses(self) -> None:
        """
        Of two walks of one image, the one started last wins whatever the order they finish in.
        """
        old = SingleImage(self.containerd, "old")
        new = SingleImage(self.containerd, "new")
        a = self.make()
        self.containerd.tag("docker.io/library/app:1", old.manifest)
        self.containerd.held.add("get_image")
        a.on_event(ImageEvent("create", "docker.io/library/app:1"))
        self.containerd.tag("docker.io/library/app:1", new.manifest)
        a.on_event(ImageEvent("update", "docker.io/library/app:1"))
        self.containerd.held.clear()
        second = self.containerd.pending.pop()
        second[2](second[1])
        self.containerd.release("get_image")
        self.assertEqual(a.advertised_keys, new.digests | {"docker.io/library/app:1"})
        self.assertEqual(self.router.keys, new.digests | {"docker.io/library/app:1"})


class UnavailableTests(AdvertiserTestCase):
    def test_keeps_advertised_and_logs_once(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.resync(a)
        self.containerd.unavailable = True
        self.resync(a)
        self.resync(a)
        a.on_event(ImageEvent("update", "docker.io/library/app:1"))
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})
        self.assertEqual(self.router.withdrawn(), [])
        self.assertEqual(len(self.logged("containerd is unavailable")), 1)
        self.containerd.unavailable = False
        self.resync(a)
        self.assertEqual(len(self.logged("reachable again")), 1)
        self.containerd.unavailable = True
        self.resync(a)
        self.assertEqual(len(self.logged("containerd is unavailable")), 2)

    def test_outage_mid_walk_keeps_previous(self) -> None:
        """
        containerd going away during a walk must not be taken for all content being gone.
        """
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.resync(a)
        self.containerd.images.pop("docker.io/library/app:1")
        other = SingleImage(self.containerd, "b")
        self.containerd.tag("docker.io/library/other:1", other.manifest)
        self.containerd.held.add("content_info")
        d = a.resync()
        self.containerd.unavailable = True
        self.containerd.held.clear()
        self.containerd.release("content_info")
        self.successResultOf(d)
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})

    def test_other_errors_keep_advertised(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        self.resync(a)
        original = self.containerd.list_images
        self.containerd.list_images = lambda filters=(): fail(ContainerdError("INTERNAL: boom"))  # type: ignore[method-assign]
        self.resync(a)
        self.containerd.list_images = original  # type: ignore[method-assign]
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})
        self.assertEqual(len(self.logged("containerd call failed")), 1)


class ServiceTests(AdvertiserTestCase):
    def test_resync_at_start_and_every_interval(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make(reconcile_interval=30.0)
        a.startService()
        self.addCleanup(a.stopService)
        self.assertEqual(self.containerd.calls["list_images"], 1)
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})
        self.clock.advance(29)
        self.assertEqual(self.containerd.calls["list_images"], 1)
        self.clock.advance(1)
        self.assertEqual(self.containerd.calls["list_images"], 2)

    def test_loop_survives_exception(self) -> None:
        """
        An unexpected error in one reconcile is logged; the next one still runs.
        """
        a = self.make(reconcile_interval=30.0)
        self.containerd.raise_once["list_images"] = RuntimeError("bug")
        a.startService()
        self.addCleanup(a.stopService)
        self.assertEqual(len(self.logged("Resync failed")), 1)
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        self.clock.advance(30)
        self.assertEqual(self.containerd.calls["list_images"], 2)
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})

    def test_slow_resync_does_not_stack(self) -> None:
        """
        Reconciles due while a resync hangs fold into one follow-up run.
        """
        a = self.make(reconcile_interval=30.0)
        self.containerd.held.add("list_images")
        a.startService()
        self.addCleanup(a.stopService)
        self.clock.pump([30, 30, 30])
        self.assertEqual(self.containerd.calls["list_images"], 1)
        self.containerd.release("list_images")
        self.assertEqual(self.containerd.calls["list_images"], 2)

    def test_stop_stops_loop(self) -> None:
        a = self.make(reconcile_interval=30.0)
        a.startService()
        a.stopService()
        self.clock.advance(300)
        self.assertEqual(self.containerd.calls["list_images"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_on_resubscribed_resyncs(self) -> None:
        image = SingleImage(self.containerd, "a")
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a = self.make()
        a.on_resubscribed()
        self.assertEqual(self.router.keys, image.digests | {"docker.io/library/app:1"})


class GaugeTests(AdvertiserTestCase):
    def gauges(self, registry: str) -> tuple[float | None, ...]:
        return tuple(
            self.metrics.registry.get_sample_value(name, {"registry": registry})
            for name in (
                "spegel_advertised_image_tags",
                "spegel_advertised_image_digests",
                "spegel_advertised_content_digests",
            )
        )

    def test_per_registry(self) -> None:
        one = SingleImage(self.containerd, "one", layers=2)
        two = SingleImage(self.containerd, "two", layers=3)
        self.containerd.tag("gauge-a.example/x/app:1", one.manifest)
        self.containerd.tag("gauge-a.example/x/app:2", one.manifest)
        self.containerd.tag(f"gauge-a.example/x/app@{one.manifest}", one.manifest)
        self.containerd.tag("gauge-a.example/y/app:1", two.manifest)
        self.containerd.tag("gauge-b.example/x/app:1", two.manifest)
        a = self.make()
        self.resync(a)
        self.assertEqual(self.gauges("gauge-a.example"), (3.0, 2.0, 4.0 + 5.0))
        self.assertEqual(self.gauges("gauge-b.example"), (1.0, 1.0, 5.0))
        del self.containerd.images["gauge-b.example/x/app:1"]
        a.on_event(ImageEvent("delete", "gauge-b.example/x/app:1"))
        self.assertEqual(self.gauges("gauge-b.example"), (None, None, None))
        del self.containerd.images["gauge-a.example/x/app:2"]
        a.on_event(ImageEvent("delete", "gauge-a.example/x/app:2"))
        self.assertEqual(self.gauges("gauge-a.example"), (2.0, 2.0, 9.0))
        del self.containerd.blobs[two.layers[0]]
        a.on_event(ContentEvent("delete", two.layers[0]))
        # y/app:1 lost a layer: its tag is withdrawn, its other digests stay.
        self.assertEqual(self.gauges("gauge-a.example"), (1.0, 2.0, 8.0))


class LooseContentTests(AdvertiserTestCase):
    """
    containerd 2.1+ announces each blob as it is committed (C{/content/create}), before the
    image exists: the blob is advertised at once, under the registry its distribution source
    label names, so peers pulling the same image at the same time can fetch it here.
    """

    SOURCE = "containerd.io/distribution.source.docker.io"

    def blob(self, data: bytes, source: str | None = "library/app") -> str:
        digest = self.containerd.put(data)
        if source is not None:
            self.containerd.labels[digest] = {self.SOURCE: source}
        return digest

    def started(self) -> Advertiser:
        a = self.make()
        self.resync(a)
        return a

    def test_advertised_on_create(self) -> None:
        a = self.started()
        layer = self.blob(b"layer being pulled")
        a.on_event(ContentEvent("create", layer))
        self.assertEqual(a.advertised_keys, {layer})
        self.assertEqual(self.router.provided(), [layer])
        # A content digest of docker.io, but no image's root.
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_advertised_content_digests", {"registry": "docker.io"}), 1.0)
        self.assertEqual(self.metrics.registry.get_sample_value("spegel_advertised_image_digests", {"registry": "docker.io"}), 0.0)

    def test_label_arrives_later(self) -> None:
        """
        The label is set by the pull just after the commit: looked for again, a little later.
        """
        a = self.started()
        layer = self.blob(b"label later", source=None)
        a.on_event(ContentEvent("create", layer))
        self.assertEqual(a.advertised_keys, frozenset())
        self.clock.advance(0.05)
        self.assertEqual(a.advertised_keys, frozenset())
        self.containerd.labels[layer] = {self.SOURCE: "library/other,library/app"}
        self.clock.advance(0.25)
        self.assertEqual(a.advertised_keys, {layer})

    def test_label_without_port(self) -> None:
        """
        containerd labels content from 127.0.0.1:5000 as from 127.0.0.1: it is taken for the
        mirrored registry of that host, and filtered as such.
        """
        a = self.make(RegistryFilter(mirrored_registries=frozenset({REGISTRY_HOST, "ghcr.io"})))
        self.resync(a)
        layer = self.containerd.put(b"from a registry with a port")
        self.containerd.labels[layer] = {"containerd.io/distribution.source.127.0.0.1": "team/app"}
        a.on_event(ContentEvent("create", layer))
        self.assertEqual(a.advertised_keys, {layer})
        self.assertEqual(
            self.metrics.registry.get_sample_value("spegel_advertised_content_digests", {"registry": REGISTRY_HOST}), 1.0
        )
        other = self.containerd.put(b"from another host")
        self.containerd.labels[other] = {"containerd.io/distribution.source.10.0.0.1": "team/app"}
        a.on_event(ContentEvent("create", other))
        for wait in advertiser.LOOSE_LABEL_WAITS:
            self.clock.advance(wait)
        self.assertEqual(a.advertised_keys, {layer})

    def test_no_source_not_advertised(self) -> None:
        a = self.started()
        blob = self.blob(b"imported", source=None)
        calls = self.containerd.calls["content_info"]
        a.on_event(ContentEvent("create", blob))
        for wait in advertiser.LOOSE_LABEL_WAITS:
            self.clock.advance(wait)
        self.assertEqual(a.advertised_keys, frozenset())
        self.assertEqual(self.containerd.calls["content_info"] - calls, len(advertiser.LOOSE_LABEL_WAITS))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_filtered_source_not_advertised(self) -> None:
        a = self.make(RegistryFilter(mirrored_registries=frozenset({"ghcr.io"})))
        self.resync(a)
        layer = self.blob(b"from docker hub")
        a.on_event(ContentEvent("create", layer))
        for wait in advertiser.LOOSE_LABEL_WAITS:
            self.clock.advance(wait)
        self.assertEqual(a.advertised_keys, frozenset())

    def test_gone_before_looked_at(self) -> None:
        a = self.started()
        layer = self.blob(b"gone")
        del self.containerd.blobs[layer]
        a.on_event(ContentEvent("create", layer))
        self.assertEqual(a.advertised_keys, frozenset())

    def test_deleted_withdrawn(self) -> None:
        a = self.started()
        layer = self.blob(b"deleted later")
        a.on_event(ContentEvent("create", layer))
        del self.containerd.blobs[layer]
        a.on_event(ContentEvent("delete", layer))
        self.assertEqual(a.advertised_keys, frozenset())
        self.assertEqual(self.router.withdrawn(), [layer])

    def test_resync_keeps_present_drops_gone(self) -> None:
        """
        A resync keeps loose blobs still in the store (their image may still be on its way)
        and withdraws those garbage collection took without an event.
        """
        a = self.started()
        kept, collected = self.blob(b"kept"), self.blob(b"collected")
        for digest in (kept, collected):
            a.on_event(ContentEvent("create", digest))
        del self.containerd.blobs[collected]
        self.resync(a)
        self.assertEqual(a.advertised_keys, {kept})

    def test_image_then_covers_it(self) -> None:
        """
        When the image arrives, its tag and every digest are advertised; the loose blob is one
        of them, provided once.
        """
        a = self.started()
        image = SingleImage(self.containerd, "pulled")
        for digest in image.digests:
            self.containerd.labels[digest] = {self.SOURCE: "library/app"}
            a.on_event(ContentEvent("create", digest))
        self.assertEqual(a.advertised_keys, image.digests)
        self.containerd.tag("docker.io/library/app:1", image.manifest)
        a.on_event(ImageEvent("create", "docker.io/library/app:1"))
        self.assertEqual(a.advertised_keys, image.digests | {"docker.io/library/app:1"})
        self.assertEqual(sorted(self.router.provided()), sorted(image.digests | {"docker.io/library/app:1"}))
        # The image holds them now: removing it withdraws them (its blobs then go with garbage
        # collection, which sends no event).
        del self.containerd.images["docker.io/library/app:1"]
        a.on_event(ImageEvent("delete", "docker.io/library/app:1"))
        self.assertEqual(a.advertised_keys, frozenset())

