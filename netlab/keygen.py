"""``netlab keygen USER``: create a key for a user, in the users file and a key file.

Both files are written atomically (temporary file, fsync, rename) with mode
0600 from the moment they exist.  Copy the key file to the client machine (or
run keygen there with the same key file path) and restart nothing: the
daemon re-reads the users file on reload (SIGHUP).  The command line is
declared in :mod:`netlab.commands`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from netlab.auth import KeyFileError, add_user, encode_key, generate_key, write_private
from netlab.errors import UsageError


async def keygen(context: Any) -> int:
    args = context.args
    users_file = args.users_file or context.config.netlab.users_file
    key_file = args.key_file or context.config.client.key_file
    if not users_file or not key_file:
        raise UsageError(
            "keygen needs --users-file and --key-file (or [netlab] users_file and "
            "[client] key_file in the configuration)"
        )
    users_path, key_path = Path(users_file), Path(key_file)
    if key_path.exists() and not args.force:
        raise UsageError(f'key file "{key_path}" exists; pass --force to replace it')
    key = generate_key()
    try:
        add_user(users_path, args.new_user, key, replace=args.force)
        write_private(key_path, encode_key(key) + "\n")
    except KeyFileError as error:
        raise UsageError(str(error)) from None
    sys.stdout.write(
        f'added user {args.new_user} to "{users_path}"; key written to "{key_path}"\n'
    )
    return 0
