"""benchmarks/bench_file.py --quick runs, verifies every copy and prints its table."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .support import run_benchmark


class QuickBenchmarkTests(TestCase):
    def test_quick_run(self) -> None:
        """The quick run exits 0 and prints netlab rows, RSS and concurrency."""
        result = run_benchmark("bench_file.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        for row in ("netlab TCP", "netlab TLS"):
            for operation in ("get", "put"):
                self.assertRegex(
                    result.stdout, rf"\| {row}\s+\| {operation} \|\s+\d+ \|"
                )
        self.assertIn("daemon peak RSS", result.stdout)
        self.assertRegex(result.stdout, r"4/4 verified both ways")
