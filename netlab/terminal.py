"""Making untrusted text safe to show on a terminal or write to a log."""

from __future__ import annotations

import unicodedata

#: Unicode categories never shown as they are: controls, format characters
#: (bidi overrides, zero-width joiners), surrogates, private use, unassigned,
#: and line/paragraph separators.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def escape_name(name: str) -> str:
    """``name`` with every unprintable character and backslash escaped.

    Safe to print on a terminal or write to a log: an ANSI escape sequence
    comes out as ``\\x1b[31m`` instead of turning the text red.
    """
    out: list[str] = []
    for character in name:
        if character == "\\":
            out.append("\\\\")
        elif character.isprintable() and unicodedata.category(character) not in (
            UNPRINTABLE_CATEGORIES
        ):
            out.append(character)
        else:
            code = ord(character)
            if code <= 0xFF:
                out.append(f"\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)
