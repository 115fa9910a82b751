"""The file service's wire operations, driven through a session over a StringTransport.

Session timers run on a MemoryReactorClock; the store's worker threads report
back through the real reactor, so tests that wait for a put or a get to
finish poll (bounded) for the answer instead of sleeping.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from netlab.auth import FailureTracker, Verifier
from netlab.config import from_mapping
from netlab.file.service import FileService
from netlab.file.store import PARTIAL_PREFIX
from netlab.framing import encode_data_frame
from netlab.session import SessionFactory, SessionPolicy, decode_control
from tests.sessionsupport import USERS, FakeClient, control
from tests.support import temporary_directory


class FileServiceTestCase(TestCase):
    """A FileService's application behind a SessionFactory with fake clients."""

    file_settings: dict[str, Any] = {}
    anonymous = False

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.root = self.directory / "root"
        self.root.mkdir()
        config = from_mapping(
            {
                "netlab": {"state_directory": str(self.directory / "state")},
                "file": {
                    "root": str(self.root),
                    "min_free_space": 0,
                    "read_only_users": ["bob"],
                    **self.file_settings,
                },
            },
            base_directory=self.directory,
        )
        self.service = FileService(config, reactor)
        self.clock = MemoryReactorClock()
        self.factory = SessionFactory(
            SessionPolicy(service="file", allow_anonymous=self.anonymous),
            Verifier(USERS),
            FailureTracker(self.clock, 3, 60.0, 300.0),
            self.service.application,
            self.clock,
        )

    def client(self, user: str | None = "alice") -> FakeClient:
        client = FakeClient(self.factory, self.clock)
        if user is None:
            client.hello()
            client.send(control("auth", mechanism="anonymous"))
            self.assertEqual(client.received()[0]["op"], "ready")
        else:
            from tests.sessionsupport import KEY, OTHER_KEY

            answer, _, _ = client.auth(user, KEY if user == "alice" else OTHER_KEY)
            self.assertEqual(answer["op"], "ready")
        self.addCleanup(client.disconnect)
        return client

    def ask(self, client: FakeClient, op: str, **fields: Any) -> dict[str, Any]:
        client.send(control(op, **fields))
        (answer,) = client.received()
        return answer

    async def wait_for(self, client: FakeClient, op: str) -> list[dict[str, Any]]:
        """Everything received up to and including a message ``op`` (bounded wait)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen += client.received()
            if any(message.get("op") in (op, "error") for message in seen):
                return seen
            await deferLater(reactor, 0.005, lambda: None)
        self.fail(f"no {op!r} within 10s; got {seen!r}")

    async def put(
        self, client: FakeClient, name: str, data: bytes, **fields: Any
    ) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        start = self.ask(
            client, "put", path=name, size=len(data), sha256=digest, **fields
        )
        if start["op"] != "put-start":
            return start
        for index in range(start["offset"], len(data), 100_000):
            client.send(encode_data_frame(data[index : index + 100_000]))
        client.send(control("put-end"))
        return (await self.wait_for(client, "put-done"))[-1]


class SimpleOperationTests(FileServiceTestCase):
    """ls (paged), stat, mkdir and rm over the wire."""

    file_settings = {"list_page_size": 2}

    def test_ls_paged(self) -> None:
        """A directory larger than a page comes in pages, resumed after a name."""
        for name in "edcba":
            (self.root / name).write_bytes(name.encode())
        client = self.client()
        first = self.ask(client, "ls", path="")
        self.assertEqual([e["name"] for e in first["entries"]], ["a", "b"])
        self.assertTrue(first["more"])
        last = self.ask(client, "ls", path=".", after="d")
        self.assertEqual([e["name"] for e in last["entries"]], ["e"])
        self.assertFalse(last["more"])

    def test_stat_mkdir_rm(self) -> None:
        """mkdir, stat and rm answer done / entry; errors keep the session open."""
        client = self.client()
        self.assertEqual(self.ask(client, "mkdir", path="d")["op"], "done")
        entry = self.ask(client, "stat", path="d")
        self.assertEqual(entry["entry"]["type"], "directory")
        missing = self.ask(client, "stat", path="nope")
        self.assertEqual((missing["op"], missing["code"]), ("error", "not-found"))
        self.assertEqual(self.ask(client, "rm", path="d")["op"], "done")
        self.assertFalse(client.closed)

    def test_hostile_paths(self) -> None:
        """Every hostile path gets a clear error and the session keeps serving."""
        outside = temporary_directory(self)
        (outside / "secret").write_text("secret")
        os.symlink(outside / "secret", self.root / "file-link")
        os.symlink(outside, self.root / "dir-link")
        client = self.client()
        cases = {
            "../x": "bad-path",
            "/etc/passwd": "bad-path",
            "a/../../x": "bad-path",
            "a\0b": "bad-path",
            "": "bad-path",
            ".": "bad-path",
            "a//b": "bad-path",
            "x\x1b[31m": "bad-path",
            "ctl\x07": "bad-path",
            "n" * 256: "bad-path",
            "dir-link/secret": "symlink",
        }
        for path, code in cases.items():
            for op in ("get", "rm", "mkdir"):
                answer = self.ask(client, op, path=path)
                self.assertEqual(
                    (answer["op"], answer["code"]), ("error", code), (op, path)
                )
                self.assertNotIn("\x1b", answer["message"])
        answer = self.ask(client, "get", path="file-link")
        self.assertEqual(answer["code"], "symlink")
        answer = self.ask(
            client, "put", path="dir-link/new", size=1, sha256="0" * 64, force=True
        )
        self.assertEqual(answer["code"], "symlink")
        for path in (7, None, ["a"]):
            answer = self.ask(client, "stat", path=path)
            self.assertEqual(answer["code"], "bad-path")
        self.assertTrue((outside / "secret").exists())
        self.assertFalse(client.closed)
        self.assertEqual(self.ask(client, "ls", path="")["op"], "listing")

    def test_malformed_requests(self) -> None:
        """Wrong field types and unknown operations are refused, not fatal."""
        client = self.client()
        for op, fields, code in (
            ("get", {"path": "f", "offset": -1}, "bad-message"),
            ("get", {"path": "f", "offset": "0"}, "bad-message"),
            ("put", {"path": "f", "size": 1, "sha256": "xyz"}, "bad-message"),
            ("put", {"path": "f", "size": True, "sha256": "0" * 64}, "bad-message"),
            (
                "put",
                {"path": "f", "size": 1, "sha256": "0" * 64, "force": 1},
                "bad-message",
            ),
            ("ls", {"path": "", "after": 3}, "bad-message"),
            ("frobnicate", {}, "unknown-op"),
            ("put-end", {}, "unexpected-message"),
        ):
            answer = self.ask(client, op, **fields)
            self.assertEqual((answer["op"], answer["code"]), ("error", code), op)
        client.send(encode_data_frame(b"stray"))
        self.assertEqual(client.received()[0]["code"], "unexpected-message")


class PermissionTests(FileServiceTestCase):
    """Read-only users and anonymous readers cannot change anything."""

    anonymous = True
    file_settings = {"anonymous": "read"}

    def test_read_only_user(self) -> None:
        """bob (read_only_users) may list and get but not put, rm or mkdir."""
        (self.root / "f").write_bytes(b"x")
        client = self.client("bob")
        self.assertEqual(self.ask(client, "ls", path="")["op"], "listing")
        for op, fields in (
            ("put", {"path": "g", "size": 1, "sha256": "0" * 64}),
            ("rm", {"path": "f"}),
            ("mkdir", {"path": "d"}),
        ):
            answer = self.ask(client, op, **fields)
            self.assertEqual(answer["code"], "forbidden")
        self.assertTrue((self.root / "f").exists())

    def test_anonymous_reader(self) -> None:
        """anonymous = "read": an unauthenticated client may ls but not rm."""
        (self.root / "f").write_bytes(b"x")
        client = self.client(None)
        self.assertEqual(self.ask(client, "ls", path="")["op"], "listing")
        answer = self.ask(client, "rm", path="f")
        self.assertEqual(answer["code"], "forbidden")
        self.assertIn("authenticate", answer["message"])


DATA = os.urandom(700_000)


class TransferTests(FileServiceTestCase):
    """get and put over the wire."""

    file_settings = {"chunk_size": 65536}

    async def test_get(self) -> None:
        """get streams chunk-size frames and ends with both digests; a cached
        digest is served the second time."""
        (self.root / "f").write_bytes(DATA)
        client = self.client()
        client.send(control("get", path="f"))
        messages = await self.wait_for(client, "get-end")
        start, *frames, end = messages
        self.assertEqual(
            (start["op"], start["size"], start["offset"]), ("get-start", len(DATA), 0)
        )
        payload = b"".join(frame["data"] for frame in frames)
        self.assertEqual(payload, DATA)
        self.assertTrue(all(len(frame["data"]) <= 65536 for frame in frames))
        digest = hashlib.sha256(DATA).hexdigest()
        self.assertEqual((end["sha256"], end["file_sha256"]), (digest, digest))
        self.assertEqual(self.ask(client, "stat", path="f")["sha256"], digest)
        client.send(control("get", path="f"))
        self.assertEqual((await self.wait_for(client, "get-end"))[-1]["sha256"], digest)

    async def test_get_from_offset(self) -> None:
        """A resumed get sends the tail, its digest, and the whole file's digest."""
        (self.root / "f").write_bytes(DATA)
        client = self.client()
        client.send(control("get", path="f", offset=500_000))
        _, *frames, end = await self.wait_for(client, "get-end")
        self.assertEqual(b"".join(f["data"] for f in frames), DATA[500_000:])
        self.assertEqual(end["sha256"], hashlib.sha256(DATA[500_000:]).hexdigest())
        self.assertEqual(end["file_sha256"], hashlib.sha256(DATA).hexdigest())

    async def test_put(self) -> None:
        """A put lands atomically and verified; a second one needs force."""
        client = self.client()
        done = await self.put(client, "f", DATA)
        self.assertEqual(done["op"], "put-done")
        self.assertEqual((self.root / "f").read_bytes(), DATA)
        refused = await self.put(client, "f", b"new")
        self.assertEqual(refused["code"], "exists")
        self.assertEqual(
            (await self.put(client, "f", b"new", force=True))["op"], "put-done"
        )
        self.assertEqual((self.root / "f").read_bytes(), b"new")

    async def test_wrong_sha256(self) -> None:
        """A put whose data does not match its declared digest is refused; no target."""
        client = self.client()
        start = self.ask(client, "put", path="f", size=len(DATA), sha256="0" * 64)
        self.assertEqual(start["op"], "put-start")
        client.send(encode_data_frame(DATA))
        client.send(control("put-end"))
        answer = (await self.wait_for(client, "put-done"))[-1]
        self.assertEqual(answer["code"], "integrity")
        self.assertEqual(list(self.root.iterdir()), [])
        self.assertEqual(self.ask(client, "ls", path="")["op"], "listing")

    async def test_size_mismatch(self) -> None:
        """More data than declared, or put-end before the declared size: refused."""
        client = self.client()
        digest = hashlib.sha256(DATA).hexdigest()
        self.ask(client, "put", path="f", size=10, sha256=digest)
        client.send(encode_data_frame(DATA[:11]))
        self.assertEqual(client.received()[0]["code"], "size-mismatch")
        # The client's stray frames and put-end are dropped after the error.
        client.send(encode_data_frame(b"more"))
        client.send(control("put-end"))
        self.assertEqual(client.received(), [])
        self.ask(client, "put", path="g", size=len(DATA) + 1, sha256=digest)
        client.send(encode_data_frame(DATA))
        client.send(control("put-end"))
        answer = (await self.wait_for(client, "put-done"))[-1]
        self.assertEqual(answer["code"], "size-mismatch")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(list(self.root.iterdir()), [])

    async def test_disconnect_then_resume(self) -> None:
        """A put cut off mid-stream keeps its partial; the same put resumes from it."""
        client = self.client()
        digest = hashlib.sha256(DATA).hexdigest()
        self.ask(client, "put", path="f", size=len(DATA), sha256=digest)
        client.send(encode_data_frame(DATA[:300_000]))
        client.disconnect()
        # The partial is released once its worker has written what arrived.
        for _ in range(1000):
            if not self.service.store.busy:
                break
            await deferLater(reactor, 0.005, lambda: None)
        self.assertFalse((self.root / "f").exists())
        (partial,) = [
            p for p in self.root.iterdir() if p.name.startswith(PARTIAL_PREFIX)
        ]
        self.assertEqual(partial.stat().st_size, 300_000)
        again = self.client()
        start = self.ask(again, "put", path="f", size=len(DATA), sha256=digest)
        self.assertEqual(start["offset"], 300_000)
        again.send(encode_data_frame(DATA[300_000:]))
        again.send(control("put-end"))
        self.assertEqual((await self.wait_for(again, "put-done"))[-1]["op"], "put-done")
        self.assertEqual((self.root / "f").read_bytes(), DATA)
        self.assertEqual([p.name for p in self.root.iterdir()], ["f"])

    async def test_concurrent_puts(self) -> None:
        """Two puts to one name: the second is told busy, the first completes."""
        first, second = self.client(), self.client()
        digest = hashlib.sha256(DATA).hexdigest()
        self.assertEqual(
            self.ask(first, "put", path="f", size=len(DATA), sha256=digest)["op"],
            "put-start",
        )
        busy = self.ask(second, "put", path="f", size=3, sha256="0" * 64)
        self.assertEqual(busy["code"], "busy")
        first.send(encode_data_frame(DATA))
        first.send(control("put-end"))
        self.assertEqual((await self.wait_for(first, "put-done"))[-1]["op"], "put-done")
        self.assertEqual((self.root / "f").read_bytes(), DATA)

    async def test_one_operation_at_a_time(self) -> None:
        """Another request during a put is refused without disturbing the put."""
        client = self.client()
        digest = hashlib.sha256(DATA).hexdigest()
        self.ask(client, "put", path="f", size=len(DATA), sha256=digest)
        answer = self.ask(client, "ls", path="")
        self.assertEqual(answer["code"], "transfer-in-progress")
        client.send(encode_data_frame(DATA))
        client.send(control("put-end"))
        self.assertEqual(
            (await self.wait_for(client, "put-done"))[-1]["op"], "put-done"
        )


