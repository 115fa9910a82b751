"""Tests for the twistd plugin's options and the service base classes (no sockets)."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import attrs
from twisted.application.service import Application, IService
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import TestCase

from netlab import service as service_module
from netlab.config import NetlabConfig, load
from netlab.logs import NetlabLogObserver
from netlab.service import (
    DatagramListeningService,
    NetlabService,
    ServiceStartError,
    StreamListeningService,
)
from netlab.tap import Options, describe, makeService

from .support import temporary_directory, write_config

ALL_OFF = """
[file]
enabled = false
[time]
enabled = false
[chat]
enabled = false
"""


class OptionsTests(TestCase):
    def parse(self, *argv: str) -> tuple[Options, int | None, str, str]:
        options = Options()
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = None
        try:
            options.parseOptions(list(argv))
        except SystemExit as exit:
            code = int(exit.code or 0)
        return options, code, out.getvalue(), err.getvalue()

    def test_bad_config_is_one_line_and_status_3(self) -> None:
        """An invalid file stops option parsing with one line and exit status 3."""
        directory = temporary_directory(self)
        path = write_config(directory, "[file]\nendpiont = 1\n")
        _, code, out, err = self.parse("--config", str(path))
        self.assertEqual(code, 3)
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("netlab: config error:", err)
        self.assertIn('[file] endpiont: unknown key; did you mean "endpoint"?', err)

    def test_check_reports_and_exits_zero(self) -> None:
        """--check prints the source and the services, and exits 0."""
        directory = temporary_directory(self)
        path = write_config(directory, ALL_OFF)
        _, code, out, _ = self.parse("--config", str(path), "--check")
        self.assertEqual(code, 0)
        self.assertIn(f"configuration OK ({path})", out)
        self.assertIn("disabled: file, command, time, chat", out)

    def test_check_refuses_bad_config(self) -> None:
        """--check on a bad file exits non-zero with the problem."""
        directory = temporary_directory(self)
        path = write_config(directory, '[time]\nendpoint = "tcp:1"\n')
        _, code, _, err = self.parse("--config", str(path), "--check")
        self.assertEqual(code, 3)
        self.assertIn("[time] endpoint:", err)

    def test_unavailable_service_is_a_config_error(self) -> None:
        """Enabling a service this release lacks is refused at start-up."""
        self.patch(service_module, "SERVICE_BUILDERS", {"command": None})
        directory = temporary_directory(self)
        path = write_config(directory, ALL_OFF + "[command]\nenabled = true\n")
        _, code, _, err = self.parse("--config", str(path))
        self.assertEqual(code, 3)
        self.assertIn("[command] enabled: this service is not available", err)

    def test_describe_lists_endpoints(self) -> None:
        """The --check report shows each enabled service with its endpoint."""
        report = describe(load(None))
        self.assertIn("built-in defaults", report)
        self.assertIn("tcp:8021:interface=127.0.0.1", report)
        self.assertIn("disabled: command", report)


class EchoStreamService(StreamListeningService):
    section_name = "file"

    def factory(self) -> Factory:
        return Factory.forProtocol(Protocol)


class EchoDatagramService(DatagramListeningService):
    section_name = "time"

    def protocol(self) -> DatagramProtocol:
        return DatagramProtocol()


class DatagramMemoryReactor(MemoryReactor):
    """MemoryReactor has no listenUDP: record the calls, return a fake port."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any, str, int]] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        self.udp.append((port, protocol, interface, maxPacketSize))
        return _FakePort(IPv4Address("UDP", interface, port))


@attrs.define
class _FakePort:
    address: IPv4Address

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        pass


