"""The systemd benchmark's quick mode runs to the end and prints its table."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .support import run_benchmark


class QuickBenchmarkTests(TestCase):
    def test_quick_run(self) -> None:
        """``bench_systemd.py --quick`` exits 0 and prints every row, with
        netlab's figures always measured (references may be n/a when chronyd
        or systemd-socket-activate is not installed)."""
        result = run_benchmark("bench_systemd.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        number = r" +\d+\.\d{3}"
        for row in (
            r"cold start -> first SNTP answer",
            r"start -> READY=1 \(file\+time\)",
            r"warm SNTP round trip",
            r"SIGHUP -> READY=1 \(reload\)",
        ):
            self.assertRegex(result.stdout, row + number)
        self.assertRegex(
            result.stdout, r"socket-activated first answer +(\d+\.\d{3}|n/a)"
        )
        self.assertRegex(result.stdout, r"chronyd +(\d+\.\d{3}|n/a)")
