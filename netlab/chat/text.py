# The look-alike letters below are the point of this module.
# ruff: noqa: RUF001, RUF002
"""Text hygiene for chat: sanitising message text and checking and folding nicknames.

Everything a member types is shown on other people's terminals, so nothing
that a terminal interprets may pass: ANSI/VT escape sequences, C0/C1 control
characters and the Unicode bidirectional overrides (which can make
``evil.exe`` read as ``exe.live``).  Message text has them stripped (a message
should still get through); nicknames containing them are refused (a name that
is silently altered is a name its owner did not choose).

Nicknames are unique by their *folded* form: NFKC normalisation, case folding,
and a small table of Latin look-alikes from Cyrillic and Greek plus the digit
tricks (``0`` for ``o``, ``1`` for ``l``), so ``Tom``, ``TOM``, ``T0m`` and the
Cyrillic ``Тоm`` are one name.  The table covers the confusables that fit in a
nickname's allowed alphabet; it is not Unicode's full confusables list.
"""

from __future__ import annotations

import re
import unicodedata

#: ESC-introduced sequences: CSI (``ESC [ ... final``), OSC (``ESC ] ... BEL/ST``)
#: and the two-character forms; plus the 8-bit CSI/OSC introducers.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor movement, erase
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
    r"|\x1b[@-Z\\-_]"  # two-character escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)

#: Bidirectional embedding, override and isolate controls, and marks.
BIDI_CONTROLS = frozenset(
    "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

#: Invisible characters that make two names look identical.
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad")


def _is_control(character: str) -> bool:
    """C0/C1 controls, bidi controls and invisible formatting characters."""
    return (
        unicodedata.category(character) in ("Cc", "Cf", "Cs", "Co", "Cn")
        or character in BIDI_CONTROLS
        or character in _INVISIBLE
    )


def sanitise(text: str) -> str:
    """Message text with escape sequences and control characters removed.

    Tabs become spaces; newlines are removed too, because one datagram is one
    line on the listener's screen (and text mode is line-oriented).
    """
    if text.isascii() and text.isprintable():
        return text.strip()  # The common case: nothing to remove.
    text = _ESCAPE_SEQUENCE.sub("", text).replace("\t", " ")
    return "".join(c for c in text if not _is_control(c)).strip()


#: What a nickname may contain: letters and digits of any script (folded
#: below), and ``_ - .``; it starts with a letter or digit.
_NICK_CHARACTER = re.compile(r"[\w.\-]")

#: Look-alikes folded onto the Latin letter they imitate (after casefold).
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h",
        "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
        "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ӏ": "l", "ԛ": "q", "ԝ": "w",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v",
        "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ς": "c",
        # Digits and punctuation that read as letters
        "0": "o", "1": "l", "3": "e", "5": "s",
    }
)  # fmt: skip


class NickError(ValueError):
    """A nickname is not acceptable (the message says why and what is allowed)."""


def check_nick(nick: str, max_length: int) -> str:
    """Return ``nick`` (NFC-normalised) if it is acceptable, else raise NickError."""
    if any(_is_control(c) for c in nick) or "\x1b" in nick:
        raise NickError(
            "nicknames may not contain control, escape or bidirectional characters"
        )
    nick = unicodedata.normalize("NFC", nick.strip())
    if not nick:
        raise NickError("the nickname is empty")
    if len(nick) > max_length:
        raise NickError(f"nicknames are at most {max_length} characters")
    if not all(_NICK_CHARACTER.fullmatch(c) for c in nick) or not nick[0].isalnum():
        raise NickError(
            "nicknames are letters, digits, '_', '-' and '.', starting with a "
            "letter or digit"
        )
    return nick


def fold_nick(nick: str) -> str:
    """The form two nicknames are compared in: ``Tom``, ``T0M``, ``Тоm`` -> ``tom``."""
    folded = unicodedata.normalize("NFKC", nick).casefold()
    folded = "".join(
        c for c in unicodedata.normalize("NFKD", folded) if not unicodedata.combining(c)
    )
    return folded.translate(_CONFUSABLES)


def check_room(room: str) -> str:
    """Room names: 1-32 of ``[A-Za-z0-9_.-]`` (ASCII, so they cannot be spoofed)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}", room):
        raise NickError(
            "room names are 1-32 ASCII letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return room.lower()
