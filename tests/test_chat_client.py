"""Tests for the chat client's state machine and renderer (netlab.chat.client).

The clients talk to the real server state machine through an in-memory
network that loses, duplicates and reorders datagrams (seeded, so a failure
replays); every client must still show every room message exactly once, in
the server's order.
"""

from __future__ import annotations

import base64
import heapq
import json
import random
from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from netlab.auth import Users
from netlab.chat.client import ChatClient, Renderer, Shown
from netlab.chat.server import Address, ChatServer
from tests.chat_support import SECRET, settings


class LossyNetwork:
    """Datagrams between clients and a ChatServer: lost, duplicated, reordered."""

    def __init__(
        self,
        server: ChatServer,
        clock: Clock,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        self.server, self.clock = server, clock
        self.random = random.Random(seed)
        self.loss, self.duplicate, self.delay = loss, duplicate, delay
        self.in_flight: list[tuple[float, int, Address, Address, bytes]] = []
        self.clients: dict[Address, ChatClient] = {}
        self.counter = 0
        self.sent = 0

    def _carry(self, source: Address, target: Address, datagram: bytes) -> None:
        self.sent += 1
        if self.random.random() < self.loss:
            return
        copies = 2 if self.random.random() < self.duplicate else 1
        for _ in range(copies):
            self.counter += 1
            arrival = self.clock.seconds() + self.random.uniform(0, self.delay)
            heapq.heappush(
                self.in_flight, (arrival, self.counter, source, target, datagram)
            )

    def sender(self, address: Address) -> Callable[[bytes], None]:
        return lambda datagram: self._carry(address, ("server", 0), datagram)

    def add_client(self, address: Address, nick: str, shown: list[Shown]) -> ChatClient:
        client = ChatClient(
            nick, "lobby", self.clock, self.sender(address), shown.append,
            retransmit_interval=0.5, max_attempts=30,
        )  # fmt: skip
        self.clients[address] = client
        return client

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Advance time, delivering datagrams as they arrive and ticking clients."""
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            now = self.clock.seconds()
            while self.in_flight and self.in_flight[0][0] <= now:
                _, _, source, target, datagram = heapq.heappop(self.in_flight)
                if target == ("server", 0):
                    self.server.receive(datagram, source)
                elif target in self.clients:
                    self.clients[target].receive(datagram)
            for datagram, address in self.server.flush():
                self._carry(("server", 0), address, datagram)
            for client in self.clients.values():
                client.tick()


def room_messages(server: ChatServer) -> list[tuple[str, str]]:
    """The room's messages in sequence order, as (nick, text)."""
    return [
        (m["from"], m["text"])
        for m in (json.loads(e.json_line) for e in server.rooms["lobby"].history)
        if m["type"] == "msg"
    ]


class LossyDeliveryTests(TestCase):
    def conversation(self, seed: int, **faults: float) -> None:
        clock = Clock()
        server = ChatServer(
            settings(member_timeout=8.0, history=1000), clock, secret=SECRET
        )
        network = LossyNetwork(server, clock, seed, **faults)
        shown: dict[str, list[Shown]] = {}
        for port, nick in ((5001, "ann"), (5002, "bob"), (5003, "cid")):
            shown[nick] = []
            network.add_client(("127.0.0.1", port), nick, shown[nick]).start()
        network.run(20)
        self.assertTrue(all(c.joined for c in network.clients.values()))
        said = []
        whispered: dict[str, list[str]] = {nick: [] for nick in shown}
        clients = list(network.clients.values())
        for number in range(20):
            for index, client in enumerate(clients):
                text = f"{client.nick} says {number}"
                client.say(text)
                said.append(text)
                to = clients[(index + 1) % len(clients)].nick
                whisper = f"{client.nick} whispers {number}"
                client.private(to, whisper)
                whispered[to].append(whisper)
            network.run(0.5)
        network.run(20)
        in_room = room_messages(server)
        self.assertEqual(sorted(t for _, t in in_room), sorted(said))
        for nick, items in shown.items():
            messages = [(i.nick, i.text) for i in items if i.kind == "msg"]
            self.assertEqual(messages, in_room, nick)
        for address, client in network.clients.items():
            # Every private message shows once, in the order the server
            # numbered them for their recipient.
            numbered = [
                json.loads(line)["text"]
                for line in server.sessions[address].privates.values()
            ]
            self.assertEqual(sorted(numbered), sorted(whispered[client.nick]))
            privates = [i.text for i in shown[client.nick] if i.kind == "private"]
            self.assertEqual(privates, numbered, client.nick)
        for client in network.clients.values():
            self.assertEqual(client.outstanding, {})

    def test_lost_duplicated_reordered(self) -> None:
        """With 20% loss, 20% duplicates and reordering, every room and private
        message shows once, in order.
        """
        self.conversation(1, loss=0.2, duplicate=0.2, delay=0.3)

    def test_other_seeds(self) -> None:
        """The same holds for other fault patterns (seeded)."""
        for seed in (2, 3):
            self.conversation(seed, loss=0.3, duplicate=0.3, delay=0.5)

    def test_perfect_network(self) -> None:
        """Without faults the conversation is shown the same way."""
        self.conversation(0)


class ClientBehaviourTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[dict[str, object]] = []
        self.shown: list[Shown] = []
        self.client = ChatClient(
            "tom", "lobby", self.clock,
            lambda d: self.sent.append(json.loads(d)), self.shown.append,
        )  # fmt: skip

    def welcome(self, first: int = 1, seq: int = 0) -> None:
        self.client.start()
        self.client.receive(
            json.dumps(
                {"type": "welcome", "re": 1, "token": "T", "nick": "tom",
                 "room": "lobby", "from": first, "seq": seq, "keepalive": 5}
            ).encode()
        )  # fmt: skip

    def test_join_is_padded_for_the_cookie_reply(self) -> None:
        """The first join is padded so the cookie reply (never larger) can come back."""
        self.client.start()
        self.assertGreaterEqual(len(json.dumps(self.sent[0])), 150)
        self.client.receive(b'{"type":"cookie","cookie":"ABC"}\n')
        self.assertEqual(self.sent[1]["cookie"], "ABC")

    def test_typed_while_joining_goes_out_after_the_welcome(self) -> None:
        """A message typed before the welcome waits (no token yet), then is sent."""
        self.client.start()
        self.client.say("early words")
        self.assertEqual([m["type"] for m in self.sent], ["join"])
        for _ in range(3):
            self.clock.advance(1)
            self.client.tick()
        self.client.receive(
            b'{"type":"error","re":2,"code":"bad-token","message":"join first"}\n'
        )
        self.assertIn(2, self.client.outstanding)
        self.client.receive(
            b'{"type":"welcome","re":1,"token":"T","nick":"tom","room":"lobby",'
            b'"from":1,"seq":0}\n'
        )
        self.assertEqual(
            self.sent[-1], {"type": "say", "text": "early words", "id": 2, "token": "T"}
        )

    def test_gives_up_when_the_server_is_silent(self) -> None:
        """Unanswered requests are retransmitted, then the failure is reported."""
        failures: list[str] = []
        self.client.on_failure = lambda code, message: failures.append(code)
        self.client.start()
        for _ in range(200):
            self.clock.advance(0.5)
            self.client.tick()
        self.assertEqual(failures, ["timeout"])
        self.assertEqual(len(self.sent), self.client.max_attempts)

    def test_tail_gap_found_by_keepalive(self) -> None:
        """A lost last message is noticed from the keepalive answer and asked for."""
        self.welcome()
        self.clock.advance(6)
        self.client.tick()
        self.assertEqual(self.sent[-1]["type"], "ping")
        self.client.receive(b'{"type":"pong","room":"lobby","seq":3}\n')
        self.assertEqual(
            self.sent[-1], {"type": "resend", "from": 1, "to": 3, "token": "T"}
        )

    def test_private_gaps_repaired_and_reported(self) -> None:
        """Privates are shown once, in their numbers' order: an early one
        waits while the missing one is asked for, a duplicate is dropped, a
        lost last one is found from the keepalive answer, and ones the server
        no longer keeps are reported."""
        self.welcome()
        self.client.receive(b'{"type":"private","pseq":2,"from":"ann","text":"two"}\n')
        self.assertEqual(
            self.sent[-1], {"type": "resend-private", "from": 1, "to": 1, "token": "T"}
        )
        self.client.receive(
            b'{"type":"private","pseq":1,"from":"ann","text":"one"}\n'
            b'{"type":"private","pseq":2,"from":"ann","text":"two"}\n'
        )
        self.clock.advance(6)
        self.client.receive(b'{"type":"pong","room":"lobby","seq":0,"pseq":5}\n')
        self.assertEqual(
            self.sent[-1], {"type": "resend-private", "from": 3, "to": 5, "token": "T"}
        )
        self.client.receive(
            b'{"type":"private-gap","from":3,"to":4}\n'
            b'{"type":"private","pseq":5,"from":"bob","text":"five"}\n'
        )
        self.assertEqual(
            [(i.kind, i.text) for i in self.shown[1:]],
            [
                ("private", "one"),
                ("private", "two"),
                ("event", "(2 private messages are no longer available)"),
                ("private", "five"),
            ],
        )

    def test_privates_continue_across_rooms(self) -> None:
        """Moving to another room keeps the private numbering (it is the
        member's, not the room's); a server that does not number privates
        still has them shown."""
        self.welcome()
        self.client.receive(b'{"type":"private","pseq":1,"from":"ann","text":"a"}\n')
        self.client.change_room("kitchen")
        self.client.receive(
            json.dumps(
                {"type": "welcome", "re": 2, "token": "T", "nick": "tom",
                 "room": "kitchen", "from": 1, "seq": 0, "pseq": 1, "keepalive": 5}
            ).encode()
        )  # fmt: skip
        self.client.receive(b'{"type":"private","pseq":1,"from":"ann","text":"a"}\n')
        self.client.receive(b'{"type":"private","pseq":2,"from":"ann","text":"b"}\n')
        self.client.receive(b'{"type":"private","from":"old","text":"c"}\n')
        self.assertEqual(
            [i.text for i in self.shown if i.kind == "private"], ["a", "b", "c"]
        )

    def test_gap_older_than_history_is_reported(self) -> None:
        """Messages no longer in the server's history show as a gap, then the rest."""
        self.welcome()
        self.client.receive(
            b'{"type":"msg","room":"lobby","seq":5,"from":"ann","text":"five"}\n'
            b'{"type":"gap","room":"lobby","from":1,"to":4}\n'
        )
        self.assertEqual(
            [(i.kind, i.text) for i in self.shown[1:]],
            [
                ("event", "(4 earlier messages are no longer available)"),
                ("msg", "five"),
            ],
        )

    def test_forgotten_session_rejoins(self) -> None:
        """A bad-token answer (server restarted, or evicted) starts a new join."""
        self.welcome()
        self.client.receive(
            b'{"type":"error","re":null,"code":"bad-token","message":"x"}\n'
        )
        self.assertEqual(self.sent[-1]["type"], "join")
        self.assertNotIn("token", self.sent[-1])

    def test_hostile_server_text_is_sanitised(self) -> None:
        """Escape sequences from the server never reach the terminal."""
        self.welcome()
        self.client.receive(
            b'{"type":"msg","room":"lobby","seq":1,"from":"\\u001b[2Jann",'
            b'"text":"hi\\u001b]0;title\\u0007\\u202e"}\n'
        )
        self.assertEqual((self.shown[-1].nick, self.shown[-1].text), ("ann", "hi"))


class RendererTests(TestCase):
    def test_plain_without_colour(self) -> None:
        """Without colour (NO_COLOR or not a terminal) lines carry no escapes."""
        renderer = Renderer(colour=False)
        self.assertEqual(
            renderer.render(Shown("msg", "hi", "tom", "lobby")), "[lobby] tom: hi"
        )
        self.assertEqual(
            renderer.render(Shown("event", "tom joined lobby")), "* tom joined lobby"
        )
        self.assertEqual(renderer.render(Shown("error", "no")), "! no")

    def test_stable_nick_colours_and_dim_system_lines(self) -> None:
        """A nick has the same colour every time (any case); system lines are dimmed."""
        renderer = Renderer(colour=True)
        line = renderer.render(Shown("msg", "hi", "tom", "lobby"))
        colour = renderer.nick_colour("tom")
        self.assertEqual(line, f"[lobby] \x1b[{colour}mtom\x1b[0m: hi")
        self.assertEqual(Renderer(colour=True).nick_colour("TOM"), colour)
        colours = {renderer.nick_colour(n) for n in ("ann", "bob", "cid", "dan", "eve")}
        self.assertGreater(len(colours), 1)
        self.assertEqual(
            renderer.render(Shown("event", "tom left")), "\x1b[2m* tom left\x1b[0m"
        )


class AuthenticationTests(TestCase):
    KEY = b"a" * 32

    def client_and_server(
        self, key: bytes
    ) -> tuple[ChatClient, list[str], LossyNetwork]:
        clock = Clock()
        server = ChatServer(settings(require_authentication=True), clock, secret=SECRET)
        server.verifier.users = Users({"alice": self.KEY})
        network = LossyNetwork(server, clock, 0)
        failures: list[str] = []
        client = network.add_client(("127.0.0.1", 5001), "al", [])
        client.identity = ("alice", key)
        client.on_failure = lambda code, message: failures.append(code)
        client.start()
        network.run(3)
        return client, failures, network

    def test_mutual_proof(self) -> None:
        """With the right key the client joins and accepts the server's proof."""
        client, failures, _ = self.client_and_server(self.KEY)
        self.assertTrue(client.joined)
        self.assertEqual(failures, [])

    def test_wrong_key_fails_authentication(self) -> None:
        """With the wrong key the join fails with auth-failed, not a retry loop."""
        client, failures, _ = self.client_and_server(b"b" * 32)
        self.assertFalse(client.joined)
        self.assertEqual(failures, ["auth-failed"])
        self.assertEqual(client.outstanding, {})

    def test_wrong_server_proof_is_refused(self) -> None:
        """A welcome whose proof does not match our key is an impostor: refused."""
        sent: list[bytes] = []
        failures: list[str] = []
        client = ChatClient(
            "al", "lobby", Clock(), sent.append, lambda item: None,
            identity=("alice", self.KEY),
        )  # fmt: skip
        client.on_failure = lambda code, message: failures.append(code)
        client.start()
        client.receive(b'{"type":"cookie","cookie":"ABCDEFGHIJKLMNOP"}\n')
        self.assertIn(b'"proof"', sent[-1])
        bogus = base64.b64encode(b"x" * 32).decode()
        client.receive(
            json.dumps(
                {"type": "welcome", "re": 1, "token": "T", "nick": "al",
                 "room": "lobby", "from": 1, "seq": 0, "proof": bogus}
            ).encode()
        )  # fmt: skip
        self.assertEqual(failures, ["auth-server"])
        self.assertFalse(client.joined)
