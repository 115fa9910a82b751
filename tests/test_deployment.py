"""Tests for the deployment files: the systemd units in etc/systemd, the service
user in etc/sysusers.d, and the plugin-cache step that keeps a read-only
installation's logs clean (checked by running twistd with the plugin
directories mounted read-only, as the unit's ProtectSystem=strict does).

``systemd-analyze verify`` checks the units as systemd would load them, with
``/opt/netlab/bin`` replaced by the bin directory of the Python running the
tests (verify insists that the programs exist).  The socket units are checked
against the configuration schema: one unit per service, named sockets of the
service's transport, and the endpoint their comment tells operators to write
is a valid configuration.
"""

from __future__ import annotations

import configparser
import errno
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

import twisted.plugins
from netlab import plugincache
from netlab.config import SERVICE_TRANSPORTS, from_mapping, parse_listen_address
from netlab.errors import ExitCode
from tests.support import ALL_OFF, Daemon, temporary_directory, write_config

ETC = Path(__file__).resolve().parent.parent / "etc"
UNITS = ETC / "systemd"
SERVICE_UNIT = UNITS / "netlab.service"
SYSUSERS = ETC / "sysusers.d" / "netlab.conf"


def socket_units() -> dict[str, Path]:
    return {
        service: UNITS / f"netlab-{service}.socket" for service in SERVICE_TRANSPORTS
    }


def read_unit(path: Path) -> configparser.ConfigParser:
    """A unit file's settings (the last value wins for repeated keys)."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def installed_units(testcase: TestCase) -> Path:
    """The units copied to a temporary directory, pointing at this Python's bin."""
    directory = temporary_directory(testcase)
    bin_directory = str(Path(sys.executable).parent) + "/"
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/netlab/bin/", bin_directory)
        (directory / unit.name).write_text(text)
    return directory


def systemd_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a program of Debian's systemd package (skip the test without it)."""
    if shutil.which(args[0]) is None:
        raise SkipTest(f"{args[0]} is not installed (Debian package systemd)")
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def netlab_plugin_directory() -> FilePath[str]:
    """The plugin directory holding netlab_plugin.py (checkout or site-packages)."""
    return next(
        FilePath(path)
        for path in twisted.plugins.__path__
        if FilePath(path).child("netlab_plugin.py").exists()
    )


#: Mounts each argument before "--" read-only over itself, then runs the rest.
READ_ONLY_SCRIPT = """
while [ "$1" != -- ]; do
    mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 1
    shift
done
shift
exec "$@"
"""


def run_read_only(testcase: TestCase) -> str:
    """Run ``twistd -n netlab`` (no services) until it is ready, with every
    plugin directory read-only in a private mount namespace; return its log.

    Skipped where mount namespaces are not permitted.
    """
    if shutil.which("unshare") is None:
        raise SkipTest("unshare is not installed (Debian package util-linux)")
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise SkipTest(f"cannot make a mount namespace: {probe.stderr.strip()}")
    plugin_directories = [p for p in twisted.plugins.__path__ if Path(p).is_dir()]
    config = write_config(temporary_directory(testcase), ALL_OFF)
    wrapper = ("unshare", "--mount", "--propagation", "private")
    wrapper += ("sh", "-c", READ_ONLY_SCRIPT, "sh", *plugin_directories, "--")
    daemon = Daemon(testcase, config, wrapper=wrapper)
    daemon.wait_for("netlab ready")
    daemon.stop()
    return daemon.log


