"""Text that came from outside (callback bodies, headers, events others produced) made safe to
log, store as a reason, chain into the audit trail or put on a topic.

An attacker who controls a string can forge log lines with a newline, hide text with terminal
escapes, or grow every row that quotes it. `untrusted` keeps what a person needs to read it
and nothing else: control and format characters become a visible escape, and the text is cut.
"""
from __future__ import annotations

import unicodedata

UNTRUSTED_TEXT_MAX = 200  # characters of a foreign string kept in a reason, log line or event


def untrusted(value: object, limit: int = UNTRUSTED_TEXT_MAX) -> str:
    """`value` as text of at most `limit` characters (plus an ellipsis when cut), with every
    control (Cc), format (Cf: bidi overrides, zero-width), surrogate or unassigned character written
    as \\uXXXX so that it cannot break a line, a terminal or a log parser."""
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) > limit
    text = text[:limit]
    if not text.isprintable() or any(unicodedata.category(c) in _HIDDEN for c in text):
        text = "".join(c if c.isprintable() and unicodedata.category(c) not in _HIDDEN else f"\\u{ord(c):04x}"
                       for c in text)
    return text + "…" if cut else text


_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
