"""Tests for the chat server's state machine (netlab.chat.server), without I/O.

Every hostile input of the chat issue is sent here and checked for its clear
answer and for another member still being served.
"""

from __future__ import annotations

import base64
import json

from twisted.trial.unittest import TestCase

from netlab.auth import Users, client_proof, server_proof
from netlab.chat.server import COOKIE_WINDOW, REMEMBERED_PRIVATES, pack
from tests.chat_support import Harness, settings

TOM = ("127.0.0.1", 40001)
ANN = ("127.0.0.1", 40002)
BOB = ("127.0.0.1", 40003)
VICTIM = ("127.0.0.9", 53001)


class JSONModeTests(TestCase):
    def test_join_needs_the_cookie_round_trip(self) -> None:
        """A join without a cookie creates nothing and gets a cookie only."""
        chat = Harness()
        request = {
            "type": "join",
            "nick": "tom",
            "room": "lobby",
            "id": 1,
            "pad": "x" * 60,
        }
        chat.send(request, TOM)
        (reply,) = chat.messages(TOM)
        self.assertEqual(reply["type"], "cookie")
        self.assertEqual(chat.server.sessions, {})
        chat.send({**request, "cookie": reply["cookie"]}, TOM)
        (welcome,) = [m for m in chat.messages(TOM) if m["type"] == "welcome"]
        self.assertEqual(
            (welcome["nick"], welcome["room"], welcome["re"]), ("tom", "lobby", 1)
        )
        self.assertIn(TOM, chat.server.sessions)

    def test_cookie_expires(self) -> None:
        """A cookie from two windows ago is refused (answered with a fresh cookie)."""
        chat = Harness()
        request = {"type": "join", "nick": "tom", "id": 1, "pad": "x" * 60}
        chat.send(request, TOM)
        cookie = chat.messages(TOM)[0]["cookie"]
        chat.clock.advance(2 * COOKIE_WINDOW + 1)
        chat.send({**request, "cookie": cookie}, TOM)
        (reply,) = chat.messages(TOM)
        self.assertEqual(reply["type"], "cookie")
        self.assertNotEqual(reply["cookie"], cookie)

    def test_say_is_sequenced_fanned_out_and_acknowledged(self) -> None:
        """A message reaches every member with the next sequence number; the sender is
        acked.
        """
        chat = Harness()
        tom, ann = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(TOM)
        message_id = chat.request(TOM, tom, "say", text="hello")
        to_tom, to_ann = chat.messages(TOM), chat.messages(ANN)
        said = [m for m in to_ann if m["type"] == "msg"]
        self.assertEqual(len(said), 1)
        self.assertEqual((said[0]["from"], said[0]["text"]), ("tom", "hello"))
        self.assertIn(said[0], to_tom)
        self.assertIn({"type": "ok", "re": message_id}, to_tom)
        chat.request(ANN, ann, "say", text="hi tom")
        later = [m for m in chat.messages(TOM) if m["type"] == "msg"]
        self.assertEqual(later[0]["seq"], said[0]["seq"] + 1)

    def test_duplicate_is_acknowledged_not_repeated(self) -> None:
        """A retransmitted message (same id) is acked again but not shown twice."""
        chat = Harness()
        tom, _ = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(ANN)
        request = {"type": "say", "token": tom, "id": 7, "text": "once"}
        chat.send(request, TOM)
        chat.send(request, TOM)
        self.assertEqual(len([m for m in chat.messages(ANN) if m["type"] == "msg"]), 1)
        acks = [m for m in chat.messages(TOM) if m["type"] == "ok"]
        self.assertEqual(acks, [{"type": "ok", "re": 7}] * 2)

    def test_joiner_receives_history(self) -> None:
        """A joiner gets the last ``history`` room messages after its welcome."""
        chat = Harness(history=3)
        tom = chat.join(TOM, "tom")
        for number in range(5):
            chat.request(TOM, tom, "say", text=f"m{number}")
        chat.join(ANN, "ann")
        received = chat.joined
        welcome = received[0]
        history = [m for m in received if m.get("seq", 0) < welcome["seq"] + 1][1:]
        self.assertEqual(
            [m["seq"] for m in history], [welcome["from"] + i for i in range(3)]
        )
        self.assertEqual([m.get("text") for m in history][-2:], ["m3", "m4"])

    def test_resend_repairs_and_reports_gaps(self) -> None:
        """resend returns the stored messages and a gap for those gone from history."""
        chat = Harness(history=3)
        tom = chat.join(TOM, "tom")
        for number in range(6):
            chat.request(TOM, tom, "say", text=f"m{number}")
        chat.messages(TOM)
        last = chat.server.rooms["lobby"].seq
        chat.request(TOM, tom, "resend", **{"from": 1, "to": last})
        received = chat.messages(TOM)
        self.assertEqual(
            received[0], {"type": "gap", "room": "lobby", "from": 1, "to": last - 3}
        )
        self.assertEqual([m["seq"] for m in received[1:]], [last - 2, last - 1, last])

    def test_ping_reports_the_last_sequence(self) -> None:
        """A keepalive is answered with the room's last sequence number."""
        chat = Harness()
        tom = chat.join(TOM, "tom")
        chat.request(TOM, tom, "say", text="x")
        chat.messages(TOM)
        chat.request(TOM, tom, "ping")
        self.assertEqual(
            chat.messages(TOM),
            [
                {
                    "type": "pong",
                    "room": "lobby",
                    "seq": chat.server.rooms["lobby"].seq,
                    "pseq": 0,
                }
            ],
        )

    def test_privates_are_numbered_and_resent(self) -> None:
        """Each member's private messages are numbered 1, 2, 3 (welcome and
        pong say the last number); resend-private sends kept ones again and
        reports those no longer kept as a private-gap."""
        chat = Harness(message_burst=1000.0, source_burst=1000.0)
        tom, ann = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        for text in ("one", "two", "three"):
            chat.request(TOM, tom, "private", to="ann", text=text)
        privates = [m for m in chat.messages(ANN) if m["type"] == "private"]
        self.assertEqual([(m["pseq"], m["text"]) for m in privates], [
            (1, "one"), (2, "two"), (3, "three")
        ])  # fmt: skip
        chat.request(ANN, ann, "ping")
        self.assertEqual(chat.messages(ANN)[-1]["pseq"], 3)
        chat.request(ANN, ann, "resend-private", **{"from": 2, "to": 9})
        self.assertEqual([m["text"] for m in chat.messages(ANN)], ["two", "three"])
        for number in range(REMEMBERED_PRIVATES):
            chat.request(TOM, tom, "private", to="ann", text=f"p{number}")
        chat.messages(ANN)
        chat.request(ANN, ann, "resend-private", **{"from": 1, "to": 4})
        self.assertEqual(
            chat.messages(ANN),
            [
                {"type": "private-gap", "from": 1, "to": 3},
                {"type": "private", "pseq": 4, "from": "tom", "text": "p0"},
            ],
        )
        chat.request(ANN, ann, "resend-private", **{"from": 5, "to": 4})
        self.assertEqual(chat.messages(ANN)[-1]["code"], "bad-request")
        chat.request(ANN, ann, "join", room="kitchen")
        [welcome] = [m for m in chat.messages(ANN) if m["type"] == "welcome"]
        self.assertEqual(welcome["pseq"], 3 + REMEMBERED_PRIVATES)

    def test_private_nick_who_and_room_change(self) -> None:
        """Private messages, nick changes, who and moving rooms work and are told."""
        chat = Harness()
        tom, ann = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(TOM)
        chat.request(TOM, tom, "private", to="ANN", text="psst")
        self.assertIn(
            {"type": "private", "pseq": 1, "from": "tom", "text": "psst"},
            chat.messages(ANN),
        )
        chat.request(TOM, tom, "nick", nick="thomas")
        events = [m for m in chat.messages(ANN) if m["type"] == "event"]
        self.assertEqual((events[0]["nick"], events[0]["new"]), ("tom", "thomas"))
        message_id = chat.request(ANN, ann, "who")
        (reply,) = [m for m in chat.messages(ANN) if m.get("re") == message_id]
        self.assertEqual(reply["nicks"], ["ann", "thomas"])
        chat.messages(TOM)
        chat.request(ANN, ann, "join", room="kitchen")
        self.assertEqual(chat.messages(ANN)[0]["room"], "kitchen")
        left = [m for m in chat.messages(TOM) if m["type"] == "event"]
        self.assertEqual((left[0]["event"], left[0]["nick"]), ("leave", "ann"))

    def test_leave_tells_the_room_and_ends_the_session(self) -> None:
        """leave is acknowledged, the room is told, and the token stops working."""
        chat = Harness()
        tom, _ = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(ANN)
        chat.messages(TOM)
        message_id = chat.request(TOM, tom, "leave")
        self.assertEqual(chat.messages(TOM), [{"type": "ok", "re": message_id}])
        (event,) = chat.messages(ANN)
        self.assertEqual((event["event"], event["nick"]), ("leave", "tom"))
        self.assertNotIn(TOM, chat.server.sessions)

    def test_who_in_a_big_room_is_split_to_fit(self) -> None:
        """The member list of a big room arrives in parts, each within the datagram
        limit.
        """
        chat = Harness(max_datagram=300)
        tokens = [
            chat.join(("127.0.0.1", 41000 + n), f"member{n:02d}") for n in range(40)
        ]
        address = ("127.0.0.1", 41000)
        chat.messages(address)
        chat.request(address, tokens[0], "who")
        received = chat.messages(address)
        nicks = [n for m in received for n in m.get("nicks", [])]
        self.assertEqual(len(nicks), 40)
        self.assertGreater(len(received), 1)


