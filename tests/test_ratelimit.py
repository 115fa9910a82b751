"""Tests for netlab.ratelimit: buckets, the bounded source table, leak, ceiling."""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from netlab.ratelimit import RateLimiter, TokenBucket, Verdict


class TokenBucketTests(TestCase):
    def test_burst_then_refill(self) -> None:
        """A full bucket allows ``burst`` requests, then refills at ``rate``."""
        bucket = TokenBucket.full(rate=2.0, burst=3.0, now=0.0)
        self.assertEqual(
            [bucket.take(0.0) for _ in range(4)], [True, True, True, False]
        )
        self.assertFalse(bucket.take(0.4))
        self.assertTrue(bucket.take(0.5))

    def test_never_above_burst(self) -> None:
        """A long silence refills the bucket only up to ``burst``."""
        bucket = TokenBucket.full(rate=100.0, burst=2.0, now=0.0)
        bucket.take(0.0)
        self.assertTrue(bucket.take(1000.0))
        self.assertTrue(bucket.take(1000.0))
        self.assertFalse(bucket.take(1000.0))

    def test_clock_going_backwards_adds_nothing(self) -> None:
        """A clock step backwards neither refills nor breaks the bucket."""
        bucket = TokenBucket.full(rate=1.0, burst=1.0, now=10.0)
        self.assertTrue(bucket.take(10.0))
        self.assertFalse(bucket.take(5.0))


class RateLimiterTests(TestCase):
    def limiter(self, **kwargs: object) -> tuple[Clock, RateLimiter]:
        clock = Clock()
        options: dict[str, object] = {"rate": 1.0, "burst": 2.0, "max_sources": 100}
        options.update(kwargs)
        return clock, RateLimiter(clock, **options)  # type: ignore[arg-type]

    def test_sources_are_independent(self) -> None:
        """One source over its limit does not limit another."""
        _, limiter = self.limiter()
        verdicts = [limiter.check("flooder") for _ in range(5)]
        self.assertEqual(verdicts[:2], [Verdict.ALLOW, Verdict.ALLOW])
        self.assertEqual(set(verdicts[2:]), {Verdict.SOURCE_LIMIT})
        self.assertEqual(limiter.check("victim"), Verdict.ALLOW)

    def test_table_is_bounded(self) -> None:
        """100,000 spoofed sources never grow the table past max_sources."""
        _, limiter = self.limiter(max_sources=1000)
        for number in range(100_000):
            limiter.check(("10.0.0.1", number))
            self.assertLessEqual(len(limiter), 1000)
        self.assertEqual(len(limiter), 1000)

    def test_least_recently_seen_is_forgotten(self) -> None:
        """The source forgotten first is the one not seen for longest."""
        _, limiter = self.limiter(max_sources=2, burst=1.0)
        limiter.check("a")
        limiter.check("b")
        limiter.check("a")  # a is over its limit now, and most recent
        limiter.check("c")  # evicts b
        self.assertEqual(limiter.check("a"), Verdict.SOURCE_LIMIT)
        self.assertEqual(limiter.check("b"), Verdict.ALLOW)

    def test_leak_lets_some_through(self) -> None:
        """With leak=N a limited source still gets about one request in N through."""
        _, limiter = self.limiter(burst=1.0, rate=0.0, leak=4, random=random.Random(7))
        limiter.check("victim")
        verdicts = [limiter.check("victim") for _ in range(4000)]
        leaked = verdicts.count(Verdict.LEAK)
        self.assertGreater(leaked, 800)
        self.assertLess(leaked, 1200)
        self.assertEqual(set(verdicts), {Verdict.LEAK, Verdict.SOURCE_LIMIT})

    def test_no_leak_by_default(self) -> None:
        """Without leak, a limited source gets nothing until its bucket refills."""
        clock, limiter = self.limiter(burst=1.0, rate=1.0)
        limiter.check("s")
        self.assertEqual(
            {limiter.check("s") for _ in range(100)}, {Verdict.SOURCE_LIMIT}
        )
        clock.advance(1.0)
        self.assertEqual(limiter.check("s"), Verdict.ALLOW)

    def test_global_ceiling(self) -> None:
        """The global ceiling holds however many distinct sources ask."""
        clock, limiter = self.limiter(global_rate=10.0)
        verdicts = [limiter.check(n) for n in range(50)]
        self.assertEqual(verdicts.count(Verdict.ALLOW), 10)
        self.assertEqual(verdicts.count(Verdict.GLOBAL_LIMIT), 40)
        clock.advance(0.5)
        allowed = [limiter.check(n).allowed for n in range(100, 150)]
        self.assertEqual(allowed.count(True), 5)

    def test_reconfigure_keeps_state_and_bounds(self) -> None:
        """New limits apply to known sources; a smaller table drops the oldest."""
        _, limiter = self.limiter(burst=5.0)
        for name in "abcd":
            limiter.check(name)
        limiter.reconfigure(rate=1.0, burst=1.0, max_sources=2)
        self.assertEqual(len(limiter), 2)
        # d kept its tokens, capped at the new burst of one.
        self.assertEqual(limiter.check("d"), Verdict.ALLOW)
        self.assertEqual(limiter.check("d"), Verdict.SOURCE_LIMIT)