class UnitVerifyTests(TestCase):
    """systemd itself accepts the units."""

    def test_systemd_analyze_verify(self) -> None:
        """``systemd-analyze verify`` loads the service and every socket unit
        without an error or a warning (an unknown key is only a warning)."""
        directory = installed_units(self)
        units = [str(directory / "netlab.service")]
        units += [str(directory / p.name) for p in socket_units().values()]
        result = systemd_tool("systemd-analyze", "verify", "--man=no", *units)
        self.assertEqual(
            (result.returncode, result.stdout + result.stderr), (0, ""), units
        )

    def test_hardening_exposure(self) -> None:
        """``systemd-analyze security`` rates the service's exposure at most
        2.0 of 10 (it is 1.9 as shipped), so hardening cannot quietly erode."""
        directory = installed_units(self)
        result = systemd_tool(
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(directory / "netlab.service"),
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_sysusers_file_creates_the_service_user(self) -> None:
        """``systemd-sysusers`` accepts the shipped file, which creates the
        user and group the service runs as (a dry run: nothing is written)."""
        result = systemd_tool("systemd-sysusers", "--dry-run", str(SYSUSERS))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("ignoring", result.stderr)
        service = read_unit(SERVICE_UNIT)["Service"]
        [line] = [x for x in SYSUSERS.read_text().splitlines() if x.startswith("u ")]
        self.assertEqual(line.split()[1], service["User"])
        self.assertEqual(service["User"], service["Group"])


class UnitContentTests(TestCase):
    """The units agree with the daemon and its configuration schema."""

    def test_service_runs_twistd_in_the_foreground_with_notify(self) -> None:
        """Type=notify needs the notifying process to be the main one: twistd
        runs with --nodaemon, reads /etc/netlab, and SIGHUP reloads."""
        service = read_unit(SERVICE_UNIT)["Service"]
        self.assertEqual(service["Type"], "notify")
        self.assertEqual(
            service["ExecStart"],
            "/opt/netlab/bin/twistd --nodaemon --pidfile= netlab "
            "--config /etc/netlab/netlab.toml",
        )
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        # No restart loop on an invalid configuration (twistd netlab exits 3).
        self.assertEqual(service["RestartPreventExitStatus"], str(int(ExitCode.CONFIG)))
        self.assertEqual(
            service["ExecStartPre"], "+/opt/netlab/bin/python -I -m netlab.plugincache"
        )
        self.assertEqual(service["CapabilityBoundingSet"], "")

    def test_time_service_may_read_the_clock_state(self) -> None:
        """The system call filter lets the time service read the kernel's
        clock state (adjtimex, made as clock_adjtime by glibc), and
        ProtectClock, which forbids both, is off: else every reply would say
        "unsynchronised"."""
        allowed = set()
        protect_clock = "no"
        for line in SERVICE_UNIT.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "SystemCallFilter" and not value.startswith("~"):
                allowed.update(value.split())
            elif key == "ProtectClock":
                protect_clock = value
        self.assertLessEqual({"@system-service", "adjtimex", "clock_adjtime"}, allowed)
        self.assertEqual(protect_clock, "no")

    def test_one_named_socket_unit_per_service(self) -> None:
        """Each service has a socket unit whose socket carries the service's
        transport and the name ``netlab-SERVICE``, activating netlab.service."""
        for service, path in socket_units().items():
            with self.subTest(service=service):
                section = read_unit(path)["Socket"]
                self.assertEqual(section["FileDescriptorName"], f"netlab-{service}")
                self.assertEqual(section["Service"], "netlab.service")
                wanted = (
                    "ListenStream"
                    if SERVICE_TRANSPORTS[service] == "tcp"
                    else ("ListenDatagram")
                )
                listens = [key for key in section if key.startswith("Listen")]
                self.assertEqual(listens, [wanted])

    def test_socket_addresses_are_the_default_ones(self) -> None:
        """A socket unit listens where the service listens by default, so
        switching to socket activation does not move a service."""
        defaults = from_mapping({}, base_directory=UNITS)
        for service, path in socket_units().items():
            with self.subTest(service=service):
                section = read_unit(path)["Socket"]
                listen = next(v for k, v in section.items() if k.startswith("Listen"))
                address = defaults.listen_address(service)
                self.assertEqual(listen, f"{address.interface}:{address.port}")

    def test_documented_endpoint_is_valid_and_matches(self) -> None:
        """The endpoint each socket unit's comment gives is accepted by the
        configuration and names that unit's socket."""
        for service, path in socket_units().items():
            with self.subTest(service=service):
                match = re.search(r'^#\s+endpoint = "(.+)"$', path.read_text(), re.M)
                assert match is not None, f"{path.name} documents no endpoint"
                config = from_mapping(
                    {service: {"endpoint": match.group(1)}}, base_directory=UNITS
                )
                address = parse_listen_address(
                    config.section(service).endpoint, ("systemd",)
                )
                self.assertEqual(address.name, f"netlab-{service}")


class PluginCacheTests(TestCase):
    """``python -m netlab.plugincache`` leaves nothing for twistd to write."""

    def test_refresh_succeeds(self) -> None:
        """Run as the installation's owner, isolated (-I) as the unit runs
        it, it finds netlab and exits 0."""
        result = subprocess.run(
            [sys.executable, "-I", "-m", "netlab.plugincache"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=temporary_directory(self),
            check=False,
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("up to date", result.stdout)
        names, problems = plugincache.refresh()
        self.assertIn("netlab", names)
        self.assertEqual(problems, [])

    def test_cache_readable_by_everyone(self) -> None:
        """The unit runs the refresh with UMask=0077, yet the cache it writes
        is readable by the service user (else its twistd would try to
        rewrite the cache, in a read-only installation)."""
        cache = netlab_plugin_directory().child("dropin.cache")
        if cache.exists():
            cache.remove()
        previous = os.umask(0o077)
        try:
            self.assertEqual(plugincache.refresh()[1], [])
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(os.stat(cache.path).st_mode) & 0o044, 0o044)

    def test_unwritable_cache_reported(self) -> None:
        """When a stale cache cannot be rewritten (a read-only installation),
        it fails and says where and what to do, instead of leaving twistd to
        log the failure at every start."""
        cache = netlab_plugin_directory().child("dropin.cache")
        if cache.exists():
            cache.remove()
        self.addCleanup(plugincache.refresh)

        def read_only(self: FilePath, content: bytes, ext: bytes = b".new") -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        self.patch(FilePath, "setContent", read_only)
        stderr = self.capture_stderr()
        self.assertEqual(plugincache.main(), 1)
        self.assertIn(
            f"Unable to write to plugin cache {cache.path}", stderr.getvalue()
        )
        self.assertIn("run this as the owner of the installation", stderr.getvalue())

    def test_read_only_installation_starts_quietly(self) -> None:
        """With the plugin directories read-only, as under the hardened unit,
        twistd logs "Unable to write to plugin cache" while the cache is stale
        (the control), and nothing once netlab.plugincache has run."""
        directory = netlab_plugin_directory()
        cache = directory.child("dropin.cache")
        if cache.exists():
            cache.remove()
        self.addCleanup(plugincache.refresh)
        self.assertIn("Unable to write to plugin cache", run_read_only(self))

        self.assertEqual(plugincache.refresh()[1], [])
        self.assertNotIn("plugin cache", run_read_only(self))

    def capture_stderr(self) -> io.StringIO:
        stream = io.StringIO()
        self.patch(sys, "stderr", stream)
        return stream