class ProtocolDocumentTests(TestCase):
    """docs/protocol.rst documents every file-service error code and message."""

    def test_error_codes_documented(self) -> None:
        """Each code the file modules raise appears in the file-service section."""
        root = Path(__file__).resolve().parent.parent
        source = "".join(
            (root / "netlab" / "file" / name).read_text()
            for name in ("paths.py", "store.py", "service.py")
        )
        codes = set(
            re.findall(
                r"(?:PathRefused|TransferRefused|RequestError|_fail_put|send_error)"
                r'\(\s*"([a-z-]+)"',
                source,
            )
        )
        self.assertGreater(len(codes), 15)
        section = (root / "docs" / "protocol.rst").read_text().split("File service")[1]
        for code in codes:
            self.assertIn(f"``{code}``", section)

    def test_messages_documented(self) -> None:
        """Every operation and answer of the file service is described."""
        root = Path(__file__).resolve().parent.parent
        section = (root / "docs" / "protocol.rst").read_text().split("File service")[1]
        for op in (
            "ls",
            "listing",
            "stat",
            "entry",
            "mkdir",
            "rm",
            "done",
            "get",
            "get-start",
            "get-end",
            "put",
            "put-start",
            "put-end",
            "put-done",
        ):
            self.assertIn(f'"op": "{op}"', section)

    def test_examples_parse(self) -> None:
        """Every example message in the file-service section decodes."""
        root = Path(__file__).resolve().parent.parent
        section = (root / "docs" / "protocol.rst").read_text().split("File service")[1]
        messages = [
            line.strip().removeprefix("->").strip()
            for line in section.splitlines()
            if line.strip().removeprefix("->").strip().startswith('{"op"')
        ]
        self.assertGreater(len(messages), 12)
        for message in messages:
            decode_control(message.encode())


