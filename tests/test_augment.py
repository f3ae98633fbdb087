"""Augmented views (pipeline/text/augment.py) and the sentence splitter they cut paragraphs with."""

from __future__ import annotations

import pytest

from pipeline.text.augment import KINDS, AugmentReport, make_views
from pipeline.runtime.errors import KdqaError
from pipeline.text.features import NO_LABEL, tokenize_examples
from pipeline.text.sentences import split_sentences
from pipeline.text.squad import Example


@pytest.mark.parametrize("text,sentences", [
    ("Paris is old. Rome is older! Is it? Yes.", ["Paris is old.", "Rome is older!", "Is it?", "Yes."]),
    ("Mr. Smith met Dr. Jones in St. Louis. They talked.", ["Mr. Smith met Dr. Jones in St. Louis.", "They talked."]),
    ("J. R. R. Tolkien moved to the U.S. He stayed.", ["J. R. R. Tolkien moved to the U.S. He stayed."]),
    ("It cost 3.5 million. In 1990 it fell.", ["It cost 3.5 million.", "In 1990 it fell."]),
    ('He said "stop." Then (in 1901) he left.', ['He said "stop."', "Then (in 1901) he left."]),
    ("e.g. This stays. lower case does not start one.", ["e.g. This stays. lower case does not start one."]),
    ("  Leading space.   Trailing space.  ", ["Leading space.", "Trailing space."]),
    ("No final stop", ["No final stop"]),
])
def test_sentence_splitter(text, sentences):
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == sentences
    # Between consecutive spans there is whitespace only: the spans cover the text.
    for (_, b), (a, _) in zip(spans, spans[1:]):
        assert text[b:a].isspace()


ARTICLE = [
    "Alice built the red tower in 1901. It stands in Paris. Bob founded the old castle of Rome. "
    "The castle was named after a queen. Carol lived there.",
    "The blue bridge crosses the river. Dave built it after the war. Eve painted it green.",
    "Frank was a king of the north. He was born in London.",
]


def example(qid: str, context: str, answer: str | None, question: str = "who founded the castle?", title="t"):
    if answer is None:
        return Example(qid, title, context, question, [], [], True)
    return Example(qid, title, context, question, [answer], [context.index(answer)], False, [answer])


def views_of(examples, views=3, seed=0, kinds=KINDS):
    report = AugmentReport()
    return [v for view in range(views) for v in make_views(examples, view, seed, kinds, report)], report


def check_labelled(view: Example) -> None:
    for text, start in zip(view.answer_texts, view.answer_starts):
        assert view.context[start : start + len(text)] == text


def test_sentences_view_keeps_the_answer_exactly_and_cuts_or_reorders():
    exs = [example(f"q{i}", ARTICLE[0], "Bob founded the old castle") for i in range(40)]
    views, report = views_of(exs, views=1, kinds=["sentences"])
    assert report.views == 40 and report.labelled == 40 and report.remap_failed == 0
    original = [ARTICLE[0][a:b] for a, b in split_sentences(ARTICLE[0])]
    orders = []
    for view in views:
        assert view.labelled and view.answer_texts == ["Bob founded the old castle"]
        check_labelled(view)
        assert view.context != ARTICLE[0]
        kept = [view.context[a:b] for a, b in split_sentences(view.context)]
        assert set(kept) <= set(original) and "Bob founded the old castle of Rome." in kept
        orders.append([original.index(k) for k in kept])
    # Both kinds of change happen: sentences dropped, and kept ones in another order.
    assert any(len(order) < len(original) for order in orders)
    assert any(order != sorted(order) for order in orders)


def test_answer_across_sentences_keeps_them_together():
    answer = "Paris. Bob founded"  # the splitter cuts inside it
    views, report = views_of([example("q", ARTICLE[0], answer)], views=12, kinds=["sentences"])
    assert report.remap_failed == 0
    for view in views:
        assert view.labelled
        check_labelled(view)


def test_failed_remapping_makes_a_teacher_only_view_and_is_counted():
    """A distractor inserted inside an answer that spans two sentences breaks it: never a wrong label."""
    answer = "Paris. Bob founded"
    exs = [example(f"q{i}", ARTICLE[0], answer) for i in range(30)] + [example("other", ARTICLE[1], "Dave")]
    views, report = views_of(exs, views=1, kinds=["distractor"])
    failed = [v for v in views if not v.labelled]
    assert report.remap_failed == len(failed) == report.teacher_only
    assert 0 < len(failed) < len(views)  # the gap inside the answer is one of five
    for view in failed:
        assert view.answer_texts == [] and not view.is_impossible
        assert answer not in view.context
    for view in views:
        if view.labelled:
            check_labelled(view)


def test_distractor_inserts_a_sentence_of_another_paragraph_of_the_article():
    exs = [example(f"q{i}", ARTICLE[0], "the old castle") for i in range(10)]
    exs.append(example("other", ARTICLE[1], "the war", question="when?"))
    views, report = views_of(exs, views=1, kinds=["distractor"])
    others = {ARTICLE[1][a:b] for a, b in split_sentences(ARTICLE[1])}
    for view in views:
        sentences = [view.context[a:b] for a, b in split_sentences(view.context)]
        source = ARTICLE[1] if view.id.startswith("q") else ARTICLE[0]
        pool = others if view.id.startswith("q") else {source[a:b] for a, b in split_sentences(source)}
        assert len(sentences) == len(split_sentences(view.context)) and sum(s in pool for s in sentences) == 1
        assert view.labelled
        check_labelled(view)


