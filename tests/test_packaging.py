"""Both install modes leave a working ``twistd netlab`` and ``netlab`` command.

Each test installs this checkout into a fresh virtualenv.  The virtualenv sees
the test environment's packages (Twisted and the other dependencies) through a
plain path entry, which does not run that environment's ``.pth`` files, so the
checkout itself is visible only through the install under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from twisted.trial.unittest import TestCase

from .support import temporary_directory

CHECKOUT = Path(__file__).resolve().parent.parent
TWISTD = "from twisted.scripts.twistd import run; run()"


class InstallModeTests(TestCase):
    def make_venv(self) -> tuple[Path, Path]:
        directory = temporary_directory(self)
        venv = directory / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
        )
        python = venv / "bin" / "python"
        purelib = subprocess.run(
            [
                str(python),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        outer = sysconfig.get_paths()["purelib"]
        (Path(purelib) / "_outer_dependencies.pth").write_text(outer + "\n")
        return python, directory

    def run_in(self, directory: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            list(argv),
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def check_install(self, *pip_arguments: str) -> None:
        python, directory = self.make_venv()
        before = self.run_in(directory, str(python), "-c", TWISTD, "--help")
        self.assertNotIn("netlab", before.stdout, "the checkout leaks into the venv")
        install = self.run_in(
            directory,
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            *pip_arguments,
        )
        self.assertEqual(install.returncode, 0, install.stderr)
        first = self.run_in(directory, str(python), "-c", TWISTD, "--help")
        self.assertIn("netlab", first.stdout, first.stderr)
        check = self.run_in(directory, str(python), "-c", TWISTD, "netlab", "--check")
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertIn("configuration OK (built-in defaults)", check.stdout)
        self.assertNotIn("Unable to write to plugin cache", check.stderr + check.stdout)
        client = self.run_in(directory, str(python.parent / "netlab"), "--version")
        self.assertEqual(client.returncode, 0, client.stderr)
        self.assertIn("netlab ", client.stdout)

    def test_regular_install(self) -> None:
        """`pip install .` installs the plugin next to Twisted's own plugins."""
        self.check_install(str(CHECKOUT))

    def test_editable_install(self) -> None:
        """`pip install -e .` leaves a path entry that Twisted's plugin scan sees."""
        self.check_install("--editable", str(CHECKOUT))

    def test_no_package_markers_in_twisted(self) -> None:
        """The repository must not make twisted/ or twisted/plugins/ a package."""
        self.assertFalse((CHECKOUT / "twisted" / "__init__.py").exists())
        self.assertFalse((CHECKOUT / "twisted" / "plugins" / "__init__.py").exists())
