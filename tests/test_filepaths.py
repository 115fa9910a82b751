"""Client path checking and the dir-fd sandbox beneath the file root."""

from __future__ import annotations

import os
import stat
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from netlab.file.paths import (
    NAME_MAX,
    PathRefused,
    RemotePath,
    Sandbox,
    parse_path,
)
from netlab.terminal import escape_name
from tests.support import temporary_directory


class ParsePathTests(TestCase):
    """parse_path refuses every hostile spelling with the bad-path code."""

    def assertRefused(self, text: object, code: str = "bad-path") -> PathRefused:
        with self.assertRaises(PathRefused) as caught:
            parse_path(text)
        self.assertEqual(caught.exception.code, code)
        return caught.exception

    def test_plain_paths(self) -> None:
        """Relative paths split into their components."""
        self.assertEqual(parse_path("a/b/c.txt").parts, ("a", "b", "c.txt"))
        self.assertEqual(parse_path("über naïve.txt").parts, ("über naïve.txt",))

    def test_parent_references(self) -> None:
        """``..`` anywhere is refused, as is ``.``."""
        for text in ("../x", "a/../../x", "..", "a/..", "./a", "a/./b"):
            self.assertRefused(text)

    def test_absolute(self) -> None:
        """Absolute paths are refused with advice to give a relative one."""
        error = self.assertRefused("/etc/passwd")
        self.assertIn("relative", error.message)

    def test_nul(self) -> None:
        """A NUL byte is refused."""
        self.assertRefused("a\0b")

    def test_empty_and_dot(self) -> None:
        """The empty name and ``.`` are not file names (only ls/stat accept them)."""
        self.assertRefused("")
        self.assertRefused(".")
        self.assertEqual(parse_path("", allow_root=True), RemotePath(()))
        self.assertEqual(parse_path(".", allow_root=True), RemotePath(()))

    def test_empty_components(self) -> None:
        """Doubled, leading-into-empty and trailing slashes are refused."""
        for text in ("a//b", "a/", "a/b/"):
            self.assertRefused(text)

    def test_control_and_ansi(self) -> None:
        """Control characters, ANSI escapes, DEL, C1 and bidi overrides are refused."""
        for text in (
            "a\nb",
            "\x1b[31mred",
            "tab\there",
            "del\x7f",
            "c1\x9b",
            "rtl\u202etxt",
        ):
            error = self.assertRefused(text)
            self.assertNotIn("\x1b", error.message)

    def test_long_name(self) -> None:
        """A component over 255 UTF-8 bytes is refused; 255 is fine."""
        self.assertEqual(parse_path("x" * NAME_MAX).parts, ("x" * NAME_MAX,))
        self.assertRefused("x" * (NAME_MAX + 1))
        self.assertRefused("é" * 128)  # 256 bytes in UTF-8

    def test_reserved_names(self) -> None:
        """Names of the service's partial files cannot be addressed by clients."""
        self.assertRefused(".netlab-partial-abc")

    def test_not_a_string(self) -> None:
        """A path of the wrong JSON type is refused."""
        self.assertRefused(["a"])
        self.assertRefused(None)

    @given(st.text(max_size=60))
    @settings(max_examples=400)
    def test_accepted_paths_stay_beneath(self, text: str) -> None:
        """Whatever parse_path accepts has no component that could climb or escape."""
        try:
            path = parse_path(text)
        except PathRefused:
            return
        for part in path.parts:
            self.assertNotIn(part, ("", ".", ".."))
            self.assertNotIn("/", part)
            self.assertNotIn("\0", part)
            categories = {unicodedata.category(ch) for ch in part}
            self.assertFalse({c for c in categories if c.startswith("C")}, part)
        self.assertEqual(path.text, text)

    @given(st.lists(st.sampled_from(["..", ".", "", "a", "b", "/"]), max_size=8))
    def test_dot_soup(self, pieces: list[str]) -> None:
        """Paths built from dots and slashes are refused unless plain names."""
        text = "/".join(pieces)
        try:
            path = parse_path(text)
        except PathRefused:
            return
        self.assertTrue(set(path.parts) <= {"a", "b"})


