"""
Tests for L{spegel.oci}: the validation every request goes through.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from spegel import addresses, oci

SHA = "sha256:" + "a" * 64


class DigestTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(oci.parse_digest(SHA), SHA)
        self.assertEqual(oci.parse_digest("sha512:" + "0" * 128), "sha512:" + "0" * 128)

    def test_invalid(self) -> None:
        for bad in ["", "sha256:", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32,
                    "sha256:" + "a" * 64 + "/../x", "sha256" + "a" * 64, "sha512:" + "a" * 64]:
            with self.subTest(bad=bad):
                self.assertRaises(oci.DigestInvalid, oci.parse_digest, bad)


class RepositoryTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for good in ["a", "library/nginx", "a-b/c__d/e.f", "x/y/z/0"]:
            self.assertEqual(oci.parse_repository(good), good)

    def test_traversal_and_garbage(self) -> None:
        for bad in ["..", "../etc", "a/../b", "a/./b", "/a", "a/", "a//b", "A", "a b", "a\x00",
                    "a" * 256, "", "a/.."]:
            with self.subTest(bad=bad):
                self.assertRaises(oci.NameInvalid, oci.parse_repository, bad)


class ReferenceTests(SynchronousTestCase):
    def test_tag(self) -> None:
        ref = oci.parse_reference("docker.io", "library/nginx", "1.25")
        self.assertEqual(ref.tag_key, "docker.io/library/nginx:1.25")
        self.assertEqual(ref.filter_subject, "docker.io/library/nginx:1.25")
        self.assertIsNone(ref.digest)

    def test_digest(self) -> None:
        ref = oci.parse_reference("docker.io", "library/nginx", SHA)
        self.assertEqual(ref.digest, SHA)
        self.assertEqual(ref.filter_subject, "docker.io/library/nginx")

    def test_bad(self) -> None:
        self.assertRaises(oci.TagInvalid, oci.parse_reference, "r", "a", "-x")
        self.assertRaises(oci.TagInvalid, oci.parse_reference, "r", "a", "x" * 129)
        self.assertRaises(oci.DigestInvalid, oci.parse_reference, "r", "a", "sha256:zz")

    def test_registry_host(self) -> None:
        for good in ["docker.io", "127.0.0.1:5000", "[::1]:5000", "my-registry.example.com", "Registry.Example"]:
            # As given, not normalised: it must match the image names containerd keeps.
            self.assertEqual(oci.parse_registry_host(good), good)
        for bad in ["", "a/b", "a:b:c", "../x", "a b", "x" * 300, "-a.com", "docker.io:65536", "1.2.3.999"]:
            with self.subTest(bad=bad):
                self.assertRaises(oci.NameInvalid, oci.parse_registry_host, bad)

    def test_registry_host_as_every_entry_point_parses_it(self) -> None:
        """
        Port 0 and a URL are refused with the reason, as the flags and C{spegel configuration}
        refuse them (L{spegel.addresses}).
        """
        for bad, reason in [
            ("docker.io:0", "port must be an integer from 1 to 65535, got 0"),
            ("127.0.0.1:0", "port must be an integer from 1 to 65535, got 0"),
            ("https://docker.io/", "without a scheme or a path"),
            ("https://docker.io", "without a scheme or a path"),
        ]:
            with self.subTest(bad=bad):
                error = self.assertRaises(oci.NameInvalid, oci.parse_registry_host, bad)
                self.assertIn(reason, error.message)
                self.assertIn(repr(bad), error.message)
                self.assertEqual(error.detail, {"ns": bad})
                with self.assertRaises(addresses.InvalidAddress):
                    addresses.parse_netloc(bad)

    def test_image_name_with_port_zero_refused(self) -> None:
        error = self.assertRaises(oci.UnparseableImageName, oci.parse_image_name, "docker.io:0/library/nginx:1")
        self.assertIn("port must be an integer from 1 to 65535, got 0", str(error))


class RangeTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertIsNone(oci.parse_range(None, 10))

    def test_forms(self) -> None:
        self.assertEqual(oci.parse_range("bytes=2-5", 10), oci.ByteRange(2, 5, 10))
        self.assertEqual(oci.parse_range("bytes=2-", 10), oci.ByteRange(2, 9, 10))
        self.assertEqual(oci.parse_range("bytes=-3", 10), oci.ByteRange(7, 9, 10))
        self.assertEqual(oci.parse_range("bytes=-30", 10), oci.ByteRange(0, 9, 10))
        self.assertEqual(oci.parse_range("bytes=5-100", 10), oci.ByteRange(5, 9, 10))
        byte_range = oci.parse_range("bytes=2-5", 10)
        assert byte_range is not None
        self.assertEqual(byte_range.content_range, "bytes 2-5/10")
        self.assertEqual(byte_range.length, 4)

    def test_unsatisfiable_and_garbage(self) -> None:
        for bad in ["bytes=10-", "bytes=10-20", "bytes=-0", "bytes=5-2", "bytes=-", "bytes=a-b",
                    "items=0-1", "bytes=0-1,3-4", "garbage", "bytes=" + "9" * 30 + "-"]:
            with self.subTest(bad=bad):
                with self.assertRaises(oci.RangeNotSatisfiable) as caught:
                    oci.parse_range(bad, 10)
                self.assertEqual(caught.exception.size, 10)
                self.assertEqual(caught.exception.status, 416)

    def test_empty_content(self) -> None:
        self.assertRaises(oci.RangeNotSatisfiable, oci.parse_range, "bytes=-1", 0)


class SniffTests(SynchronousTestCase):
    def test_declared(self) -> None:
        for media_type in oci.MANIFEST_MEDIA_TYPES:
            data = json.dumps({"mediaType": media_type, "schemaVersion": 2}).encode()
            self.assertEqual(oci.sniff_manifest_media_type(data), media_type)

    def test_shapes(self) -> None:
        index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        manifest = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
        self.assertEqual(oci.sniff_manifest_media_type(index), oci.OCI_INDEX)
        self.assertEqual(oci.sniff_manifest_media_type(manifest), oci.OCI_MANIFEST)

    def test_not_manifests(self) -> None:
        for data in [b"", b"\x1f\x8b\x08", b"[]", b"{", b'{"config": {}}', b"{}" + b" " * 10,
                     b'{"architecture": "amd64", "rootfs": {}}', b"[" * 100000]:
            self.assertIsNone(oci.sniff_manifest_media_type(data))

    def test_error_json(self) -> None:
        body = json.loads(oci.BlobUnknown("blob unknown", {"digest": SHA}).to_json())
        self.assertEqual(
            body, {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown",
                               "detail": {"digest": SHA}}]}
        )


class IfRangeTests(SynchronousTestCase):
    def test_range_to_honour(self) -> None:
        digest = "sha256:" + "a" * 64
        self.assertEqual(oci.range_to_honour("bytes=0-1", None, digest), "bytes=0-1")
        self.assertEqual(oci.range_to_honour("bytes=0-1", f'"{digest}"', digest), "bytes=0-1")
        self.assertIsNone(oci.range_to_honour("bytes=0-1", f'W/"{digest}"', digest))
        self.assertIsNone(oci.range_to_honour("bytes=0-1", '"sha256:' + "b" * 64 + '"', digest))
        self.assertIsNone(oci.range_to_honour("bytes=0-1", "Tue, 01 Dec 2026 10:00:00 GMT", digest))
        self.assertIsNone(oci.range_to_honour(None, f'"{digest}"', digest))
