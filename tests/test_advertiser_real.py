# -*- test-case-name: tests.test_advertiser_real -*-
"""
L{spegel.advertiser} against a real containerd (the Debian package, 1.6) pulling from a real
C{docker-registry}: each test starts both through the rig and cleans them up whatever happens.
Blocking rig calls run on the reactor's thread pool so the reactor keeps delivering events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from spegel.advertiser import Advertiser
from spegel.containerd.client import ContainerdClient
from spegel.containerd.events import EventSubscriber
from spegel.registry import RegistryFilter
from spegel.testing.containerd import ContainerdDaemon, per_containerd
from spegel.testing.images import LINUX_ARM64, MediaFormat, build_image, build_index
from spegel.testing.registry import UpstreamRegistry

NAMESPACE = "k8s.io"


class RecordingRouter:
    """
    The set of keys provided and not withdrawn, with when each key was last provided.
    """

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.provided_at: dict[str, float] = {}

    def provide(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        for key in keys:
            self.keys.add(key)
            self.provided_at[key] = now

    def withdraw(self, keys: Iterable[str]) -> None:
        self.keys.difference_update(keys)


class RealAdvertiserTests(TestCase):
    timeout = 90

    def setUp(self) -> Deferred[None]:
        self.registry = UpstreamRegistry(name="advertiser-registry")
        self.daemon = ContainerdDaemon(
            namespace=NAMESPACE, name="advertiser-containerd", build=self.containerd_build
        )
        # Registered first, so they run last: after the client and subscriber have stopped.
        self.addCleanup(self.registry.cleanup)
        self.addCleanup(self.daemon.cleanup)
        self.client = ContainerdClient(reactor, self.daemon.socket, NAMESPACE, call_timeout=5.0)
        self.router = RecordingRouter()
        self.advertiser = Advertiser(
            reactor, self.client, self.router, RegistryFilter(), reconcile_interval=3600.0, namespace=NAMESPACE
        )

        def start() -> None:
            self.registry.start()
            self.daemon.start()

        return deferToThread(start)

    def start_client(self) -> None:
        self.client.startService()
        self.addCleanup(self.client.stopService)

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
        """
        Poll C{predicate}; the seconds it took to hold.
        """
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started >= timeout:
                self.fail(f"timed out after {timeout}s waiting for {what}; keys: {sorted(self.router.keys)}")
            await deferLater(reactor, 0.01, lambda: None)
        return time.monotonic() - started

    def test_resync(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_resync())

    async def _test_resync(self) -> None:
        """
        A Docker manifest list pulled for one platform advertises its root, that platform's
        blobs and its tag, nothing of the other platform; an image pulled by digest advertises
        its digests without a tag.
        """
        self.start_client()
        index = build_index(seed="adv-index", format=MediaFormat.DOCKER, layer_sizes=(32 * 1024, 2000))
        index_ref = await deferToThread(self.registry.push_image, "adv/index", "v1", index)
        await deferToThread(self.daemon.pull, index_ref, platform="linux/arm64")
        single = build_image(seed="adv-single", layer_sizes=(16 * 1024,))
        single_ref = await deferToThread(self.registry.push_image, "adv/single", None, single)
        await deferToThread(self.daemon.pull, single_ref)

        await self.advertiser.resync()
        present = await deferToThread(self.daemon.content_digests)
        # Exactly what is present: containerd 2.x also fetches the other platform's manifest
        # and config (not its layers) when pulling one platform; 1.6 fetches that platform only.
        expected = (index.digests() & present) | single.digests() | {index_ref}
        self.assertTrue(index.digests(LINUX_ARM64) <= expected)
        self.assertEqual(self.advertiser.advertised_keys, expected)
        self.assertEqual(self.router.keys, expected)
        # Sanity: the other platform's layers really are referenced, absent, and not advertised.
        other_layers = {layer.digest for layer in index.layers} - index.digests(LINUX_ARM64)
        self.assertTrue(other_layers)
        self.assertFalse(other_layers & present)
        self.assertFalse(other_layers & self.router.keys)

    def test_events(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._test_events())

    async def _test_events(self) -> None:
        """
        With the event subscriber wired as in a node, a pulled image is provided within a
        second of the pull finishing, and withdrawn when the image is removed.
        """
        self.start_client()
        self.advertiser.startService()
        self.addCleanup(self.advertiser.stopService)
        resubscribed: list[None] = []

        def on_resubscribed() -> None:
            resubscribed.append(None)
            self.advertiser.on_resubscribed()

        subscriber = EventSubscriber(
            reactor, self.client, self.advertiser.on_event, on_resubscribed, initial_backoff=0.1, max_backoff=0.4
        )
        subscriber.startService()
        self.addCleanup(subscriber.stopService)
        await self.wait_until(lambda: bool(resubscribed), "the event subscription")

        image = build_image(seed="adv-events", layer_sizes=(64 * 1024, 4000))
        ref = await deferToThread(self.registry.push_image, "adv/events", "v1", image)
        await deferToThread(self.daemon.pull, ref)
        pulled = time.monotonic()
        expected = image.digests() | {ref}
        await self.wait_until(lambda: expected <= self.router.keys, "the pulled image's keys", timeout=5.0)
        lag = max(self.router.provided_at[key] for key in expected) - pulled
        self.assertLess(lag, 1.0, f"keys provided {lag:.3f}s after the pull finished")

        await deferToThread(self.daemon.remove_image, ref)
        await self.wait_until(lambda: not (expected & self.router.keys), "the removed image's keys", timeout=5.0)
        self.assertEqual(self.advertiser.advertised_keys, frozenset())


globals().update(per_containerd(RealAdvertiserTests))
del RealAdvertiserTests
