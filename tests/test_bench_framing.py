"""benchmarks/bench_framing.py --quick runs and prints its three tables."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .support import run_benchmark


class QuickBenchmarkTests(TestCase):
    def test_quick_run(self) -> None:
        """The quick run exits 0 and prints decode, encode and loopback tables."""
        result = run_benchmark("bench_framing.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        for heading in ("decode in memory", "encode data frames", "loopback"):
            self.assertIn(heading, result.stdout)
        self.assertIn("| netlab FrameReceiver", result.stdout)
        self.assertRegex(result.stdout, r"\|\s+1024 KiB \|\s+[\d.]+ \|\s+[\d.]+ \|")
