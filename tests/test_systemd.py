"""Tests for netlab.systemd: sd_notify messages and adopting sockets from systemd.

The notifier is tested against a real ``AF_UNIX`` datagram socket the test
reads (a path, and an abstract ``@`` name).  Socket activation is tested with
real sockets made to look inherited: Twisted's own table of inherited
descriptors is patched, exactly as ``LISTEN_PID``/``LISTEN_FDS``/
``LISTEN_FDNAMES`` would have filled it, and a real client then talks to a
service that adopted its socket.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    _SystemdParser,
    connectProtocol,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import TestCase

from netlab.config import NetlabConfig, from_mapping
from netlab.service import (
    DatagramListeningService,
    ServiceStartError,
    StreamListeningService,
    systemd_datagram_sockets,
)
from netlab.systemd import (
    Notifier,
    adopt_datagram_socket,
    notify_address,
    notify_message,
)
from tests.support import temporary_directory

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def notify_listener(testcase: TestCase, *, abstract: bool) -> tuple[socket.socket, str]:
    """A datagram socket playing systemd's notification socket, and its
    ``$NOTIFY_SOCKET`` spelling."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    testcase.addCleanup(listener.close)
    if abstract:
        name = f"netlab-test-{uuid.uuid4().hex}"
        listener.bind(b"\0" + name.encode())
        value = "@" + name
    else:
        value = str(temporary_directory(testcase) / "notify")
        listener.bind(value)
    listener.setblocking(False)
    return listener, value


def received(listener: socket.socket) -> list[dict[str, str]]:
    """Every notification waiting on ``listener``, parsed into fields."""
    messages = []
    while True:
        try:
            data = listener.recv(4096)
        except BlockingIOError:
            return messages
        lines = data.decode().splitlines()
        messages.append(dict(line.split("=", 1) for line in lines))


def inherit(testcase: TestCase, sockets: Mapping[str, socket.socket]) -> dict[str, int]:
    """Make ``sockets`` look passed by systemd under their names.

    Their descriptors become the process's inherited descriptors, as Twisted's
    ``systemd:`` endpoint sees them.  Each descriptor still open at the end
    of the test (and still this socket: a closed number may be reused) is
    closed then.
    """
    descriptors = {name: sock.detach() for name, sock in sockets.items()}
    identities = {fd: os.fstat(fd).st_ino for fd in descriptors.values()}
    testcase.patch(
        _SystemdParser,
        "_sddaemon",
        ListenFDs(list(descriptors.values()), tuple(descriptors)),
    )

    def close_still_inherited() -> None:
        for fd, inode in identities.items():
            if is_open(fd) and os.fstat(fd).st_ino == inode:
                os.close(fd)

    testcase.addCleanup(close_still_inherited)
    return descriptors


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def bound(family: int, kind: int, *, listen: bool = False) -> socket.socket:
    """A blocking socket bound on loopback, as systemd would create it."""
    sock = socket.socket(family, kind)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    if listen:
        sock.listen()
    return sock


#: The systemd endpoints the tests' services are configured with.
ENDPOINTS = {
    "time": "systemd:name=netlab-time",
    "file": "systemd:domain=INET:name=netlab-file",
}


def config_with(section: str, endpoint: str, directory: Any) -> NetlabConfig:
    return from_mapping(
        {
            "netlab": {"state_directory": str(directory)},
            section: {"endpoint": endpoint},
        },
        base_directory=directory,
    )


class Echo(DatagramProtocol):
    """Answers every datagram with ``echo:`` and the datagram."""

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        self.transport.write(b"echo:" + datagram, address)


class EchoDatagramService(DatagramListeningService):
    """A UDP service in the time service's place, with an echo protocol."""

    section_name = "time"

    def protocol(self) -> DatagramProtocol:
        return Echo()


class StreamEcho(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)


class EchoStreamService(StreamListeningService):
    """A TCP service in the file service's place, with an echo protocol."""

    section_name = "file"

    def factory(self) -> Factory:
        return Factory.forProtocol(StreamEcho)


