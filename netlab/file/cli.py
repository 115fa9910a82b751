"""``netlab ls|stat|get|put|rm|mkdir``: the file service from the command line.

Transfers show a tqdm progress bar (rate and ETA) on stderr when it is a
terminal, unless ``-q``.  Remote names are escaped before they are printed, so
a hostile name cannot drive the terminal.  Exit statuses are those of
docs/cli.rst; a transfer that fails verification exits 7.  The command lines
are declared in :mod:`netlab.commands`; a single-file ``put`` finds its file
already open and hashing (:func:`netlab.file.localdigest.start_put_hash`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath

from netlab.cli import Context
from netlab.client import Session
from netlab.errors import RemoteError, UsageError
from netlab.file.client import (
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
from netlab.file.localdigest import HashedFile
from netlab.terminal import escape_name


@contextlib.asynccontextmanager
async def _connected(context: Context) -> AsyncIterator[Session]:
    """A session with the file service, closed however the block ends."""
    session: Session = await context.connect("file")
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
    # A single-file put has had LOCAL open and hashing since its command
    # line was parsed (netlab.file.localdigest.start_put_hash), unless opening it
    # failed: the checks below then report why, as they would without it.
    hashed: HashedFile | None = args.hashed_file
    try:
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
                await _put_one(context, session, local, remote, hashed)
    finally:
        if hashed is not None:
            hashed.close()
    return 0


async def _put_one(
    context: Context,
    session: Session,
    local: Path,
    remote: str,
    hashed: HashedFile | None = None,
) -> None:
    await upload(
        session,
        local,
        remote,
        force=context.args.force,
        progress=_progress(context, escape_name(local.name)),
        hashed=hashed,
        reactor=context.reactor,
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
