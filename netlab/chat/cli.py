"""``netlab chat``: the interactive chat client, and ``--send`` for scripts.

The protocol work is :class:`netlab.chat.client.ChatClient`; this module
wires it to a UDP port, to the terminal through Twisted's ``StandardIO`` and
to the command line (declared in :mod:`netlab.commands`).  Ctrl-D (end of
input), ``/quit`` and Ctrl-C all leave the room cleanly: the leave datagram
is sent before the reactor stops.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any

from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

from netlab.chat.client import ChatClient, Renderer
from netlab.cli import Context, colour_enabled
from netlab.client import resolve_identity, service_address
from netlab.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    RemoteError,
)

#: Seconds between retransmissions of an unacknowledged request; the client
#: gives up after ``[client] timeout``.
RETRANSMIT = 0.5

#: How often the client looks for requests to retransmit and keepalives due.
TICK = 0.25

HELP = (
    "commands: /nick NAME  /join ROOM  /who  /msg NICK TEXT  /quit (or Ctrl-D)",
    "anything else is said to the room",
)


class _ClientPort(DatagramProtocol):
    """Delivers the server's datagrams (and only the server's) to the client."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: ChatClient | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if tuple(addr) == self.server and self.client is not None:
            self.client.receive(datagram)

    def send(self, datagram: bytes) -> None:
        if self.transport is not None:
            try:
                self.transport.write(datagram, self.server)
            except OSError:
                pass  # Lost like any datagram; the retransmission covers it.


def _identity(context: Context) -> tuple[str, bytes] | None:
    """The user and key to authenticate with (``--user``, ``[client]``), if any."""
    identity = resolve_identity(context.config, context.args.user)
    if identity.user is None or identity.key is None:
        return None
    return identity.user, identity.key


async def chat(context: Context) -> int:
    reactor = context.reactor
    host, port, _ = service_address(context.config, "chat", context.args.server)
    try:
        ip = await reactor.resolve(host)
    except Exception:
        raise ConnectionFailed(f"cannot resolve {host}; check --server") from None
    port_protocol = _ClientPort((ip, port))
    reactor.listenUDP(0, port_protocol, interface="::" if ":" in ip else "")
    nick = context.args.nick or os.environ.get("USER") or getpass.getuser()
    room = context.args.room or ""
    finished: Deferred[int] = Deferred()
    renderer = Renderer(colour_enabled(sys.stdout))
    lines: list[str] = []
    client = ChatClient(
        nick,
        room,
        reactor,
        port_protocol.send,
        lambda item: lines.append(renderer.render(item)),
        retransmit_interval=RETRANSMIT,
        max_attempts=max(2, round(context.config.client.timeout / RETRANSMIT)),
        identity=_identity(context),
    )
    port_protocol.client = client

    def fail(code: str, message: str) -> None:
        if not finished.called:
            error: Exception
            if code == "timeout":
                error = ConnectionFailed(message)
            elif code.startswith("auth-"):
                error = AuthenticationFailed(message)
            else:
                error = RemoteError(code, message)
            finished.errback(error)

    client.on_failure = fail
    ticker = LoopingCall(client.tick)
    ticker.clock = reactor
    ticker.start(TICK, now=False)
    try:
        if context.args.send is not None:
            return await _send_once(client, context.args.send, finished)
        return await _interactive(reactor, client, renderer, lines, finished)
    finally:
        ticker.stop()


async def _send_once(client: ChatClient, text: str, finished: Deferred[int]) -> int:
    """Join, say ``text``, wait for the acknowledgement, leave."""
    said: dict[str, int] = {}

    def welcomed() -> None:
        if "id" not in said:
            said["id"] = client.say(text)

    def acknowledged(message_id: int, reply: dict[str, Any]) -> None:
        if message_id == said.get("id") and not finished.called:
            if reply.get("type") == "error":
                finished.errback(
                    RemoteError(str(reply.get("code")), str(reply.get("message")))
                )
            else:
                finished.callback(0)

    client.on_welcome = welcomed
    client.on_ack = acknowledged
    client.start()
    try:
        return await finished
    finally:
        client.leave()


class _Terminal(LineReceiver):
    """Lines from the keyboard become chat requests; shown items are printed."""

    delimiter = b"\n"

    def __init__(self, client: ChatClient, finished: Deferred[int]) -> None:
        self.client = client
        self.finished = finished
        #: Set when the reactor is stopping (Ctrl-C): the exit status is then
        #: the interrupted one, not a normal end.
        self.interrupted = False

    def print(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write((line + "\n").encode("utf-8", "replace"))

    def lineReceived(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if not line.startswith("/"):
            self.client.say(line)
        elif command == "/nick" and argument:
            self.client.change_nick(argument)
        elif command == "/join" and argument:
            self.client.change_room(argument)
        elif command == "/who":
            self.client.who()
        elif command == "/msg" and " " in argument:
            nick, _, text = argument.partition(" ")
            self.client.private(nick, text.strip())
        elif command in ("/quit", "/leave"):
            self.close()
        else:
            for help_line in HELP:
                self.print(f"* {help_line}")

    def close(self) -> None:
        if not self.finished.called and not self.interrupted:
            self.client.leave()
            self.finished.callback(0)

    def connectionLost(self, reason: Any = None) -> None:
        # End of input (Ctrl-D, or the pipe closed): leave the room.
        self.close()


async def _interactive(
    reactor: Any,
    client: ChatClient,
    renderer: Renderer,
    early_lines: list[str],
    finished: Deferred[int],
) -> int:
    terminal = _Terminal(client, finished)
    stdio.StandardIO(terminal, reactor=reactor)
    for line in early_lines:
        terminal.print(line)
    client.show = lambda item: terminal.print(renderer.render(item))

    def interrupted() -> None:
        # Ctrl-C stops the reactor: say goodbye on the way out.
        terminal.interrupted = True
        client.leave()

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    client.start()
    return await finished
