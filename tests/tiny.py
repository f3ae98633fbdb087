"""Tiny offline stand-ins for the real world: a made-up vocabulary, random-weight BERTs, synthetic SQuAD.

Nothing here touches a hub: models are built from a config and saved with safetensors, the tokenizer from
a vocabulary file we write, and the data from a seeded generator in the official SQuAD JSON layout.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a an of in on and was is river city king queen north south built founded named after "
         "year war battle bridge tower castle old new great small red blue green paris london rome "
         "alice bob carol dave eve frank what who when where which how why did does name").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    # dict.fromkeys: one line per token ("a" is both a word and a character); a duplicate would leave an id
    # past the end of the embedding table.
    vocab = list(dict.fromkeys(SPECIAL + sorted(set(WORDS)) + chars))
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


# Single characters only: every word becomes one token per character, a tokenization other than the made-up
# vocabulary's whole words (a student of another tokenizer).
CHARACTER_VOCAB = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def make_tokenizer(folder: Path):
    return make_bert_tokenizer(folder, write_vocab(folder).read_text().splitlines())


def make_bert_tokenizer(folder: Path, tokens: list[str], lowercase: bool = True):
    """A WordPiece tokenizer over `tokens` (the special tokens first), saved in `folder`. lowercase=False
    keeps case and accents (a cased vocabulary); True lowercases and strips accents, like BERT uncased."""
    from transformers import BertTokenizerFast

    import inspect

    tokens = list(dict.fromkeys(SPECIAL + tokens))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        # transformers 5 takes the vocabulary itself (a `vocab_file=` keyword is silently ignored there,
        # leaving only the 5 special tokens: every word would become [UNK]).
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=lowercase)
    else:
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=lowercase)
    tok.save_pretrained(folder)
    return tok


def make_stripping_tokenizer(folder: Path, tokens: list[str], keep: str | None):
    """A fast WordPiece tokenizer over `tokens` (BERT's special tokens and pair template) whose normalizer deletes
    every character outside the regex class `keep`, e.g. "0-9 ": a text made only of deleted characters has no
    tokens under it. keep=None: no normalizer, every character but whitespace is read (control and format
    characters such as U+200B become [UNK], where BERT's own normalizer deletes them). Saved in `folder`
    (replacing any tokenizer files there)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL + tokens))}
    backend = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    if keep is not None:
        backend.normalizer = normalizers.Replace(Regex(f"[^{keep}]"), "")
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    for old in [*folder.glob("tokenizer*"), *folder.glob("vocab*"), *folder.glob("special_tokens*")]:
        old.unlink()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


def make_model(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0,
               positions: int = 128, vocab: list[str] | None = None) -> Path:
    """A random-weight BertForQuestionAnswering plus its tokenizer (the made-up vocabulary, or `vocab`), saved
    like a hub model directory."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    tok = make_tokenizer(folder) if vocab is None else make_bert_tokenizer(folder, vocab)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=positions)
    BertForQuestionAnswering(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_squad(path: Path, articles: int = 3, paragraphs: int = 2, questions: int = 4, seed: int = 0,
               context_words: tuple[int, int] = (20, 60)) -> Path:
    """Synthetic SQuAD 2.0 JSON: about a third of the questions unanswerable; answers are real spans."""
    rng = random.Random(seed)
    data = []
    for a in range(articles):
        paras = []
        for p in range(paragraphs):
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(*context_words))]
            context = " ".join(words) + "."
            qas = []
            for q in range(questions):
                qid = f"a{a}p{p}q{q}"
                question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + "?"
                if q % 3 == 2:
                    qas.append({"id": qid, "question": question, "answers": [], "is_impossible": True})
                    continue
                i = rng.randrange(len(words) - 3)
                n = rng.randint(1, 3)
                text = " ".join(words[i : i + n])
                start = len(" ".join(words[:i])) + (1 if i else 0)
                assert context[start : start + len(text)] == text
                qas.append({"id": qid, "question": question, "is_impossible": False,
                            "answers": [{"text": text, "answer_start": start}]})
            paras.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paras})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def write_params(path: Path, teacher: Path, student: Path, train: Path, dev: Path, **overrides) -> Path:
    """A params.yaml for a tiny, quick run; overrides as section__key=value."""
    import yaml

    params = {
        "data": {"train": str(train), "dev": str(dev)},
        "prepare": {"max_seq_len": 48, "doc_stride": 16, "max_query_len": 12, "shard_size": 16, "row_group_size": 8},
        # trust_remote_code, precision: dvc.yaml lists them, and DVC fails on a listed key that is missing.
        "teacher": {"model": str(teacher), "models": [], "batch_size": 8, "max_tokens_per_batch": 256, "trust_remote_code": False,
                    "precision": "auto"},
        "student": {"model": str(student), "batch_size": 4, "epochs": 2, "learning_rate": 1e-3, "warmup": 0.1,
                    "temperature": 2.0, "distillation_weight": 0.5, "seed": 1, "checkpoint_every": 0,
                    "log_every": 1, "num_workers": 0,
                    # the keys dvc.yaml lists for the align stage (null windows: the teacher's)
                    "max_seq_len": None, "doc_stride": None, "trust_remote_code": False},
        "evaluate": {"n_best": 5, "max_answer_len": 10, "null_threshold": 0.0, "batch_size": 16},
        # 16 dev questions: one answer changed by int8 moves F1 by whole points (the gate is tested on its own).
        "export": {"int8": True, "opset": 20, "max_f1_drop": 100.0},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params))
    return path


def set_params(run: Path, **changes) -> None:
    """Change keys of a run directory's params.yaml, given as section__key=value."""
    import yaml

    params = yaml.safe_load((run / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    (run / "params.yaml").write_text(yaml.safe_dump(params))


def strip_answers(path: Path, out: Path, id_prefix: str = "u-") -> Path:
    """The same questions with every answer removed (the shared unlabeled file's layout) and fresh ids."""
    doc = json.loads(path.read_text())
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["id"] = id_prefix + qa["id"]
                qa["answers"] = []
                qa.pop("is_impossible", None)
    out.write_text(json.dumps(doc))
    return out

