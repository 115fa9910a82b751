"""Tests for netlab.lifecycle: readiness, reload on SIGHUP and stop, in process.

The daemon's service tree is built the way ``twistd netlab`` builds it, with
a fake file service registered in ``SERVICE_BUILDERS`` (listening on a
``MemoryReactorClock``), and notifications go to a real ``AF_UNIX`` datagram
socket that the test reads.
"""

from __future__ import annotations

import io
import signal
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase

from netlab import service as service_module
from netlab.config import NetlabConfig
from netlab.lifecycle import Lifecycle
from netlab.logs import NetlabLogObserver
from netlab.service import NetlabService, StreamListeningService
from netlab.systemd import Notifier
from netlab.tap import load_daemon_config
from tests.support import ALL_OFF, temporary_directory, write_config
from tests.test_systemd import notify_listener, received

CONFIG = """
[file]
endpoint = "tcp:0:interface=127.0.0.1"
[time]
enabled = false
[chat]
enabled = false
"""

#: What the daemon reports: MemoryReactor's fake ports all claim 0.0.0.0:0.
STATUS = "serving file on 0.0.0.0:0"


class FakeFileService(StreamListeningService):
    """Stands in for the file service: records what reload hands it."""

    section_name = "file"

    def __init__(self, config: NetlabConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        self.applied: list[NetlabConfig] = []
        self.on_stop: list[Any] = []

    def factory(self) -> Factory:
        return Factory.forProtocol(Protocol)

    def apply(self, config: NetlabConfig) -> None:
        self.applied.append(config)

    def stopService(self) -> Any:
        for hook in self.on_stop:
            hook()
        return super().stopService()


def build_fake_file(config: NetlabConfig, reactor: Any) -> FakeFileService:
    return FakeFileService(config, reactor)


class ThreadCallReactor(MemoryReactorClock):
    """A memory reactor that records ``callFromThread`` instead of running it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[Any] = []

    def callFromThread(self, function: Any, *args: Any, **kwargs: Any) -> None:
        self.thread_calls.append((function, args, kwargs))


class LifecycleTests(TestCase):
    """The lifecycle as the last child of a daemon's service tree."""

    def setUp(self) -> None:
        # Only the fake file service exists, whatever this release has.
        self.patch(
            service_module,
            "SERVICE_BUILDERS",
            {
                "file": f"{__name__}:build_fake_file",
                "command": None,
                "time": None,
                "chat": None,
            },
        )
        self.directory = temporary_directory(self)
        self.path = write_config(self.directory, CONFIG)
        self.listener, address = notify_listener(self, abstract=True)
        self.reactor = ThreadCallReactor()
        config = load_daemon_config(str(self.path))
        self.observer = NetlabLogObserver.create("text", "info", io.StringIO())
        self.root = NetlabService(config, self.reactor, self.observer)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
        self.lifecycle = Lifecycle(self.reactor, notifier, load_daemon_config)
        self.lifecycle.setServiceParent(self.root)
        self.file = self.root.getServiceNamed("file")
        for number in (signal.SIGHUP, signal.SIGTERM):
            self.addCleanup(signal.signal, number, signal.getsignal(number))

    def start(self) -> None:
        """Start the tree as twistd does, and let the reactor run."""
        self.root.privilegedStartService()
        self.root.startService()
        self.addCleanup(self.stop)
        self.reactor.run()

    def stop(self) -> None:
        if self.root.running:
            self.root.stopService()

    def rewrite(self, text: str, netlab: str = "") -> None:
        """Replace the configuration file; ``netlab``: [netlab] lines."""
        write_config(self.directory, f"[netlab]\n{netlab}\n{text}")

    def test_ready_after_listening_and_running(self) -> None:
        """READY=1 with the services in STATUS= comes only once every service
        listens and the reactor runs, never before."""
        self.root.privilegedStartService()
        self.root.startService()
        self.addCleanup(self.stop)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(received(self.listener), [])
        self.reactor.run()
        self.assertEqual(
            received(self.listener),
            [{"READY": "1", "STATUS": STATUS}],
        )

    def test_no_ready_when_stopped_before_running(self) -> None:
        """A daemon stopped before its reactor ran never claims readiness."""
        self.root.privilegedStartService()
        self.root.startService()
        self.root.stopService()
        self.reactor.run()
        self.assertEqual(
            received(self.listener), [{"STOPPING": "1", "STATUS": "stopping"}]
        )

    def test_stopping_sent_before_services_stop(self) -> None:
        """STOPPING=1 reaches systemd before any service stops listening."""
        self.start()
        received(self.listener)
        seen_at_stop: list[Any] = []
        self.file.on_stop.append(lambda: seen_at_stop.extend(received(self.listener)))
        self.root.stopService()
        self.assertEqual(seen_at_stop, [{"STOPPING": "1", "STATUS": "stopping"}])

    def test_reload_applies_live_settings(self) -> None:
        """A valid new file is applied between RELOADING=1 and READY=1: the log
        level changes at once and the services get the new configuration."""
        self.start()
        received(self.listener)
        self.rewrite(CONFIG, netlab='log_level = "debug"')
        self.assertEqual(self.lifecycle.reload(), [])
        self.assertEqual(self.root.config.netlab.log_level, "debug")
        self.assertEqual(
            self.observer.predicate.logLevelForNamespace(""), LogLevel.debug
        )
        self.assertEqual([c.netlab.log_level for c in self.file.applied], ["debug"])
        reloading, ready = received(self.listener)
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertTrue(reloading["MONOTONIC_USEC"].isdigit())
        self.assertEqual(ready, {"READY": "1", "STATUS": STATUS})

    def test_reload_reports_settings_needing_restart(self) -> None:
        """A changed endpoint is not applied while running: reload names it
        in its result and in the log, and the service keeps its port."""
        self.start()
        port = self.file.port
        self.rewrite(CONFIG.replace("tcp:0:", "tcp:0:backlog=5:"))
        with capturedLogs() as events:
            restart = self.lifecycle.reload()
        self.assertEqual(restart, ["[file] endpoint"])
        warnings = [e for e in events if e["event"] == "netlab.reload.restart_needed"]
        self.assertEqual([w["settings"] for w in warnings], ["[file] endpoint"])
        self.assertIs(self.file.port, port)

    def assertRefused(self, *reason_parts: str) -> None:
        old = self.root.config
        with capturedLogs() as events:
            self.assertIsNone(self.lifecycle.reload())
        self.assertIs(self.root.config, old)
        self.assertEqual(self.file.applied, [])
        refusals = [e for e in events if e["event"] == "netlab.reload.refused"]
        self.assertEqual(len(refusals), 1)
        for part in reason_parts:
            self.assertIn(part, refusals[0]["reason"])
        self.assertEqual(refusals[0]["log_level"], LogLevel.error)
        # systemd is told the reload is over, and the daemon still serves.
        notifications = received(self.listener)
        self.assertIn("RELOADING", notifications[0])
        self.assertEqual(notifications[-1], {"READY": "1", "STATUS": STATUS})
        self.assertTrue(self.file.running)

    def test_reload_refuses_invalid_toml(self) -> None:
        """Broken TOML is refused with the file named; the old config stays."""
        self.start()
        received(self.listener)
        self.rewrite("[file\n")
        self.assertRefused(str(self.path), "invalid TOML")

    def test_reload_refuses_invalid_value(self) -> None:
        """A wrong value is refused with section and key; nothing is applied."""
        self.start()
        received(self.listener)
        self.rewrite(CONFIG, netlab='log_level = "loud"')
        self.assertRefused("[netlab] log_level", '"loud" is not allowed')

    def test_reload_refuses_unavailable_service(self) -> None:
        """Enabling a service this release lacks is refused like at start-up."""
        self.start()
        received(self.listener)
        self.rewrite(CONFIG.replace("[chat]\nenabled = false\n", ""))
        self.assertRefused("[chat] enabled")

    def test_reload_refuses_missing_file(self) -> None:
        """A configuration file removed since start-up is refused, not fatal."""
        self.start()
        received(self.listener)
        self.path.unlink()
        self.assertRefused("no such file")

    def test_reload_survives_a_failing_service(self) -> None:
        """A service whose apply() raises (a bug) is logged with the failure;
        systemd still gets READY=1 and the daemon keeps serving."""
        self.start()
        received(self.listener)

        def broken(config: NetlabConfig) -> None:
            raise RuntimeError("apply bug")

        self.file.apply = broken
        self.rewrite(CONFIG, netlab='log_level = "debug"')
        with capturedLogs() as events:
            self.assertIsNone(self.lifecycle.reload())
        [failure] = [e for e in events if e["event"] == "netlab.reload.failed"]
        self.assertIn("apply bug", str(failure["log_failure"].value))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(received(self.listener)[-1], {"READY": "1", "STATUS": STATUS})
        self.assertTrue(self.file.running)

    def test_sighup_queues_a_reload(self) -> None:
        """SIGHUP only queues a reload into the reactor (a signal may arrive
        anywhere); running the queued call reloads."""
        self.start()
        received(self.listener)
        signal.raise_signal(signal.SIGHUP)
        self.assertEqual(self.reactor.thread_calls, [(self.lifecycle.reload, (), {})])
        self.assertEqual(received(self.listener), [])

    def test_sigterm_stops_the_reactor_cleanly(self) -> None:
        """Once running, SIGTERM queues a plain reactor stop (so twistd exits 0,
        not -15); a second SIGTERM while stopping is harmless; stopping
        restores the previous handler."""
        self.start()
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.lifecycle._sigterm)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        calls = self.reactor.thread_calls
        self.assertEqual(calls, [(self.lifecycle._stop_reactor, (), {})] * 2)
        for function, args, kwargs in calls:
            function(*args, **kwargs)
        self.assertTrue(self.reactor.hasStopped)
        self.root.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGTERM), self.lifecycle._sigterm)

    def test_sighup_handler_removed_on_stop(self) -> None:
        """Stopping restores the SIGHUP handler that was there before."""

        def before(signum: int, frame: Any) -> None:
            """A handler someone installed before the daemon started."""

        signal.signal(signal.SIGHUP, before)
        self.start()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        self.root.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_reload_after_stop_ignored(self) -> None:
        """A reload queued just before shutdown does nothing once stopped."""
        self.start()
        self.root.stopService()
        received(self.listener)
        self.assertIsNone(self.lifecycle.reload())
        self.assertEqual(received(self.listener), [])


class WithoutSystemdTests(TestCase):
    """Without ``$NOTIFY_SOCKET`` the lifecycle still logs and reloads."""

    def test_ready_logged_without_notifier(self) -> None:
        """No notifier: readiness is logged with the services, nothing sent."""
        directory = temporary_directory(self)
        path = write_config(directory, ALL_OFF)
        reactor = ThreadCallReactor()
        root = NetlabService(load_daemon_config(str(path)), reactor)
        Lifecycle(reactor, None, load_daemon_config).setServiceParent(root)
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        root.startService()
        with capturedLogs() as events:
            reactor.run()
        root.stopService()
        ready = [e for e in events if e["event"] == "netlab.ready"]
        self.assertEqual([e["status"] for e in ready], ["running, no services enabled"])