class TextModeTests(TestCase):
    def test_code_proof_then_chat(self) -> None:
        """A text address echoes its code, picks a nick, lands in lobby, talks."""
        chat = Harness()
        chat.join_text(ANN, "ann")
        chat.send("/who", ANN)
        self.assertEqual(chat.lines(ANN), ["* in lobby: ann"])
        chat.send("hello everyone", ANN)
        self.assertEqual(chat.lines(ANN), ["[lobby] ann: hello everyone"])

    def test_text_and_json_members_share_a_room(self) -> None:
        """A text member's message reaches JSON members and the other way round."""
        chat = Harness()
        tom = chat.join(TOM, "tom")
        chat.join_text(ANN, "ann")
        chat.messages(TOM)
        chat.send("hi tom", ANN)
        self.assertIn("hi tom", [m.get("text") for m in chat.messages(TOM)])
        chat.request(TOM, tom, "say", text="hi ann")
        self.assertIn("[lobby] tom: hi ann", chat.lines(ANN))

    def test_lesson_client_form(self) -> None:
        """The lessons' ``tom : hi`` is understood: name as nick, the rest said."""
        chat = Harness()
        chat.send("tom : hi", TOM)
        (code,) = chat.lines(TOM)
        self.assertLessEqual(len(code) + 1, len("tom : hi"))
        chat.send(f"tom : {code}", TOM)
        self.assertIn("* tom joined lobby", chat.lines(TOM))
        chat.send("tom : hi", TOM)
        self.assertEqual(chat.lines(TOM), ["[lobby] tom: hi"])

    def test_commands(self) -> None:
        """/msg, /join, /help, unknown commands and /leave answer in plain text."""
        chat = Harness()
        chat.join_text(ANN, "ann")
        chat.join_text(BOB, "bob")
        chat.lines(ANN)
        chat.send("/msg bob are you there?", ANN)
        self.assertEqual(chat.lines(ANN), ["-> bob: are you there?"])
        self.assertEqual(chat.lines(BOB), ["[private] ann: are you there?"])
        chat.send("/help", ANN)
        self.assertTrue(chat.lines(ANN)[0].startswith("* commands:"))
        chat.send("/dance", ANN)
        self.assertEqual(chat.lines(ANN), ["! unknown command /dance; try /help"])
        chat.send("/join kitchen", ANN)
        self.assertEqual(chat.lines(ANN)[0], "* you are ann in kitchen (/help)")
        self.assertEqual(chat.lines(BOB), ["* ann left lobby"])
        chat.send("/leave", ANN)
        self.assertEqual(chat.lines(ANN), ["* bye"])
        self.assertNotIn(ANN, chat.server.sessions)

    def test_non_ascii_first_line(self) -> None:
        """A first line in any script is answered with the code like any other."""
        chat = Harness()
        chat.send("你好 有人在吗 héllo wörld, anyone here?", ANN)
        (reply,) = chat.lines(ANN)
        self.assertIn("send back this code", reply)

    def test_text_mode_off(self) -> None:
        """With text_mode = false plain datagrams are ignored, JSON still works."""
        chat = Harness(text_mode=False)
        chat.send("hello there, anyone?", ANN)
        self.assertEqual(chat.datagrams(ANN), [])
        chat.join(TOM, "tom")


