"""systemd integration: readiness notification and inherited (activated) sockets.

Twisted adopts inherited *stream* sockets through its ``systemd:`` endpoint
but has neither ``sd_notify`` nor a way to adopt an inherited *datagram*
socket by name.  This module fills both gaps with the standard library:

- :class:`Notifier` sends ``sd_notify`` messages (``READY=1``, ``STATUS=``,
  ``RELOADING=1``, ``STOPPING=1``) to ``$NOTIFY_SOCKET``: one datagram of
  ``KEY=VALUE`` lines to an ``AF_UNIX`` path, where a leading ``@`` names the
  abstract namespace.  Without ``$NOTIFY_SOCKET`` there is no notifier and
  nothing is sent.
- :func:`check_stream_socket` checks an inherited socket before Twisted's
  ``systemd:`` endpoint adopts it, and :func:`adopt_datagram_socket` adopts an
  inherited UDP socket, so that a missing or wrong descriptor stops start-up
  with one line that says which unit setting to fix.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import attrs
from twisted.internet.interfaces import IListeningPort, IReactorSocket
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

log = Logger(namespace="netlab.systemd")


# --------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------


def notify_message(fields: Mapping[str, str]) -> bytes:
    """Encode notification fields as systemd expects: ``KEY=VALUE`` lines.

    A newline inside a value would start a new, forged assignment, so it is
    refused (callers put service descriptions, never client input, here).
    """
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"not a notification field name: {key!r}")
        if "\n" in value:
            raise ValueError(f"notification field {key} contains a newline")
        lines.append(f"{key}={value}\n")
    return "".join(lines).encode("utf-8")


def notify_address(value: str) -> str | bytes:
    """The socket address for a ``$NOTIFY_SOCKET`` value.

    ``/run/systemd/notify`` is a filesystem path; ``@name`` is ``name`` in the
    abstract namespace, which Python spells with a leading NUL byte.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an abstract "
        "socket name (@NAME)"
    )


def monotonic_usec() -> str:
    """``CLOCK_MONOTONIC`` in microseconds, as ``RELOADING=1`` carries it."""
    return str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


@attrs.frozen
class Notifier:
    """Sends ``sd_notify`` messages to one notification socket."""

    address: str | bytes

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str]) -> Notifier | None:
        """The notifier ``$NOTIFY_SOCKET`` asks for, or ``None`` without one.

        The variable is removed from ``environ`` (as ``sd_notify`` does with
        ``unset_environment``): programs the command service runs must not
        inherit the right to speak for the daemon.
        """
        value = environ.pop("NOTIFY_SOCKET", "")
        if not value:
            return None
        try:
            return cls(notify_address(value))
        except ValueError as error:
            log.warn(
                "not notifying systemd: {reason}",
                event="systemd.notify.unsupported",
                reason=str(error),
            )
            return None

    def send(self, **fields: str) -> bool:
        """Send one notification; log and return False when it cannot be sent.

        The socket is non-blocking: a notification is never worth stalling
        the reactor for, and systemd reads its socket promptly.
        """
        message = notify_message(fields)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message, self.address)
            except OSError as error:
                log.warn(
                    "could not notify systemd ({fields}): {reason}",
                    event="systemd.notify.failed",
                    fields=",".join(fields),
                    reason=error.strerror or str(error),
                )
                return False
        log.debug(
            "notified systemd: {fields}",
            event="systemd.notify.sent",
            fields=",".join(fields),
        )
        return True


# --------------------------------------------------------------------------
# Socket activation
# --------------------------------------------------------------------------


class ActivationError(Exception):
    """An inherited socket is missing or unusable (the message says how to fix it)."""


_KINDS = {socket.SOCK_STREAM: "stream (TCP)", socket.SOCK_DGRAM: "datagram (UDP)"}
_UNIT_SETTING = {
    socket.SOCK_STREAM: "ListenStream=",
    socket.SOCK_DGRAM: "ListenDatagram=",
}


