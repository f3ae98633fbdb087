"""Unlabeled data: question + context pairs in SQuAD format that only the teacher labels.

`data.unlabeled` lists SQuAD-format JSON files or datasets-hub names (split `train`, or `name:SPLIT` as for
data.train). Their answers are never read: a file may have none at all, and where it has some they are
only counted (`answers_ignored` in report.json), so a labelled file can serve as unlabeled data without its
labels leaking in. The usual structural checks apply (ids, contexts, questions); ids must also be unique
across every data source, since feature ids (and so the teacher's logits) are keyed by them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from pipeline.runtime.errors import KdqaError
from pipeline.text.squad import Example, check_question, read_records

log = logging.getLogger(__name__)


@dataclass
class UnlabeledReport:
    source: str
    questions: int = 0
    answers_ignored: int = 0  # questions that came with answers: counted, never read
    contexts_in_dev: int = 0  # questions whose paragraph is also a dev paragraph (the dev score may flatter)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.source}: {self.questions} unlabeled questions ({self.answers_ignored} came with answers, "
                f"ignored; {self.contexts_in_dev} on dev paragraphs)")


def load_unlabeled(source: str) -> tuple[list[Example], UnlabeledReport]:
    """Teacher-only examples of one unlabeled source, in file order."""
    report = UnlabeledReport(source=source)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for where, paragraph, qa in read_records(source, "train"):
        qid, _, context, question = check_question(where, paragraph, qa, seen)
        report.questions += 1
        answers = qa.get("answers")
        report.answers_ignored += isinstance(answers, list) and len(answers) > 0
        examples.append(Example(qid, str(paragraph.get("title") or ""), context, question, [], [],
                                is_impossible=False, labelled=False))
    if not examples:
        raise KdqaError(f"{source}: no questions in this unlabeled file")
    return examples, report


def check_ids_distinct(unlabeled: list[tuple[str, list[Example]]], labelled: list[tuple[str, list[Example]]]) -> None:
    """An unlabeled question's id is its own: no other unlabeled source and no labelled one (train or dev)
    may use it, or one feature id (`example#window`) would name two rows. Pairs: (a name for the source,
    e.g. "data.unlabeled[0] (extra.json)", its examples). Train and dev ids may overlap: they never share
    a split."""
    owner: dict[str, str] = {}
    for name, examples in labelled:
        for ex in examples:
            owner.setdefault(ex.id, name)
    for name, examples in unlabeled:
        for ex in examples:
            first = owner.setdefault(ex.id, name)
            if first != name:
                raise KdqaError(f"{name}: question id {ex.id!r} is also in {first}; an unlabeled question needs an "
                                "id of its own")


def count_dev_contexts(examples: list[Example], dev: list[Example], report: UnlabeledReport) -> None:
    """Count (and warn about) unlabeled questions asked on dev paragraphs: training on them leaks dev text."""
    dev_contexts = {ex.context for ex in dev}
    report.contexts_in_dev = sum(ex.context in dev_contexts for ex in examples)
    if report.contexts_in_dev:
        log.warning("%s: %d questions are on paragraphs of the dev set; the dev scores will overstate how well "
                    "the student does on unseen text", report.source, report.contexts_in_dev)