class HostileTests(TestCase):
    def test_oversize_datagrams_are_refused(self) -> None:
        """Datagrams of 1201, 8193 and 65507 bytes are refused whole; members still
        served.
        """
        chat = Harness()
        tom, _ = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(TOM)
        chat.messages(ANN)
        for size in (1201, 8193, 65507):
            text = "x" * (size - 60)
            datagram = json.dumps(
                {"type": "say", "token": tom, "id": size, "text": text}
            )
            datagram += " " * (size - len(datagram))
            chat.send(datagram, TOM)
            (error,) = chat.messages(TOM)
            self.assertEqual(error["code"], "too-large")
            self.assertIn("1200 bytes", error["message"])
            self.assertEqual(chat.messages(ANN), [])
            chat.send(b"y" * size, VICTIM)
            self.assertLessEqual(sum(map(len, chat.datagrams(VICTIM))), size)
        chat.request(TOM, tom, "say", text="still here")
        self.assertIn("still here", [m.get("text") for m in chat.messages(ANN)])
        self.assertEqual(chat.server.counters.oversize, 6)

    def test_invalid_utf8_is_refused(self) -> None:
        """Invalid UTF-8 is refused with a clear error, and nothing is fanned out."""
        chat = Harness()
        chat.join_text(ANN, "ann")
        chat.join_text(BOB, "bob")
        chat.lines(ANN)
        chat.send(b"caf\xc3 \xff\xfe", ANN)
        self.assertEqual(chat.lines(ANN), ["! datagrams must be UTF-8 text"])
        self.assertEqual(chat.lines(BOB), [])
        chat.send("fine now", ANN)
        self.assertEqual(chat.lines(BOB), ["[lobby] ann: fine now"])

    def test_ansi_and_bidi_in_nick_are_refused(self) -> None:
        """Nicknames with ANSI escapes or RTL overrides are refused."""
        chat = Harness()
        tom = chat.join(TOM, "tom")
        for nick in ("\x1b[31mred", "evil\u202eexe", "bell\x07", "zero\u200bwidth"):
            chat.request(TOM, tom, "nick", nick=nick)
            (error,) = chat.messages(TOM)
            self.assertEqual(error["code"], "bad-nick")
        self.assertEqual(chat.server.sessions[TOM].nick, "tom")

    def test_ansi_and_bidi_in_text_are_stripped(self) -> None:
        """ANSI escapes, RTL overrides and control characters are removed from text."""
        chat = Harness()
        chat.join_text(ANN, "ann")
        tom = chat.join(TOM, "tom")
        chat.messages(TOM)
        chat.request(
            TOM, tom, "say", text="\x1b[2J\x1b]0;pwned\x07red \u202egnp.exe\x00 ok"
        )
        (said,) = [m for m in chat.messages(TOM) if m["type"] == "msg"]
        self.assertEqual(said["text"], "red gnp.exe ok")
        self.assertEqual(chat.lines(ANN)[-1], "[lobby] tom: red gnp.exe ok")
        chat.request(TOM, tom, "say", text="\x1b[31m\u202e")
        (error,) = chat.messages(TOM)
        self.assertEqual(error["code"], "empty")

    def test_nick_collisions_fold_case_and_lookalikes(self) -> None:
        """Tom, TOM, T0M and a Cyrillic look-alike are all the same nickname."""
        chat = Harness()
        chat.join(TOM, "Tom")
        for number, nick in enumerate(("tom", "TOM", "T0M", "\u0422\u043em")):
            address = ("127.0.0.1", 42000 + number)
            request = {"type": "join", "nick": nick, "id": 1, "pad": "x" * 80}
            chat.send(request, address)
            cookie = chat.messages(address)[0]["cookie"]
            chat.send({**request, "cookie": cookie}, address)
            (error,) = chat.messages(address)
            self.assertEqual(error["code"], "nick-taken", nick)
            self.assertNotIn(address, chat.server.sessions)
        chat.join(ANN, "Tomas")

    def test_same_nick_from_new_address_until_expiry(self) -> None:
        """A nick is refused from a new address while its owner lives, then freed."""
        chat = Harness(member_timeout=60.0)
        chat.join(TOM, "tom")
        impostor = ("127.0.0.66", 40001)
        request = {"type": "join", "nick": "tom", "id": 1, "pad": "x" * 80}
        chat.send(request, impostor)
        cookie = chat.messages(impostor)[0]["cookie"]
        chat.send({**request, "cookie": cookie}, impostor)
        self.assertEqual(chat.messages(impostor)[0]["code"], "nick-taken")
        chat.clock.advance(61)
        chat.send(request, impostor)
        cookie = chat.messages(impostor)[0]["cookie"]
        chat.send({**request, "cookie": cookie}, impostor)
        self.assertEqual(chat.messages(impostor)[0]["type"], "welcome")
        self.assertNotIn(TOM, chat.server.sessions)

    def test_forged_and_stale_tokens(self) -> None:
        """A wrong token, a token from another address and an expired one: refused."""
        chat = Harness(member_timeout=30.0)
        tom = chat.join(TOM, "tom")
        chat.join(ANN, "ann")
        chat.messages(ANN)
        chat.messages(TOM)
        forged = {
            "type": "say",
            "token": "A" * 16,
            "id": 5,
            "text": "forged" + " " * 60,
        }
        chat.send(forged, TOM)
        self.assertEqual(chat.messages(TOM)[0]["code"], "bad-token")
        # Tom's real token, from another address: bound to Tom's address.
        stolen = {"type": "say", "token": tom, "id": 6, "text": "stolen" + " " * 60}
        chat.send(stolen, BOB)
        self.assertEqual(chat.messages(BOB)[0]["code"], "bad-token")
        self.assertEqual(chat.messages(ANN), [])
        chat.clock.advance(31)
        chat.server.expire()
        chat.deliver()
        chat.send({**stolen, "id": 7}, TOM)
        self.assertEqual(chat.messages(TOM)[0]["code"], "bad-token")

    def test_spoofed_join_sends_victim_nothing_larger(self) -> None:
        """A join spoofed from a victim's address gets it one reply, no larger than the
        request.
        """
        chat = Harness()
        chat.join(TOM, "tom")
        for request in (
            {"type": "join", "nick": "mallory", "id": 1},
            {"type": "join", "nick": "mallory", "id": 1, "pad": "x" * 60},
            {
                "type": "join",
                "nick": "mallory",
                "cookie": "AAAAAAAAAAAAAAAA",
                "pad": "x" * 60,
            },
            {"type": "say", "token": "guess", "text": "hi"},
            "plain text from a spoofed source",
            "x",
        ):
            data = json.dumps(request) if isinstance(request, dict) else request
            chat.send(data, VICTIM)
            for datagram in chat.datagrams(VICTIM):
                self.assertLessEqual(len(datagram), len(data.encode()))
        tom = chat.server.sessions[TOM].token
        chat.request(TOM, tom, "say", text="after the spoofing")
        self.assertEqual(chat.datagrams(VICTIM), [])
        self.assertNotIn(VICTIM, chat.server.sessions)

    def test_privileged_source_ports_are_ignored(self) -> None:
        """Datagrams from ports below 1024 (DNS, NTP: victims) are ignored."""
        chat = Harness()
        chat.send("hello from port 53, padded out to be long enough", ("127.0.0.1", 53))
        self.assertEqual(chat.datagrams(("127.0.0.1", 53)), [])

    def test_member_flood_is_warned_then_dropped(self) -> None:
        """A flooding member is warned per message over the limit, then dropped; others
        unaffected.
        """
        chat = Harness(message_rate=1.0, message_burst=5.0, flood_strikes=3)
        tom, ann = chat.join(TOM, "tom"), chat.join(ANN, "ann")
        chat.messages(ANN)
        for number in range(5):
            chat.request(TOM, tom, "say", text=f"burst {number}")
        self.assertEqual(len([m for m in chat.messages(ANN) if m["type"] == "msg"]), 5)
        chat.messages(TOM)
        for number in range(3):
            chat.request(TOM, tom, "say", text=f"over {number}")
            (warning,) = chat.messages(TOM)
            self.assertEqual(warning["code"], "flood")
            self.assertIn("slow down", warning["message"])
        chat.request(TOM, tom, "say", text="one too many")
        self.assertEqual(chat.messages(TOM)[-1]["code"], "dropped")
        self.assertNotIn(TOM, chat.server.sessions)
        to_ann = chat.messages(ANN)
        self.assertEqual([m.get("event") for m in to_ann], ["dropped"])
        chat.request(ANN, ann, "say", text="ann is fine")
        self.assertIn("ann is fine", [m.get("text") for m in chat.messages(ANN)])

    def test_source_flood_is_throttled(self) -> None:
        """Datagrams beyond the per-source burst are dropped unanswered."""
        chat = Harness(source_rate=1.0, source_burst=10.0)
        for _ in range(50):
            chat.send("spam spam spam spam spam spam", VICTIM)
        self.assertEqual(len(chat.datagrams(VICTIM)), 10)
        self.assertEqual(chat.server.counters.source_limited, 40)

    def test_ten_thousand_joins_hold_the_caps(self) -> None:
        """10,000 join attempts: no state without cookie; with one, caps hold."""
        chat = Harness(max_sessions=50, max_members=30, max_rooms=5, source_burst=1e9)
        for number in range(10_000):
            address = (f"10.{number // 250 % 250}.{number % 250}.1", 20000 + number)
            chat.server.receive(
                json.dumps(
                    {"type": "join", "nick": f"n{number}", "id": 1, "pad": "x" * 60}
                ).encode(),
                address,
            )
        chat.server.flush()
        self.assertEqual(chat.server.sessions, {})
        refused = 0
        for number in range(10_000):
            address = (f"10.{number // 250 % 250}.{number % 250}.2", 20000 + number)
            cookie = chat.server.cookie(address, 16)
            room = f"room{number % 7}"
            chat.server.receive(
                json.dumps(
                    {
                        "type": "join",
                        "nick": f"n{number}",
                        "room": room,
                        "id": 1,
                        "cookie": cookie,
                    }
                ).encode(),
                address,
            )
            refused += any(
                b'"type":"error"' in datagram for datagram, _ in chat.server.flush()
            )
        self.assertEqual(len(chat.server.sessions), 50)
        self.assertLessEqual(len(chat.server.rooms), 5)
        self.assertTrue(all(len(r.members) <= 30 for r in chat.server.rooms.values()))
        self.assertEqual(refused, 10_000 - 50)
        self.assertLessEqual(len(chat.server.sources), max(4096, 4 * 50))

    def test_silent_member_is_evicted_and_room_told(self) -> None:
        """A member silent for member_timeout is evicted; the room is told; keepalives
        keep others.
        """
        chat = Harness(member_timeout=30.0)
        chat.join(TOM, "tom")
        ann = chat.join(ANN, "ann")
        chat.messages(ANN)
        for _ in range(4):
            chat.clock.advance(10)
            chat.request(ANN, ann, "ping")
        chat.server.expire()
        chat.deliver()
        events = [m for m in chat.messages(ANN) if m["type"] == "event"]
        self.assertEqual(
            [(e["event"], e["nick"]) for e in events], [("timeout", "tom")]
        )
        self.assertNotIn(TOM, chat.server.sessions)
        self.assertIn(ANN, chat.server.sessions)

    def test_room_caps(self) -> None:
        """Full rooms, unknown rooms when creation is off, and bad names are refused."""
        chat = Harness(max_members=1, create_rooms=False, rooms=("lobby", "den"))
        tom = chat.join(TOM, "tom")
        request = {"type": "join", "nick": "ann", "id": 1, "pad": "x" * 80}
        chat.send(request, ANN)
        cookie = chat.messages(ANN)[0]["cookie"]
        chat.send({**request, "cookie": cookie}, ANN)
        self.assertEqual(chat.messages(ANN)[0]["code"], "room-full")
        for room, code in (("attic", "no-room"), ("../etc", "bad-room"), ("den", None)):
            chat.request(TOM, tom, "join", room=room)
            reply = chat.messages(TOM)[0]
            self.assertEqual(reply.get("code"), code, room)

    def test_bad_json(self) -> None:
        """Malformed, non-object, nested-bomb and unknown-type JSON: a clear error."""
        chat = Harness()
        tom = chat.join(TOM, "tom")
        chat.messages(TOM)
        for data in (
            "{not json",
            "{}",
            '{"type": 5}',
            '{"a":' + "[" * 590 + "]" * 590 + "}",
        ):
            chat.send(data, TOM)
            self.assertEqual(chat.messages(TOM)[0]["code"], "bad-request", data[:20])
        chat.request(TOM, tom, "dance")
        self.assertEqual(chat.messages(TOM)[0]["code"], "unknown-type")

    def test_too_long_after_encoding(self) -> None:
        """Text that would not fit in one datagram once encoded is refused, not cut."""
        chat = Harness(rooms=("r" * 32,))
        tom = chat.join(TOM, "t" * 24, room="r" * 32)
        chat.messages(TOM)
        request = {"type": "say", "token": tom, "id": 9, "text": ""}
        request["text"] = "x" * (1200 - len(json.dumps(request)))
        chat.send(json.dumps(request), TOM)
        self.assertEqual(chat.messages(TOM)[0]["code"], "too-long")


