"""Tests for the server's session state machine, driven over a StringTransport.

Each hostile input is sent by a hand-written client and the test checks the
error the peer reads, that the connection is closed (or not), and that the
log has one line for it.
"""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from netlab.auth import client_proof, new_nonce
from netlab.framing import encode_data_frame, encode_frame, frame_header
from netlab.session import Control, Data, ProtocolError, SessionPolicy, decode_frame
from tests.sessionsupport import (
    HELLO,
    KEY,
    OTHER_KEY,
    EchoApplication,
    FakeClient,
    control,
    make_factory,
)


class SessionTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.factory = make_factory(self.clock)
        EchoApplication.instances.clear()

    def client(self, host: str = "127.0.0.1") -> FakeClient:
        return FakeClient(self.factory, self.clock, host)

    def ready_client(self, host: str = "127.0.0.1") -> FakeClient:
        client = self.client(host)
        answer, _, _ = client.auth()
        self.assertEqual(answer["op"], "ready")
        return client

    def assertClosedWith(self, client: FakeClient, code: str) -> dict[str, object]:
        messages = client.received()
        self.assertTrue(messages, "no error was sent")
        last = messages[-1]
        self.assertEqual((last["op"], last["code"]), ("error", code), messages)
        self.assertIsInstance(last["message"], str)
        self.assertTrue(client.closed, "the connection was not closed")
        return last