def assert_start_error(
    testcase: TestCase, service_class: type[Any], *expected: str
) -> None:
    """Starting ``service_class`` (on its systemd endpoint from
    :data:`ENDPOINTS`) fails with a ServiceStartError whose one line starts
    with the service's section and contains every ``expected`` text."""
    section = service_class.section_name
    config = config_with(section, ENDPOINTS[section], temporary_directory(testcase))
    service = service_class(config, MemoryReactor())
    with testcase.assertRaises(ServiceStartError) as caught:
        service.privilegedStartService()
    message = str(caught.exception)
    testcase.assertTrue(message.startswith(f"[{section}] "), message)
    for text in expected:
        testcase.assertIn(text, message)


class OneReply(DatagramProtocol):
    """Sends one datagram and fires ``reply`` with the answer."""

    def __init__(self, payload: bytes, address: tuple[str, int]) -> None:
        self.payload = payload
        self.address = address
        self.reply: Deferred[bytes] = Deferred()

    def startProtocol(self) -> None:
        self.transport.write(self.payload, self.address)

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        if not self.reply.called:
            self.reply.callback(datagram)


async def udp_exchange(payload: bytes, address: tuple[str, int]) -> bytes:
    """Send ``payload`` to a UDP server over loopback; return its answer."""
    from twisted.internet import reactor

    client = OneReply(payload, address)
    port = reactor.listenUDP(0, client, interface=address[0])
    try:
        return await client.reply.addTimeout(10, reactor)
    finally:
        await port.stopListening()