def inherited_descriptors() -> dict[str, int]:
    """The descriptors systemd passed to this process, by ``FileDescriptorName=``.

    This is the very table Twisted's ``systemd:`` endpoint reads: importing
    :mod:`twisted.internet.endpoints` consumes ``LISTEN_PID``/``LISTEN_FDS``
    (after checking that they are meant for this process), so reading the
    environment again here would either find nothing or disagree with Twisted.
    """
    from twisted.internet.endpoints import _SystemdParser

    named: dict[str, int] = _SystemdParser._sddaemon.inheritedNamedDescriptors()
    return named


def inherited_descriptor(name: str) -> int:
    """The descriptor systemd passed under ``name``."""
    descriptors = inherited_descriptors()
    if name not in descriptors:
        passed = ", ".join(repr(n) for n in sorted(descriptors)) or "none"
        raise ActivationError(
            f"systemd passed no socket named {name!r} (names passed: {passed}); "
            f"set FileDescriptorName={name} in the .socket unit and start the "
            "daemon through it"
        )
    return descriptors[name]


def inherited_socket(
    name: str, socket_type: socket.SocketKind
) -> tuple[int, socket.socket]:
    """The descriptor named ``name`` and a checked duplicate of it as a socket.

    Checked: it is a socket of ``socket_type``, of an IP family, and (for
    streams) listening.  The caller closes both when done.
    """
    descriptor = inherited_descriptor(name)
    duplicate = -1
    try:
        duplicate = os.dup(descriptor)
        sock = socket.socket(fileno=duplicate)
    except OSError as error:
        if duplicate >= 0:
            os.close(duplicate)
        raise ActivationError(
            f"systemd socket {name!r} (descriptor {descriptor}) is not usable: "
            f"{error.strerror}; check {_UNIT_SETTING[socket_type]} in the .socket unit"
        ) from None
    problem = None
    if sock.type != socket_type:
        problem = f"is a {_KINDS.get(sock.type, sock.type.name)} socket"
    elif sock.family not in (socket.AF_INET, socket.AF_INET6):
        problem = f"is an {sock.family.name} socket, not an IP one"
    elif socket_type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        problem = "is a connection, not a listening socket (Accept=yes)"
    if problem is not None:
        sock.close()
        raise ActivationError(
            f"systemd socket {name!r} {problem}; this service needs a "
            f"{_KINDS[socket_type]} socket: use {_UNIT_SETTING[socket_type]}"
            "ADDRESS:PORT (and Accept=no) in the .socket unit"
        )
    return descriptor, sock


def check_stream_socket(name: str, domain: str) -> None:
    """Check the inherited socket for a ``systemd:domain=DOMAIN:name=NAME`` endpoint.

    Twisted adopts whatever descriptor carries the name; a datagram socket or
    one of another family would only fail later, inside the reactor.
    """
    _, sock = inherited_socket(name, socket.SOCK_STREAM)
    with sock:
        expected = getattr(socket, f"AF_{domain}", None)
        if sock.family != expected:
            actual = sock.family.name.removeprefix("AF_")
            raise ActivationError(
                f"systemd socket {name!r} is an {actual} socket but the endpoint "
                f"says domain={domain}; write domain={actual}"
            )


def adopt_datagram_socket(
    reactor: IReactorSocket,
    name: str,
    protocol: DatagramProtocol,
    max_packet_size: int,
) -> IListeningPort:
    """Listen with ``protocol`` on the UDP socket systemd passed as ``name``."""
    descriptor, sock = inherited_socket(name, socket.SOCK_DGRAM)
    with sock:
        # systemd hands sockets over blocking; one spurious wake-up on a
        # blocking socket would freeze the reactor.  O_NONBLOCK belongs to the
        # open socket, so this covers every duplicate of it.
        sock.setblocking(False)
        port = reactor.adoptDatagramPort(
            sock.fileno(), sock.family, protocol, max_packet_size
        )
    # adoptDatagramPort took its own duplicate; the inherited descriptor would
    # otherwise stay open (and be inherited by every program the daemon runs).
    os.close(descriptor)
    return port
