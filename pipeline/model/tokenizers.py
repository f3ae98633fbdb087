"""Is this tokenizer the model's real one? Checked before any stage tokenizes, trains or scores with it.

A model folder with only `config.json` + `*.safetensors` still "loads" a tokenizer: transformers builds one
from the config with nothing but the special tokens, so every word becomes [UNK] and every stage runs to
the end on garbage. Comparing vocabularies between stages cannot catch it (the broken tokenizer matches
itself), so each tokenizer is checked on its own: its files are there, it knows ordinary tokens, and its
size fits the model's embedding table.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.runtime.errors import KdqaError

# Files that carry a vocabulary (fast tokenizer, WordPiece, BPE, SentencePiece); one of them must be there.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model")
# A real tokenizer may have fewer entries than the embedding table (tables are often padded to a multiple of
# 64 or 128, or keep unused rows), but never this much fewer.
MIN_SHARE_OF_EMBEDDINGS = 0.5


def check_tokenizer_files(folder: Path, name: str) -> None:
    """A local model folder must hold the tokenizer's own files, not just the weights."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise KdqaError(f"{name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): transformers would "
                        "build a stand-in that knows only the special tokens and reads every word as [UNK]; copy "
                        "the model's tokenizer files into this folder (tokenizer.save_pretrained(folder))")


def embedding_rows(name: str) -> int | None:
    """`vocab_size` from a local folder's config.json (the rows of its embedding table), if it says."""
    config = Path(name).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_vocabulary(tokenizer, name: str, rows: int | None) -> None:
    """The tokenizer knows ordinary tokens, and its ids fit the model's embedding table (`rows`, if known)."""
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    if not [token for token in vocab if token not in specials]:
        raise KdqaError(f"{name}: the tokenizer knows only its {len(vocab)} special tokens, so every word would "
                        "be [UNK]; copy the model's real tokenizer files into this folder")
    size = len(tokenizer)
    if rows is not None and size < MIN_SHARE_OF_EMBEDDINGS * rows:
        raise KdqaError(f"{name}: the tokenizer knows {size} tokens but the model's embedding table has {rows} "
                        "rows: these tokenizer files do not belong to this model")
    if rows is not None and size > rows:
        raise KdqaError(f"{name}: the tokenizer knows {size} tokens but the model's embedding table has only "
                        f"{rows} rows (token ids past it would crash the model); use the model's own tokenizer "
                        "or resize its embeddings")
