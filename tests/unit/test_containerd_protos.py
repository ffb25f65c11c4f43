# -*- test-case-name: tests.unit.test_containerd_protos -*-
"""
The checked-in containerd stubs match what L{spegel_testing.protos} produces, and they
describe containerd's wire names (packages, methods, field numbers).
"""

from __future__ import annotations

import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from spegel_testing import protos
from spegel.containerd.api import (
    content_events_pb2,
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    image_events_pb2,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    types_pb2,
    version_pb2_grpc,
)


class DriftTests(SynchronousTestCase):
    """
    Regenerating into a temporary directory gives exactly the checked-in files.
    """

    def test_no_drift(self) -> None:
        with tempfile.TemporaryDirectory() as output_root:
            fresh = protos.generate(output_root)
        current = protos.checked_in()
        self.assertEqual(
            sorted(fresh),
            sorted(current),
            "stub files differ from the .proto files; run .venv/bin/python -m spegel_testing.protos",
        )
        stale = [name for name in fresh if fresh[name] != current[name]]
        self.assertEqual(
            stale, [], "stubs drifted from the .proto files; run .venv/bin/python -m spegel_testing.protos"
        )

    def test_every_proto_generates_a_module(self) -> None:
        names = {name.rsplit("/", 1)[-1].removesuffix(".proto") for name in protos.proto_files()}
        self.assertEqual(
            {name.removesuffix("_pb2.py") for name in protos.checked_in() if name.endswith("_pb2.py")},
            names,
        )

    def test_generated_imports_name_the_package(self) -> None:
        """
        Stubs import each other as C{spegel.containerd.api.*}, never by a bare top-level name.
        """
        for name, data in protos.checked_in().items():
            for line in data.decode("utf-8").splitlines():
                if line.startswith(("import ", "from ")) and "_pb2" in line:
                    self.assertTrue(
                        line.startswith(("from spegel.containerd.api import ", "from google.protobuf import ")),
                        f"{name}: {line}",
                    )


class WireNameTests(SynchronousTestCase):
    """
    The names containerd serves and sends, which our subset must keep exactly.
    """

    def test_service_paths(self) -> None:
        def full(stub_module: Any, service: str) -> str:
            return stub_module.DESCRIPTOR.services_by_name[service].full_name

        self.assertEqual(full(images_pb2, "Images"), "containerd.services.images.v1.Images")
        self.assertEqual(full(content_pb2, "Content"), "containerd.services.content.v1.Content")
        self.assertEqual(full(events_pb2, "Events"), "containerd.services.events.v1.Events")
        self.assertEqual(
            full(introspection_pb2, "Introspection"), "containerd.services.introspection.v1.Introspection"
        )
        # The gRPC stubs exist for each service.
        for stub in (
            images_pb2_grpc.ImagesStub,
            content_pb2_grpc.ContentStub,
            events_pb2_grpc.EventsStub,
            version_pb2_grpc.VersionStub,
        ):
            self.assertTrue(callable(stub))

    def test_event_type_names(self) -> None:
        self.assertEqual(image_events_pb2.ImageCreate.DESCRIPTOR.full_name, "containerd.services.images.v1.ImageCreate")
        self.assertEqual(image_events_pb2.ImageUpdate.DESCRIPTOR.full_name, "containerd.services.images.v1.ImageUpdate")
        self.assertEqual(image_events_pb2.ImageDelete.DESCRIPTOR.full_name, "containerd.services.images.v1.ImageDelete")
        self.assertEqual(content_events_pb2.ContentDelete.DESCRIPTOR.full_name, "containerd.events.ContentDelete")
        self.assertEqual(content_events_pb2.ContentCreate.DESCRIPTOR.full_name, "containerd.events.ContentCreate")

    def test_field_numbers(self) -> None:
        def numbers(message: Any) -> dict[str, int]:
            return {f.name: f.number for f in message.DESCRIPTOR.fields}

        self.assertEqual(numbers(types_pb2.Descriptor), {"media_type": 1, "digest": 2, "size": 3, "annotations": 5})
        self.assertEqual(
            numbers(images_pb2.Image), {"name": 1, "labels": 2, "target": 3, "created_at": 7, "updated_at": 8}
        )
        self.assertEqual(
            numbers(content_pb2.Info), {"digest": 1, "size": 2, "created_at": 3, "updated_at": 4, "labels": 5}
        )
        self.assertEqual(numbers(content_pb2.ReadContentRequest), {"digest": 1, "offset": 2, "size": 3})
        self.assertEqual(numbers(content_pb2.ReadContentResponse), {"offset": 1, "data": 2})
        self.assertEqual(
            numbers(events_pb2.Envelope), {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4}
        )
        self.assertEqual(numbers(content_events_pb2.ContentCreate), {"digest": 1, "size": 2, "mediaType": 3})