class EscapeNameTests(TestCase):
    """escape_name makes any name safe to print."""

    def test_escapes(self) -> None:
        """Control characters and backslashes are escaped; letters are kept."""
        self.assertEqual(escape_name("a\x1b[31mb"), "a\\x1b[31mb")
        self.assertEqual(escape_name("back\\slash"), "back\\\\slash")
        self.assertEqual(escape_name("naïve"), "naïve")
        self.assertEqual(escape_name("\u202e"), "\\u202e")

    @given(st.text())
    def test_printable(self, text: str) -> None:
        """The escaped form never contains an unprintable character."""
        self.assertTrue(escape_name(text).isprintable())


class SandboxTests(TestCase):
    """The sandbox never reaches outside its root, even through symlinks."""

    def setUp(self) -> None:
        base = temporary_directory(self)
        self.root = base / "root"
        self.outside = base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        (self.outside / "secret").write_text("secret")
        (self.root / "dir").mkdir()
        (self.root / "dir" / "file").write_text("inside")
        self.sandbox = Sandbox(self.root)

    def test_open_inside(self) -> None:
        """A file below the root opens normally."""
        descriptor = self.sandbox.open_file(parse_path("dir/file"))
        try:
            self.assertEqual(os.read(descriptor, 100), b"inside")
        finally:
            os.close(descriptor)

    def test_symlink_file_out(self) -> None:
        """A symlink inside the root to a file outside is refused, not followed."""
        os.symlink(self.outside / "secret", self.root / "link")
        with self.assertRaises(PathRefused) as caught:
            self.sandbox.open_file(parse_path("link"))
        self.assertEqual(caught.exception.code, "symlink")

    def test_symlink_parent_out(self) -> None:
        """A symlinked parent directory pointing out is refused."""
        os.symlink(self.outside, self.root / "out")
        for operation in (
            lambda: self.sandbox.open_file(parse_path("out/secret")),
            lambda: self.sandbox.lstat(parse_path("out/secret")),
            lambda: self.sandbox.open_directory(parse_path("out")),
        ):
            with self.assertRaises(PathRefused) as caught:
                operation()
            self.assertEqual(caught.exception.code, "symlink")

    def test_symlink_swapped_in_after_check(self) -> None:
        """A parent replaced by a symlink after it was opened cannot redirect a write.

        The directory is resolved (as a put does), then an attacker moves it
        away and puts a symlink to the outside in its place; the write through
        the held descriptor still lands in the original directory.
        """
        with self.sandbox.parent(parse_path("dir/new")) as directory:
            os.rename(self.root / "dir", self.root / "moved")
            os.symlink(self.outside, self.root / "dir")
            descriptor = os.open(
                "new", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=directory
            )
            os.write(descriptor, b"data")
            os.close(descriptor)
        self.assertFalse((self.outside / "new").exists())
        self.assertEqual((self.root / "moved" / "new").read_bytes(), b"data")
        # And a fresh resolution now refuses the swapped-in link.
        with self.assertRaises(PathRefused):
            self.sandbox.open_file(parse_path("dir/secret"))

    def test_missing_and_not_directory(self) -> None:
        """Missing components and files used as directories get their own codes."""
        with self.assertRaises(PathRefused) as caught:
            self.sandbox.open_file(parse_path("nope/file"))
        self.assertEqual(caught.exception.code, "not-found")
        with self.assertRaises(PathRefused) as caught:
            self.sandbox.open_file(parse_path("dir/file/x"))
        self.assertEqual(caught.exception.code, "not-a-directory")

    def test_directory_as_file(self) -> None:
        """Opening a directory for writing is refused as is-a-directory."""
        with self.assertRaises(PathRefused) as caught:
            self.sandbox.open_file(parse_path("dir"), os.O_WRONLY)
        self.assertEqual(caught.exception.code, "is-a-directory")

    @given(
        st.lists(
            st.sampled_from(["dir", "file", "link", "out", "secret", "x"]),
            min_size=1,
            max_size=5,
        )
    )
    @settings(max_examples=100, deadline=None)
    def test_never_outside(self, parts: list[str]) -> None:
        """No path over names that include escaping symlinks opens a file outside."""
        if not (self.root / "out").is_symlink():
            os.symlink(self.outside, self.root / "out")
            os.symlink(self.outside / "secret", self.root / "link")
        path = parse_path("/".join(parts))
        try:
            descriptor = self.sandbox.open_file(path)
        except PathRefused:
            return
        try:
            if not stat.S_ISDIR(os.fstat(descriptor).st_mode):
                self.assertNotEqual(os.read(descriptor, 100), b"secret")
        finally:
            os.close(descriptor)