class Collect(Protocol):
    """Sends ``payload`` on connect; ``answer`` fires with the first reply."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)


async def tcp_exchange(payload: bytes, address: tuple[str, int]) -> bytes:
    """Send ``payload`` to a TCP server over loopback; return its first answer."""
    from twisted.internet import reactor

    protocol = Collect(payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, *address), protocol)
    try:
        return await protocol.answer.addTimeout(10, reactor)
    finally:
        protocol.transport.loseConnection()


# --------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------


class NotifyMessageTests(TestCase):
    """The notification wire format: ``KEY=VALUE`` lines in one datagram."""

    def test_fields_become_lines_in_order(self) -> None:
        """Each field is one ``KEY=VALUE`` line, in the order given."""
        message = notify_message({"READY": "1", "STATUS": "serving time on x:1"})
        self.assertEqual(message, b"READY=1\nSTATUS=serving time on x:1\n")

    def test_newline_in_value_refused(self) -> None:
        """A newline in a value would forge another assignment: refused."""
        with self.assertRaises(ValueError):
            notify_message({"STATUS": "ok\nREADY=1"})

    def test_bad_field_name_refused(self) -> None:
        """Field names are upper-case words; anything else is refused."""
        for name in ("ready", "", "A=B", "STA TUS"):
            with self.subTest(name=name), self.assertRaises(ValueError):
                notify_message({name: "1"})

    def test_addresses(self) -> None:
        """A path stays a path; ``@name`` is name in the abstract namespace."""
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_address("@foo/bar"), b"\0foo/bar")
        for bad in ("relative/path", "@", "vsock:2:1234"):
            with self.subTest(value=bad), self.assertRaises(ValueError):
                notify_address(bad)


class NotifierTests(TestCase):
    """Notifications reach a real notification socket, or nothing happens."""

    def test_path_socket(self) -> None:
        """A notification arrives whole at a filesystem-path socket."""
        listener, value = notify_listener(self, abstract=False)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": value})
        assert notifier is not None
        self.assertTrue(notifier.send(READY="1", STATUS="serving"))
        self.assertEqual(received(listener), [{"READY": "1", "STATUS": "serving"}])

    def test_abstract_socket(self) -> None:
        """``@name`` reaches a socket bound in the abstract namespace."""
        listener, value = notify_listener(self, abstract=True)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": value})
        assert notifier is not None
        notifier.send(STOPPING="1")
        self.assertEqual(received(listener), [{"STOPPING": "1"}])

    def test_no_notify_socket_no_notifier(self) -> None:
        """Without ``$NOTIFY_SOCKET`` (or with an empty one) there is no notifier."""
        self.assertIsNone(Notifier.from_environment({}))
        self.assertIsNone(Notifier.from_environment({"NOTIFY_SOCKET": ""}))

    def test_variable_removed_from_environment(self) -> None:
        """The variable is consumed, so programs the daemon runs cannot notify."""
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}
        Notifier.from_environment(environ)
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_unsupported_address_logged(self) -> None:
        """An address of an unsupported kind is logged, and nothing is sent."""
        with capturedLogs() as events:
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:99"})
        self.assertIsNone(notifier)
        self.assertEqual([e["event"] for e in events], ["systemd.notify.unsupported"])

    def test_unreachable_socket_logged_not_raised(self) -> None:
        """A socket nobody listens on is a logged warning, never a crash."""
        directory = temporary_directory(self)
        notifier = Notifier(str(directory / "nobody"))
        with capturedLogs() as events:
            self.assertFalse(notifier.send(READY="1"))
        failures = [e for e in events if e["event"] == "systemd.notify.failed"]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["fields"], "READY")


# --------------------------------------------------------------------------
# Socket activation
# --------------------------------------------------------------------------


class AdoptDatagramTests(TestCase):
    """A UDP service takes its socket from systemd by name."""

    def test_adopted_socket_serves_a_real_client(self) -> None:
        """The service answers a real client on the inherited socket, and the
        inherited descriptor itself is closed (the port holds a duplicate)."""
        from twisted.internet import reactor

        sock = bound(socket.AF_INET, socket.SOCK_DGRAM)
        address = sock.getsockname()
        fds = inherit(self, {"netlab-time": sock})
        config = config_with("time", ENDPOINTS["time"], temporary_directory(self))
        service = EchoDatagramService(config, reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)

        self.assertFalse(is_open(fds["netlab-time"]))
        self.assertEqual(
            (service.listening_address.host, service.listening_address.port), address
        )
        self.assertFalse(os.get_blocking(service.port.fileno()))

        async def talk() -> None:
            self.assertEqual(await udp_exchange(b"hi", address), b"echo:hi")

        return ensureDeferred(talk())

    def test_ipv6_socket(self) -> None:
        """An inherited IPv6 datagram socket is adopted with its own family."""
        reactor = MemoryReactor()
        sock = bound(socket.AF_INET6, socket.SOCK_DGRAM)
        inherit(self, {"chat": sock})
        protocol = Echo()
        adopt_datagram_socket(reactor, "chat", protocol, 4000)
        [(_, family, adopted, size)] = reactor.adoptedPorts
        self.assertEqual((family, adopted, size), (socket.AF_INET6, protocol, 4000))

    def test_max_packet_size_passed(self) -> None:
        """The service's ``max_packet_size`` reaches the adopted port, so
        oversize datagrams are seen whole rather than truncated at 8192."""
        reactor = MemoryReactor()
        inherit(self, {"netlab-time": bound(socket.AF_INET, socket.SOCK_DGRAM)})
        config = config_with("time", ENDPOINTS["time"], temporary_directory(self))
        EchoDatagramService(config, reactor).privilegedStartService()
        [(_, _, _, size)] = reactor.adoptedPorts
        self.assertEqual(size, EchoDatagramService.max_packet_size)

    def test_missing_name(self) -> None:
        """No socket under the configured name: the error lists what systemd
        did pass and names the unit setting to fix."""
        inherit(self, {"netlab-chat": bound(socket.AF_INET, socket.SOCK_DGRAM)})
        assert_start_error(
            self,
            EchoDatagramService,
            "no socket named 'netlab-time'",
            "'netlab-chat'",
            "FileDescriptorName=netlab-time",
        )

    def test_not_activated(self) -> None:
        """Started without socket activation at all: the same clear error."""
        inherit(self, {})
        assert_start_error(self, EchoDatagramService, "names passed: none")

    def test_stream_socket_refused(self) -> None:
        """A TCP socket under the UDP service's name is refused at start-up."""
        inherit(
            self,
            {"netlab-time": bound(socket.AF_INET, socket.SOCK_STREAM, listen=True)},
        )
        assert_start_error(
            self, EchoDatagramService, "is a stream (TCP) socket", "ListenDatagram="
        )

    def test_unix_socket_refused(self) -> None:
        """An AF_UNIX datagram socket (ListenDatagram=/path) is refused clearly
        instead of failing inside Twisted with an unsupported family."""
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        unix.bind(str(temporary_directory(self) / "sock"))
        inherit(self, {"netlab-time": unix})
        assert_start_error(self, EchoDatagramService, "AF_UNIX", "not an IP one")

    def test_descriptor_not_a_socket(self) -> None:
        """A descriptor that is not a socket at all is refused with a hint."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([read_end], ("netlab-time",)))
        self.addCleanup(os.close, read_end)
        assert_start_error(
            self, EchoDatagramService, "is not usable", "ListenDatagram="
        )


class AdoptStreamTests(TestCase):
    """A TCP service takes its socket through Twisted's ``systemd:`` endpoint."""

    def test_adopted_socket_serves_a_real_client(self) -> None:
        """The service answers a real TCP client on the inherited socket."""
        from twisted.internet import reactor

        sock = bound(socket.AF_INET, socket.SOCK_STREAM, listen=True)
        address = sock.getsockname()
        inherit(self, {"netlab-file": sock})
        config = config_with("file", ENDPOINTS["file"], temporary_directory(self))
        service = EchoStreamService(config, reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.listening_address.port, address[1])

        async def talk() -> None:
            self.assertEqual(await tcp_exchange(b"hi", address), b"echo:hi")

        return ensureDeferred(talk())

    def test_missing_name(self) -> None:
        """No socket under the configured name: a clear start-up error."""
        inherit(self, {"other": bound(socket.AF_INET, socket.SOCK_STREAM, listen=True)})
        assert_start_error(
            self,
            EchoStreamService,
            "no socket named 'netlab-file'",
            "FileDescriptorName=netlab-file",
        )

    def test_datagram_socket_refused(self) -> None:
        """A UDP socket under the TCP service's name is refused at start-up
        (Twisted would adopt it and fail later, inside the reactor)."""
        inherit(self, {"netlab-file": bound(socket.AF_INET, socket.SOCK_DGRAM)})
        assert_start_error(
            self,
            EchoStreamService,
            "is a datagram (UDP) socket",
            "ListenStream=",
        )

    def test_connection_socket_refused(self) -> None:
        """A connected socket (a unit with Accept=yes) is refused."""
        server = bound(socket.AF_INET, socket.SOCK_STREAM, listen=True)
        self.addCleanup(server.close)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        inherit(self, {"netlab-file": client})
        assert_start_error(self, EchoStreamService, "Accept=yes", "Accept=no")

    def test_wrong_domain_refused(self) -> None:
        """An IPv6 socket for a ``domain=INET`` endpoint: the error says what
        to write instead."""
        inherit(
            self,
            {"netlab-file": bound(socket.AF_INET6, socket.SOCK_STREAM, listen=True)},
        )
        assert_start_error(self, EchoStreamService, "write domain=INET6")


