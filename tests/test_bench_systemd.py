"""The systemd benchmark's quick mode runs to the end and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_systemd.py"


class QuickBenchmarkTests(TestCase):
    def test_quick_run(self) -> None:
        """``bench_systemd.py --quick`` exits 0 and prints every row, with
        netlab's figures always measured (references may be n/a when chronyd
        or systemd-socket-activate is not installed)."""
        result = subprocess.run(
            [sys.executable, str(BENCHMARK), "--quick"],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
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
