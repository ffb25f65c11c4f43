# -*- test-case-name: tests.unit.test_rig -*-
"""
Tests of the test rig's image builder (L{spegel_testing.images}), socket- and process-free; the
rest of the rig is tested with real processes in L{tests.e2e.test_rig_real}.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

from twisted.trial.unittest import SynchronousTestCase

from spegel_testing.images import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    MediaFormat,
    TestImage,
    build_image,
    build_index,
    iter_chunks,
)


class ImageBuilderTests(SynchronousTestCase):
    """
    L{build_image} and L{build_index} make deterministic, self-consistent images.
    """

    def assertConsistent(self, image: TestImage) -> None:
        """
        Every blob's digest and size match its bytes, every manifest points at blobs of the image,
        and every config lists the diff_ids of its layers' uncompressed tars.
        """
        for blob in image.blobs():
            data = blob.read()
            self.assertEqual(blob.size, len(data))
            self.assertEqual(blob.digest, "sha256:" + hashlib.sha256(data).hexdigest())
        digests = image.digests()
        for platformImage in image.platform_images:
            manifest = json.loads(platformImage.manifest.read())
            self.assertEqual(manifest["mediaType"], platformImage.manifest.media_type)
            self.assertIn(manifest["config"]["digest"], digests)
            self.assertEqual([layer["digest"] for layer in manifest["layers"]], [b.digest for b in platformImage.layers])
            config = json.loads(platformImage.config.read())
            self.assertEqual(config["architecture"], platformImage.platform.architecture)
            diffIDs = []
            for layer in platformImage.layers:
                data = layer.read()
                if layer.media_type.endswith("gzip"):
                    data = gzip.decompress(data)
                diffIDs.append("sha256:" + hashlib.sha256(data).hexdigest())
                with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                    self.assertEqual(len(archive.getmembers()), 1)
            self.assertEqual(config["rootfs"]["diff_ids"], diffIDs)
            self.assertEqual(list(platformImage.diff_ids), diffIDs)

    def test_singlePlatformOCI(self) -> None:
        """
        A single-platform OCI image has an OCI manifest as its root, one blob per layer size.
        """
        image = build_image(seed="a", layer_sizes=(1000, 2000, 3000))
        self.assertConsistent(image)
        self.assertEqual(image.media_type, OCI_MANIFEST)
        self.assertFalse(image.is_index)
        self.assertEqual(len(image.layers), 3)
        self.assertEqual(len(image.blobs()), 5)
        self.assertEqual({layer.media_type for layer in image.layers}, {OCI_LAYER_GZIP})

    def test_dockerMediaTypes(self) -> None:
        """
        C{format=MediaFormat.DOCKER} gives schema2 manifests, Docker configs and layers.
        """
        image = build_image(seed="a", format=MediaFormat.DOCKER)
        self.assertConsistent(image)
        self.assertEqual(image.media_type, DOCKER_MANIFEST)
        self.assertEqual(image.configs[0].media_type, DOCKER_CONFIG)

    def test_index(self) -> None:
        """
        An index has one single-platform image per platform, with distinct layers.
        """
        for format, mediaType in [(MediaFormat.OCI, OCI_INDEX), (MediaFormat.DOCKER, DOCKER_LIST)]:
            image = build_index(seed="b", format=format)
            self.assertConsistent(image)
            self.assertTrue(image.is_index)
            self.assertEqual(image.media_type, mediaType)
            index = json.loads(image.root.read())
            self.assertEqual(
                [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]],
                [("linux", "amd64"), ("linux", "arm64")],
            )
            self.assertEqual(len(set(image.layers)), 4)
            arm = image.digests(LINUX_ARM64)
            self.assertEqual(len(arm), 5)
            self.assertNotIn(image.for_platform(LINUX_AMD64).manifest.digest, arm)

    def test_deterministic(self) -> None:
        """
        The same seed gives the same digests; another seed gives others.
        """
        self.assertEqual(build_image(seed=7).digests(), build_image(seed=7).digests())
        self.assertFalse(build_image(seed=7).digests() & build_image(seed=8).digests())

    def test_streamedToFile(self) -> None:
        """
        With a C{directory}, layers are written to files named by digest, uncompressed when asked,
        and equal what the in-memory build gives.
        """
        directory = self.mktemp()
        onDisk = build_image(seed="c", layer_sizes=(3 << 20,), compress=False, directory=directory)
        inMemory = build_image(seed="c", layer_sizes=(3 << 20,), compress=False)
        self.assertEqual(onDisk.digest, inMemory.digest)
        layer = onDisk.layers[0]
        self.assertIsNone(layer.data)
        self.assertEqual(os.path.basename(layer.path or ""), layer.digest.replace(":", "-"))
        self.assertEqual(layer.media_type, OCI_LAYER_TAR)
        self.assertEqual(layer.digest, onDisk.platform_images[0].diff_ids[0])
        self.assertEqual(b"".join(iter_chunks(layer, 4096)), inMemory.layers[0].data)
        self.assertConsistent(onDisk)