class HandshakeTests(SessionTestCase):
    """The happy paths: hello, authentication, ready, ping, bye."""

    def test_hello_names_protocol_version_and_limits(self) -> None:
        """The server's hello names protocol, version, service, limit and nonce."""
        answer = self.client().hello()
        self.assertEqual(answer["op"], "hello")
        self.assertEqual((answer["protocol"], answer["version"]), ("netlab", 1))
        self.assertEqual(answer["service"], "file")
        self.assertEqual(answer["max_frame"], 2 * 1024 * 1024)
        self.assertEqual(answer["auth"], ["hmac-sha256"])
        self.assertEqual(len(base64.b64decode(answer["nonce"])), 32)

    def test_mutual_authentication(self) -> None:
        """A right proof gets ready, with the server's mirror proof."""
        client = self.client()
        answer, server_nonce, client_nonce = client.auth()
        self.assertEqual(answer["user"], "alice")
        from netlab.auth import server_proof

        self.assertEqual(
            base64.b64decode(answer["proof"]),
            server_proof(KEY, server_nonce, client_nonce, "alice"),
        )
        [application] = EchoApplication.instances
        self.assertTrue(application.session.authenticated)
        self.assertEqual(application.session.user, "alice")

    def test_handshake_one_byte_at_a_time(self) -> None:
        """hello and auth fed one byte per read still authenticate."""
        client = self.client()
        client.send(HELLO, one_byte_at_a_time=True)
        [hello] = client.received()
        server_nonce = base64.b64decode(hello["nonce"])
        client_nonce = new_nonce()
        proof = client_proof(KEY, server_nonce, client_nonce, "alice")
        client.send(
            client.auth_frame("alice", client_nonce, proof), one_byte_at_a_time=True
        )
        [ready] = client.received()
        self.assertEqual(ready["op"], "ready")

    def test_ready_routes_to_application(self) -> None:
        """Control messages and data frames reach the application once ready."""
        client = self.ready_client()
        client.send(control("echo", n=1) + encode_data_frame(b"\x00\xffraw"))
        self.assertEqual(
            client.received(),
            [{"op": "echoed", "user": "alice", "n": 1}, {"data": b"\x00\xffraw"}],
        )

    def test_request_error_keeps_session(self) -> None:
        """An application's RequestError is sent and the session stays open."""
        client = self.ready_client()
        client.send(control("refuse"))
        client.send(control("later"))
        messages = client.received()
        self.assertEqual(
            [(m["op"], m["code"]) for m in messages],
            [("error", "not-allowed"), ("error", "not-allowed")],
        )
        self.assertEqual(messages[0]["path"], "x")
        self.assertFalse(client.closed)

    def test_application_bug(self) -> None:
        """An unexpected exception is logged once and answered with internal-error."""
        client = self.ready_client()
        other = self.ready_client()
        with capturedLogs() as events:
            client.send(control("crash"))
        self.assertClosedWith(client, "internal-error")
        [event] = [e for e in events if e.get("event") == "session.application.failed"]
        self.assertIsNotNone(event.get("log_failure"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        other.send(control("echo"))
        self.assertEqual(other.received()[0]["op"], "echoed")

    def test_ping_pong(self) -> None:
        """ping is answered with pong carrying the same id."""
        client = self.ready_client()
        client.send(control("ping", id=7))
        self.assertEqual(client.received(), [{"op": "pong", "id": 7}])

    def test_bye(self) -> None:
        """bye is answered with bye, then the server closes."""
        client = self.ready_client()
        client.send(control("bye"))
        self.assertEqual(client.received(), [{"op": "bye"}])
        self.assertTrue(client.closed)
        client.disconnect()
        [application] = EchoApplication.instances
        self.assertIsNotNone(application.lost)
        self.assertEqual(self.factory.sessions, set())

    def test_anonymous_when_allowed(self) -> None:
        """A service that allows it accepts anonymous clients, unauthenticated."""
        self.factory.policy = SessionPolicy(service="file", allow_anonymous=True)
        client = self.client()
        self.assertEqual(client.hello()["auth"], ["hmac-sha256", "anonymous"])
        client.send(control("auth", mechanism="anonymous"))
        self.assertEqual(client.received(), [{"op": "ready", "user": None}])
        [application] = EchoApplication.instances
        self.assertFalse(application.session.authenticated)

    def test_anonymous_refused_by_default(self) -> None:
        """Without allow_anonymous, anonymous auth is auth-required after a delay."""
        client = self.client()
        client.hello()
        client.send(control("auth", mechanism="anonymous"))
        self.assertEqual(client.received(), [])
        self.clock.advance(1)
        self.assertClosedWith(client, "auth-required")


class MalformedInputTests(SessionTestCase):
    """Malformed frames and messages: a clear error, then the connection closes."""

    def check_refused(self, frame: bytes, code: str, ready: bool = False) -> None:
        client = self.ready_client() if ready else self.client()
        with capturedLogs() as events:
            client.send(frame)
        self.assertClosedWith(client, code)
        lines = [e for e in events if e.get("event") == "session.protocol_error"]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("log_failure", lines[0])

    def test_not_json(self) -> None:
        """A control frame that is not JSON is bad-message."""
        self.check_refused(encode_frame(b"{not json"), "bad-message")

    def test_not_utf8(self) -> None:
        """A control frame that is not UTF-8 is bad-message."""
        self.check_refused(encode_frame(b'{"op":"\xff\xfe"}'), "bad-message")

    def test_wrong_shapes(self) -> None:
        """JSON without a string op, or with duplicate keys, is bad-message."""
        for payload in (b'{"op": 5}', b"{}", b'{"op":"hello","op":"x"}', b'{"op":""}'):
            self.check_refused(encode_frame(payload), "bad-message")

    def test_not_an_object(self) -> None:
        """Frames starting with anything but '{' or 0x00 are bad-frame."""
        for payload in (b"[1]", b"5", b" {}", b""):
            self.check_refused(encode_frame(payload), "bad-frame")

    def test_deeply_nested_json(self) -> None:
        """Nesting far beyond the limit (and beyond the parser's stack) is refused."""
        bomb = b'{"op":"echo","x":' + b"[" * 30000 + b"]" * 30000 + b"}"
        self.check_refused(encode_frame(bomb), "bad-message", ready=True)
        moderate = b'{"op":"echo","x":' + b"[" * 40 + b"]" * 40 + b"}"
        self.check_refused(encode_frame(moderate), "bad-message", ready=True)

    def test_nan_refused(self) -> None:
        """Non-standard JSON constants are refused."""
        self.check_refused(encode_frame(b'{"op":"echo","x":NaN}'), "bad-message", True)

    def test_hello_wrong_protocol(self) -> None:
        """A hello for another protocol is bad-message."""
        frame = control("hello", protocol="http", version=1, max_frame=1 << 20)
        self.check_refused(frame, "bad-message")

    def test_unsupported_version(self) -> None:
        """A hello with another version gets unsupported-version, naming ours."""
        client = self.client()
        client.send(control("hello", protocol="netlab", version=2, max_frame=1 << 20))
        error = self.assertClosedWith(client, "unsupported-version")
        self.assertIn("version 1", str(error["message"]))

    def test_tiny_max_frame(self) -> None:
        """A peer limit too small for control messages is refused."""
        self.check_refused(
            control("hello", protocol="netlab", version=1, max_frame=10), "bad-message"
        )

    def test_first_message_not_hello(self) -> None:
        """Anything before hello is unexpected-message."""
        self.check_refused(control("auth"), "unexpected-message")
        self.check_refused(encode_data_frame(b"x"), "unexpected-message")

    def test_hello_again_after_ready(self) -> None:
        """A second hello after ready is unexpected-message."""
        self.check_refused(HELLO, "unexpected-message", ready=True)

    def test_oversized_prefix(self) -> None:
        """Prefixes of MAX_LENGTH + 1 and 0xFFFFFFFF close without an answer."""
        for length in (2 * 1024 * 1024 + 1, 0xFFFFFFFF):
            client = self.ready_client()
            client.send(frame_header(length) + b"x" * 10)
            self.assertTrue(client.closed)
            self.assertEqual(client.protocol.buffered, 0)

    def test_close_mid_frame(self) -> None:
        """A connection lost mid-frame releases the session; nothing is delivered."""
        client = self.ready_client()
        client.send(control("echo", n=1)[:-3])
        client.disconnect()
        self.assertEqual(client.received(), [])
        self.assertEqual(self.factory.sessions, set())
        self.assertEqual(self.factory.per_address, {})

    def test_other_client_served_meanwhile(self) -> None:
        """A hostile client's errors do not disturb a well-behaved one."""
        good = self.ready_client()
        bad = self.client()
        bad.send(encode_frame(b"\xff"))
        good.send(control("echo", n=2))
        self.assertEqual(good.received(), [{"op": "echoed", "user": "alice", "n": 2}])
        self.assertTrue(bad.closed)
        self.assertFalse(good.closed)


class AuthenticationTests(SessionTestCase):
    """Wrong keys, unknown users, replay, reflection, and the lock-out."""

    def failure_after_delay(
        self, client: FakeClient, frame: bytes
    ) -> dict[str, object]:
        with capturedLogs() as events:
            client.send(frame)
            self.assertEqual(client.received(), [], "failure answered without delay")
            self.clock.advance(0.999)
            self.assertEqual(client.received(), [])
            self.clock.advance(0.001)
        error = self.assertClosedWith(client, "auth-failed")
        [line] = [e for e in events if e.get("event") == "session.auth.failed"]
        self.assertEqual(line["peer"], "127.0.0.1:40000")
        return error

    def attempt(self, user: str, key: bytes) -> dict[str, object]:
        client = self.client()
        server_nonce = base64.b64decode(client.hello()["nonce"])
        client_nonce = new_nonce()
        proof = client_proof(key, server_nonce, client_nonce, user)
        return self.failure_after_delay(
            client, client.auth_frame(user, client_nonce, proof)
        )

    def test_wrong_key_and_unknown_user_fail_identically(self) -> None:
        """Wrong key and unknown user get the same code and message, after a delay."""
        wrong_key = self.attempt("alice", OTHER_KEY)
        unknown = self.attempt("mallory", KEY)
        self.assertEqual(wrong_key, unknown)

    def test_replayed_proof(self) -> None:
        """A proof recorded from an earlier session fails in a new one."""
        first = self.client()
        server_nonce = base64.b64decode(first.hello()["nonce"])
        client_nonce = new_nonce()
        recorded = first.auth_frame(
            "alice",
            client_nonce,
            client_proof(KEY, server_nonce, client_nonce, "alice"),
        )
        first.send(recorded)
        self.assertEqual(first.received()[0]["op"], "ready")
        replay = self.client()
        replay.hello()
        self.failure_after_delay(replay, recorded)

    def test_reflected_server_proof(self) -> None:
        """The server's own proof, sent back as a client proof, fails."""
        observed = self.client()
        answer, server_nonce, client_nonce = observed.auth()
        server_side = base64.b64decode(answer["proof"])
        # An attacker without the key sends the server's mirror proof back.
        attacker = self.client()
        new_server_nonce = base64.b64decode(attacker.hello()["nonce"])
        self.assertNotEqual(new_server_nonce, server_nonce)
        self.failure_after_delay(
            attacker, attacker.auth_frame("alice", client_nonce, server_side)
        )

    def test_reflected_nonce(self) -> None:
        """A client nonce equal to the server's nonce is refused outright."""
        client = self.client()
        server_nonce = base64.b64decode(client.hello()["nonce"])
        proof = client_proof(KEY, server_nonce, server_nonce, "alice")
        self.failure_after_delay(
            client, client.auth_frame("alice", server_nonce, proof)
        )

    def test_operation_before_auth(self) -> None:
        """Any operation or data before auth is auth-required, after a delay."""
        for frame in (control("echo"), control("ping"), encode_data_frame(b"x")):
            client = self.client()
            client.hello()
            client.send(frame)
            self.assertEqual(client.received(), [])
            self.clock.advance(1)
            self.assertClosedWith(client, "auth-required")
            # Input during the delay changes nothing.
            self.assertFalse(EchoApplication.instances)

    def test_malformed_auth(self) -> None:
        """auth with a short nonce or a non-base64 one is bad-message."""
        for nonce in ("AAAA", "%%%%"):
            client = self.client()
            client.hello()
            client.send(
                control(
                    "auth",
                    mechanism="hmac-sha256",
                    user="alice",
                    nonce=nonce,
                    proof="AAAA",
                )
            )
            self.assertClosedWith(client, "bad-message")

    def test_lockout(self) -> None:
        """Three failures lock the address out; other addresses still get in."""
        for _ in range(3):
            self.attempt("alice", OTHER_KEY)
        locked = self.client()
        self.assertClosedWith(locked, "locked-out")
        self.ready_client(host="127.0.0.2")
        self.clock.advance(301)
        self.ready_client()


class LimitTests(SessionTestCase):
    """Timeouts and connection caps."""

    def test_handshake_timeout(self) -> None:
        """A handshake that never finishes is closed with handshake-timeout."""
        client = self.client()
        client.hello()
        self.clock.advance(9.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.2)
        self.assertClosedWith(client, "handshake-timeout")

    def test_idle_timeout(self) -> None:
        """A silent ready session is closed with idle-timeout; traffic resets it."""
        client = self.ready_client()
        self.clock.advance(200)
        client.send(control("ping"))
        client.received()
        self.clock.advance(200)
        self.assertFalse(client.closed)
        self.clock.advance(101)
        self.assertClosedWith(client, "idle-timeout")

    def test_abort_when_peer_never_reads(self) -> None:
        """A closed connection that does not finish flushing is aborted."""
        client = self.client()
        self.clock.advance(11)
        self.assertTrue(client.closed)
        self.clock.advance(10)
        self.assertTrue(client.transport.disconnected)

    def test_per_address_cap(self) -> None:
        """The connection over the per-address cap is told so and closed."""
        self.factory.policy = SessionPolicy(
            service="file", max_connections_per_address=2
        )
        first, _second = self.ready_client(), self.client()
        third = self.client()
        self.assertClosedWith(third, "too-many-connections")
        self.client(host="127.0.0.3").hello()
        first.send(control("echo"))
        self.assertEqual(first.received()[0]["op"], "echoed")
        first.disconnect()
        self.client().hello()

    def test_global_cap(self) -> None:
        """The connection over the global cap is told so and closed."""
        self.factory.policy = SessionPolicy(service="file", max_connections=2)
        self.client("127.0.0.1")
        self.client("127.0.0.2")
        self.assertClosedWith(self.client("127.0.0.3"), "too-many-connections")


class LogFloodTests(SessionTestCase):
    """Warnings anyone can provoke are throttled, and say what they held back."""

    def test_refusal_flood_is_a_trickle(self) -> None:
        """500 refused connections log a burst of 20 lines, then one a second,
        the next one counting those held back; each client is still told why,
        and a client under the cap is served throughout."""
        self.factory.policy = SessionPolicy(service="file", max_connections=1)
        served = self.ready_client()
        with capturedLogs() as events:
            for _ in range(500):
                self.assertClosedWith(self.client("127.0.0.9"), "too-many-connections")
            self.clock.advance(1.0)
            self.assertClosedWith(self.client("127.0.0.9"), "too-many-connections")
        lines = [e for e in events if e.get("event") == "session.refused"]
        self.assertEqual(len(lines), 21)
        self.assertEqual([line["not_logged"] for line in lines[:20]], [0] * 20)
        self.assertEqual(lines[20]["not_logged"], 480)
        self.assertIn("(and 480 more not logged)", formatEvent(lines[20]))
        served.send(control("echo"))
        self.assertEqual(served.received()[0]["op"], "echoed")

    def test_auth_failures_are_throttled_apart(self) -> None:
        """Authentication failures have a throttle of their own: a refusal
        flood does not hide them."""
        self.factory.policy = SessionPolicy(service="file", max_connections=1)
        self.ready_client()
        with capturedLogs():
            for _ in range(30):
                self.client("127.0.0.9")
        self.factory.policy = SessionPolicy(service="file")
        with capturedLogs() as events:
            client = self.client()
            client.hello()
            client.send(control("auth", mechanism="anonymous"))
            self.clock.advance(1)
        self.assertEqual(
            [e["event"] for e in events if e.get("event", "").startswith("session.")],
            ["session.auth.failed"],
        )


class DecodeFuzzTests(TestCase):
    """Arbitrary payloads decode or fail with a ProtocolError, nothing else."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.builds(lambda b: b"{" + b, st.binary(max_size=200)),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                lambda children: (
                    st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=3), children, max_size=3)
                ),
                max_leaves=20,
            ).map(lambda value: json.dumps({"op": "x", "v": value}).encode()),
        )
    )
    def test_decode_frame(self, payload: bytes) -> None:
        """decode_frame returns a message or raises ProtocolError with a known code."""
        try:
            message = decode_frame(payload)
        except ProtocolError as error:
            self.assertIn(error.code, {"bad-frame", "bad-message"})
        else:
            self.assertIsInstance(message, Control | Data)
