"""Augmented views of the labelled training set: new (question, context) pairs for the teacher to label.

Each labelled example gets `views` views, each of one kind (the kinds are taken in turn from a starting
point drawn per example, so every kind is used about equally):

- `sentences`: the paragraph cut and reordered around the answer: the sentences holding the answer stay
  together, each other sentence is dropped with probability 1/2, and what is kept is shuffled.
- `other_paragraph`: the question asked of another paragraph of the same article. Often unanswerable
  there, sometimes not: only the teacher can say, so the view has no hard label.
- `distractor`: a sentence from another paragraph of the same article inserted between two sentences.

A view keeps its hard label only when the answer text survives, character for character, at its remapped
offset (checked, never assumed); otherwise it becomes a teacher-only row (`remap_failed` in the report).
Unanswerable questions keep their "no answer" label in `sentences` views (a part of a paragraph that does
not answer a question does not answer it either) but not in `distractor` views (the inserted sentence
might). A kind that cannot apply to an example (one sentence only, a one-paragraph article) gives no view
there (`not_applicable`).

Everything is deterministic: view v of example e depends only on (seed, e's id, v) and on e's article, so
views are the same on every run and adding examples does not change the views of the others. A view's id
is `example#v` (v from 0), so its features are `example#v#window`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

from pipeline.params import AUGMENT_KINDS as KINDS  # the one list, beside the params it validates
from pipeline.params import Params
from pipeline.runtime.errors import KdqaError
from pipeline.text.sentences import split_sentences
from pipeline.text.squad import Example

MOVES_ANSWERS = ("sentences", "distractor")  # kinds that keep hard labels where the answer survives
DROP_PROBABILITY = 0.5  # each sentence without the answer is dropped with this probability (`sentences`)
SEPARATOR = " "  # what joins sentences in a rebuilt paragraph


@dataclass
class AugmentReport:
    views: int = 0  # views written
    labelled: int = 0  # views that keep a hard label
    teacher_only: int = 0  # views only the teacher labels (by kind, or because remapping failed)
    remap_failed: int = 0  # views whose answer did not survive exactly (teacher-only; included above)
    by_kind: dict[str, int] = field(default_factory=dict)
    not_applicable: dict[str, int] = field(default_factory=dict)  # views a kind could not make

    def to_dict(self) -> dict:
        return asdict(self)


def check_kinds(kinds: Iterable[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise KdqaError(f"params: prepare.augment_kinds: unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})")


def article_paragraphs(examples: list[Example]) -> dict[str, list[str]]:
    """The distinct paragraphs of each article (by title), in order of first appearance."""
    paragraphs: dict[str, dict[str, None]] = defaultdict(dict)
    for ex in examples:
        paragraphs[ex.title].setdefault(ex.context)
    return {title: list(contexts) for title, contexts in paragraphs.items()}


def make_views(examples: list[Example], view: int, seed: int, kinds: Iterable[str],
               report: AugmentReport) -> Iterator[Example]:
    """View number `view` of every labelled training example, in order (a generator: nothing is held but
    the paragraphs of the articles); counts go into `report`. Prepare writes each view number as its own
    run of shards, so asking for more views adds shards and leaves the existing ones byte for byte."""
    kinds = list(kinds)
    check_kinds(kinds)
    if not kinds:
        return
    paragraphs = article_paragraphs(examples)
    for ex in examples:
        rotation = random.Random(f"{seed}/{ex.id}").randrange(len(kinds))
        kind = kinds[(rotation + view) % len(kinds)]
        rng = random.Random(f"{seed}/{ex.id}/{view}")
        others = [p for p in paragraphs[ex.title] if p != ex.context]
        made = MAKERS[kind](ex, others, rng)
        if made is None:
            report.not_applicable[kind] = report.not_applicable.get(kind, 0) + 1
            continue
        made = replace(made, id=f"{ex.id}#{view}")
        answerable = not ex.is_impossible and bool(ex.answer_texts)
        report.remap_failed += kind in MOVES_ANSWERS and answerable and not made.labelled
        report.views += 1
        report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
        report.labelled += made.labelled
        report.teacher_only += not made.labelled
        yield made


# --- one function per kind: (example, other paragraphs of its article, rng) -> view or None ---

def sentences_view(ex: Example, others: list[str], rng: random.Random) -> Example | None:
    spans = split_sentences(ex.context)
    if len(spans) < 2:
        return None
    block = answer_block(ex, spans)  # indices of the sentences that must stay together, in order
    if len(block) == len(spans):  # the answer runs through every sentence: nothing to cut or move
        return None
    units = [block] if block else []
    for i in range(len(spans)):
        if i not in block and rng.random() >= DROP_PROBABILITY:
            units.append([i])
    if not units:  # an unanswerable question, every sentence dropped: keep one, a paragraph is never empty
        units.append([rng.randrange(len(spans))])
    rng.shuffle(units)
    order = [i for unit in units for i in unit]
    if order == list(range(len(spans))):  # nothing dropped or moved: drop one sentence the answer is not in
        free = [i for i in order if i not in block]
        order.remove(rng.choice(free))
        units = [u for u in units if u[0] in order]
    pieces = [(spans[u[0]][0], spans[u[-1]][1]) for u in units]  # a block keeps its inner whitespace
    return rebuild(ex, pieces, inserted=None, keep_no_answer=True)


def distractor_view(ex: Example, others: list[str], rng: random.Random) -> Example | None:
    if not others:
        return None
    source = rng.choice(others)
    candidates = [source[a:b] for a, b in split_sentences(source)]
    spans = split_sentences(ex.context)
    gap = rng.randrange(len(spans) + 1)  # before sentence `gap` (len(spans): after the last one)
    pieces = [(spans[0][0], spans[gap - 1][1])] if gap else []
    pieces.append(None)  # where the distractor goes
    if gap < len(spans):
        pieces.append((spans[gap][0], spans[-1][1]))
    return rebuild(ex, pieces, inserted=rng.choice(candidates), keep_no_answer=False)


def other_paragraph_view(ex: Example, others: list[str], rng: random.Random) -> Example | None:
    if not others:
        return None
    return replace(ex, context=rng.choice(others), answer_texts=[], answer_starts=[], gold_texts=[],
                   is_impossible=False, labelled=False)


MAKERS = {"sentences": sentences_view, "other_paragraph": other_paragraph_view, "distractor": distractor_view}


# --- rebuilding a paragraph from pieces of the original, with its answers remapped ---

def answer_block(ex: Example, spans: list[tuple[int, int]]) -> list[int]:
    """The sentences the first answer overlaps, from the first to the last (empty when unanswerable)."""
    if ex.is_impossible or not ex.answer_texts:
        return []
    start, end = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answer_texts[0])
    hit = [i for i, (a, b) in enumerate(spans) if a < end and start < b]
    return list(range(hit[0], hit[-1] + 1)) if hit else []


def rebuild(ex: Example, pieces: list[tuple[int, int] | None], inserted: str | None, keep_no_answer: bool) -> Example:
    """The view whose context is the original's `pieces` (character ranges; None: the `inserted` text)
    joined by SEPARATOR, with every answer that survives exactly moved to its new offset.

    Labels: an answerable example keeps the answers that survive (teacher-only if its first one does not:
    that one is the training label); an unanswerable one stays so only if `keep_no_answer`."""
    parts, moved = [], {}  # moved: original start of each piece -> its start in the new context
    offset = 0
    for piece in pieces:
        text = inserted if piece is None else ex.context[piece[0] : piece[1]]
        if piece is not None:
            moved[piece] = offset
        parts.append(text)
        offset += len(text) + len(SEPARATOR)
    context = SEPARATOR.join(parts)
    if ex.is_impossible or not ex.answer_texts:
        if keep_no_answer:
            return replace(ex, context=context)
        return replace(ex, context=context, gold_texts=[], is_impossible=False, labelled=False)
    texts, starts = [], []
    for text, start in zip(ex.answer_texts, ex.answer_starts):
        new = remap(start, len(text), moved)
        if new is not None and context[new : new + len(text)] == text:
            texts.append(text)
            starts.append(new)
        elif not texts:  # the first answer (the training label) did not survive: no hard label at all
            return replace(ex, context=context, answer_texts=[], answer_starts=[], gold_texts=[],
                           labelled=False)
    return replace(ex, context=context, answer_texts=texts, answer_starts=starts, gold_texts=texts)


def remap(start: int, length: int, moved: dict[tuple[int, int], int]) -> int | None:
    """The new offset of characters [start, start + length) of the original, if one piece holds them all."""
    for (a, b), new_start in moved.items():
        if a <= start and start + length <= b:
            return new_start + (start - a)
    return None


def augmented_runs(train: list[Example], params: Params, report: AugmentReport) -> Iterator[list[Example]]:
    """The augmented split's examples, one run per view number, one run in memory at a time (each is about as
    many examples as train). Deterministic: `kdqa align` makes them again, in the same order, for its student."""
    settings = params.prepare
    for view in range(settings.augment_views):
        yield list(make_views(train, view, settings.augment_seed, settings.augment_kinds, report))