class OutputTests(TestCase):
    def test_burst_is_packed_within_the_limit(self) -> None:
        """Queued messages for one member leave packed, each within the limit."""
        chat = Harness(message_burst=1000.0, source_burst=1000.0)
        tom = chat.join(TOM, "tom")
        chat.join(ANN, "ann")
        chat.datagrams(ANN)
        for number in range(100):
            chat.server.receive(
                json.dumps(
                    {
                        "type": "say",
                        "token": tom,
                        "id": 1000 + number,
                        "text": f"m{number}",
                    }
                ).encode(),
                TOM,
            )
        chat.deliver()
        datagrams = chat.datagrams(ANN)
        lines = [json.loads(line) for d in datagrams for line in d.split(b"\n") if line]
        self.assertEqual([m["text"] for m in lines], [f"m{n}" for n in range(100)])
        self.assertLess(len(datagrams), 15)

    def test_pack(self) -> None:
        """pack keeps order, never exceeds the limit, sends an oversize line alone."""
        self.assertEqual(pack([b"aa\n", b"bb\n", b"cc\n"], 6), [b"aa\nbb\n", b"cc\n"])
        self.assertEqual(pack([b"a" * 10, b"b"], 5), [b"a" * 10, b"b"])
        self.assertEqual(pack([], 5), [])

    def test_reload_applies_live_settings(self) -> None:
        """apply() takes new limits and history length; rooms and members stay."""
        chat = Harness(history=10)
        tom = chat.join(TOM, "tom")
        for number in range(8):
            chat.request(TOM, tom, "say", text=f"m{number}")
        chat.server.apply(settings(history=2, rooms=("lobby", "news")))
        self.assertEqual(len(chat.server.rooms["lobby"].history), 2)
        self.assertIn("news", chat.server.rooms)
        self.assertIn(TOM, chat.server.sessions)


