"""The chat server's state machine, free of I/O (sans-IO).

:class:`ChatServer` is fed datagrams with :meth:`ChatServer.receive` and told
the time by an injected clock; it queues what it wants to send, and
:meth:`ChatServer.flush` hands that out as ``(datagram, address)`` pairs,
packing several queued lines for one member into one datagram up to the size
limit.  The Twisted adapter in :mod:`netlab.chat.service` only moves bytes.

Two wire modes share the rooms (``docs/chat.rst`` describes every message):

* **JSON mode**: a datagram starting with ``{`` is one JSON request.  A join
  is answered with a cookie first (bound to the source address), and only a
  join that returns the cookie creates a session: its token must accompany
  every later request from that address.  Room traffic carries per-room
  sequence numbers; requests carry a client message id that the server
  acknowledges and uses to ignore retransmitted duplicates.
* **Text mode**: any other UTF-8 datagram is a line of text (``/nick``,
  ``/join``, plain text ...).  An address first has to echo a short code the
  server sent it.

Security decisions, where they are made below: nothing goes to an address
that has not proved it receives what is sent there (the cookie or code round
trip), and until then a reply is never larger than the request, so the
service cannot be used to reflect or amplify traffic at a spoofed victim;
cookies are stateless (an HMAC of the address and a time window), so join
floods cost no memory; every table is capped.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from netlab.auth import Verifier
from netlab.chat.text import NickError, check_nick, check_room, fold_nick, sanitise
from netlab.ratelimit import RateLimiter, Verdict

Address = tuple[str, int]

#: How long a join cookie or text-mode code stays valid: one window, plus the
#: previous one so a code sent just before a window turns over still works.
COOKIE_WINDOW = 60.0

#: How many acknowledged message ids a session remembers for deduplication.
REMEMBERED_IDS = 256

#: Private messages kept per member for resending (JSON mode).
REMEMBERED_PRIVATES = 100

#: Sources with a port below this are privileged services (DNS, NTP ...), the
#: usual victims of reflection; a chat client never uses one.
LOWEST_SOURCE_PORT = 1024


class Clock(Protocol):
    def seconds(self) -> float: ...


class Mode(enum.Enum):
    """How a session talks: JSON objects or plain text lines."""

    JSON = "json"
    TEXT = "text"


@attrs.define
class Counters:
    """What the server has done, for logs and tests."""

    received: int = 0
    oversize: int = 0
    invalid: int = 0
    source_limited: int = 0
    flood_warnings: int = 0
    dropped_members: int = 0
    evicted_members: int = 0
    deliveries: int = 0
    datagrams: int = 0
    send_errors: int = 0


@attrs.frozen
class Entry:
    """One sequenced room event as stored in history, in both encodings."""

    seq: int
    json_line: bytes
    text_line: bytes


@attrs.define(eq=False)
class Room:
    """A room: its members, its sequence counter and its recent history."""

    name: str
    permanent: bool
    history: deque[Entry]
    members: dict[Address, Session] = attrs.field(factory=dict)
    seq: int = 0
    #: Messages not yet sent to the members (the same for all of them).
    pending: list[Entry] = attrs.field(factory=list)

    def entries(self, first: int, last: int) -> list[Entry]:
        """The stored entries with ``first <= seq <= last``."""
        if not self.history:
            return []
        oldest = self.history[0].seq
        start = max(first, oldest) - oldest
        stop = min(last, self.seq) - oldest + 1
        return [self.history[i] for i in range(start, max(start, stop))]


@attrs.define(eq=False)
class Session:
    """A member: an address that proved it receives, with a nickname and a room."""

    address: Address
    mode: Mode
    last_seen: float
    token: str = ""
    nick: str | None = None
    folded: str | None = None
    room: Room | None = None
    strikes: int = 0
    #: The authenticated user and the server's proof for it (JSON mode).
    user: str | None = None
    server_proof: bytes | None = None
    acks: OrderedDict[int, bytes] = attrs.field(factory=OrderedDict)
    outbox: list[bytes] = attrs.field(factory=list)
    #: The sequence number of the last private message sent to this member,
    #: and the last few of them (JSON lines) for ``resend-private``.
    private_seq: int = 0
    privates: OrderedDict[int, bytes] = attrs.field(factory=OrderedDict)


class Refusal(Exception):
    """A request cannot be done: ``code`` for programs, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def line(self, message_id: object) -> bytes:
        """The JSON error line answering request ``message_id``."""
        return encode(
            {
                "type": "error",
                "re": message_id,
                "code": self.code,
                "message": self.message,
            }
        )


