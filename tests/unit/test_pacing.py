"""
Tests for L{spegel.pacing}: the upload cap's token bucket on a fake clock. The rate holds over
simulated seconds, an idle bucket allows one burst and no more, uploads in line take turns,
and an upload that stops leaves no timer behind.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from spegel.bodies import READ_CHUNK
from spegel.metrics import Metrics
from spegel.pacing import BURST_FLOOR, MIN_RATE, UNPACED, IPacer, TokenBucket

MiB = 1024 * 1024


class Greedy:
    """
    An upload that always has more to send: it takes all it is granted, in pieces of at most
    C{piece} bytes, and waits when refused.
    """

    def __init__(self, bucket: TokenBucket, piece: int = MiB) -> None:
        self.pacer = bucket.upload()
        self.piece = piece
        self.sent = 0
        self.wakes = 0

    def run(self) -> None:
        while True:
            granted = self.pacer.take(self.piece)
            if not granted:
                self.pacer.wait(self.woken)
                return
            self.sent += granted

    def woken(self) -> None:
        self.wakes += 1
        self.run()


def advance(clock: task.Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()

    def test_sizes(self) -> None:
        """
        The burst is an eighth of a second of the rate, at least a read chunk; a waiting upload
        is woken for a hundredth of a second of it, at least 4 KiB.
        """
        fast = TokenBucket(self.clock, 100 * MiB, metrics=Metrics())
        self.assertEqual(fast.burst, 12.5 * MiB)
        self.assertEqual(fast.quantum, MiB)
        slow = TokenBucket(self.clock, MIN_RATE, metrics=Metrics())
        self.assertEqual(slow.burst, BURST_FLOOR)
        self.assertEqual(slow.quantum, 4096)
        self.assertGreaterEqual(BURST_FLOOR, READ_CHUNK)
        self.assertRaises(ValueError, TokenBucket, self.clock, 0, metrics=Metrics())

    def test_pacers_provide_the_interface(self) -> None:
        verifyObject(IPacer, UNPACED)
        verifyObject(IPacer, TokenBucket(self.clock, MiB, metrics=Metrics()).upload())

    def test_rate_over_simulated_seconds(self) -> None:
        """
        A greedy upload sends the burst at once, then the rate: after t seconds, never more
        than burst + rate * t, and less by at most one quantum.
        """
        rate = 10 * MiB
        bucket = TokenBucket(self.clock, rate, metrics=Metrics())
        upload = Greedy(bucket, piece=256 * 1024)
        upload.run()
        self.assertEqual(upload.sent, bucket.burst)
        for _ in range(100):
            advance(self.clock, 0.1)
            allowed = bucket.burst + rate * self.clock.seconds()
            # (within a byte: the tokens are a float, the grants whole bytes)
            self.assertLessEqual(upload.sent, allowed + 1)
            self.assertGreaterEqual(upload.sent, allowed - bucket.quantum)
        # Woken about once per quantum, not per piece or per tick.
        self.assertLessEqual(upload.wakes, rate * 10 / bucket.quantum + 1)

    def test_burst_after_idle(self) -> None:
        """
        A bucket left idle for long saves one burst, not the whole idle time's worth.
        """
        bucket = TokenBucket(self.clock, 8 * MiB, metrics=Metrics())
        upload = bucket.upload()
        self.assertEqual(upload.take(100 * MiB), MiB)
        self.assertEqual(upload.take(100 * MiB), 0)
        self.clock.advance(60)
        self.assertEqual(upload.take(100 * MiB), MiB)
        self.assertEqual(upload.take(1), 0)

    def test_no_dribbles(self) -> None:
        """
        Less than a quantum is not granted (unless that is all the upload wants): every grant
        costs a syscall.
        """
        bucket = TokenBucket(self.clock, 10 * MiB, metrics=Metrics())
        upload = bucket.upload()
        upload.take(int(bucket.burst))
        self.clock.advance(bucket.quantum / bucket.rate / 2)
        self.assertEqual(upload.take(MiB), 0)
        self.assertGreater(upload.take(100), 0)

    def test_give_back(self) -> None:
        bucket = TokenBucket(self.clock, 8 * MiB, metrics=Metrics())
        upload = bucket.upload()
        self.assertEqual(upload.take(MiB), MiB)
        upload.give_back(1000)
        self.assertEqual(upload.take(1000), 1000)
        self.assertEqual(upload.take(1), 0)

    def test_uploads_share_the_rate_evenly(self) -> None:
        """
        Three greedy uploads together stay under the cap, and each gets a third of it.
        """
        rate = 6 * MiB
        bucket = TokenBucket(self.clock, rate, metrics=Metrics())
        uploads = [Greedy(bucket, piece=64 * 1024) for _ in range(3)]
        for upload in uploads:
            upload.run()
        advance(self.clock, 10)
        total = sum(upload.sent for upload in uploads)
        self.assertLessEqual(total, bucket.burst + rate * 10 + 1)
        self.assertGreaterEqual(total, bucket.burst + rate * 10 - bucket.quantum)
        # The burst went to whoever asked first; the rest, in turns of a quantum.
        shares: list[float] = [upload.sent for upload in uploads]
        shares[0] -= bucket.burst
        self.assertLessEqual(max(shares) - min(shares), 2 * bucket.quantum, shares)

    def test_newcomer_queues_behind_those_waiting(self) -> None:
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        first = Greedy(bucket)
        first.run()
        self.assertEqual(bucket.waiting, 1)
        # Tokens have accrued, but the first in line gets them, not a newcomer.
        self.clock.advance(bucket.quantum / bucket.rate / 2)
        late = bucket.upload()
        self.assertEqual(late.take(100), 0)
        before = first.sent
        self.clock.advance(bucket.quantum / bucket.rate)
        self.assertGreater(first.sent, before)

    def test_stop_while_waiting_cancels_the_timer(self) -> None:
        """
        An upload that ends while it waits (its client went away) is not called back, and the
        bucket keeps no timer for nobody.
        """
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        upload = Greedy(bucket)
        upload.run()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        upload.pacer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(bucket.waiting, 0)
        self.clock.advance(10)
        self.assertEqual(upload.wakes, 0)
        upload.pacer.stop()  # twice is harmless

    def test_one_of_two_stops(self) -> None:
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        staying, leaving = Greedy(bucket), Greedy(bucket)
        staying.run()
        leaving.run()
        leaving.pacer.stop()
        advance(self.clock, 1)
        self.assertEqual(leaving.wakes, 0)
        self.assertGreaterEqual(staying.sent, bucket.burst + bucket.rate - bucket.quantum)

    def test_throttled_seconds(self) -> None:
        """
        The time during which uploads waited is counted once, however many waited.
        """
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        uploads = [Greedy(bucket), Greedy(bucket)]
        for upload in uploads:
            upload.run()
        advance(self.clock, 2)
        for upload in uploads:
            upload.pacer.stop()
        self.assertAlmostEqual(bucket.throttled_seconds, 2.0, places=6)
        counted = bucket.metrics.registry.get_sample_value("spegel_upload_throttled_seconds_total")
        self.assertAlmostEqual(counted, 2.0, places=6)
        self.clock.advance(5)
        self.assertAlmostEqual(bucket.throttled_seconds, 2.0, places=6)

    def test_clock_stepped_back(self) -> None:
        """
        The reactor's clock is the wall clock: stepped back, it does not drain the bucket; the
        tokens accrue again from then on.
        """
        self.clock.advance(1000)
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        upload = bucket.upload()
        upload.take(int(bucket.burst))
        self.clock.rightNow -= 500
        self.assertEqual(upload.take(1), 0)
        self.clock.advance(0.1)
        self.assertEqual(upload.take(MiB), int(MiB * 0.1))

    def test_a_failing_upload_does_not_stop_the_others(self) -> None:
        bucket = TokenBucket(self.clock, MiB, metrics=Metrics())
        broken = bucket.upload()
        broken.take(int(bucket.burst))

        def fail() -> None:
            raise RuntimeError("a bug in a producer")

        broken.wait(fail)
        healthy = Greedy(bucket)
        healthy.run()
        advance(self.clock, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertGreater(healthy.sent, 0)


class UnpacedTests(SynchronousTestCase):
    def test_everything_at_once(self) -> None:
        self.assertEqual(UNPACED.take(10**12), 10**12)
        resumed: list[bool] = []
        UNPACED.wait(lambda: resumed.append(True))
        self.assertEqual(resumed, [True])