class SystemdDatagramSocketsTests(TestCase):
    """``systemd_datagram_sockets``: one inherited UDP socket shared by a service
    and its helper processes, checked like every adopted socket."""

    def test_sockets_share_the_inherited_one(self) -> None:
        """Each returned socket is the passed socket; the inherited descriptor
        is closed so programs the daemon runs do not inherit it."""
        passed = bound(socket.AF_INET, socket.SOCK_DGRAM)
        address = passed.getsockname()
        fds = inherit(self, {"a": passed})
        sockets = systemd_datagram_sockets("time", "a", 3)
        for sock in sockets:
            self.addCleanup(sock.close)
            self.assertEqual(sock.getsockname(), address)
        self.assertEqual(len({sock.fileno() for sock in sockets}), 3)
        self.assertFalse(is_open(fds["a"]))

    def test_missing_name(self) -> None:
        """An unknown name is a ServiceStartError that names the service and the
        unit setting."""
        inherit(self, {"a": bound(socket.AF_INET, socket.SOCK_DGRAM)})
        with self.assertRaises(ServiceStartError) as caught:
            systemd_datagram_sockets("time", "b", 2)
        self.assertTrue(str(caught.exception).startswith("[time] "))
        self.assertIn("FileDescriptorName=b", str(caught.exception))

    def test_stream_socket_refused(self) -> None:
        """A TCP socket where UDP is needed is refused with the unit setting."""
        inherit(self, {"a": bound(socket.AF_INET, socket.SOCK_STREAM, listen=True)})
        with self.assertRaises(ServiceStartError) as caught:
            systemd_datagram_sockets("time", "a", 2)
        self.assertIn("use ListenDatagram=", str(caught.exception))

    def test_unix_socket_refused(self) -> None:
        """A datagram socket that is not IP (AF_UNIX) is refused too."""
        inherit(self, {"a": socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)})
        with self.assertRaises(ServiceStartError) as caught:
            systemd_datagram_sockets("time", "a", 1)
        self.assertIn("not an IP one", str(caught.exception))
