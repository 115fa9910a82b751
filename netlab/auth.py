"""Keys, the users file and HMAC-SHA256 mutual challenge-response.

The exchange (``docs/protocol.rst`` shows it byte by byte): the server sends
a fresh 32-byte nonce ``Ns``; the client answers with its user name, its own
fresh nonce ``Nc`` and ``HMAC-SHA256(key, "netlab-client" || Ns || Nc || user)``;
the server checks it and proves itself with
``HMAC-SHA256(key, "netlab-server" || Ns || Nc || user)``.

Why each piece is there:

* Both nonces are fresh per session and from :mod:`secrets`, so a proof
  recorded from an earlier session is useless: the server's nonce differs.
* The role labels differ, so a proof one side produced can never be
  reflected back as the other side's proof.
* The user name is inside the MAC, so a proof cannot be moved to another
  account that happens to share a key.
* Comparison is :func:`hmac.compare_digest` (constant time), and an unknown
  user is checked against a per-process random key exactly like a known one,
  so neither the answer nor its timing tells whether a user exists.

Keys are at least 32 random bytes, stored base64-encoded.  The daemon reads
them from the users file, which must not be readable by group or others; the
client reads its own key from its key file under the same rule.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Bytes in a nonce.
NONCE_SIZE = 32
#: Bytes in a freshly generated key (and the least a users file may hold).
KEY_SIZE = 32
#: The label in the MAC input of the client's proof.
CLIENT_LABEL = b"netlab-client"
#: The label in the MAC input of the server's proof.
SERVER_LABEL = b"netlab-server"
#: What a user name may look like (it is logged and shown, so kept plain).
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")


class KeyFileError(Exception):
    """A users file or key file is missing, unsafe or malformed (message: fix)."""


def new_nonce() -> bytes:
    """A fresh random nonce."""
    return secrets.token_bytes(NONCE_SIZE)


def generate_key() -> bytes:
    """A fresh random key."""
    return secrets.token_bytes(KEY_SIZE)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_base64(text: object, what: str) -> bytes:
    """Strict base64 (``ValueError`` naming ``what`` when it is not)."""
    if not isinstance(text, str):
        # One error type for every malformed value keeps callers simple.
        raise ValueError(f"{what} is not a base64 string")  # noqa: TRY004
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None


def _proof(
    label: bytes, key: bytes, server_nonce: bytes, client_nonce: bytes, user: str
) -> bytes:
    message = label + server_nonce + client_nonce + user.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()


def client_proof(
    key: bytes, server_nonce: bytes, client_nonce: bytes, user: str
) -> bytes:
    """What the client sends to prove it holds ``key``."""
    return _proof(CLIENT_LABEL, key, server_nonce, client_nonce, user)


def server_proof(
    key: bytes, server_nonce: bytes, client_nonce: bytes, user: str
) -> bytes:
    """What the server sends to prove it holds ``key`` too."""
    return _proof(SERVER_LABEL, key, server_nonce, client_nonce, user)


def check_private(path: Path, what: str) -> None:
    """Refuse a key-holding file that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f'{what} "{path}" does not exist') from None
    except OSError as error:
        raise KeyFileError(f'cannot read {what} "{path}": {error.strerror}') from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f'{what} "{path}" is not a regular file')
    if mode & 0o077:
        raise KeyFileError(
            f'{what} "{path}" is accessible by group or others (mode '
            f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )


@attrs.frozen
class Users:
    """The users allowed to authenticate, with their keys."""

    keys: Mapping[str, bytes] = attrs.field(factory=dict)

    def __contains__(self, user: object) -> bool:
        return user in self.keys

    def __len__(self) -> int:
        return len(self.keys)


def parse_users(document: Mapping[str, Any], path: Path) -> Users:
    """Validate a parsed users file (``[users.NAME] key = "BASE64"``)."""
    unknown = [name for name in document if name != "users"]
    if unknown:
        raise KeyFileError(
            f'users file "{path}": unknown top-level key {unknown[0]!r}; '
            "each user is a [users.NAME] table with a key"
        )
    table = document.get("users", {})
    if not isinstance(table, dict):
        raise KeyFileError(f'users file "{path}": "users" must be a table')
    keys: dict[str, bytes] = {}
    for user, entry in table.items():
        where = f'users file "{path}": [users.{user}]'
        if not USER_NAME.fullmatch(user):
            raise KeyFileError(
                f"{where}: a user name is 1-64 letters, digits, '_', '.' or '-'"
            )
        if not isinstance(entry, dict) or set(entry) != {"key"}:
            raise KeyFileError(f'{where}: expected exactly one key: key = "BASE64"')
        try:
            key = decode_base64(entry["key"], "key")
        except ValueError as error:
            raise KeyFileError(
                f"{where}: {error}; create keys with netlab keygen"
            ) from None
        if len(key) < KEY_SIZE:
            raise KeyFileError(
                f"{where}: the key has {len(key)} bytes, fewer than {KEY_SIZE}; "
                "create keys with netlab keygen"
            )
        keys[user] = key
    return Users(keys)


