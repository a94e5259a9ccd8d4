"""untrusted(): foreign text made safe for a log line, a reason, an audit entry or an event."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from services.common.text import UNTRUSTED_TEXT_MAX, untrusted


def test_plain_text_passes_unchanged():
    assert untrusted("Request cancelled by user") == "Request cancelled by user"
    assert untrusted("Ksh 100 — malipo yamefaulu ✓") == "Ksh 100 — malipo yamefaulu ✓"


@pytest.mark.parametrize("raw, shown", [
    ("line\nforged: admin logged in", "line\\u000aforged: admin logged in"),
    ("\r\x00\x1b[31mred", "\\u000d\\u0000\\u001b[31mred"),
    ("abc\u202eevil", "abc\\u202eevil"),  # right-to-left override
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("para\u2029graph\u2028line\x85next", "para\\u2029graph\\u2028line\\u0085next"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("private \U000f0000 use", "private \\U000f0000 use"),
])
def test_control_and_format_characters_become_visible_escapes(raw, shown):
    assert untrusted(raw) == shown


def test_long_text_is_cut_with_an_ellipsis():
    assert untrusted("x" * 1000) == "x" * UNTRUSTED_TEXT_MAX + "…"
    assert untrusted("abcdef", 3) == "abc…"
    assert untrusted("abc", 3) == "abc"


def test_escapes_count_towards_the_limit():
    # Before: 200 NULs came back as 1200 characters.
    assert untrusted("\x00" * 1000) == "\\u0000" * (UNTRUSTED_TEXT_MAX // 6) + "…"
    assert untrusted("ab\ncd", 4) == "ab…"  # an escape is never split


def test_other_values_are_shown_by_their_repr():
    assert untrusted(b"\x00raw") == "b'\\x00raw'"
    assert untrusted(None) == "None"
    assert untrusted(ValueError("bad\nvalue")) == "ValueError('bad\\nvalue')"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=600), st.integers(1, 300))
def test_any_text_comes_out_printable_and_bounded(raw, limit):
    shown = untrusted(raw, limit)
    body = shown.removesuffix("…") if len(shown) > limit else shown
    assert len(body) <= limit
    assert body.isprintable()
    assert "\n" not in shown and "\r" not in shown
