"""Teacher logits carried through character space onto a student's own tokens and windows.

A span answer is a distribution over positions of one text, so a teacher's start/end distributions can be
moved to any other tokenization of that text through the tokens' character offsets (into the original
context, whatever the tokenizer's normalisation did to it):

1. Projection. A teacher window's start distribution (softmax over CLS and its context tokens, T=1) puts each
   token's mass on the token's first character, its end distribution on the token's last character; the
   CLS ("no answer in this window") mass stays apart as the window's null mass. The window saw the
   characters from its first context token's start to its last one's end (of a teacher carried onto these
   windows from its own tokenizer: its first and last token with a value, `seen_window`).
2. Mapping onto a student window. The characters of the student window take their mass from the teacher
   windows that saw them. One teacher window is used as far as it reaches, chosen as the one that sees the
   most of the student window (ties: the one where the student window sits most centrally); characters it
   did not see come from the next such window, and so on. So a student window inside one teacher window
   (the same windows, or smaller ones) gets that window's distribution exactly; one that spans two
   teacher windows gets one distribution pieced from both, never an average of two normalisations.
   Each student context token gets the mass of the characters it owns (a character inside several tokens,
   e.g. one character split into bytes, is owned by the first of them for starts and the last for ends).
   CLS gets 1 - M, where M is the teacher's mass on the student window's characters: the window's own null
   mass plus whatever the teacher put outside the student window, because for this window that is "no
   answer here", exactly as the hard labels treat an answer outside the window. (When two pieced windows
   disagree so that M > 1, CLS gets 0 and the positions are scaled by 1/M.)
   Student tokens no teacher window saw are masked out; mass on characters no student token holds is lost;
   the rest is renormalised, and the share kept before renormalising is the feature's covered mass.
3. Stored form. Per student token, the log-probability of the aligned distribution (float16): the loss takes
   them as logits, and since softmax(log p / T) = p^(1/T) / Z, a one-to-one mapping gives exactly the
   teacher's softmax(z / T) at any T (log-softmax differs from z by a constant per row, which cancels). Where
   tokens merged, the merged mass is softened as one: (p1 + p2)^(1/T), not p1^(1/T) + p2^(1/T), i.e. the
   distribution over the student's positions is what gets the temperature. Positions with no mass hold
   NO_MASS (softmax gives them 0 at any temperature); positions masked out hold NaN, which the student's
   stream turns into a per-position target mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.text.features import CLS_INDEX

NO_MASS = -1e4  # log-probability of "no mass": exp(NO_MASS / T) underflows to 0 for any T in use; fits float16
UNSEEN = np.nan  # a position no teacher window saw: excluded from the distillation term


@dataclass(frozen=True)
class Window:
    """One feature's context tokens: positions `context_start..context_end` (inclusive) and the character
    offsets of every position of the feature (-1 outside the context)."""

    offset_start: np.ndarray
    offset_end: np.ndarray
    context_start: int
    context_end: int

    @classmethod
    def of(cls, feature: dict) -> "Window":
        """The window of a feature row (as `tokenize_examples` yields it or a features shard holds it)."""
        return cls(np.asarray(feature["offset_start"]), np.asarray(feature["offset_end"]),
                   int(feature["context_start"]), int(feature["context_end"]))

    @classmethod
    def of_row(cls, windows, row: int) -> "Window":
        """The window of row `row` of a features shard's windows (`pipeline.store.features.read_windows`)."""
        return cls(windows.offset_start[row], windows.offset_end[row], int(windows.context_start[row]),
                   int(windows.context_end[row]))

    def context_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = slice(self.context_start, self.context_end + 1)
        return self.offset_start[tokens].astype(np.int64), self.offset_end[tokens].astype(np.int64)

    def last_chars(self) -> np.ndarray:
        """Each context token's last character (a zero-width token: its start)."""
        starts, ends = self.context_offsets()
        return np.maximum(ends - 1, starts)

    def char_range(self) -> tuple[int, int]:
        """Characters [lo, hi) of the context this window reads."""
        starts, _ = self.context_offsets()
        return int(starts.min()), int(self.last_chars().max()) + 1


