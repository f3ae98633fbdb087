"""Load SQuAD 2.0 examples from a local JSON file or the datasets hub, and validate them.

Policy: structural problems (unreadable file, missing `data`/`paragraphs`/`qas`/`context`/`question`/`id`,
duplicate ids, empty text) stop the stage with one line naming the file and record. Per-answer problems
(an `answer_start` a few characters off, an answer that is not in its context) are repaired or skipped and
counted in a `DataReport`; with `strict=True` they are errors too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import SCORED_SPLITS

# How far from the stated `answer_start` we look for the answer text before giving up on it.
REPAIR_WINDOW_CHARS = 64
MAX_REPORTED_DETAILS = 50


@dataclass
class Example:
    id: str
    title: str
    context: str
    question: str
    answer_texts: list[str]  # gold answers (for scoring); empty for unanswerable questions
    answer_starts: list[int]  # character offsets of answer_texts in context (for labels)
    is_impossible: bool
    # The record's answer texts as given, unvalidated: what the official evaluation script scores against.
    gold_texts: list[str] = field(default_factory=list)
    # False for rows only the teacher labels (unlabeled data, teacher-only augmented views): their features
    # carry no hard label and the student's cross-entropy skips them.
    labelled: bool = True


@dataclass
class DataReport:
    source: str
    questions: int = 0
    answerable: int = 0
    unanswerable: int = 0
    answers_repaired: int = 0
    answers_skipped: int = 0
    questions_dropped: int = 0  # answerable questions left with no locatable answer
    # is_impossible true but answers given: trained as unanswerable (the flag wins); scoring, like the official
    # evaluation script, goes by the answers.
    contradictory_labels: int = 0
    details: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.details) < MAX_REPORTED_DETAILS:
            self.details.append(message)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.source}: {self.questions} questions ({self.answerable} answerable, "
            f"{self.unanswerable} unanswerable); {self.answers_repaired} answer offsets repaired, "
            f"{self.answers_skipped} answers skipped, {self.questions_dropped} questions dropped, "
            f"{self.contradictory_labels} marked impossible despite answers"
        )


def is_local_file(source: str) -> bool:
    return source.endswith(".json") or Path(source).exists()


def hub_dataset(source: str, split: str) -> tuple[str, str]:
    """(dataset name, split spec) of a hub source: `squad_v2` reads the split named after the stage's split
    (train, validation for dev); `squad_v2:train[:2%]` reads that split spec (datasets' split slicing)."""
    name, _, spec = source.partition(":")
    return name, spec or {"train": "train", "dev": "validation"}.get(split, split)


def read_records(source: str, split: str) -> list[tuple[str, dict, dict]]:
    """(record location, paragraph, qa) triples of a SQuAD-format JSON path, or of a datasets-hub name with an
    optional split spec (`hub_dataset`)."""
    if is_local_file(source):
        return _read_squad_json(Path(source))
    return _read_hub(*hub_dataset(source, split))


def load_examples(source: str, split: str, strict: bool = False) -> tuple[list[Example], DataReport]:
    """Examples of one split: `source` is a SQuAD-format JSON path or a datasets-hub name (`hub_dataset`)."""
    records = read_records(source, split)
    # Dev (and validation) questions are scored, not trained on: keep them even when no answer can be located, so
    # the question set (and the gold answers) are exactly what the official evaluation script sees.
    return _validate(records, source, strict, keep_unlocatable=split in SCORED_SPLITS)


def _read_squad_json(path: Path) -> list[tuple[str, dict, dict]]:
    """Flatten the official nested layout into (record location, paragraph, qa) triples."""
    if not path.is_file():
        raise KdqaError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors add is harmless
    except UnicodeDecodeError as exc:
        raise KdqaError(f"{path}: not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise KdqaError(f"{path}: empty file (expected SQuAD-format JSON)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KdqaError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise KdqaError(f"{path}: expected a top-level object with a 'data' list (SQuAD format)")
    records = []
    for a, article in enumerate(doc["data"]):
        where = f"{path}: data[{a}]"
        if not isinstance(article, dict):
            raise KdqaError(f"{where}: expected an object")
        if not isinstance(article.get("paragraphs"), list):
            raise KdqaError(f"{where}: {_missing_or_wrong(article, 'paragraphs', 'a list')}")
        title = article.get("title", "")
        for p, paragraph in enumerate(article["paragraphs"]):
            pwhere = f"{where}.paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise KdqaError(f"{pwhere}: expected an object")
            if not isinstance(paragraph.get("context"), str):
                raise KdqaError(f"{pwhere}: {_missing_or_wrong(paragraph, 'context', 'a string')}")
            if not isinstance(paragraph.get("qas"), list):
                raise KdqaError(f"{pwhere}: {_missing_or_wrong(paragraph, 'qas', 'a list')}")
            for q, qa in enumerate(paragraph["qas"]):
                qwhere = f"{pwhere}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise KdqaError(f"{qwhere}: expected an object")
                records.append((qwhere, {"title": title, "context": paragraph["context"]}, qa))
    return records


def _missing_or_wrong(record: dict, name: str, expected: str) -> str:
    if record.get(name) is None:
        return f"missing '{name}'"
    return f"'{name}' must be {expected}, got {type(record[name]).__name__} {record[name]!r:.40}"


def _read_hub(name: str, hub_split: str) -> list[tuple[str, dict, dict]]:
    """The hub's flattened layout (id, title, context, question, answers{text, answer_start})."""
    import datasets

    from pipeline.runtime.hub import OFFLINE_HELP, is_offline, use_cache_only_if_unreachable

    use_cache_only_if_unreachable()
    try:
        ds = datasets.load_dataset(name, split=hub_split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        remedy = OFFLINE_HELP if is_offline() else "give a local SQuAD JSON path in params.yaml data.* to work offline"
        raise KdqaError(
            f"{name}: could not load split '{hub_split}' from the datasets hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {remedy}"
        ) from None
    records = []
    for i, row in enumerate(ds):
        answers = row.get("answers") or {"text": [], "answer_start": []}
        qa = {
            "id": row.get("id"),
            "question": row.get("question"),
            "is_impossible": len(answers["text"]) == 0,
            "answers": [{"text": t, "answer_start": s} for t, s in zip(answers["text"], answers["answer_start"])],
        }
        records.append((f"{name}[{hub_split}][{i}]", {"title": row.get("title", ""), "context": row.get("context")}, qa))
    return records


def _locate_answer(context: str, text: str, start: int) -> int | None:
    """The offset of `text` in `context`: `start` if right, else the nearest occurrence within the window."""
    if context[start : start + len(text)] == text:
        return start
    lo = max(0, start - REPAIR_WINDOW_CHARS)
    hi = min(len(context), start + len(text) + REPAIR_WINDOW_CHARS)
    best = None
    pos = context.find(text, lo)
    while pos != -1 and pos + len(text) <= hi:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def check_question(where: str, paragraph: dict, qa: dict, seen: dict[str, str]) -> tuple[str, str, str, str]:
    """The structural checks every question passes, labelled or not: a unique non-empty id, a non-empty
    context and question. Returns (id, location naming the id, context, question); records the id in `seen`."""
    qid = qa.get("id")
    if not isinstance(qid, str):
        raise KdqaError(f"{where}: {_missing_or_wrong(qa, 'id', 'a string')}")
    if not qid.strip():
        raise KdqaError(f"{where}: empty 'id'")
    where = f"{where} (id {qid})"
    if qid in seen:
        raise KdqaError(f"{where}: duplicate id, first seen at {seen[qid]}")
    seen[qid] = where
    context, question = paragraph["context"], qa.get("question")
    if not isinstance(context, str) or not context.strip():
        raise KdqaError(f"{where}: empty 'context'")
    if not isinstance(question, str):
        raise KdqaError(f"{where}: {_missing_or_wrong(qa, 'question', 'a string')}")
    if not question.strip():
        raise KdqaError(f"{where}: empty 'question'")
    check_text(where, "id", qid)
    check_text(where, "context", context)
    check_text(where, "question", question)
    if isinstance(paragraph.get("title"), str):
        check_text(where, "title", paragraph["title"])
    for k, answer in enumerate(qa.get("answers") or []):
        if isinstance(answer, dict) and isinstance(answer.get("text"), str):
            check_text(where, f"answers[{k}].text", answer["text"])
    return qid, where, context, question


def check_text(where: str, field: str, text: str) -> None:
    """Text must be Unicode that UTF-8 can encode. JSON's escapes can spell a lone UTF-16 surrogate (half of an
    emoji's pair, such as "\\ud83d" cut from "\\ud83d\\ude00"): Python reads it into the string, but the
    tokenizer and Parquet cannot take it. Checked where text enters kdqa: records as a file is read, and the
    arguments of `QuestionAnswerer`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KdqaError(f"{where}: {field} holds a lone UTF-16 surrogate {text[exc.start]!r} at character "
                        f"{exc.start} (half of a surrogate pair, e.g. a cut emoji), which is not text the tokenizer "
                        "can read; repair or remove it") from None


def _validate(records, source: str, strict: bool, keep_unlocatable: bool = False) -> tuple[list[Example], DataReport]:
    report = DataReport(source=source)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for where, paragraph, qa in records:
        qid, where, context, question = check_question(where, paragraph, qa, seen)
        answers = qa.get("answers", [])
        if not isinstance(answers, list):
            raise KdqaError(f"{where}: 'answers' must be a list")
        flag = qa.get("is_impossible")
        if flag is not None and not isinstance(flag, bool):
            raise KdqaError(f"{where}: 'is_impossible' must be true or false, got {flag!r:.40}")
        gold_texts = [a["text"] for a in answers if isinstance(a, dict) and isinstance(a.get("text"), str)]
        if flag is False and not answers and not keep_unlocatable:
            # Marked answerable but nothing to learn from: a per-answer problem, not "unanswerable".
            if strict:
                raise KdqaError(f"{where}: marked answerable (is_impossible false) but has no answers")
            report.questions_dropped += 1
            report.note(f"{where}: dropped, marked answerable but has no answers")
            continue
        if flag is True and answers:
            if strict:
                raise KdqaError(f"{where}: is_impossible is true but it has {len(answers)} answer(s); remove the "
                                "answers or set is_impossible to false")
            report.contradictory_labels += 1
            report.note(f"{where}: is_impossible true with {len(answers)} answer(s): trained as unanswerable, "
                        "scored against its answers (as the official evaluation script does)")
        is_impossible = bool(flag) or not answers

        texts, starts = [], []
        if not is_impossible:
            for k, ans in enumerate(answers):
                problem = None
                text = ans.get("text") if isinstance(ans, dict) else None
                start = ans.get("answer_start") if isinstance(ans, dict) else None
                if not isinstance(text, str) or not text.strip():
                    problem = "has no text"
                elif not isinstance(start, int) or isinstance(start, bool) or start < 0:
                    problem = f"has an invalid answer_start {start!r}"
                elif start + len(text) > len(context) and text not in context:
                    problem = f"lies outside the context (answer_start {start}, context length {len(context)})"
                else:
                    found = _locate_answer(context, text, start)
                    if found is None:
                        problem = f"text {text!r} not found near answer_start {start}"
                    elif found != start:
                        if strict:
                            raise KdqaError(f"{where}: answers[{k}] answer_start {start} does not match its text "
                                            f"(found at {found})")
                        report.answers_repaired += 1
                        report.note(f"{where}: answers[{k}] answer_start {start} -> {found}")
                        start = found
                if problem:
                    if strict:
                        raise KdqaError(f"{where}: answers[{k}] {problem}")
                    report.answers_skipped += 1
                    report.note(f"{where}: answers[{k}] skipped: {problem}")
                    continue
                texts.append(text)
                starts.append(start)
            if not texts and not keep_unlocatable:
                report.questions_dropped += 1
                report.note(f"{where}: dropped, no usable answer")
                continue
        report.questions += 1
        report.answerable += not is_impossible
        report.unanswerable += is_impossible
        examples.append(Example(qid, str(paragraph.get("title") or ""), context, question, texts, starts,
                                is_impossible, gold_texts))
    if not examples:
        raise KdqaError(f"{source}: no usable questions")
    return examples, report
