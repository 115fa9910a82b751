"""The chat benchmark's quick mode runs and prints its table (not a timing test)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .support import run_benchmark


class QuickBenchmarkTests(TestCase):
    def test_quick_run_prints_the_table(self) -> None:
        """``bench_chat.py --quick`` exits 0 and prints a netlab row with no loss."""
        result = run_benchmark("bench_chat.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("delivered/s", result.stdout)
        self.assertRegex(result.stdout, r"netlab\s+5\s+[\d,]+\s+0\.00%")
        self.assertRegex(result.stdout, r"ngircd\s+5\s+(skipped|[\d,]+)")
