"""Helpers for tests of the session protocol: a tiny application and a fake client.

:class:`EchoApplication` stands in for the file and command services.
:class:`FakeClient` drives a :class:`~netlab.session.ServerProtocol` over a
``StringTransport`` with a ``MemoryReactorClock``, speaking the protocol by
hand so tests can send anything, including what no real client would.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from netlab.auth import FailureTracker, Users, Verifier, client_proof, new_nonce
from netlab.framing import encode_frame
from netlab.session import (
    Control,
    ISessionApplication,
    RequestError,
    ServerSession,
    SessionFactory,
    SessionPolicy,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
USERS = Users({"alice": KEY, "bob": OTHER_KEY})


@implementer(ISessionApplication)
class EchoApplication:
    """Echoes ``echo`` messages and data frames; ``refuse`` fails one request,
    ``crash`` raises like a bug would."""

    instances: list[EchoApplication] = []

    def __init__(self, session: ServerSession) -> None:
        self.session = session
        self.lost: Failure | None = None
        EchoApplication.instances.append(self)

    def control_received(self, message: Control) -> object:
        if message.op == "echo":
            self.session.send("echoed", user=self.session.user, **message.fields)
            return None
        if message.op == "refuse":
            raise RequestError("not-allowed", "refused on purpose", path="x")
        if message.op == "later":
            return self._later(message)
        if message.op == "crash":
            raise RuntimeError("a bug in the application")
        raise RequestError("unknown-op", f'unknown operation "{message.op}"')

    async def _later(self, message: Control) -> None:
        raise RequestError("not-allowed", "refused later")

    def data_received(self, payload: bytes) -> object:
        self.session.send_data(payload)
        return None

    def connection_lost(self, reason: Failure) -> None:
        self.lost = reason


def make_factory(
    clock: Any, policy: SessionPolicy | None = None, max_failures: int = 3
) -> SessionFactory:
    return SessionFactory(
        policy or SessionPolicy(service="file", auth_failure_delay=1.0),
        Verifier(USERS),
        FailureTracker(clock, max_failures, 60.0, 300.0),
        EchoApplication,
        clock,
    )


def parse_frames(data: bytes) -> list[bytes]:
    """Split a byte string of whole frames into payloads."""
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        assert len(data) >= 4 + length, "incomplete frame in output"
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames


def control(op: str, **fields: Any) -> bytes:
    return encode_frame(json.dumps({"op": op, **fields}).encode())


HELLO = control("hello", protocol="netlab", version=1, max_frame=1 << 20)


class FakeClient:
    """One connection to ``factory`` over a StringTransport."""

    def __init__(
        self,
        factory: SessionFactory,
        clock: MemoryReactorClock,
        host: str = "127.0.0.1",
    ) -> None:
        self.clock = clock
        address = IPv4Address("TCP", host, 40000)
        self.protocol = factory.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self._seen = 0

    def send(self, data: bytes, one_byte_at_a_time: bool = False) -> None:
        if one_byte_at_a_time:
            for index in range(len(data)):
                self.protocol.dataReceived(data[index : index + 1])
        else:
            self.protocol.dataReceived(data)

    def received(self) -> list[dict[str, Any]]:
        """Messages sent since the last call (data frames as ``{"data": b}``)."""
        output = self.transport.value()[self._seen :]
        self._seen = len(self.transport.value())
        messages = []
        for payload in parse_frames(output):
            if payload[:1] == b"\x00":
                messages.append({"data": payload[1:]})
            else:
                messages.append(json.loads(payload))
        return messages

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def hello(self) -> dict[str, Any]:
        self.send(HELLO)
        (answer,) = self.received()
        return answer

    def auth(
        self, user: str = "alice", key: bytes = KEY, nonce: bytes | None = None
    ) -> tuple[dict[str, Any], bytes, bytes]:
        """hello + auth; return (answer, server nonce, client nonce)."""
        server_nonce = base64.b64decode(self.hello()["nonce"])
        client_nonce = nonce if nonce is not None else new_nonce()
        proof = client_proof(key, server_nonce, client_nonce, user)
        self.send(self.auth_frame(user, client_nonce, proof))
        self.clock.advance(5)  # past any failure delay
        answers = self.received()
        return answers[0], server_nonce, client_nonce

    @staticmethod
    def auth_frame(user: str, client_nonce: bytes, proof: bytes) -> bytes:
        return control(
            "auth",
            mechanism="hmac-sha256",
            user=user,
            nonce=base64.b64encode(client_nonce).decode(),
            proof=base64.b64encode(proof).decode(),
        )

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionDone

        self.protocol.connectionLost(Failure(ConnectionDone()))