class ServiceTests(TestCase):
    """The FileService: reload and start-up warnings."""

    def make(self, **file: Any) -> FileService:
        directory = temporary_directory(self)
        (directory / "root").mkdir()
        config = from_mapping(
            {"file": {"root": str(directory / "root"), **file}},
            base_directory=directory,
        )
        return FileService(config, reactor)

    def test_reload_applies_store_policy(self) -> None:
        """A reload hands the new quota and overwrite policy to the store at once."""
        service = self.make(quota="1MiB")
        new = attrs.evolve(
            service.config,
            file=attrs.evolve(service.config.file, quota=5, overwrite="never"),
        )
        self.assertEqual(service.reconfigure(new), [])
        self.assertEqual(service.store.policy.quota, 5)
        self.assertEqual(service.store.policy.overwrite, "never")

    def test_anonymous_beyond_loopback_warns(self) -> None:
        """Anonymous access on a non-loopback address is logged as a warning."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make(
            anonymous="read", endpoint="tcp:8021:interface=0.0.0.0"
        ).warn_if_exposed()
        self.make(anonymous="read").warn_if_exposed()
        self.make(endpoint="tcp:8021:interface=0.0.0.0").warn_if_exposed()
        warnings = [e for e in events if e.get("event") == "file.anonymous.exposed"]
        self.assertEqual(len(warnings), 1)

    def test_bound_address_decides_once_listening(self) -> None:
        """Once listening, the socket's own address decides: a systemd socket
        bound to loopback does not warn, one bound to every address does."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for address, warned in (
            (IPv4Address("TCP", "127.0.0.1", 8021), 0),
            (IPv6Address("TCP", "::1", 8021), 0),
            (IPv4Address("TCP", "0.0.0.0", 8021), 1),
        ):
            service = self.make(
                anonymous="read", endpoint="systemd:domain=INET:name=netlab-file"
            )
            port = StringTransport(hostAddress=address)
            service.port = port  # type: ignore[assignment]
            events.clear()
            service.warn_if_exposed()
            warnings = [e for e in events if e.get("event") == "file.anonymous.exposed"]
            self.assertEqual(len(warnings), warned, address)

    def test_reload_that_opens_anonymous_access_warns(self) -> None:
        """A reload that turns anonymous access on beyond loopback warns too."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = self.make(endpoint="tcp:8021:interface=0.0.0.0")
        opened = attrs.evolve(
            service.config,
            file=attrs.evolve(service.config.file, anonymous="write"),
        )
        self.assertEqual(service.reconfigure(opened), [])
        [warning] = [e for e in events if e.get("event") == "file.anonymous.exposed"]
        self.assertEqual(warning["access"], "write")
        events.clear()
        service.reconfigure(opened)  # Already open: said once is enough.
        self.assertNotIn("file.anonymous.exposed", [e.get("event") for e in events])
