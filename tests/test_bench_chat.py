"""The chat benchmark's quick mode runs and prints its table (not a timing test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_chat.py"


class QuickBenchmarkTests(TestCase):
    def test_quick_run_prints_the_table(self) -> None:
        """``bench_chat.py --quick`` exits 0 and prints a netlab row with no loss."""
        result = subprocess.run(
            [sys.executable, str(BENCHMARK), "--quick"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("delivered/s", result.stdout)
        self.assertRegex(result.stdout, r"netlab\s+5\s+[\d,]+\s+0\.00%")
        self.assertRegex(result.stdout, r"ngircd\s+5\s+(skipped|[\d,]+)")