@dataclass(frozen=True)
class CharDistribution:
    """One head (start or end) of a teacher window in character space: `mass[i]` is the probability that the
    answer starts (ends) at character `lo + i`; `null` the probability of "no answer in this window"."""

    lo: int
    null: float
    mass: np.ndarray  # float64

    @property
    def hi(self) -> int:
        return self.lo + len(self.mass)


def answer_probabilities(logits: np.ndarray, window: Window) -> np.ndarray:
    """softmax over CLS and the context tokens (the positions the loss compares), in float64: [null, tokens...].
    A teacher carried onto these windows from its own tokenizer (pipeline/model/carried.py) holds NaN where none
    of its windows saw a token: no mass there (its CLS always has a value)."""
    allowed = np.r_[CLS_INDEX, np.arange(window.context_start, window.context_end + 1)]
    z = logits[allowed].astype(np.float64)
    z[np.isnan(z)] = -np.inf
    p = np.exp(z - z.max())
    return p / p.sum()


def seen_window(start_logits: np.ndarray, window: Window) -> Window | None:
    """`window` less the context tokens at its ends that hold NaN (None: every one does). A teacher carried onto
    these windows (pipeline/model/carried.py) holds NaN where none of its own windows read the characters, and
    they are at the ends: its windows of an example overlap, so together they read one run of characters."""
    context = np.arange(window.context_start, window.context_end + 1)
    valued = context[~np.isnan(start_logits[context])]
    if len(valued) == 0:
        return None
    return Window(window.offset_start, window.offset_end, int(valued[0]), int(valued[-1]))


def project_window(start_logits: np.ndarray, end_logits: np.ndarray,
                   window: Window) -> tuple[CharDistribution, CharDistribution]:
    """A teacher window's start and end distributions in character space."""
    lo, hi = window.char_range()
    starts, _ = window.context_offsets()
    heads = []
    for logits, chars in ((start_logits, starts), (end_logits, window.last_chars())):
        p = answer_probabilities(logits, window)
        mass = np.zeros(hi - lo)
        np.add.at(mass, chars - lo, p[1:])  # tokens sharing a character add up
        heads.append(CharDistribution(lo, float(p[0]), mass))
    return heads[0], heads[1]


@dataclass
class AlignedTargets:
    """The teacher's targets for one student feature, over all of its positions."""

    start: np.ndarray  # float32 log-probabilities; NO_MASS where there is none, NaN where masked out
    end: np.ndarray
    start_covered: float  # share of the teacher's mass that landed on kept positions (1: nothing lost)
    end_covered: float
    teacher_windows: int  # how many teacher windows the targets were pieced from (1: one window, exact)


