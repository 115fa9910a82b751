"""The chat service: a thin Twisted adapter around the chat state machine.

:class:`ChatProtocol` hands each datagram to the state machine and, once per
reactor turn, writes out what it queued.  Twisted's UDP port reads up to
256 KiB of datagrams per wake-up, so under a burst many messages are queued
before the flush and go out packed several to a datagram; when traffic is
light each message leaves alone, at once.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any

import attrs
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from netlab.auth import KeyFileError
from netlab.chat.server import Address, ChatServer
from netlab.config import NetlabConfig
from netlab.service import (
    DatagramListeningService,
    INetlabService,
    ServiceStartError,
)
from netlab.tcpservice import load_users_for

log = Logger(namespace="netlab.chat")

#: Errors from ``sendto`` that mean "this datagram could not go now": a full
#: socket buffer during a fan-out burst, a vanished peer.  Twisted's
#: ``udp.Port.write`` raises them; the datagram is dropped and counted, and
#: JSON clients repair the gap from history.
TRANSIENT_SEND_ERRORS = frozenset(
    {
        errno.EAGAIN,
        errno.ENOBUFS,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


class ChatProtocol(DatagramProtocol):
    """Feeds datagrams to the chat state machine and writes its output."""

    # The service logs where it listens; "Starting protocol <object at 0x...>"
    # tells an operator nothing more.
    noisy = False

    def __init__(self, server: ChatServer, reactor: Any) -> None:
        self.server = server
        self.reactor = reactor
        self._flush_call: IDelayedCall | None = None

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        self.server.receive(datagram, addr)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        """Write the queued output after the datagrams read in this turn."""
        if self._flush_call is None and self.server.pending:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        if self.transport is None:
            return
        write = self.transport.write
        for datagram, address in self.server.flush():
            try:
                write(datagram, address)
            except (OSError, MessageLengthError) as error:
                number = getattr(error, "errno", None)
                if isinstance(error, OSError) and number not in TRANSIENT_SEND_ERRORS:
                    raise
                self.server.counters.send_errors += 1

    def stopProtocol(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None


class ChatService(DatagramListeningService):
    """The ``[chat]`` service: rooms and nicknames over UDP."""

    section_name = "chat"

    def __init__(self, config: NetlabConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        self.server = ChatServer(config.chat, reactor)
        self.server.observe = self._observe
        self.chat_protocol = ChatProtocol(self.server, reactor)
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def protocol(self) -> DatagramProtocol:
        return self.chat_protocol

    def _load_users(self, config: NetlabConfig) -> None:
        """Take the users file's users (raises KeyFileError)."""
        self.server.verifier.users = load_users_for(config)

    def privilegedStartService(self) -> None:
        if self.config.chat.require_authentication:
            try:
                self._load_users(self.config)
            except KeyFileError as error:
                raise ServiceStartError(f"[netlab] users_file: {error}") from None
            if not self.server.verifier.users:
                log.warn(
                    "chat requires authentication but has no users, so it refuses "
                    "every join; create one with netlab keygen",
                    event="netlab.users.none",
                )
        super().privilegedStartService()

    def listen(self) -> IListeningPort:
        port = super().listen()
        size = self.config.chat.socket_buffer
        if size:
            handle = port.getHandle()  # type: ignore[attr-defined]
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                # Best effort: the kernel caps the size; an error keeps the default.
                with contextlib.suppress(OSError):
                    handle.setsockopt(socket.SOL_SOCKET, option, size)
        return port

    def _observe(self, name: str, fields: dict[str, Any]) -> None:
        log.info(
            "{event}: {nick} ({address})",
            event=name,
            nick=fields.get("nick"),
            address=fields.get("address") or fields.get("room"),
        )

    def _sweep(self) -> None:
        self.server.expire()
        self.chat_protocol.schedule_flush()

    @staticmethod
    def _sweep_interval(config: NetlabConfig) -> float:
        return max(1.0, float(config.chat.member_timeout) / 6)

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self._sweep_interval(self.config), now=False)

    def stopService(self) -> Any:
        if self._sweeper.running:
            self._sweeper.stop()
        log.info(
            "chat service stopping: {received} datagrams in, {datagrams} out, "
            "{deliveries} deliveries, {send_errors} send errors, "
            "{source_limited} over a source limit, {dropped_members} members "
            "dropped for flooding, {evicted_members} evicted",
            event="chat.stopped",
            **attrs.asdict(self.server.counters),
        )
        return super().stopService()

    def apply(self, config: NetlabConfig) -> None:
        if config.chat.require_authentication:
            try:
                self._load_users(config)
            except KeyFileError as error:
                log.warn(
                    "reload: keeping the previous chat users: {reason}",
                    event="netlab.users.reload_failed",
                    reason=str(error),
                )
        self.server.apply(config.chat)
        if self._sweeper.running:
            self._sweeper.interval = self._sweep_interval(config)
        log.info("chat settings reloaded", event="chat.reloaded")


def build(config: NetlabConfig, reactor: Any) -> INetlabService:
    """The chat service for ``config`` (registered in SERVICE_BUILDERS)."""
    return ChatService(config, reactor)