def test_other_paragraph_view_is_teacher_only_and_stays_in_the_article():
    exs = [example("a", ARTICLE[0], "Alice"), example("b", ARTICLE[1], "Dave"),
           example("c", "Eve was queen of a small city.", "Eve", title="elsewhere")]
    views, report = views_of(exs, views=2, kinds=["other_paragraph"])
    assert [v.id for v in views] == ["a#0", "b#0", "a#1", "b#1"]  # view by view: each its own run of shards
    assert report.not_applicable == {"other_paragraph": 2}  # a one-paragraph article has no other paragraph
    for view in views:
        assert not view.labelled and view.answer_texts == []
        assert view.context in ARTICLE[:2] and view.context != (ARTICLE[0] if view.id[0] == "a" else ARTICLE[1])
        assert view.question == "who founded the castle?"


def test_unanswerable_question_keeps_no_answer_only_where_no_sentence_is_added():
    exs = [example(f"q{i}", ARTICLE[0], None) for i in range(6)] + [example("x", ARTICLE[1], "Dave")]
    views, report = views_of(exs, views=3)  # one view of each kind per example
    original = {ARTICLE[0][a:b] for a, b in split_sentences(ARTICLE[0])}
    kinds_seen = set()
    for view in (v for v in views if v.id.startswith("q")):
        sentences = {view.context[a:b] for a, b in split_sentences(view.context)}
        if view.context == ARTICLE[1]:
            kind = "other_paragraph"
        elif sentences <= original:
            kind = "sentences"
        else:
            kind = "distractor"
        kinds_seen.add(kind)
        # Only a cut of its own paragraph keeps the "no answer" label; the others are the teacher's.
        assert view.labelled == (kind == "sentences")
        assert view.is_impossible == (kind == "sentences")
    assert kinds_seen == set(KINDS)
    assert report.remap_failed == 0


def test_a_view_is_never_empty():
    """Unanswerable questions have no sentence that must stay: a cut keeps at least one (seen empty on real data)."""
    exs = [example(f"q{i}", ARTICLE[2], None) for i in range(60)]  # two sentences, both free to drop
    views, _ = views_of(exs, views=1, kinds=["sentences"])
    assert len(views) == 60
    original = {ARTICLE[2][a:b] for a, b in split_sentences(ARTICLE[2])}
    for view in views:
        sentences = {view.context[a:b] for a, b in split_sentences(view.context)}
        assert view.context.strip() and sentences <= original and view.is_impossible and view.labelled


def test_views_are_deterministic_per_example_and_rotate_kinds():
    exs = [example(f"q{i}", ARTICLE[i % 2], ["the old castle", "the river"][i % 2]) for i in range(8)]
    views, report = views_of(exs, views=3, seed=5)
    again, _ = views_of(exs, views=3, seed=5)
    assert views == again
    # Each example gets each kind once (three views, three kinds, all applicable here).
    assert report.by_kind == {k: 8 for k in KINDS} and report.views == 24
    # Adding an example changes no other example's views; another seed changes them.
    more, _ = views_of(exs + [example("new", ARTICLE[1], "Eve")], views=4, seed=5)
    assert [v for v in more if not v.id.startswith("new") and not v.id.endswith("#3")] == views
    other_seed, _ = views_of(exs, views=3, seed=6)
    assert [v.context for v in other_seed] != [v.context for v in views]
    assert report.labelled + report.teacher_only == report.views


def test_unknown_kind_is_an_error():
    with pytest.raises(KdqaError, match="unknown kind 'shuffle'"):
        views_of([example("q", ARTICLE[0], "Alice")], kinds=["sentences", "shuffle"])


def test_view_features_have_traceable_ids_and_labels_only_where_kept(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.teacher)
    # Words of the tiny vocabulary, so every word is one token.
    article = ["alice built the red tower. bob founded the old castle. carol named the city.",
               "the blue bridge was built after the war. dave named it. eve was queen."]
    exs = [Example("x", "t", article[0], "who founded the castle?", ["bob"], [article[0].index("bob")], False),
           Example("y", "t", article[1], "who named it?", ["dave"], [article[1].index("dave")], False)]
    # The splitter needs a capital to start a sentence; lower-case text stays one sentence, so `sentences`
    # views do not apply here and the rest still come out.
    views, report = views_of(exs, views=3)
    features = list(tokenize_examples(tokenizer, views, 48, 16, 12))
    assert [f["feature_id"] for f in features] == [f"{v.id}#0" for v in views]  # one window each
    for f, view in zip(features, views):
        assert f["feature_id"].startswith(("x#", "y#")) and f["feature_id"].count("#") == 2
        if view.labelled:
            s, e = f["start_position"], f["end_position"]
            assert view.context[f["offset_start"][s] : f["offset_end"][e]] == view.answer_texts[0]
        else:
            assert f["start_position"] == f["end_position"] == NO_LABEL
    assert report.teacher_only > 0 and report.labelled > 0