class RefusingReactor(MemoryReactor):
    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class ListeningServiceTests(TestCase):
    def test_stream_service_listens_on_its_endpoint(self) -> None:
        """A TCP service listens on its configured endpoint at privileged start."""
        reactor = MemoryReactor()
        service = EchoStreamService(load(None), reactor)
        service.privilegedStartService()
        port, _, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (8021, "127.0.0.1"))
        self.assertIsNotNone(service.listening_address)
        service.startService()
        service.stopService()
        self.assertIsNone(service.listening_address)

    def test_port_in_use_is_one_clear_line(self) -> None:
        """A port that is taken gives a ServiceStartError naming the endpoint."""
        service = EchoStreamService(load(None), RefusingReactor())
        error = self.assertRaises(ServiceStartError, service.privilegedStartService)
        self.assertIn(
            "[file] cannot listen on tcp:8021:interface=127.0.0.1", str(error)
        )
        self.assertIn("Address already in use", str(error))

    def test_ssl_without_certificate_is_refused(self) -> None:
        """An ssl: endpoint needs [tls] certificate and private_key."""
        directory = temporary_directory(self)
        path = write_config(directory, '[file]\nendpoint = "ssl:0"\n')
        service = EchoStreamService(load(path), MemoryReactor())
        error = self.assertRaises(ServiceStartError, service.privilegedStartService)
        self.assertIn("[tls] certificate and private_key are not set", str(error))

    def test_datagram_service_reads_oversize_datagrams_whole(self) -> None:
        """UDP services listen with a maxPacketSize above any datagram (65535)."""
        reactor = DatagramMemoryReactor()
        service = EchoDatagramService(load(None), reactor)
        service.privilegedStartService()
        port, _, interface, max_packet_size = reactor.udp[0]
        self.assertEqual((port, interface, max_packet_size), (8123, "127.0.0.1", 65535))

    def test_missing_systemd_socket(self) -> None:
        """A systemd: endpoint whose name systemd did not pass is a clear error."""
        directory = temporary_directory(self)
        path = write_config(
            directory, '[time]\nendpoint = "systemd:name=netlab-time"\n'
        )
        self.patch(service_module.os, "environ", {"LISTEN_FDNAMES": "other"})
        service = EchoDatagramService(load(path), MemoryReactor())
        error = self.assertRaises(ServiceStartError, service.privilegedStartService)
        self.assertIn("no socket named 'netlab-time'", str(error))
        self.assertIn("FileDescriptorName=", str(error))

    def test_reconfigure_reports_restart_keys(self) -> None:
        """Changing a key that is not live is reported as needing a restart."""
        directory = temporary_directory(self)
        first = load(write_config(directory, ""))
        second = load(
            write_config(directory, '[file]\nendpoint = "tcp:9021"\n', name="b.toml")
        )
        service = EchoStreamService(first, MemoryReactor())
        self.assertEqual(list(service.reconfigure(second)), ["[file] endpoint"])
        self.assertIs(service.config, second)


class MakeServiceTests(TestCase):
    def test_log_observer_is_installed_as_component(self) -> None:
        """The configured log format reaches twistd as an ILogObserver component."""
        directory = temporary_directory(self)
        options = Options()
        options.parseOptions(
            ["--config", str(write_config(directory, ALL_OFF + "[netlab]\n"))]
        )
        root = makeService(options)
        application = Application("netlab")
        root.setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), NetlabLogObserver)
        self.assertIs(root.parent, IService(application))

    def test_json_observer_writes_lines_with_event_names(self) -> None:
        """JSON logging writes one object per line, with the event name field."""
        stream = io.StringIO()
        observer = NetlabLogObserver.create("json", "info", stream)
        log = Logger(namespace="netlab", observer=observer)
        log.info("hello {who}", event="test.hello", who="world")
        log.debug("hidden", event="test.hidden")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        record = json.loads(lines[0])
        self.assertEqual((record["event"], record["who"]), ("test.hello", "world"))

    def test_level_changes_while_running(self) -> None:
        """set_level (used by reload) changes what is written."""
        stream = io.StringIO()
        observer = NetlabLogObserver.create("text", "warn", stream)
        log = Logger(namespace="netlab", observer=observer)
        log.info("before", event="test.before")
        observer.set_level("info")
        log.info("after", event="test.after")
        self.assertNotIn("before", stream.getvalue())
        self.assertIn("after", stream.getvalue())

    def test_no_services_enabled(self) -> None:
        """With every service off the root service has no children."""
        directory = temporary_directory(self)
        root = NetlabService(load(write_config(directory, ALL_OFF)), MemoryReactor())
        self.assertEqual(list(root), [])
        self.assertIsInstance(root.config, NetlabConfig)