def load_users(path: Path) -> Users:
    """Read the users file, refusing it unless only its owner can read it."""
    check_private(path, "users file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise KeyFileError(
            f'cannot read users file "{path}": {error.strerror}'
        ) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise KeyFileError(f'users file "{path}" is not valid TOML: {error}') from None
    return parse_users(document, path)


def read_key_file(path: Path) -> bytes:
    """The client's key: one base64 line in a file only its owner can read."""
    check_private(path, "key file")
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f'cannot read key file "{path}": {error}') from None
    try:
        key = decode_base64(text, f'key file "{path}"')
    except ValueError as error:
        raise KeyFileError(f"{error}; create one with netlab keygen") from None
    if len(key) < KEY_SIZE:
        raise KeyFileError(
            f'key file "{path}" holds {len(key)} bytes, fewer than {KEY_SIZE}; '
            "create one with netlab keygen"
        )
    return key


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file 0600, so the key is never visible to others.
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def render_users(users: Users) -> str:
    """The users file for ``users`` (names and keys need no TOML quoting)."""
    lines = [
        "# netlab users file: one [users.NAME] table per user, written by",
        "# netlab keygen. Keep it mode 0600: the daemon refuses it otherwise.",
    ]
    for user in sorted(users.keys):
        lines += ["", f"[users.{user}]", f'key = "{encode_key(users.keys[user])}"']
    return "\n".join(lines) + "\n"


def add_user(users_file: Path, user: str, key: bytes, *, replace: bool) -> None:
    """Add ``user`` with ``key`` to the users file (created if missing)."""
    if not USER_NAME.fullmatch(user):
        raise KeyFileError(
            f"invalid user name {user!r}: use 1-64 letters, digits, '_', '.' or '-'"
        )
    users = load_users(users_file) if users_file.exists() else Users()
    if user in users and not replace:
        raise KeyFileError(
            f'user {user!r} already has a key in "{users_file}"; pass --force to '
            "replace it"
        )
    write_private(users_file, render_users(Users({**users.keys, user: key})))


# --------------------------------------------------------------------------
# The server's side of the exchange.
# --------------------------------------------------------------------------


@attrs.define
class Verifier:
    """Checks client proofs against the users file.

    ``verify`` returns the server's proof for a good client proof and None
    for anything else, taking the same steps whether or not the user exists.
    """

    users: Users = attrs.field(factory=Users)
    #: Stands in for an unknown user's key, so the same MAC work is done.
    _decoy_key: bytes = attrs.field(factory=generate_key)

    def verify(
        self, user: str, server_nonce: bytes, client_nonce: bytes, proof: bytes
    ) -> bytes | None:
        key = self.users.keys.get(user)
        known = key is not None
        expected = client_proof(
            key or self._decoy_key, server_nonce, client_nonce, user
        )
        matches = hmac.compare_digest(expected, proof)
        if not (known and matches):
            return None
        assert key is not None
        return server_proof(key, server_nonce, client_nonce, user)


@attrs.define
class FailureTracker:
    """Counts authentication failures per source address and locks out floods.

    ``max_failures`` failures from one address within ``window`` seconds lock
    that address out for ``lockout`` seconds.  ``clock`` is an IReactorTime.
    """

    clock: Any
    max_failures: int
    window: float
    lockout: float
    _failures: dict[str, deque[float]] = attrs.field(factory=dict)
    _locked_until: dict[str, float] = attrs.field(factory=dict)

    def locked(self, host: str) -> bool:
        """Whether ``host`` is refused right now."""
        until = self._locked_until.get(host)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._locked_until[host]
            return False
        return True

    def record_failure(self, host: str) -> bool:
        """Count one failure; return True when it locks ``host`` out."""
        now = self.clock.seconds()
        recent = self._failures.setdefault(host, deque())
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        self._prune(now)
        if len(recent) >= self.max_failures:
            del self._failures[host]
            self._locked_until[host] = now + self.lockout
            return True
        return False

    def _prune(self, now: float) -> None:
        # Bound memory under a flood from many addresses: forget stale entries.
        if len(self._failures) > 4096:
            for host in [
                h
                for h, times in self._failures.items()
                if times[-1] <= now - self.window
            ]:
                del self._failures[host]
        if len(self._locked_until) > 4096:
            for host in [h for h, until in self._locked_until.items() if until <= now]:
                del self._locked_until[host]

    def reconfigure(self, max_failures: int, window: float, lockout: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
