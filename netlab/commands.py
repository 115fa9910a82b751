"""Every ``netlab`` subcommand's command line, declared without its implementation.

Building the parser and parsing arguments must be quick: every ``netlab``
run pays for it, including ``--help``, ``--version`` and usage errors, and a
``put`` hashes its file while the rest of the client loads (see below).  So
this module imports only argparse and the standard library, and names each
command's code as a string, ``"module:function"``, that :func:`resolve` imports
once the command is known to run:

``handler``
    the ``async def handler(context: netlab.cli.Context) -> int | None`` that
    does the work, in its own module with its heavy imports (Twisted,
    pyOpenSSL, the service's client);
``prepare`` (optional)
    a light ``function(args)`` that :func:`netlab.cli.main` calls right after
    parsing, before the configuration and Twisted are loaded, to start work
    that needs neither; it may store what it started on ``args`` for the
    handler (``put`` starts hashing LOCAL there).

The commands are listed in :func:`add_commands` in the order ``--help``
shows them.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Add every subcommand to the ``netlab`` parser's ``subparsers``."""
    _add_config(subparsers)
    _add_keygen(subparsers)
    _add_file_commands(subparsers)
    _add_time(subparsers)
    _add_chat(subparsers)


def resolve(reference: str) -> Any:
    """The object a ``"module:function"`` reference names (importing the module)."""
    module_name, _, name = reference.partition(":")
    return getattr(importlib.import_module(module_name), name)


# -- config and keygen --------------------------------------------------------


def _add_config(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config",
        help="validate and print the configuration in force",
        description="Validate the configuration file the client would use and "
        "print every setting in force, as TOML.",
    )
    parser.set_defaults(handler="netlab.configcli:show")


def _add_keygen(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keygen",
        help="create a user's key in the users file and a key file",
        description="Create a random 32-byte key for USER, add USER to the daemon's "
        "users file and write the same key to the client's key file (both mode "
        "0600, written atomically).",
    )
    # Not "user": that is the global --user (whom to connect as).
    parser.add_argument("new_user", metavar="USER", help="the user name to create")
    parser.add_argument(
        "--users-file",
        metavar="FILE",
        help="the daemon's users file (default: [netlab] users_file)",
    )
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="where to write the client's key (default: [client] key_file)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace the key of an existing user"
    )
    parser.set_defaults(handler="netlab.keygen:keygen")


# -- the file service ---------------------------------------------------------


def _add_file_commands(subparsers: Any) -> None:
    ls = subparsers.add_parser("ls", help="list a remote directory")
    ls.add_argument("-l", "--long", action="store_true", help="type, size and time")
    ls.add_argument("path", nargs="?", default="", help="remote directory (root)")
    ls.set_defaults(handler="netlab.file.cli:ls_command")

    stat = subparsers.add_parser("stat", help="show a remote file's details")
    stat.add_argument("path", help="remote path")
    stat.set_defaults(handler="netlab.file.cli:stat_command")

    get = subparsers.add_parser("get", help="download a file (or -r a directory)")
    get.add_argument("remote", help="remote path")
    get.add_argument("local", nargs="?", help="local path (default: the remote name)")
    _transfer_options(get)
    get.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over instead of resuming from LOCAL.part",
    )
    get.set_defaults(handler="netlab.file.cli:get_command")

    put = subparsers.add_parser("put", help="upload a file (or -r a directory)")
    put.add_argument("local", help="local path")
    put.add_argument("remote", nargs="?", help="remote path (default: the local name)")
    _transfer_options(put)
    # A put must declare its file's SHA-256 before sending a byte: hashing
    # starts here, on the second core, while the client loads and connects.
    put.set_defaults(
        handler="netlab.file.cli:put_command",
        prepare="netlab.file.localdigest:start_put_hash",
        hashed_file=None,
    )

    rm = subparsers.add_parser("rm", help="remove a remote file or empty directory")
    rm.add_argument("path", help="remote path")
    rm.set_defaults(handler="netlab.file.cli:rm_command")

    mkdir = subparsers.add_parser("mkdir", help="create a remote directory")
    mkdir.add_argument("path", help="remote path")
    mkdir.set_defaults(handler="netlab.file.cli:mkdir_command")


def _transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="whole directories"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=True,
        help="resume a partial transfer (the default)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# -- time and chat ------------------------------------------------------------


def _add_time(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "time",
        help="ask the time service for the time (SNTP, RFC 868 or text)",
        description="Query the netlab time service. SNTP (default) prints the "
        "server's time, the local clock's offset and the round-trip delay.",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--ntp", dest="kind", action="store_const", const="ntp", help="SNTPv4 (default)"
    )
    kind.add_argument(
        "--rfc868",
        dest="kind",
        action="store_const",
        const="rfc868",
        help="RFC 868: an empty datagram, whole seconds back",
    )
    kind.add_argument(
        "--text",
        nargs="?",
        const="time",
        metavar="COMMAND",
        help="send a text command (time, iso, unix, help; default time) and "
        "print the reply",
    )
    parser.add_argument(
        "--count", type=int, default=1, metavar="N", help="queries to make (default 1)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between queries (default 1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="the service's UDP port (default: the port of [time] endpoint)",
    )
    parser.set_defaults(handler="netlab.time.cli:handle", kind="ntp")


def _add_chat(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat in a room of the chat service",
        description="Join a chat room and talk: lines you type are said to the "
        "room, /commands do the rest (/help lists them). Ctrl-D or /quit leaves.",
    )
    parser.add_argument(
        "--room", default=None, help="room to join (default: the server's first room)"
    )
    parser.add_argument(
        "--nick", default=None, help="nickname (default: your user name)"
    )
    parser.add_argument(
        "--send",
        metavar="TEXT",
        default=None,
        help="say TEXT, then leave (for scripts)",
    )
    parser.set_defaults(handler="netlab.chat.cli:chat")
