"""``netlab ls|stat|get|put|rm|mkdir``: the file service from the command line.

Transfers show a tqdm progress bar (rate and ETA) on stderr when it is a
terminal, unless ``-q``.  Remote names are escaped before they are printed, so
a hostile name cannot drive the terminal.  Exit statuses are those of
docs/cli.rst; a transfer that fails verification exits 7.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from netlab.cli import Context
from netlab.client import Session, connect
from netlab.errors import RemoteError, UsageError
from netlab.fileclient import (
    Progress,
    RemoteEntry,
    download,
    list_directory,
    make_directory,
    part_path,
    remove,
    stat_remote,
    upload,
)
from netlab.terminal import escape_name


def register(subparsers: Any) -> None:
    """Add the file commands to ``netlab``."""
    ls = subparsers.add_parser("ls", help="list a remote directory")
    ls.add_argument("-l", "--long", action="store_true", help="type, size and time")
    ls.add_argument("path", nargs="?", default="", help="remote directory (root)")
    ls.set_defaults(handler=ls_command)

    stat = subparsers.add_parser("stat", help="show a remote file's details")
    stat.add_argument("path", help="remote path")
    stat.set_defaults(handler=stat_command)

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
    get.set_defaults(handler=get_command)

    put = subparsers.add_parser("put", help="upload a file (or -r a directory)")
    put.add_argument("local", help="local path")
    put.add_argument("remote", nargs="?", help="remote path (default: the local name)")
    _transfer_options(put)
    put.set_defaults(handler=put_command)

    rm = subparsers.add_parser("rm", help="remove a remote file or empty directory")
    rm.add_argument("path", help="remote path")
    rm.set_defaults(handler=rm_command)

    mkdir = subparsers.add_parser("mkdir", help="create a remote directory")
    mkdir.add_argument("path", help="remote path")
    mkdir.set_defaults(handler=mkdir_command)


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


@contextlib.asynccontextmanager
async def _connected(context: Context) -> AsyncIterator[Session]:
    """A session with the file service, closed however the block ends."""
    session = await connect(
        context.config,
        "file",
        reactor=context.reactor,
        server=context.args.server,
        user=context.args.user,
    )
    try:
        yield session
    finally:
        await session.close()


def _progress(context: Context, label: str) -> Callable[[int, int], Progress] | None:
    """A tqdm bar factory when stderr is a terminal and -q is not given."""
    if context.args.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def start(total: int, done: int) -> Progress:
        bar = tqdm(
            total=total,
            initial=done,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )
        context.reactor.addSystemEventTrigger("before", "shutdown", bar.close)

        def advance(count: int) -> None:
            bar.update(count)
            if bar.n >= total:
                bar.close()

        return advance

    return start


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


# -- ls, stat, rm, mkdir ----------------------------------------------------


def _format_entry(entry: RemoteEntry, long: bool) -> str:
    name = escape_name(entry.name) + ("/" if entry.type == "directory" else "")
    if not long:
        return name
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime))
    return f"{entry.type[0]} {entry.size:>14} {when} {name}"


async def ls_command(context: Context) -> int:
    async with _connected(context) as session:
        async for entry in list_directory(session, context.args.path):
            print(_format_entry(entry, context.args.long))
    return 0


async def stat_command(context: Context) -> int:
    async with _connected(context) as session:
        entry, digest = await stat_remote(session, context.args.path)
    print(f"path:   {escape_name(context.args.path)}")
    print(f"type:   {entry.type}")
    print(f"size:   {entry.size}")
    print(
        f"mtime:  {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(entry.mtime))}"
    )
    if digest:
        print(f"sha256: {digest}")
    return 0


async def rm_command(context: Context) -> int:
    async with _connected(context) as session:
        await remove(session, context.args.path)
    return 0


async def mkdir_command(context: Context) -> int:
    async with _connected(context) as session:
        await make_directory(session, context.args.path)
    return 0


# -- get and put ----------------------------------------------------------------


async def get_command(context: Context) -> int:
    args = context.args
    remote = args.remote.rstrip("/") if args.remote not in ("", "/") else args.remote
    name = PurePosixPath(remote).name
    local = Path(args.local) if args.local else Path(name or ".")
    async with _connected(context) as session:
        if args.recursive:
            await _get_tree(context, session, remote, local)
        else:
            if local.is_dir():
                local = local / name
            await _get_one(context, session, remote, local)
    return 0


async def _get_one(
    context: Context, session: Session, remote: str, local: Path
) -> None:
    args = context.args
    await download(
        session,
        remote,
        local,
        resume=args.resume,
        force=args.force,
        reactor=context.reactor,
        progress=_progress(context, escape_name(PurePosixPath(remote).name)),
    )


async def _get_tree(
    context: Context, session: Session, remote: str, local: Path
) -> None:
    local.mkdir(parents=True, exist_ok=True)
    entries = [entry async for entry in list_directory(session, remote)]
    for entry in entries:
        remote_child = _join(remote, entry.name)
        local_child = local / _local_name(entry.name)
        if entry.type == "directory":
            await _get_tree(context, session, remote_child, local_child)
        elif entry.type == "file":
            if local_child.exists() and not part_path(local_child).exists():
                if not context.args.force:
                    _say(context, f"skipping {local_child}: exists (use --force)")
                    continue
            await _get_one(context, session, remote_child, local_child)


def _local_name(name: str) -> str:
    # The server checked nothing about names already on its disk: never let
    # one climb out of the local target directory.
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"the server listed an unsafe name: {escape_name(name)}")
    return name


def _say(context: Context, text: str) -> None:
    if not context.args.quiet:
        sys.stderr.write(f"netlab: {text}\n")


async def put_command(context: Context) -> int:
    args = context.args
    local = Path(args.local)
    if not local.exists():
        raise UsageError(f"{local} does not exist")
    remote = args.remote if args.remote is not None else local.resolve().name
    async with _connected(context) as session:
        if args.recursive:
            if not local.is_dir():
                raise UsageError(f"{local} is not a directory")
            await _put_tree(context, session, local, remote)
        else:
            if local.is_dir():
                raise UsageError(f"{local} is a directory; use -r")
            await _put_one(context, session, local, remote)
    return 0


async def _put_one(
    context: Context, session: Session, local: Path, remote: str
) -> None:
    await upload(
        session,
        local,
        remote,
        force=context.args.force,
        progress=_progress(context, escape_name(local.name)),
    )


async def _put_tree(
    context: Context, session: Session, local: Path, remote: str
) -> None:
    if remote:
        try:
            await make_directory(session, remote)
        except RemoteError as error:
            if error.code != "exists":
                raise
    for child in sorted(local.iterdir()):
        remote_child = _join(remote, child.name)
        if child.is_symlink():
            _say(context, f"skipping symlink {child}")
        elif child.is_dir():
            await _put_tree(context, session, child, remote_child)
        elif child.is_file():
            await _put_one(context, session, child, remote_child)
