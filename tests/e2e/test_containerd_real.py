# -*- test-case-name: tests.e2e.test_containerd_real -*-
"""
L{spegel.containerd} against a real containerd (the Debian package, 1.6): each test starts its
own daemon on a socket in a short temporary directory, through L{spegel_testing.containerd}, and
kills it in cleanup whatever happens.

Images are built from random bytes (L{spegel_testing.images}), written as an OCI image-layout
tar and loaded with C{ctr images import --no-unpack}, so no registry and no snapshotter is
involved.  Blocking rig calls (starting containerd, running ctr) go to the reactor's thread pool
so the reactor keeps delivering events meanwhile.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from spegel.containerd.client import (
    ContainerdClient,
    ContainerdUnavailable,
    ContentNotFound,
    ImageNotFound,
    content_path_for,
)
from spegel.containerd.events import ContentEvent, EventSubscriber, ImageEvent
from spegel_testing.containerd import ContainerdBuild, ContainerdDaemon, per_containerd
from spegel_testing.images import TestImage, build_image

NAMESPACE = "k8s.io"


def write_oci_archive(image: TestImage, name: str, path: str) -> None:
    """
    Write C{image} as an OCI image-layout tar that C{ctr images import} names C{name}.
    """
    tag = name.rsplit(":", 1)[-1]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **image.root.descriptor(),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }

    def add(archive: tarfile.TarFile, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as archive:
        add(archive, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add(archive, "index.json", json.dumps(index).encode())
        for blob in image.blobs():
            add(archive, "blobs/sha256/" + blob.digest.split(":", 1)[1], blob.read())


class RealContainerdTests(TestCase):
    """
    The client and the event subscriber talking to a containerd daemon.
    """

    #: Set on each subclass that per_containerd makes.
    containerd_build: ContainerdBuild

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        self.daemon = ContainerdDaemon(
            namespace=NAMESPACE, name="containerd-under-test", build=self.containerd_build
        )
        # Registered first, so it runs last: after the client and subscriber have stopped.
        self.addCleanup(self.daemon.cleanup)
        self.client = ContainerdClient(reactor, self.daemon.socket, NAMESPACE, call_timeout=5.0)
        self.events: list[Any] = []
        self.resubscriptions = 0
        return deferToThread(self.daemon.start)

    def start_client(self) -> None:
        self.client.startService()
        self.addCleanup(self.client.stopService)

    def start_subscriber(self) -> EventSubscriber:
        def resubscribed() -> None:
            self.resubscriptions += 1

        subscriber = EventSubscriber(
            reactor, self.client, self.events.append, resubscribed, initial_backoff=0.1, max_backoff=0.4
        )
        subscriber.startService()
        self.addCleanup(subscriber.stopService)
        return subscriber

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        waited = 0.0
        while not predicate():
            if waited >= timeout:
                self.fail(f"timed out after {timeout}s waiting for {what}; events: {self.events}")
            await deferLater(reactor, 0.02, lambda: None)
            waited += 0.02
        return None

    async def import_image(self, seed: str, name: str) -> TestImage:
        image = build_image(seed=seed, layer_sizes=(48 * 1024, 1000))
        path = os.path.join(self.daemon.base_dir, f"{seed}.tar")
        write_oci_archive(image, name, path)
        await deferToThread(self.daemon.ctr, "images", "import", "--no-unpack", path)
        return image

    def test_calls(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_calls())

    async def _test_calls(self) -> None:
        self.start_client()
        name = "registry.example:5000/team/app:v1"
        image = await self.import_image("calls", name)

        version = await self.client.version()
        server_version = await deferToThread(self.daemon.ctr, "version")
        self.assertIn(f"Version:  {version}", server_version)

        images = await self.client.list_images()
        self.assertEqual([i.name for i in images], [name])
        self.assertEqual(images[0].target.digest, image.digest)
        self.assertEqual(images[0].target.media_type, image.media_type)
        self.assertEqual(images[0].target.size, image.root.size)
        self.assertEqual(await self.client.list_images(['name~="^docker.io/"']), [])

        got = await self.client.get_image(name)
        self.assertEqual(got, images[0])
        with self.assertRaises(ImageNotFound):
            await self.client.get_image("registry.example:5000/team/app:missing")

        layer = image.layers[0]
        data = layer.read()
        info = await self.client.content_info(layer.digest)
        self.assertEqual((info.digest, info.size), (layer.digest, layer.size))
        self.assertEqual(await self.client.read_content(layer.digest, 0, layer.size), data)
        self.assertEqual(await self.client.read_content(layer.digest, 1000, 70000), data[1000:])
        self.assertEqual(await self.client.read_content(layer.digest, 100, 5), data[100:105])
        # Larger than containerd's 32 KiB chunks, so several responses are joined.
        self.assertEqual(await self.client.read_content(layer.digest, 7, 40000), data[7:40007])
        missing = "sha256:" + "0" * 64
        with self.assertRaises(ContentNotFound):
            await self.client.content_info(missing)
        with self.assertRaises(ContentNotFound):
            await self.client.read_content(missing, 0, 10)

        root = await self.client.content_root()
        self.assertEqual(root, self.daemon.content_path)
        with open(content_path_for(root, layer.digest), "rb") as f:
            self.assertEqual(f.read(), data)
        with open(content_path_for(root, image.digest), "rb") as f:
            self.assertEqual(f.read(), image.root.read())

    def test_unavailable(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_unavailable())

    async def _test_unavailable(self) -> None:
        self.start_client()
        await deferToThread(self.daemon.kill)
        with self.assertRaises(ContainerdUnavailable):
            await self.client.version()
        await deferToThread(self.daemon.start)
        # grpc reconnects by itself once the socket is back (its backoff, up to 30 s here).
        for _ in range(600):
            try:
                version = await self.client.version()
            except ContainerdUnavailable:
                await deferLater(reactor, 0.05, lambda: None)
            else:
                break
        self.assertTrue(version)

    def test_events(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_events())

    async def _test_events(self) -> None:
        self.start_client()
        subscriber = self.start_subscriber()
        await self.wait_until(lambda: self.resubscriptions == 1, "the first subscription")
        self.assertTrue(subscriber.subscribed)

        name = "registry.example:5000/team/events:v1"
        image = await self.import_image("events", name)
        await self.wait_until(lambda: ImageEvent("create", name) in self.events, "the image create event")

        # containerd 1.6 publishes /content/delete only for an explicit delete through the
        # content service, not when garbage collection removes blobs (2.1 does both).
        layer = image.layers[0].digest
        await deferToThread(self.daemon.ctr, "content", "rm", layer)
        await self.wait_until(lambda: ContentEvent("delete", layer) in self.events, "the content delete event")

        await deferToThread(self.daemon.remove_image, name)
        await self.wait_until(lambda: ImageEvent("delete", name) in self.events, "the image delete event")
        created = [e for e in self.events if isinstance(e, ContentEvent) and e.action == "create"]
        self.assertEqual(
            [e for e in self.events if e not in created][:3],
            [ImageEvent("create", name), ContentEvent("delete", layer), ImageEvent("delete", name)],
        )
        if self.containerd_build.publishes_content_create:
            # 2.1+: every blob is announced as it is committed, before the image exists (and
            # so is the archive's own index, which is no part of the image).
            before_image = self.events[: self.events.index(ImageEvent("create", name))]
            announced = {e.digest for e in before_image if e in created}
            self.assertEqual(image.digests() - announced, set())
        else:
            self.assertEqual(created, [])

        stopped = subscriber.stopService()
        assert stopped is not None
        await stopped
        self.assertEqual([t for t in threading.enumerate() if t.name == "spegel-containerd-events"], [])
        self.assertEqual(self.resubscriptions, 1)

    def test_restart(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_restart())

    async def _test_restart(self) -> None:
        self.start_client()
        subscriber = self.start_subscriber()
        await self.wait_until(lambda: self.resubscriptions == 1, "the first subscription")

        await deferToThread(self.daemon.kill)
        await self.wait_until(lambda: not subscriber.subscribed, "the stream to break")
        # Published while nobody could listen: lost, hence the resync the callback triggers.
        await deferToThread(self.daemon.start)
        await self.wait_until(lambda: self.resubscriptions == 2, "the second subscription")

        name = "registry.example:5000/team/restart:v1"
        await self.import_image("restart", name)
        await self.wait_until(lambda: ImageEvent("create", name) in self.events, "an event after the restart")
        self.assertEqual(self.resubscriptions, 2)


globals().update(per_containerd(RealContainerdTests))
del RealContainerdTests