class AuthenticationTests(TestCase):
    KEY = b"k" * 32

    def setUp(self) -> None:
        self.chat = Harness(require_authentication=True)
        self.chat.server.verifier.users = Users({"alice": self.KEY})

    def join(self, **fields: object) -> dict[str, object]:
        request = {"type": "join", "nick": "al", "id": 1, "pad": "x" * 200}
        self.chat.send(request, TOM)
        cookie = str(self.chat.messages(TOM)[0]["cookie"])
        request.update(cookie=cookie, **fields)
        if "proof" not in fields and "user" in fields:
            nonce = b"n" * 32
            proof = client_proof(self.KEY, cookie.encode(), nonce, str(fields["user"]))
            request["nonce"] = base64.b64encode(nonce).decode()
            request["proof"] = base64.b64encode(proof).decode()
        self.chat.send(request, TOM)
        self.cookie = cookie
        return self.chat.messages(TOM)[0]

    def test_join_without_proof_is_refused(self) -> None:
        """With require_authentication, a join without user and proof is refused."""
        reply = self.join()
        self.assertEqual(reply["code"], "auth-required")
        self.assertIn("key_file", str(reply["message"]))
        self.assertEqual(self.chat.server.sessions, {})

    def test_wrong_key_and_unknown_user_are_refused_alike(self) -> None:
        """A proof with the wrong key, or for an unknown user, fails the same way."""
        nonce = base64.b64encode(b"n" * 32).decode()
        for user in ("alice", "mallory"):
            wrong = base64.b64encode(client_proof(b"w" * 32, b"c", b"n", user))
            reply = self.join(user=user, nonce=nonce, proof=wrong.decode())
            self.assertEqual(reply["code"], "auth-failed", user)
        self.assertEqual(self.chat.server.sessions, {})

    def test_good_proof_gets_the_servers_proof(self) -> None:
        """A good proof joins, and the welcome proves the server has the key too."""
        reply = self.join(user="alice")
        self.assertEqual(reply["type"], "welcome")
        expected = server_proof(self.KEY, self.cookie.encode(), b"n" * 32, "alice")
        self.assertEqual(base64.b64decode(str(reply["proof"])), expected)
        self.assertEqual(reply["user"], "alice")

    def test_text_mode_is_refused(self) -> None:
        """Text mode cannot authenticate: it is told so, within the request's size."""
        self.chat.send("hello, can I join this chat without a key, please?", ANN)
        (reply,) = self.chat.lines(ANN)
        self.assertEqual(reply, "! authentication required: use netlab chat")
        self.assertEqual(self.chat.server.sessions, {})
