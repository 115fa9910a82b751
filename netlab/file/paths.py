"""Client paths and the sandbox that resolves them beneath the file root.

A client names a file with a relative, ``/``-separated path.  :func:`parse_path`
checks it without touching the disk; :class:`Sandbox` then reaches it by
walking from an open descriptor of the root, one component at a time, with
``O_NOFOLLOW | O_DIRECTORY`` and ``dir_fd``.  That is what makes the sandbox
safe against races: there is no "check, then open by name" window, because
every step opens relative to a descriptor already held, and a symbolic link is
never followed -- not even one swapped in after an earlier check, since the
kernel refuses it at the moment of the open (``ELOOP``).  The final component
is never followed either (``O_NOFOLLOW`` on open, ``follow_symlinks=False`` on
stat, and rename/unlink/mkdir act on the link itself).

Names with control characters (C0, C1, DEL), format characters (bidi
overrides), surrogates and unassigned code points are refused: they are how
terminal escape and spoofing attacks travel.  Whatever is printed or logged
goes through :func:`escape_name` anyway, because names created on the server's
disk by other means are listed as they are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import attrs

from netlab.terminal import UNPRINTABLE_CATEGORIES, escape_name

#: Longest name of one component, in UTF-8 bytes (Linux's NAME_MAX).
NAME_MAX = 255
#: Longest whole path, in UTF-8 bytes (Linux's PATH_MAX).
PATH_MAX = 4096
#: Names the service keeps for itself (partial uploads); clients cannot use them.
RESERVED_PREFIX = ".netlab-"


class PathRefused(Exception):
    """A client path or the file it names cannot be used.

    ``code`` is the stable wire error code; the message says why and, where it
    can, what to do instead.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class RemotePath:
    """A checked client path: its components below the root (none for the root)."""

    parts: tuple[str, ...]

    @property
    def is_root(self) -> bool:
        return not self.parts

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""

    @property
    def text(self) -> str:
        """The path as the client wrote it (normalised)."""
        return "/".join(self.parts)

    def child(self, name: str) -> RemotePath:
        return RemotePath((*self.parts, check_name(name)))

    def __str__(self) -> str:
        return escape_name(self.text) if self.parts else "."


def check_name(name: str) -> str:
    """Return ``name`` if it is acceptable as one path component, else raise."""
    if name == "":
        raise PathRefused(
            "bad-path",
            "empty path component (two slashes, or a leading or trailing slash?)",
        )
    if name in (".", ".."):
        raise PathRefused(
            "bad-path",
            f'"{name}" is not allowed in a path; give the path from the root',
        )
    if "\0" in name:
        raise PathRefused("bad-path", "the path contains a NUL character")
    for character in name:
        if unicodedata.category(character) in UNPRINTABLE_CATEGORIES:
            raise PathRefused(
                "bad-path",
                f'the name "{escape_name(name)}" contains the control or format '
                f"character U+{ord(character):04X}; rename the file",
            )
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # pragma: no cover - surrogates are refused above
        raise PathRefused("bad-path", "the name is not valid Unicode") from None
    if len(encoded) > NAME_MAX:
        raise PathRefused(
            "bad-path",
            f"a name is {len(encoded)} bytes long; the limit is {NAME_MAX} bytes",
        )
    if name.startswith(RESERVED_PREFIX):
        raise PathRefused(
            "bad-path", f'names starting with "{RESERVED_PREFIX}" are reserved'
        )
    return name


def parse_path(text: object, *, allow_root: bool = False) -> RemotePath:
    """Check a client path and split it into components.

    Only relative paths are accepted, with no ``.`` or ``..`` component and no
    empty one.  ``""`` and ``"."`` name the root itself, which only ``ls`` and
    ``stat`` accept (``allow_root``).
    """
    if not isinstance(text, str):
        raise PathRefused("bad-path", "the path must be a string")
    if text in ("", "."):
        if allow_root:
            return RemotePath(())
        raise PathRefused("bad-path", "a file name is required, not the root directory")
    if len(text.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise PathRefused("bad-path", f"the path is longer than {PATH_MAX} bytes")
    if text.startswith("/"):
        raise PathRefused(
            "bad-path",
            "absolute paths are not allowed; give the path relative to the "
            "server's root",
        )
    return RemotePath(tuple(check_name(part) for part in text.split("/")))


def _refusal(error: OSError, where: RemotePath) -> PathRefused:
    """Turn an OS error met while resolving ``where`` into a wire error."""
    shown = str(where)
    if error.errno == errno.ENOENT:
        return PathRefused("not-found", f"{shown}: no such file or directory")
    if error.errno == errno.ELOOP:
        return PathRefused(
            "symlink",
            f"{shown}: is a symbolic link, which the file service never follows",
        )
    if error.errno == errno.ENOTDIR:
        return PathRefused("not-a-directory", f"{shown}: a parent is not a directory")
    if error.errno == errno.EACCES:
        return PathRefused("forbidden", f"{shown}: permission denied on the server")
    return PathRefused("io-error", f"{shown}: {error.strerror}")


def _is_symlink(name: str, directory: int) -> bool:
    try:
        return stat.S_ISLNK(
            os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        )
    except OSError:
        return False


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Sandbox:
    """Resolves :class:`RemotePath` values beneath ``root`` without leaving it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_root(self) -> int:
        # The root itself is the operator's choice and may be a symlink.
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_directory(self, path: RemotePath) -> int:
        """An open descriptor of directory ``path`` (the caller closes it)."""
        descriptor = self.open_root()
        walked: list[str] = []
        try:
            for part in path.parts:
                walked.append(part)
                try:
                    child = os.open(part, _DIRECTORY_FLAGS, dir_fd=descriptor)
                except OSError as error:
                    if error.errno == errno.ENOTDIR and _is_symlink(part, descriptor):
                        # O_DIRECTORY | O_NOFOLLOW reports a symlink as ENOTDIR.
                        error = OSError(errno.ELOOP, "symbolic link")
                    raise _refusal(error, RemotePath(tuple(walked))) from None
                os.close(descriptor)
                descriptor = child
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    @contextlib.contextmanager
    def directory(self, path: RemotePath) -> Iterator[int]:
        """Context manager around :meth:`open_directory`."""
        descriptor = self.open_directory(path)
        try:
            yield descriptor
        finally:
            os.close(descriptor)

    @contextlib.contextmanager
    def parent(self, path: RemotePath) -> Iterator[int]:
        """The open directory that holds ``path``'s last component."""
        with self.directory(RemotePath(path.parts[:-1])) as descriptor:
            yield descriptor

    def open_file(
        self, path: RemotePath, flags: int = os.O_RDONLY, mode: int = 0o644
    ) -> int:
        """Open the file ``path`` (never through a symlink); the caller closes it."""
        with self.parent(path) as directory:
            try:
                return os.open(
                    path.name,
                    flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=directory,
                )
            except OSError as error:
                if error.errno == errno.EISDIR:
                    raise PathRefused(
                        "is-a-directory", f"{path}: is a directory"
                    ) from None
                raise _refusal(error, path) from None

    def lstat(self, path: RemotePath) -> os.stat_result:
        """``lstat`` of ``path`` (a symlink is reported, never followed)."""
        if path.is_root:
            return os.stat(self.root)
        with self.parent(path) as directory:
            try:
                return os.stat(path.name, dir_fd=directory, follow_symlinks=False)
            except OSError as error:
                raise _refusal(error, path) from None
