"""The time benchmark's quick mode runs to the end and prints its tables."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .support import run_benchmark


class QuickBenchmarkTests(TestCase):
    def test_quick_run(self) -> None:
        """``bench_time.py --quick`` exits 0 with the load and accuracy tables.

        chronyd is skipped when it is not installed; netlab always runs.
        """
        result = run_benchmark("bench_time.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"netlab \(1 process\) +[\d,]+ +\d+ +\d+")
        self.assertRegex(result.stdout, r"netlab \(workers = 2\) +[\d,]+")
        self.assertRegex(result.stdout, r"generator ceiling +[\d,]+")
        self.assertRegex(result.stdout, r"netlab \(1 process\) +[+-][\d.]+ +[\d.]+\n")
        self.assertRegex(result.stdout, r"chronyd +([\d,]+|skipped)")