def _resend_range(request: dict[str, Any]) -> tuple[int, int]:
    """The ``from``/``to`` of a resend request, checked."""
    first, last = request.get("from"), request.get("to")
    if not (isinstance(first, int) and isinstance(last, int)) or first > last:
        raise Refusal("bad-request", 'resend needs integers "from" <= "to"')
    return first, last


#: One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(message: dict[str, Any]) -> bytes:
    """One JSON line (compact, UTF-8, newline-terminated)."""
    return (_ENCODER.encode(message) + "\n").encode("utf-8")


def text_line(text: str) -> bytes:
    return (text + "\n").encode("utf-8")


HELP_LINES = (
    "* commands: /nick NAME  /join ROOM  /who  /msg NICK TEXT  /leave  /help",
    "* anything else is said to your room",
)


class ChatServer:
    """Rooms, sessions and limits; see the module docstring.

    ``settings`` is the ``[chat]`` section (:class:`netlab.config.ChatSection`).
    """

    def __init__(
        self, settings: Any, clock: Clock, secret: bytes | None = None
    ) -> None:
        self.clock = clock
        self.secret = secret if secret is not None else os.urandom(32)
        self.counters = Counters()
        self.rooms: dict[str, Room] = {}
        self.sessions: dict[Address, Session] = {}
        self.nicks: dict[str, Session] = {}
        #: Sessions with queued lines, in the order they were queued.
        self._dirty: dict[Address, Session] = {}
        #: Rooms with messages for all their members, packed once per room.
        self._dirty_rooms: dict[str, Room] = {}
        #: Replies to addresses without a session (each no larger than its request).
        self._direct: list[tuple[bytes, Address]] = []
        #: Checks join proofs; the service fills in its users.
        self.verifier = Verifier()
        self.sources = RateLimiter(clock, 1.0, 1.0, 1)
        self.members = RateLimiter(clock, 1.0, 1.0, 1)
        #: Called with (event name, fields) for things worth logging.
        self.observe: Callable[[str, dict[str, Any]], None] = lambda name, fields: None
        self.apply(settings)

    # ------------------------------------------------------------------
    # Configuration
    # ------------------------------------------------------------------

    def apply(self, settings: Any) -> None:
        """Take new ``[chat]`` settings; rooms and members already present stay."""
        self.settings = settings
        # Remembering a few times max_sessions sources keeps members' buckets
        # from being pushed out by a flood of spoofed ones.
        self.sources.reconfigure(
            settings.source_rate,
            settings.source_burst,
            max(4096, 4 * settings.max_sessions),
            settings.global_rate,
        )
        self.members.reconfigure(
            settings.message_rate, settings.message_burst, settings.max_sessions
        )
        for name in settings.rooms:
            room = self.rooms.get(name.lower())
            if room is None:
                self.rooms[name.lower()] = self._new_room(name.lower(), True)
            else:
                room.permanent = True
        for room in self.rooms.values():
            room.history = deque(room.history, maxlen=settings.history)

    def _new_room(self, name: str, permanent: bool) -> Room:
        return Room(name, permanent, deque(maxlen=self.settings.history))

    @property
    def default_room(self) -> str:
        return str(self.settings.rooms[0]).lower() if self.settings.rooms else "lobby"

    @property
    def keepalive_interval(self) -> float:
        return float(self.settings.member_timeout) / 4

    # ------------------------------------------------------------------
    # Cookies: proof that an address receives what is sent to it
    # ------------------------------------------------------------------

    def cookie(self, address: Address, length: int, window: int | None = None) -> str:
        """The cookie (``length`` base32 characters) for ``address`` now."""
        if window is None:
            window = int(self.clock.seconds() // COOKIE_WINDOW)
        material = f"{address[0]}|{address[1]}|{length}|{window}".encode()
        digest = hmac.new(self.secret, material, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii")[:length]

    def cookie_valid(self, address: Address, value: str, length: int) -> bool:
        window = int(self.clock.seconds() // COOKIE_WINDOW)
        value = value.strip().upper()
        if not value.isascii():  # compare_digest refuses non-ASCII str
            return False
        return any(
            hmac.compare_digest(value, self.cookie(address, length, w))
            for w in (window, window - 1)
        )

    # ------------------------------------------------------------------
    # Input
    # ------------------------------------------------------------------

    def receive(self, data: bytes, address: Address) -> None:
        """Handle one datagram from ``address``."""
        self.counters.received += 1
        if address[1] < LOWEST_SOURCE_PORT:
            self.counters.invalid += 1
            return
        verdict = self.sources.check(address)
        if not verdict.allowed:
            self.counters.source_limited += 1
            return
        session = self.sessions.get(address)
        if len(data) > self.settings.max_datagram:
            self.counters.oversize += 1
            self._refuse(
                session,
                address,
                len(data),
                "too-large",
                f"datagrams are limited to {self.settings.max_datagram} bytes; "
                "send a shorter message",
                json_mode=data[:1] == b"{",
            )
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.counters.invalid += 1
            self._refuse(
                session,
                address,
                len(data),
                "not-utf8",
                "datagrams must be UTF-8 text",
                json_mode=data[:1] == b"{",
            )
            return
        if data[:1] == b"{":
            self._receive_json(text, address, session, len(data))
        elif self.settings.text_mode:
            self._receive_text(text, address, session, len(data))
        else:
            self.counters.invalid += 1

    def _refuse(
        self,
        session: Session | None,
        address: Address,
        size: int,
        code: str,
        message: str,
        *,
        json_mode: bool,
        re: object = None,
    ) -> None:
        """Tell the sender what was wrong, within the amplification rule."""
        if (session is None and json_mode) or (session and session.mode is Mode.JSON):
            line = Refusal(code, message).line(re)
        else:
            line = text_line(f"! {message}")
        if session is not None:
            self._queue(session, line)
        else:
            self._reply_unverified(line, address, size)

    def _reply_unverified(self, datagram: bytes, address: Address, size: int) -> None:
        # The amplification rule: an address that has not proved it receives
        # may be a spoofed victim, so it never gets more bytes than were sent
        # in its name.
        if len(datagram) <= size:
            self._direct.append((datagram, address))

    # ------------------------------------------------------------------
    # JSON mode
    # ------------------------------------------------------------------

    def _receive_json(
        self, text: str, address: Address, session: Session | None, size: int
    ) -> None:
        try:
            request = json.loads(text)
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("type"), str):
            self.counters.invalid += 1
            self._refuse(
                session,
                address,
                size,
                "bad-request",
                'each JSON datagram must be one object with a "type"',
                json_mode=True,
            )
            return
        kind = request["type"]
        message_id = request.get("id")
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            message_id = None
        token = request.get("token")
        if kind == "join" and (session is None or token != session.token):
            self._json_join_new(request, address, session, size, message_id)
            return
        if session is None or session.mode is not Mode.JSON or token != session.token:
            # A forged token, or a stale one from a session that expired.
            self._refuse(
                None,
                address,
                size,
                "bad-token",
                "no session with this token from this address; join again",
                json_mode=True,
                re=message_id,
            )
            return
        session.last_seen = self.clock.seconds()
        if message_id is not None and message_id in session.acks:
            # A retransmission of something already done: acknowledge again.
            self._queue(session, session.acks[message_id])
            return
        handler = self._json_handlers.get(kind)
        if handler is None:
            self._refuse(
                session,
                address,
                size,
                "unknown-type",
                f"unknown request type {kind!r}; see docs/chat.rst",
                json_mode=True,
                re=message_id,
            )
            return
        try:
            if kind not in ("ping", "leave"):
                self._check_rate(session)
            reply = handler(self, session, request)
        except Refusal as refusal:
            reply = refusal.line(message_id)
        if reply is None:
            return
        if message_id is not None and kind in ("say", "private", "nick", "who"):
            session.acks[message_id] = reply
            while len(session.acks) > REMEMBERED_IDS:
                session.acks.popitem(last=False)
        self._queue(session, reply)

    def _json_join_new(
        self,
        request: dict[str, Any],
        address: Address,
        session: Session | None,
        size: int,
        message_id: int | None,
    ) -> None:
        """A join without this address's token: cookie round trip, then a session."""
        cookie = request.get("cookie")
        if not isinstance(cookie, str) or not self.cookie_valid(address, cookie, 16):
            self._reply_unverified(
                encode({"type": "cookie", "cookie": self.cookie(address, 16)}),
                address,
                size,
            )
            return
        if (
            session is not None
            and message_id is not None
            and message_id in session.acks
            and request.get("nick") == session.nick
        ):
            # The welcome was lost and the join retransmitted.
            self._queue(session, session.acks[message_id])
            return
        nick, room = request.get("nick"), request.get("room") or self.default_room
        try:
            _require_strings(nick=nick, room=room)
            assert isinstance(nick, str) and isinstance(room, str)
            if session is not None:
                # The same address joining afresh: a restarted client.
                self._remove(session, "leave")
            user, proof = self._authenticate(request, cookie)
            new = self._create_session(address, Mode.JSON)
            new.token = secrets.token_urlsafe(12)
            new.user, new.server_proof = user, proof
            try:
                self._set_nick(new, nick)
                self._enter(new, room, message_id)
            except Refusal:
                self._remove(new, None)
                raise
        except Refusal as refusal:
            # The cookie proved the address receives, so a full reply is fine.
            self._direct.append((refusal.line(message_id), address))

    def _authenticate(
        self, request: dict[str, Any], cookie: str
    ) -> tuple[str | None, bytes | None]:
        """Check a join's proof when authentication is required.

        The server's nonce is the join cookie: the client could not have it
        without receiving at its address, and it changes every window.  The
        client adds its own random nonce, so the server's proof is fresh.
        """
        if not self.settings.require_authentication:
            return None, None
        user, nonce, proof = (request.get(k) for k in ("user", "nonce", "proof"))
        if not all(isinstance(v, str) for v in (user, nonce, proof)):
            raise Refusal(
                "auth-required",
                "this chat requires authentication: set [client] user and "
                "key_file (netlab keygen creates them)",
            )
        assert isinstance(user, str) and isinstance(nonce, str)
        assert isinstance(proof, str)
        try:
            client_nonce = base64.b64decode(nonce, validate=True)
            client_proof = base64.b64decode(proof, validate=True)
        except ValueError:
            raise Refusal("bad-request", "nonce and proof must be base64") from None
        server_proof = self.verifier.verify(
            user, cookie.encode("ascii"), client_nonce, client_proof
        )
        if server_proof is None:
            self.observe("chat.auth.failed", {"nick": user, "address": None})
            raise Refusal(
                "auth-failed",
                "authentication failed: check [client] user and key_file",
            )
        return user, server_proof

    def _say(self, session: Session, raw_text: object) -> None:
        """Say a message to the member's room (JSON and text mode alike)."""
        text = self._message_text(raw_text)
        room = self._room_of(session)
        self._broadcast(
            room,
            "msg",
            {"from": session.nick, "text": text},
            f"[{room.name}] {session.nick}: {text}",
        )

    def _json_say(self, session: Session, request: dict[str, Any]) -> bytes:
        self._say(session, request.get("text"))
        return encode({"type": "ok", "re": request.get("id")})

    def _json_private(self, session: Session, request: dict[str, Any]) -> bytes:
        target = request.get("to")
        text = self._message_text(request.get("text"))
        if not isinstance(target, str):
            raise Refusal("bad-request", 'private needs a "to" nickname')
        self._private(session, target, text)
        return encode({"type": "ok", "re": request.get("id")})

    def _json_nick(self, session: Session, request: dict[str, Any]) -> bytes:
        nick = request.get("nick")
        if not isinstance(nick, str):
            raise Refusal("bad-request", 'nick needs a "nick" string')
        self._change_nick(session, nick)
        return encode({"type": "ok", "re": request.get("id"), "nick": session.nick})

    def _json_who(self, session: Session, request: dict[str, Any]) -> bytes | None:
        room = self._room_of(session)
        message_id = request.get("id")
        nicks = sorted(m.nick or "" for m in room.members.values())
        # A big room's list is split so each line fits in one datagram.
        chunks: list[list[str]] = [[]]
        budget = self.settings.max_datagram - 120
        used = 0
        for nick in nicks:
            cost = len(nick.encode()) + 3
            if used + cost > budget and chunks[-1]:
                chunks.append([])
                used = 0
            chunks[-1].append(nick)
            used += cost
        for index, chunk in enumerate(chunks[:-1]):
            self._queue(
                session,
                encode(
                    {
                        "type": "members",
                        "room": room.name,
                        "part": index,
                        "nicks": chunk,
                    }
                ),
            )
        return encode(
            {"type": "ok", "re": message_id, "room": room.name, "nicks": chunks[-1]}
        )

    def _json_leave(self, session: Session, request: dict[str, Any]) -> None:
        self._direct.append(
            (encode({"type": "ok", "re": request.get("id")}), session.address)
        )
        self._remove(session, "leave")

    def _json_ping(self, session: Session, request: dict[str, Any]) -> bytes:
        room = self._room_of(session)
        return encode(
            {
                "type": "pong",
                "room": room.name,
                "seq": room.seq,
                "pseq": session.private_seq,
            }
        )

    def _json_resend(self, session: Session, request: dict[str, Any]) -> bytes | None:
        room = self._room_of(session)
        first, last = _resend_range(request)
        last = min(last, room.seq)
        entries = room.entries(first, last)
        oldest = entries[0].seq if entries else last + 1
        if first < oldest:
            self._queue(
                session,
                encode(
                    {"type": "gap", "room": room.name, "from": first, "to": oldest - 1}
                ),
            )
        for entry in entries:
            self._queue(session, entry.json_line)
        return None

    def _json_resend_private(
        self, session: Session, request: dict[str, Any]
    ) -> bytes | None:
        first, last = _resend_range(request)
        last = min(last, session.private_seq)
        kept = [seq for seq in session.privates if first <= seq <= last]
        oldest = kept[0] if kept else last + 1
        if first < oldest:
            self._queue(
                session,
                encode({"type": "private-gap", "from": first, "to": oldest - 1}),
            )
        for seq in kept:
            self._queue(session, session.privates[seq])
        return None

    def _json_join_room(self, session: Session, request: dict[str, Any]) -> None:
        room = request.get("room")
        if not isinstance(room, str):
            raise Refusal("bad-request", 'join needs a "room" string')
        self._enter(session, room, request.get("id"))

    _json_handlers: dict[
        str, Callable[[Any, Session, dict[str, Any]], bytes | None]
    ] = {
        "say": _json_say,
        "private": _json_private,
        "resend-private": _json_resend_private,
        "nick": _json_nick,
        "who": _json_who,
        "leave": _json_leave,
        "ping": _json_ping,
        "resend": _json_resend,
        "join": _json_join_room,
    }

    # ------------------------------------------------------------------
    # Text mode
    # ------------------------------------------------------------------

    def _receive_text(
        self, text: str, address: Address, session: Session | None, size: int
    ) -> None:
        line = text.strip("\r\n")
        lesson_nick, lesson_text = _split_lesson_form(line)
        if session is None and self.settings.require_authentication:
            self._reply_unverified(
                text_line("! authentication required: use netlab chat"), address, size
            )
            return
        if session is None:
            proof = lesson_text if lesson_nick is not None else line
            if not self.cookie_valid(address, proof, 6):
                self._text_challenge(address, size)
                return
            if len(self.sessions) >= self.settings.max_sessions:
                self._reply_unverified(text_line("! server full"), address, size)
                return
            session = self._create_session(address, Mode.TEXT)
            if lesson_nick is not None:
                self._text_command(session, f"/nick {lesson_nick}")
            else:
                self._queue(
                    session,
                    text_line("* welcome; choose a nickname with /nick NAME (/help)"),
                )
            return
        if session.mode is not Mode.TEXT:
            self._refuse(
                session, address, size, "bad-request",
                "this address joined in JSON mode; send JSON", json_mode=True,
            )  # fmt: skip
            return
        session.last_seen = self.clock.seconds()
        if lesson_nick is not None and (
            session.nick is None or fold_nick(lesson_nick) == session.folded
        ):
            # The lessons' client sends "name : message" every time.
            if session.nick is None:
                self._text_command(session, f"/nick {lesson_nick}")
            line = lesson_text
        if not line.strip():
            return
        try:
            self._check_rate(session)
        except Refusal as refusal:
            self._queue(session, text_line(f"! {refusal.message}"))
            return
        self._text_command(session, line)

    def _text_challenge(self, address: Address, size: int) -> None:
        code = self.cookie(address, 6)
        # The longest explanation that fits in the request's size.
        for reply in (
            f"netlab chat: to join, send back this code: {code}",
            f"send back this code: {code}",
            f"code {code}",
            code,
        ):
            if len(reply) + 1 <= size:
                self._reply_unverified(text_line(reply), address, size)
                return

    def _text_command(self, session: Session, line: str) -> None:
        try:
            self._text_dispatch(session, line)
        except Refusal as refusal:
            self._queue(session, text_line(f"! {refusal.message}"))

    def _text_dispatch(self, session: Session, line: str) -> None:
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if not line.startswith("/"):
            self._say(session, line)
        elif command == "/nick":
            if session.nick is None:
                self._set_nick(session, argument)
                self._enter(session, self.default_room, None)
            else:
                self._change_nick(session, argument)
        elif command == "/join":
            if session.nick is None:
                raise Refusal("no-nick", "choose a nickname first with /nick NAME")
            self._enter(session, argument or self.default_room, None)
        elif command == "/who":
            room = self._room_of(session)
            nicks = sorted(m.nick or "" for m in room.members.values())
            self._queue(session, text_line(f"* in {room.name}: " + ", ".join(nicks)))
        elif command == "/msg":
            target, _, text = argument.partition(" ")
            self._private(session, target, self._message_text(text))
        elif command in ("/leave", "/quit"):
            self._direct.append((text_line("* bye"), session.address))
            self._remove(session, "leave")
        elif command == "/help":
            for help_line in HELP_LINES:
                self._queue(session, text_line(help_line))
        else:
            raise Refusal("unknown-command", f"unknown command {command}; try /help")

    # ------------------------------------------------------------------
    # Shared operations
    # ------------------------------------------------------------------

    def _create_session(self, address: Address, mode: Mode) -> Session:
        if len(self.sessions) >= self.settings.max_sessions:
            raise Refusal("server-full", "the chat is full; try again later")
        session = Session(address, mode, self.clock.seconds())
        self.sessions[address] = session
        return session

    def _check_rate(self, session: Session) -> None:
        """Per-member flood control: warn over the limit, drop after the strikes.

        The warning is a refusal of the message (so a JSON client stops
        retransmitting it); the last one also ends the session.
        """
        if self.members.check(session.address) is Verdict.ALLOW:
            session.strikes = 0
            return
        session.strikes += 1
        self.counters.flood_warnings += 1
        if session.strikes > self.settings.flood_strikes:
            self.counters.dropped_members += 1
            self.observe(
                "chat.member.dropped",
                {"nick": session.nick, "address": session.address},
            )
            self._remove(session, "dropped")
            raise Refusal("dropped", "you were dropped for flooding; join again later")
        raise Refusal(
            "flood",
            f"slow down: at most {self.settings.message_rate:g} messages a second; "
            "this one was not sent",
        )

    def _message_text(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise Refusal("bad-request", "the message text must be a string")
        text = sanitise(raw)
        if not text:
            raise Refusal(
                "empty", "the message is empty (control characters are removed)"
            )
        return text

    def _room_of(self, session: Session) -> Room:
        if session.room is None:
            raise Refusal("no-room", "join a room first (/nick NAME, then /join ROOM)")
        return session.room

    def _nick_holder(self, folded: str) -> Session | None:
        holder = self.nicks.get(folded)
        if holder is not None and self._expired(holder):
            # The name's owner went silent: its claim lapses now, not at the
            # next sweep.
            self._evict(holder)
            holder = None
        return holder

    def _set_nick(self, session: Session, nick: str) -> None:
        try:
            nick = check_nick(nick, self.settings.nick_max_length)
        except NickError as error:
            raise Refusal("bad-nick", str(error)) from None
        folded = fold_nick(nick)
        holder = self._nick_holder(folded)
        if holder is not None and holder is not session:
            raise Refusal(
                "nick-taken",
                f"the nickname {nick} is in use (or looks like one that is); "
                "pick another",
            )
        if session.folded is not None:
            del self.nicks[session.folded]
        session.nick, session.folded = nick, folded
        self.nicks[folded] = session

    def _change_nick(self, session: Session, nick: str) -> None:
        old = session.nick
        self._set_nick(session, nick)
        if session.room is not None and old != session.nick:
            self._broadcast(
                session.room,
                "event",
                {"event": "nick", "nick": old, "new": session.nick},
                f"* {old} is now known as {session.nick}",
            )

    def _enter(self, session: Session, name: str, message_id: object) -> None:
        """Move ``session`` into room ``name``; send it the welcome and the history."""
        try:
            name = check_room(name)
        except NickError as error:
            raise Refusal("bad-room", str(error)) from None
        room = self.rooms.get(name)
        if room is None:
            if not self.settings.create_rooms:
                raise Refusal(
                    "no-room",
                    f"there is no room {name}; rooms: " + ", ".join(sorted(self.rooms)),
                )
            if len(self.rooms) >= self.settings.max_rooms:
                raise Refusal(
                    "too-many-rooms",
                    "no more rooms can be created; join an existing one",
                )
            room = self._new_room(name, False)
            self.rooms[name] = room
        if room is session.room:
            raise Refusal("same-room", f"you are already in {name}")
        if len(room.members) >= self.settings.max_members:
            raise Refusal("room-full", f"room {name} is full; try another")
        if session.room is not None:
            self._leave_room(session, "leave")
        first = room.history[0].seq if room.history else room.seq + 1
        if session.mode is Mode.JSON:
            fields: dict[str, Any] = {
                "type": "welcome",
                "re": message_id,
                "token": session.token,
                "nick": session.nick,
                "room": room.name,
                "from": first,
                "seq": room.seq,
                "pseq": session.private_seq,
                "keepalive": self.keepalive_interval,
                "max_datagram": self.settings.max_datagram,
            }
            if session.server_proof is not None:
                fields["user"] = session.user
                fields["proof"] = base64.b64encode(session.server_proof).decode()
            welcome = encode(fields)
            if isinstance(message_id, int):
                session.acks[message_id] = welcome
        else:
            welcome = text_line(f"* you are {session.nick} in {room.name} (/help)")
        self._queue(session, welcome)
        for entry in room.history:
            self._queue(
                session,
                entry.json_line if session.mode is Mode.JSON else entry.text_line,
            )
        session.room = room
        self._materialize(room)
        room.members[session.address] = session
        self._broadcast(
            room,
            "event",
            {"event": "join", "nick": session.nick},
            f"* {session.nick} joined {room.name}",
        )
        self.observe("chat.member.joined", {"nick": session.nick, "room": room.name})

    def _private(self, session: Session, target: str, text: str) -> None:
        if session.nick is None:
            raise Refusal("no-nick", "choose a nickname first with /nick NAME")
        recipient = self._nick_holder(fold_nick(target))
        if recipient is None or recipient.room is None:
            raise Refusal(
                "no-such-nick", f"nobody is called {target}; /who lists your room"
            )
        if recipient.mode is Mode.JSON:
            # Numbered per recipient, like a room's messages, so that the
            # recipient's client can find a lost one and ask for it again.
            seq = recipient.private_seq + 1
            line = encode(
                {"type": "private", "pseq": seq, "from": session.nick, "text": text}
            )
            self._check_size(line)
            recipient.private_seq = seq
            recipient.privates[seq] = line
            while len(recipient.privates) > REMEMBERED_PRIVATES:
                recipient.privates.popitem(last=False)
        else:
            line = text_line(f"[private] {session.nick}: {text}")
            self._check_size(line)
        self._queue(recipient, line)
        if session.mode is Mode.TEXT:
            self._queue(session, text_line(f"-> {recipient.nick}: {text}"))

    def _check_size(self, line: bytes) -> None:
        if len(line) > self.settings.max_datagram:
            raise Refusal(
                "too-long",
                f"the message is too long once sent ({len(line)} of at most "
                f"{self.settings.max_datagram} bytes); shorten it",
            )

    def _broadcast(
        self, room: Room, kind: str, fields: dict[str, Any], text: str
    ) -> None:
        """Give a room message the next sequence number, keep it, fan it out."""
        json_line = encode(
            {"type": kind, "room": room.name, "seq": room.seq + 1, **fields}
        )
        text_bytes = text_line(text)
        self._check_size(json_line)
        self._check_size(text_bytes)
        room.seq += 1
        entry = Entry(room.seq, json_line, text_bytes)
        room.history.append(entry)
        room.pending.append(entry)
        self._dirty_rooms[room.name] = room
        self.counters.deliveries += len(room.members)

    def _materialize(self, room: Room) -> None:
        """Queue a room's pending messages to each member, before membership changes.

        Room messages normally wait in ``room.pending`` and are packed once
        for the whole room at flush time, which is what makes fan-out cheap;
        but they belong to the members present when they were said, so a
        join or a leave first hands them to those members one by one.
        """
        for entry in room.pending:
            for member in room.members.values():
                self._queue(
                    member,
                    entry.json_line if member.mode is Mode.JSON else entry.text_line,
                )
        room.pending.clear()

    def _leave_room(self, session: Session, why: str) -> None:
        room = session.room
        if room is None:
            return
        self._materialize(room)
        room.members.pop(session.address, None)
        session.room = None
        words = {
            "leave": f"left {room.name}",
            "timeout": "timed out",
            "dropped": "was dropped for flooding",
        }[why]
        self._broadcast(
            room,
            "event",
            {"event": why, "nick": session.nick},
            f"* {session.nick} {words}",
        )
        if not room.members and not room.permanent:
            del self.rooms[room.name]

    def _remove(self, session: Session, why: str | None) -> None:
        """End a session; ``why`` (leave, timeout, dropped) is told to its room."""
        if why is not None:
            self._leave_room(session, why)
        if session.folded is not None and self.nicks.get(session.folded) is session:
            del self.nicks[session.folded]
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        self._dirty.pop(session.address, None)
        session.outbox.clear()

    def _expired(self, session: Session) -> bool:
        silent = self.clock.seconds() - session.last_seen
        return bool(silent > self.settings.member_timeout)

    def _evict(self, session: Session) -> None:
        self.counters.evicted_members += 1
        self.observe(
            "chat.member.evicted", {"nick": session.nick, "address": session.address}
        )
        self._remove(session, "timeout")

    def expire(self) -> None:
        """Evict every member not heard from within ``member_timeout``."""
        for session in [s for s in self.sessions.values() if self._expired(s)]:
            self._evict(session)

    # ------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------

    def _queue(self, session: Session, line: bytes) -> None:
        session.outbox.append(line)
        self._dirty[session.address] = session

    @property
    def pending(self) -> bool:
        """Whether :meth:`flush` has anything to send."""
        return bool(self._dirty or self._direct or self._dirty_rooms)

    def flush(self) -> list[tuple[bytes, Address]]:
        """Everything queued, as datagrams; each member's lines packed."""
        limit = self.settings.max_datagram
        out = self._direct
        self._direct = []
        for room in self._dirty_rooms.values():
            if not room.pending:
                continue
            lines = {
                Mode.JSON: [e.json_line for e in room.pending],
                Mode.TEXT: [e.text_line for e in room.pending],
            }
            room.pending = []
            packed: dict[Mode, list[bytes]] = {}
            for address, member in room.members.items():
                own = self._dirty.pop(address, None)
                if own is not None:
                    # Its own lines first, packed with the room's: a lock-step
                    # client (the lessons') gets everything in one datagram.
                    datagrams = pack(own.outbox + lines[member.mode], limit)
                    own.outbox = []
                else:
                    if member.mode not in packed:
                        packed[member.mode] = pack(lines[member.mode], limit)
                    datagrams = packed[member.mode]
                out.extend((datagram, address) for datagram in datagrams)
        for address, session in self._dirty.items():
            out.extend((datagram, address) for datagram in pack(session.outbox, limit))
            session.outbox = []
        self._dirty = {}
        self._dirty_rooms = {}
        self.counters.datagrams += len(out)
        return out


def pack(lines: Iterable[bytes], limit: int) -> list[bytes]:
    """Join lines, in order, into few datagrams of at most ``limit`` bytes."""
    datagrams: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            datagrams.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        datagrams.append(b"".join(current))
    return datagrams


def _split_lesson_form(line: str) -> tuple[str | None, str]:
    """``"tom : hi"`` (the lessons' ``name : message``) -> ``("tom", "hi")``."""
    name, separator, rest = line.partition(" : ")
    if (
        separator
        and name.strip()
        and " " not in name.strip()
        and not name.startswith("/")
    ):
        return name.strip(), rest.strip()
    return None, line


def _require_strings(**fields: object) -> None:
    """Refuse a request whose named fields are not strings."""
    for name, value in fields.items():
        if not isinstance(value, str):
            raise Refusal("bad-request", f'the request needs a "{name}" string')
