"""The chat client's state machine (JSON mode), free of I/O.

:class:`ChatClient` is given a ``send`` function for datagrams and a ``show``
function for what a person should see, and is fed the server's datagrams with
:meth:`ChatClient.receive` and the passing of time with :meth:`ChatClient.tick`.
It makes an unreliable network look reliable:

* every request carries a message id and is retransmitted until the server
  acknowledges that id (the server ignores duplicates, so this is safe);
* room messages carry per-room sequence numbers, and private messages
  per-member ones (:class:`Numbered`): duplicates are dropped, early arrivals
  wait in a buffer, gaps are asked for again (``resend``, ``resend-private``)
  and messages are shown exactly once, in order; a gap older than what the
  server keeps is shown as such;
* keepalives (``ping``) keep the membership alive, and their answer names the
  last number of both, which reveals a lost *last* message.

:class:`Renderer` turns what is shown into terminal lines, with a stable
colour per nickname when colour is wanted.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from netlab.auth import NONCE_SIZE, client_proof, server_proof
from netlab.chat.server import Clock
from netlab.chat.text import sanitise

#: The join request is padded to this size so that the server's cookie reply,
#: which may be no larger than the request, fits.
JOIN_PADDING = 200


@attrs.frozen
class Shown:
    """One thing to show a person.

    ``kind``: ``msg`` (room message), ``private``, ``event`` (joins, leaves,
    nick changes: shown dimmed), ``info`` (answers such as /who) or ``error``.
    """

    kind: str
    text: str
    nick: str | None = None
    room: str | None = None


@attrs.define
class Numbered:
    """A stream of numbered messages: each shown once and in order, whatever
    the network loses, repeats or reorders."""

    #: The request type that asks the server for missing numbers again.
    resend: str
    #: The next number to show; None until the server says where to start.
    expected: int | None = None
    #: Messages that arrived ahead of ``expected``, by number.
    early: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    #: The highest number known to exist (from messages and keepalive answers).
    highest_known: int = 0
    last_request: float = -1e9

    def start(self, expected: int, highest: int) -> None:
        """Show from ``expected`` on; ``highest`` exists already."""
        self.expected = expected
        self.highest_known = highest
        self._forget_before(expected)

    def reset(self) -> None:
        self.expected = None
        self.early.clear()

    def add(self, number: int, message: dict[str, Any]) -> None:
        if self.expected is not None and number < self.expected:
            return  # Already shown: a duplicate.
        self.early.setdefault(number, message)
        self.highest_known = max(self.highest_known, number)

    def ready(self) -> Iterator[dict[str, Any]]:
        """Take the messages that can be shown now, in order."""
        while self.expected is not None and self.expected in self.early:
            message = self.early.pop(self.expected)
            self.expected += 1
            yield message

    def missing(
        self, now: float, interval: float, *, urgent: bool = False
    ) -> dict[str, Any] | None:
        """The request for the first gap, if any (at most one per ``interval``)."""
        if self.expected is None:
            return None
        last = max([self.highest_known, *self.early])
        if last < self.expected:
            return None
        if not urgent and now - self.last_request < interval:
            return None
        first_early = min(self.early) if self.early else last + 1
        self.last_request = now
        return {"type": self.resend, "from": self.expected, "to": first_early - 1}

    def skip(self, first: int, last: int) -> int:
        """The server no longer has ``first``..``last``: go past them.

        Returns how many of the messages still expected were lost (0 when
        the range is not where this stream stands).
        """
        if self.expected is None or not first <= self.expected <= last:
            return 0
        lost = last - self.expected + 1
        self.expected = last + 1
        self._forget_before(self.expected)
        return lost

    def _forget_before(self, number: int) -> None:
        for early in [n for n in self.early if n < number]:
            del self.early[early]


@attrs.define
class Outstanding:
    """A request not yet acknowledged."""

    request: dict[str, Any]
    sent_at: float
    attempts: int = 1


class ChatClient:
    """One member's side of the JSON protocol; see the module docstring."""

    def __init__(
        self,
        nick: str,
        room: str,
        clock: Clock,
        send: Callable[[bytes], None],
        show: Callable[[Shown], None],
        *,
        retransmit_interval: float = 1.0,
        max_attempts: int = 8,
        identity: tuple[str, bytes] | None = None,
    ) -> None:
        self.nick, self.room = nick, room
        self.clock, self.send, self.show = clock, send, show
        self.retransmit_interval = retransmit_interval
        self.max_attempts = max_attempts
        #: (user, key) to authenticate with, or None.
        self.identity = identity
        self.nonce = b""
        self.token: str | None = None
        self.cookie: str | None = None
        self.keepalive = 20.0
        self.next_id = 1
        self.outstanding: dict[int, Outstanding] = {}
        #: The room's messages and events; our private messages.
        self.messages = Numbered("resend")
        self.privates = Numbered("resend-private")
        self.last_sent = clock.seconds()
        #: Called with the error message when the chat cannot go on.
        self.on_failure: Callable[[str, str], None] = lambda code, message: None
        #: Called once the server welcomes us (first join or a room change).
        self.on_welcome: Callable[[], None] = lambda: None
        #: Called with each acknowledged message id.
        self.on_ack: Callable[[int, dict[str, Any]], None] = lambda id, reply: None
        self._join_id: int | None = None

    # ------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------

    @property
    def joined(self) -> bool:
        return self.token is not None and self.messages.expected is not None

    def _request(self, request: dict[str, Any]) -> int:
        message_id = self.next_id
        self.next_id += 1
        request["id"] = message_id
        self.outstanding[message_id] = Outstanding(request, self.clock.seconds())
        self._transmit(request)
        return message_id

    def _transmit(self, request: dict[str, Any]) -> None:
        body = dict(request)
        if body["type"] == "join" and self.token is None:
            if self.cookie is not None:
                body["cookie"] = self.cookie
                if self.identity is not None:
                    user, key = self.identity
                    proof = client_proof(key, self.cookie.encode(), self.nonce, user)
                    body["user"] = user
                    body["nonce"] = base64.b64encode(self.nonce).decode()
                    body["proof"] = base64.b64encode(proof).decode()
            size = len(_encode(body))
            if size < JOIN_PADDING:
                body["pad"] = "." * (JOIN_PADDING - size - 10)
        elif self.token is not None:
            body["token"] = self.token
        else:
            return  # Not joined yet: sent once the welcome brings a token.
        self.last_sent = self.clock.seconds()
        self.send(_encode(body))

    def start(self) -> int:
        """Begin joining ``room`` as ``nick``; returns the join's message id."""
        self.token = self.cookie = None
        # One client nonce per join, so a retransmitted join (answered with
        # the same welcome) checks against the same server proof.
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        # A new session: the server numbers its privates from 1 again.
        self.messages.reset()
        self.privates.reset()
        self._join_id = self._request(
            {"type": "join", "room": self.room, "nick": self.nick}
        )
        return self._join_id

    def say(self, text: str) -> int:
        return self._request({"type": "say", "text": text})

    def private(self, nick: str, text: str) -> int:
        return self._request({"type": "private", "to": nick, "text": text})

    def change_nick(self, nick: str) -> int:
        return self._request({"type": "nick", "nick": nick})

    def who(self) -> int:
        return self._request({"type": "who"})

    def change_room(self, room: str) -> int:
        self._join_id = self._request({"type": "join", "room": room})
        return self._join_id

    def leave(self) -> None:
        """Say goodbye once (no retransmission: we are going away)."""
        if self.token is not None:
            self._transmit({"type": "leave", "id": self.next_id})
            self.next_id += 1
            self.token = None
        self.outstanding.clear()

    # ------------------------------------------------------------------
    # Time
    # ------------------------------------------------------------------

    def tick(self) -> None:
        """Retransmit what is unacknowledged, repair gaps, keep the session alive."""
        now = self.clock.seconds()
        for pending in list(self.outstanding.values()):
            if now - pending.sent_at < self.retransmit_interval:
                continue
            if self.token is None and pending.request["type"] != "join":
                continue  # Waits for the join; not a failed attempt.
            if pending.attempts >= self.max_attempts:
                self.outstanding.clear()
                self.on_failure(
                    "timeout",
                    "the chat server stopped answering; check that it runs and "
                    "that [chat] endpoint / --server point at it",
                )
                return
            pending.attempts += 1
            pending.sent_at = now
            self._transmit(pending.request)
        if self.joined:
            self._request_missing()
            if now - self.last_sent >= self.keepalive:
                self._transmit({"type": "ping"})

    def _request_missing(self) -> None:
        """Ask again for what is missing from either stream."""
        now = self.clock.seconds()
        for stream in (self.messages, self.privates):
            request = stream.missing(now, self.retransmit_interval)
            if request is not None:
                self._transmit(request)

    # ------------------------------------------------------------------
    # Input
    # ------------------------------------------------------------------

    def receive(self, datagram: bytes) -> None:
        """Handle one datagram from the server (one or more JSON lines)."""
        for raw in datagram.split(b"\n"):
            if not raw.strip():
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict):
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "cookie" and self.token is None:
            self.cookie = str(message.get("cookie"))
            if self._join_id in self.outstanding:
                pending = self.outstanding[self._join_id]
                pending.sent_at = self.clock.seconds()
                self._transmit(pending.request)
        elif kind == "welcome":
            self._welcome(message)
        elif kind in ("msg", "event"):
            if message.get("room") == self.room:
                self._numbered(self.messages, message.get("seq"), message)
        elif kind == "private":
            if "pseq" in message:
                self._numbered(self.privates, message.get("pseq"), message)
            else:  # A server that does not number them.
                self._show_private(message)
        elif kind == "gap":
            self._gap(self.messages, message, "earlier messages")
        elif kind == "private-gap":
            self._gap(self.privates, message, "private messages")
        elif kind == "pong":
            if self.joined and message.get("room") == self.room:
                for stream, field in ((self.messages, "seq"), (self.privates, "pseq")):
                    last = message.get(field, 0)
                    if isinstance(last, int):
                        stream.highest_known = max(stream.highest_known, last)
                self._request_missing()
        elif kind == "ok":
            self._acknowledged(message)
        elif kind == "members":
            self._show_members(message)
        elif kind == "error":
            self._error(message)

    def _server_proven(self, message: dict[str, Any]) -> bool:
        """Whether the welcome proves the server knows our key (if we have one)."""
        if self.identity is None or self.token is not None:
            return True
        if "proof" not in message:
            # The server does not authenticate anyone: nothing to prove.
            self.show(Shown("event", "this chat server does not authenticate users"))
            return True
        user, key = self.identity
        expected = server_proof(key, str(self.cookie).encode(), self.nonce, user)
        try:
            received = base64.b64decode(str(message.get("proof")), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(expected, received)

    def _welcome(self, message: dict[str, Any]) -> None:
        if not self._server_proven(message):
            self.outstanding.clear()
            self.on_failure(
                "auth-server",
                "the chat server's proof of your key is wrong: it may be an "
                "impostor; check --server and the users file",
            )
            return
        self.outstanding.pop(message.get("re"), None)  # type: ignore[arg-type]
        self.token = str(message.get("token"))
        self.nick = _clean(message.get("nick"))
        new_room = _clean(message.get("room"))
        if self.messages.expected is not None and new_room == self.room:
            return  # A retransmitted welcome.
        if new_room != self.room:
            self.messages.early.clear()
        self.room = new_room
        self.keepalive = float(message.get("keepalive", self.keepalive))
        self.messages.start(int(message.get("from", 1)), int(message.get("seq", 0)))
        if self.privates.expected is None:  # Privates follow us across rooms.
            private_seq = int(message.get("pseq", 0))
            self.privates.start(private_seq + 1, private_seq)
        self.show(Shown("event", f"you are {self.nick} in {self.room}"))
        now = self.clock.seconds()
        for pending in self.outstanding.values():
            # What was typed while joining goes out now.
            pending.sent_at = now
            self._transmit(pending.request)
        self._deliver()
        self.on_welcome()

    def _numbered(
        self, stream: Numbered, number: object, message: dict[str, Any]
    ) -> None:
        if not isinstance(number, int):
            return
        stream.add(number, message)
        if stream.expected is not None:
            self._deliver()
            if stream.early:
                self._request_missing()

    def _deliver(self) -> None:
        for message in self.messages.ready():
            self._show_room(message)
        for message in self.privates.ready():
            self._show_private(message)

    def _gap(self, stream: Numbered, message: dict[str, Any], what: str) -> None:
        first, last = message.get("from"), message.get("to")
        if not (isinstance(first, int) and isinstance(last, int)):
            return
        lost = stream.skip(first, last)
        if lost:
            self.show(Shown("event", f"({lost} {what} are no longer available)"))
            self._deliver()

    def _show_private(self, message: dict[str, Any]) -> None:
        self.show(
            Shown("private", _clean(message.get("text")), _clean(message.get("from")))
        )

    def _show_room(self, message: dict[str, Any]) -> None:
        room = _clean(message.get("room"))
        nick = _clean(message.get("nick") or message.get("from"))
        if message["type"] == "msg":
            self.show(Shown("msg", _clean(message.get("text")), nick, room))
            return
        event = message.get("event")
        words = {
            "join": f"{nick} joined {room}",
            "leave": f"{nick} left {room}",
            "timeout": f"{nick} timed out",
            "dropped": f"{nick} was dropped for flooding",
            "nick": f"{nick} is now known as {_clean(message.get('new'))}",
        }.get(str(event), f"{nick}: {_clean(event)}")
        self.show(Shown("event", words, nick, room))

    def _acknowledged(self, message: dict[str, Any]) -> None:
        message_id = message.get("re")
        pending = self.outstanding.pop(message_id, None)  # type: ignore[arg-type]
        if pending is None:
            return
        if "nicks" in message:
            self._show_members(message)
        if "nick" in message:
            self.nick = _clean(message["nick"])
        assert isinstance(message_id, int)
        self.on_ack(message_id, message)

    def _show_members(self, message: dict[str, Any]) -> None:
        nicks = message.get("nicks")
        if isinstance(nicks, list):
            names = ", ".join(_clean(n) for n in nicks)
            self.show(Shown("info", f"in {_clean(message.get('room'))}: {names}"))

    def _error(self, message: dict[str, Any]) -> None:
        code = str(message.get("code"))
        text = _clean(message.get("message"))
        message_id = message.get("re")
        if code == "bad-token":
            if self.token is not None:
                # Our session is gone (evicted while away, or the server restarted).
                self.show(
                    Shown("event", "the server forgot this session; joining again")
                )
                self.start()
            return  # Requests stay outstanding and go out again once welcomed.
        pending = self.outstanding.pop(message_id, None)  # type: ignore[arg-type]
        if (
            pending is not None
            and pending.request["type"] == "join"
            and not self.joined
        ):
            self.on_failure(code, text)
            return
        if code == "dropped":
            self.token = None
            self.on_failure(code, text)
            return
        self.show(Shown("error", text))
        if isinstance(message_id, int):
            self.on_ack(message_id, message)


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def _clean(value: object) -> str:
    """Server-supplied text, sanitised again before it reaches a terminal."""
    return sanitise(str(value)) if value is not None else ""


#: Foreground colours for nicknames (no black/white/grey: backgrounds vary).
NICK_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


@attrs.frozen
class Renderer:
    """Terminal lines for :class:`Shown` items; colour only when ``colour``."""

    colour: bool

    def nick_colour(self, nick: str) -> int:
        """The same colour for a nickname every time, in every client."""
        return NICK_COLOURS[zlib.crc32(nick.casefold().encode()) % len(NICK_COLOURS)]

    def _nick(self, nick: str) -> str:
        if not self.colour:
            return nick
        return f"\x1b[{self.nick_colour(nick)}m{nick}\x1b[0m"

    def render(self, item: Shown) -> str:
        if item.kind == "msg":
            return f"[{item.room}] {self._nick(item.nick or '')}: {item.text}"
        if item.kind == "private":
            return f"[private] {self._nick(item.nick or '')}: {item.text}"
        if item.kind == "error":
            return f"\x1b[1m! {item.text}\x1b[0m" if self.colour else f"! {item.text}"
        return f"\x1b[2m* {item.text}\x1b[0m" if self.colour else f"* {item.text}"