def rank_teacher_windows(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """Teacher windows overlapping [lo, hi), best first: most characters seen, then most central."""
    def key(w: int):
        a, b = ranges[w]
        overlap = min(b, hi) - max(a, lo)
        return -overlap, -min(lo - a, b - hi), w

    return sorted((w for w, (a, b) in enumerate(ranges) if min(b, hi) > max(a, lo)), key=key)


def char_owners(starts: np.ndarray, ends: np.ndarray, lo: int, n_chars: int, first: bool) -> np.ndarray:
    """For each character of [lo, lo + n_chars), the index of the token that holds it (-1: none). A character
    inside several tokens goes to the first of them (`first`) or the last."""
    lengths = np.clip(ends - starts, 0, None)
    tokens = np.repeat(np.arange(len(starts)), lengths)
    # character positions of every (token, character) pair, without a Python loop
    pair_of_token = np.repeat(np.cumsum(lengths) - lengths, lengths)  # index of each token's first pair
    chars = np.arange(lengths.sum()) - pair_of_token + np.repeat(starts - lo, lengths)
    inside = (chars >= 0) & (chars < n_chars)
    if first:
        owner = np.full(n_chars, len(starts), dtype=np.int64)
        np.minimum.at(owner, chars[inside], tokens[inside])
        owner[owner == len(starts)] = -1
    else:
        owner = np.full(n_chars, -1, dtype=np.int64)
        np.maximum.at(owner, chars[inside], tokens[inside])
    return owner


def student_head(mass: np.ndarray, owner: np.ndarray, kept: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(null, per-token probabilities, covered mass) of one head over a student window's characters."""
    inside = mass.sum()
    scale = max(1.0, inside)  # pieced windows that disagree: scale down, no null left
    held = owner >= 0
    tokens = np.bincount(owner[held], weights=mass[held], minlength=len(kept)) / scale
    tokens[~kept] = 0.0
    null = max(0.0, 1.0 - inside)
    covered = null + tokens.sum()
    if covered <= 0:  # the teacher's mass lands on no student position: nothing to learn but "no answer"
        return 1.0, np.zeros_like(tokens), 0.0
    return null / covered, tokens / covered, covered


def to_log(p: np.ndarray) -> np.ndarray:
    out = np.full(p.shape, NO_MASS, dtype=np.float64)
    np.log(p, out=out, where=p > 0)
    return np.maximum(out, NO_MASS)


def align_window(teacher: list[tuple[CharDistribution, CharDistribution]], student: Window,
                 length: int) -> AlignedTargets:
    """The teacher's start/end targets over a student feature of `length` positions."""
    lo, hi = student.char_range()
    starts, ends = student.context_offsets()
    n_chars = hi - lo
    ranges = [(start.lo, start.hi) for start, _ in teacher]
    mass = {"start": np.zeros(n_chars), "end": np.zeros(n_chars)}
    seen = np.zeros(n_chars, dtype=bool)
    used = 0
    for w in rank_teacher_windows(ranges, lo, hi):
        a, b = max(ranges[w][0], lo), min(ranges[w][1], hi)
        new = ~seen[a - lo : b - lo]
        if not new.any():
            continue
        used += 1
        for head, dist in zip(("start", "end"), teacher[w]):
            mass[head][a - lo : b - lo][new] = dist.mass[a - dist.lo : b - dist.lo][new]
        seen[a - lo : b - lo] = True
    # A token is kept when the teacher saw any of its characters (a zero-width one: its position).
    seen_before = np.r_[0, np.cumsum(seen)]
    kept = seen_before[np.clip(ends - lo, 0, n_chars)] - seen_before[np.clip(starts - lo, 0, n_chars)] > 0
    zero_width = ends <= starts
    kept[zero_width] = seen[np.clip(starts[zero_width] - lo, 0, n_chars - 1)]

    context = np.arange(student.context_start, student.context_end + 1)
    out, covered = {}, {}
    for head in ("start", "end"):
        owner = char_owners(starts, ends, lo, n_chars, first=head == "start")
        null, tokens, covered[head] = student_head(mass[head], owner, kept)
        row = np.full(length, NO_MASS)
        row[CLS_INDEX] = to_log(np.array([null]))[0]
        row[context] = np.where(kept, to_log(tokens), UNSEEN)
        out[head] = row.astype(np.float32)
    return AlignedTargets(out["start"], out["end"], float(covered["start"]), float(covered["end"]), used)


@dataclass
class AlignStats:
    """How a teacher's targets came out over some features: what align and a carried teacher report."""

    features: int = 0
    pieced: int = 0  # features whose targets came from more than one teacher window
    covered: float = 0.0  # sum over features of the mean start/end covered mass

    def add(self, target: AlignedTargets) -> None:
        self.features += 1
        self.pieced += target.teacher_windows > 1
        self.covered += (target.start_covered + target.end_covered) / 2

    def __iadd__(self, other: AlignStats) -> AlignStats:
        self.features, self.pieced, self.covered = (self.features + other.features, self.pieced + other.pieced,
                                                    self.covered + other.covered)
        return self

    @property
    def mean_covered(self) -> float:
        return self.covered / max(self.features, 1)


def align_example(teacher_windows: list[tuple[np.ndarray, np.ndarray, Window]],
                  student_windows: list[tuple[Window, int]]) -> list[AlignedTargets]:
    """Targets for every student feature of one example, from all of the teacher's windows of it.

    teacher_windows: (start logits, end logits, window) per teacher feature; student_windows: (window,
    number of positions) per student feature.
    """
    # A carried teacher's windows (its values on the features: `kdqa align` carrying it on) read only the characters
    # of their tokens with a value: counting the NaN ones as read would turn "never seen" into "no mass" there, and
    # a window that saw none of its context into a sure "no answer".
    seen = [(s, e, seen_window(s, w)) for s, e, w in teacher_windows]
    projected = [project_window(s, e, w) for s, e, w in seen if w is not None]
    return [align_window(projected, window, length) for window, length in student_windows]
