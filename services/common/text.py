"""Text that came from outside (callback bodies, headers, events others produced) made safe to
log, store as a reason, chain into the audit trail or put on a topic.

An attacker who controls a string can forge log lines with a newline, hide text with terminal
escapes, or grow every row that quotes it. `untrusted` keeps what a person needs to read it
and nothing else: control and format characters become a visible escape, and the text is cut.
"""
from __future__ import annotations

UNTRUSTED_TEXT_MAX = 200  # characters of a foreign string kept in a reason, log line or event


def untrusted(value: object, limit: int = UNTRUSTED_TEXT_MAX) -> str:
    """`value` as text of at most `limit` characters (plus an ellipsis when cut), with every
    character that is not printable (str.isprintable: control (Cc), format (Cf: bidi overrides,
    zero-width), surrogate, private-use, unassigned, line and paragraph separators, spaces other than
    ' ') written as \\uXXXX (\\UXXXXXXXX above U+FFFF) so that it cannot break a line, a terminal or a
    log parser. Escapes count towards `limit`, so a string of NULs cannot grow six-fold."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit and text.isprintable():
        return text
    kept: list[str] = []
    length = 0
    for c in text:
        piece = c if c.isprintable() else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if length + len(piece) > limit:
            return "".join(kept) + "…"
        kept.append(piece)
        length += len(piece)
    return "".join(kept)
