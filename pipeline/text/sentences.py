"""Sentence spans of a paragraph, by a documented rule (no dependency: the augmented views only need to
cut paragraphs at plausible places, and a missed boundary merely keeps two sentences together).

A sentence ends at `.`, `!` or `?` (plus any closing quotes or brackets) when whitespace follows and then
an uppercase letter, a digit or an opening quote/bracket. It does not end after a known abbreviation
("Mr.", "e.g."), a single letter ("J. R. R. Tolkien") or a dotted acronym ("U.S."): those are the common
false boundaries in encyclopaedic text. Decimals ("3.5") never match, since whitespace must follow.
"""

from __future__ import annotations

import re

# Sentence-final punctuation, closing quotes/brackets, then (not consumed) whitespace and a sentence start.
_END = re.compile(r"""[.!?]["'\u201d\u2019)\]]*(?=\s+["'\u201c\u2018(\[]?[A-Z0-9])""")
# The word a period closes: letters and inner dots ("U.S", "e.g", "Mr").
_LAST_WORD = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt rev gov sen rep pres vs etc al ca approx no vol "
    "fig jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co corp e.g i.e".split()
)


def _is_false_end(text: str, end: int) -> bool:
    """True when the period before `end` closes an abbreviation, an initial or an acronym."""
    if text[end - 1] != ".":
        return False
    word = _LAST_WORD.search(text[max(0, end - 32) : end])
    if word is None:
        return False
    w = word.group(1)
    return len(w) == 1 or "." in w or w.lower() in ABBREVIATIONS


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, in order, end exclusive. The spans hold no
    leading or trailing whitespace; what lies between two spans is whitespace only."""
    spans, start = [], 0
    for match in _END.finditer(text):
        end = match.end()
        if _is_false_end(text, match.start() + 1):
            continue
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    # Trim the whitespace each span starts or ends with; drop spans that were whitespace only.
    trimmed = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            trimmed.append((a, b))
    return trimmed
