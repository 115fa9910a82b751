"""Helpers for the chat tests: a chat server core on a fake clock and network.

:class:`Harness` drives :class:`netlab.chat.server.ChatServer` with
:class:`twisted.internet.task.Clock` and collects what it sends, per address,
so tests can join members in either mode and read what each one received.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import attrs
from twisted.internet.task import Clock

from netlab.chat.server import Address, ChatServer
from netlab.config import ChatSection

SECRET = b"chat-tests-secret-" * 2


def settings(**overrides: Any) -> ChatSection:
    """The [chat] defaults with ``overrides``."""
    return attrs.evolve(ChatSection(), **overrides)


class Harness:
    """A ChatServer, its clock, and everything it sent, by address."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.server = ChatServer(settings(**overrides), self.clock, secret=SECRET)
        self.inbox: dict[Address, list[bytes]] = defaultdict(list)
        self.next_id = 100
        #: What the last :meth:`join` received (welcome, history, join event).
        self.joined: list[dict[str, Any]] = []

    def send(self, data: bytes | str | dict[str, Any], address: Address) -> None:
        """Deliver one datagram to the server and collect its output."""
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.server.receive(data, address)
        self.deliver()

    def deliver(self) -> None:
        for datagram, address in self.server.flush():
            assert len(datagram) <= self.server.settings.max_datagram, datagram
            self.inbox[address].append(datagram)

    def datagrams(self, address: Address) -> list[bytes]:
        """What ``address`` received since the last call (and forget it)."""
        received = self.inbox.pop(address, [])
        return received

    def messages(self, address: Address) -> list[dict[str, Any]]:
        """The JSON lines ``address`` received since the last call."""
        return [
            json.loads(line)
            for datagram in self.datagrams(address)
            for line in datagram.split(b"\n")
            if line
        ]

    def lines(self, address: Address) -> list[str]:
        """The text lines ``address`` received since the last call."""
        return [
            line
            for datagram in self.datagrams(address)
            for line in datagram.decode().split("\n")
            if line
        ]

    def request(self, address: Address, token: str, kind: str, **fields: Any) -> int:
        """Send a JSON request with a fresh id; return the id."""
        self.next_id += 1
        self.send({"type": kind, "token": token, "id": self.next_id, **fields}, address)
        return self.next_id

    def join(self, address: Address, nick: str, room: str = "lobby") -> str:
        """Join in JSON mode (cookie round trip included); return the token."""
        request = {"type": "join", "nick": nick, "room": room, "id": 1, "pad": "x" * 80}
        self.send(request, address)
        cookie = self.messages(address)[0]["cookie"]
        self.send({**request, "cookie": cookie}, address)
        self.joined = self.messages(address)
        welcome = self.joined[0]
        assert welcome["type"] == "welcome", welcome
        return str(welcome["token"])

    def join_text(self, address: Address, nick: str) -> None:
        """Join in text mode: prove the address with the code, then /nick."""
        self.send("hello, is this the chat?", address)
        code = self.lines(address)[0].rsplit(" ", 1)[-1]
        self.send(code, address)
        self.send(f"/nick {nick}", address)
        self.lines(address)
