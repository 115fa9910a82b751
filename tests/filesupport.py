"""Helpers for file-service tests: a configuration with users and keys.

:func:`file_setup` writes a users file (alice read-write, reader read-only),
their key files, a root directory and a configuration with the file service
on an ephemeral loopback port, so both :class:`tests.support.Daemon` and the
client (``netlab --config ...``) can use the same file.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from netlab.auth import add_user, encode_key, generate_key, write_private
from tests.support import write_config


@attrs.frozen
class FileSetup:
    directory: Path
    root: Path
    config: Path
    keys: dict[str, Path]

    def client_args(self, user: str | None = "alice") -> list[str]:
        """Global ``netlab`` arguments for ``user`` (None: anonymous)."""
        arguments = ["--config", str(self.config)]
        if user is not None:
            arguments += ["--user", user]
        return arguments

    def env(self, user: str = "alice") -> dict[str, str]:
        return {"NETLAB_KEY_FILE": str(self.keys[user])}


def file_setup(
    directory: Path, extra: str = "", endpoint: str = "", sections: str = ""
) -> FileSetup:
    """Users, keys, a root and a config in ``directory``.

    ``extra`` goes into ``[file]``; ``sections`` (whole sections) at the end.
    """
    root = directory / "root"
    root.mkdir()
    users_file = directory / "users.toml"
    keys: dict[str, Path] = {}
    for user in ("alice", "reader"):
        key = generate_key()
        add_user(users_file, user, key, replace=False)
        keys[user] = directory / f"{user}.key"
        write_private(keys[user], encode_key(key) + "\n")
    config = write_config(
        directory,
        f"""
        [netlab]
        state_directory = "{directory / "state"}"
        users_file = "{users_file}"
        auth_failure_delay = 0
        [file]
        endpoint = "{endpoint or "tcp:0:interface=127.0.0.1"}"
        root = "{root}"
        read_only_users = ["reader"]
        min_free_space = 0
        {extra}
        [time]
        enabled = false
        [chat]
        enabled = false
        {sections}
        """,
    )
    return FileSetup(directory, root, config, keys)
