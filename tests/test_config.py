"""Tests for netlab.config: defaults, kinds, and every class of validation error."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from netlab import config
from netlab.config import (
    SECTIONS,
    NetlabConfig,
    ParseContext,
    keys,
    load,
    parse_duration,
    parse_listen_address,
    parse_size,
)
from netlab.errors import ConfigError

from .support import temporary_directory


class DefaultsTests(TestCase):
    def test_no_file_means_all_defaults(self) -> None:
        """Loading no file gives loopback services and the command service off."""
        loaded = load(None)
        self.assertIsNone(loaded.path)
        self.assertFalse(loaded.command.enabled)
        self.assertNotIn("command", loaded.enabled_services())
        for name in loaded.enabled_services():
            address = loaded.listen_address(name)
            self.assertTrue(address.is_loopback, f"{name} listens on {address}")

    def test_every_key_is_documented(self) -> None:
        """Each declared key has help text and a kind that can spell its default."""
        for section in SECTIONS:
            for info in keys(section):
                self.assertTrue(info.help.strip(), f"[{section}] {info.name}")
                self.assertTrue(info.kind.form, f"[{section}] {info.name}")
                if info.doc_default is None:
                    info.kind.render(info.default)

    def test_state_directory_follows_systemd(self) -> None:
        """$STATE_DIRECTORY (set by systemd's StateDirectory=) is the default."""
        self.patch(os, "environ", {**os.environ, "STATE_DIRECTORY": "/var/lib/netlab"})
        self.assertEqual(load(None).netlab.state_directory, Path("/var/lib/netlab"))

    def test_file_root_defaults_inside_state_directory(self) -> None:
        """Without [file] root the service serves state_directory/files."""
        directory = temporary_directory(self)
        path = directory / "n.toml"
        path.write_text(f'[netlab]\nstate_directory = "{directory}"\n')
        self.assertEqual(load(path).file_root, directory / "files")


class LoadErrorTests(TestCase):
    """Each way a file can be wrong gives one line naming where and what."""

    def load_text(self, text: str) -> NetlabConfig:
        self.directory = temporary_directory(self)
        self.path = self.directory / "netlab.toml"
        self.path.write_text(text)
        return load(self.path)

    def assertRefused(self, text: str, *fragments: str) -> str:
        error = self.assertRaises(ConfigError, self.load_text, text)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(str(self.path), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_missing_file(self) -> None:
        """A file that does not exist is named, with a hint."""
        error = self.assertRaises(ConfigError, load, "/nonexistent/netlab.toml")
        self.assertIn("/nonexistent/netlab.toml: no such file", str(error))

    def test_unreadable_file(self) -> None:
        """A path that cannot be read as a file (here a directory) says so."""
        directory = temporary_directory(self)
        error = self.assertRaises(ConfigError, load, directory)
        self.assertIn(f"{directory}: cannot read: Is a directory", str(error))

    def test_toml_syntax_error_has_line(self) -> None:
        """A TOML syntax error reports its line."""
        self.assertRefused(
            "[file]\nenabled = true\nroot = \n", "invalid TOML", "line 3"
        )

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are refused as such."""
        self.directory = temporary_directory(self)
        self.path = self.directory / "netlab.toml"
        self.path.write_bytes(b"[file]\nroot = '\xff'\n")
        self.assertIn("not UTF-8", str(self.assertRaises(ConfigError, load, self.path)))

    def test_unknown_section_suggests(self) -> None:
        """An unknown section suggests the closest real one."""
        self.assertRefused("[flie]\n", "unknown section [flie]", 'did you mean "file"')

    def test_unknown_key_suggests(self) -> None:
        """An unknown key names its section and suggests the closest real key."""
        self.assertRefused(
            '[file]\nendpiont = "tcp:1"\n',
            "[file] endpiont:",
            'did you mean "endpoint"',
        )

    def test_unknown_key_without_close_match_lists_keys(self) -> None:
        """With no close match the valid keys are listed."""
        self.assertRefused("[time]\nzzzz = 1\n", "[time] zzzz", "valid: enabled")

    def test_top_level_key(self) -> None:
        """A key outside any section is refused with a hint."""
        self.assertRefused("enabled = true\n", "every setting belongs in a section")

    def test_section_that_is_a_value(self) -> None:
        """A section name used as a plain key is refused."""
        self.assertRefused("file = 3\n", "[file] must be a table")

    def test_wrong_type(self) -> None:
        """A value of the wrong type names the key and the expected form."""
        self.assertRefused(
            '[file]\nenabled = "yes"\n',
            "[file] enabled:",
            '"yes" is not a boolean',
            "expected true or false",
        )

    def test_out_of_range(self) -> None:
        """An out-of-range value says which bound it crossed."""
        self.assertRefused(
            "[client]\ntimeout = 0.01\n", "[client] timeout:", "below the minimum"
        )

    def test_bad_choice(self) -> None:
        """A value outside a choice lists the choices."""
        self.assertRefused(
            '[netlab]\nlog_format = "xml"\n', "log_format", 'one of "text", "json"'
        )

    def test_missing_path(self) -> None:
        """A path that must exist and does not is refused with its absolute form."""
        self.assertRefused(
            '[tls]\nca_file = "missing.pem"\n', "ca_file", "does not exist"
        )

    def test_path_of_wrong_type(self) -> None:
        """A directory where a file is expected is refused."""
        self.assertRefused('[tls]\nca_file = "."\n', "ca_file", "is not a regular file")

    def test_relative_paths_start_at_the_file(self) -> None:
        """Relative paths are resolved against the configuration file's directory."""
        directory = temporary_directory(self)
        (directory / "users.toml").write_text("")
        path = directory / "netlab.toml"
        path.write_text('[netlab]\nusers_file = "users.toml"\n')
        self.assertEqual(load(path).netlab.users_file, directory / "users.toml")

    def test_bad_endpoints(self) -> None:
        """Malformed endpoint strings are refused with the expected form."""
        for text, fragment in [
            ('[file]\nendpoint = "tpc:8021"\n', "known type"),
            ('[file]\nendpoint = "tcp:99999"\n', "no port"),
            ('[file]\nendpoint = "tcp:8021:interface=localhost"\n', "not an IP"),
            ('[file]\nendpoint = "udp:8021"\n', "known type"),
            ('[time]\nendpoint = "tcp:8123"\n', "known type"),
            ('[file]\nendpoint = "systemd:name=x"\n', "domain="),
            ('[time]\nendpoint = "systemd:domain=INET"\n', "name=NAME"),
            ('[file]\nendpoint = "tcp:8021:tls=yes"\n', "use ssl:PORT"),
            ('[file]\nendpoint = "ssl:8021:tls=yes"\n', "use ssl:PORT"),
            ('[time]\nendpoint = "systemd:name=t:tls=yes"\n', "tls= is for"),
            (
                '[file]\nendpoint = "systemd:domain=INET:name=f:tls=maybe"\n',
                "yes or no",
            ),
        ]:
            message = self.assertRefused(text, fragment, "expected an endpoint string")
            self.assertIn("endpoint:", message)

    def test_two_services_on_one_port(self) -> None:
        """Two TCP services on one port are refused, naming both."""
        self.assertRefused(
            '[command]\nenabled = true\nendpoint = "tcp:8021:interface=0.0.0.0"\n',
            "[command] endpoint:",
            "port 8021 is also used by [file]",
        )

    def test_tcp_and_udp_may_share_a_number(self) -> None:
        """A TCP and a UDP service may use the same port number."""
        loaded = self.load_text('[time]\nendpoint = "udp:8021:interface=127.0.0.1"\n')
        self.assertEqual(loaded.listen_address("time").port, 8021)

    def test_disabled_services_do_not_collide(self) -> None:
        """A disabled service's port is not checked against the others."""
        loaded = self.load_text(
            '[command]\nendpoint = "tcp:8021:interface=127.0.0.1"\n'
        )
        self.assertFalse(loaded.command.enabled)


class KindTests(TestCase):
    context = ParseContext(base_directory=Path("/"))

    def test_sizes(self) -> None:
        """Human sizes use decimal and binary units."""
        self.assertEqual(parse_size("64MiB"), 64 * 1024**2)
        self.assertEqual(parse_size("1.5 GB"), 1_500_000_000)
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("2k"), 2000)
        for bad in ["", "MiB", "12 parsecs", "-1", "1e3"]:
            self.assertRaises(config.Invalid, parse_size, bad)

    def test_sizes_accept_integers_but_not_booleans(self) -> None:
        """A size key takes an integer number of bytes, but not a boolean."""
        kind = config.Size()
        self.assertEqual(kind.parse(4096, self.context), 4096)
        self.assertRaises(config.Invalid, kind.parse, True, self.context)

    def test_durations(self) -> None:
        """Durations take units and compounds."""
        self.assertEqual(parse_duration("30s"), 30)
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("1h30m"), 5400)
        self.assertEqual(parse_duration("2d"), 172800)
        for bad in ["", "30", "5 minutes", "s", "1h junk"]:
            self.assertRaises(config.Invalid, parse_duration, bad)

    @given(st.integers(min_value=0, max_value=2**50))
    def test_size_spelling_round_trips(self, size: int) -> None:
        """Every size the sample file spells parses back to the same number."""
        self.assertEqual(parse_size(config.format_size(size)), size)

    @given(st.integers(min_value=1, max_value=10**7))
    def test_duration_spelling_round_trips(self, milliseconds: int) -> None:
        """Every duration the sample file spells parses back to the same value."""
        seconds = milliseconds / 1000
        self.assertAlmostEqual(parse_duration(config.format_duration(seconds)), seconds)

    def test_endpoint_escapes(self) -> None:
        """Escaped colons in endpoint arguments are kept in the value."""
        address = parse_listen_address(
            r"ssl:8021:interface=127.0.0.1:privateKey=/k\:ey.pem", ("ssl",)
        )
        self.assertEqual(address.options["privateKey"], "/k:ey.pem")
        self.assertEqual(address.port, 8021)

    def test_tls_on_a_systemd_socket(self) -> None:
        """tls=yes marks a TCP socket systemd passes as TLS; ssl: is always
        TLS, tcp: and tls=no never."""
        cases = [
            ("systemd:domain=INET:name=netlab-file:tls=yes", True),
            ("systemd:domain=INET:tls=yes:name=netlab-file", True),
            ("systemd:domain=INET:name=netlab-file:tls=no", False),
            ("systemd:domain=INET:name=netlab-file", False),
            ("ssl:8021", True),
            ("tcp:8021", False),
        ]
        for description, tls in cases:
            address = parse_listen_address(description, ("tcp", "ssl", "systemd"))
            self.assertEqual(address.tls, tls, description)

    def test_overlap_rules(self) -> None:
        """Wildcard interfaces overlap everything; port 0 and systemd never do."""
        wildcard = parse_listen_address("tcp:80:interface=0.0.0.0", ("tcp",))
        loopback = parse_listen_address("tcp:80:interface=127.0.0.1", ("tcp",))
        other = parse_listen_address("tcp:80:interface=127.0.0.2", ("tcp",))
        ephemeral = parse_listen_address("tcp:0", ("tcp",))
        self.assertTrue(wildcard.overlaps(loopback))
        self.assertFalse(loopback.overlaps(other))
        self.assertFalse(ephemeral.overlaps(ephemeral))
        self.assertTrue(loopback.is_loopback)
        self.assertFalse(wildcard.is_loopback)
