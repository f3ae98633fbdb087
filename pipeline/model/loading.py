"""Loading QA models and tokenizers from a hub name or a local directory, with errors a user can act on.

Weights load through safetensors (`use_safetensors=True`) and remote code stays off unless params turn it
on, so loading a model never executes a pickle or code from the hub.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.hub import OFFLINE_HELP, is_offline, use_cache_only_if_unreachable
from pipeline.model.tokenizers import check_tokenizer_files, check_vocabulary, embedding_rows

log = logging.getLogger(__name__)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_local_dir(name: str, what: str) -> None:
    path = Path(name).expanduser()
    if not path.exists():
        raise KdqaError(f"{name}: {what} directory does not exist")
    if not path.is_dir():
        raise KdqaError(f"{name}: {what} must be a directory with config.json and weights")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = _looks_local(name)
    if local:
        _check_local_dir(name, "tokenizer")
        check_tokenizer_files(Path(name).expanduser(), name)
    else:
        use_cache_only_if_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise KdqaError(f"{name}: could not load tokenizer ({_first_line(exc)}){_hub_hint(name)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise KdqaError(f"{name}: kdqa needs a fast (Rust) tokenizer for offset mappings")
    check_vocabulary(tokenizer, name, embedding_rows(name) if local else None)
    return tokenizer


# What a model is for decides what a missing QA head means when it is loaded.
NEW_HEAD_ALLOWED = "new head allowed"  # a student's starting point: an encoder gets a fresh start/end head
TRAINED = "trained"  # a teacher, or a model to evaluate, export or serve: its head must come from its weights


def load_qa_model(name: str, trust_remote_code: bool = False, purpose: str = NEW_HEAD_ALLOWED, **config_overrides):
    """An extractive QA model (encoder + start/end head).

    purpose NEW_HEAD_ALLOWED: a bare encoder gets a freshly initialised head (said once, in the log).
    purpose TRAINED: every tensor must come from the weights; a head that transformers had to initialise at
    random is refused, since its answers and logits would be noise. Either way weights that are not finite
    (NaN or infinite: a diverged run) are refused."""
    from transformers import AutoModelForQuestionAnswering

    if _looks_local(name):
        _check_local_dir(name, "model")
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise KdqaError(f"{name}: model directory has no config.json")
        if not list(path.glob("*.safetensors")):
            raise KdqaError(f"{name}: model directory has no safetensors weights (*.safetensors)")
    else:
        use_cache_only_if_unreachable()
    try:
        model, info = AutoModelForQuestionAnswering.from_pretrained(
            name,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
            output_loading_info=True,
            **config_overrides,
        )
    except Exception as exc:
        raise KdqaError(f"{name}: could not load model ({_first_line(exc)}){_hub_hint(name)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing and purpose == TRAINED:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise KdqaError(f"{name}: not a trained extractive QA model: its weights lack {shown}, which transformers "
                        "would initialise at random. A teacher (and a model to evaluate, export or serve) must be "
                        "fine-tuned for extractive QA, with its start/end head (qa_outputs) saved; a plain "
                        "pretrained encoder can only be a student's starting point")
    if missing:
        head = [key for key in missing if key.split(".")[0] in _HEAD_NAMES]
        other = [key for key in missing if key not in head]
        if head:
            log.info("%s: no QA head in its weights (%s): the student starts from the encoder with a new head",
                     name, ", ".join(head))
        if other:
            log.warning("%s: %d weights missing from the checkpoint, initialised at random: %s", name, len(other),
                        ", ".join(other[:6]))
    check_finite_weights(model, name)
    return model


# The start/end head's module name in transformers' QA models (BERT, RoBERTa, ELECTRA, DistilBERT, ...).
_HEAD_NAMES = ("qa_outputs",)


def check_finite_weights(model, name: str, consequence: str = "") -> None:
    """Refuse a model with a NaN or infinite weight: what a diverged training run leaves. Its answers would all
    be "no answer" and would score like a cautious model."""
    import torch

    for tensor_name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise KdqaError(f"{name}: weights are not finite ({tensor_name} has {bad} NaN or infinite values of "
                            f"{tensor.numel()}): a diverged training run{'; ' + consequence if consequence else ''}"
                            f"{'' if consequence else '; retrain it (lower student.learning_rate)'}")


def check_sequence_length(model, max_seq_len: int, name: str) -> None:
    """Features longer than the model's position table would crash mid-run (or read garbage): refuse now."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_len > limit:
        raise KdqaError(f"{name}: reads at most {limit} tokens, but data/features was prepared with "
                        f"prepare.max_seq_len {max_seq_len}; lower it and run `kdqa prepare` again")


def check_position_table(name: str, max_seq_len: int, trust_remote_code: bool = False,
                         key: str = "prepare.max_seq_len") -> None:
    """Before features are written: `max_seq_len` (params `key`) must fit the model's position table (its config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:
        return  # no readable config: the teacher stage, which loads the model, reports it
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_len > limit:
        raise KdqaError(f"params: {key} {max_seq_len} is longer than {name} reads ({limit} positions); "
                        f"lower {key} to at most {limit}")


def vocab_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's vocabulary: student and teacher must agree on it token for token."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for token, index in vocab:
        h.update(f"{index}\t{token}\n".encode())
    h.update(f"lower={getattr(tokenizer, 'do_lower_case', None)}".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """Hash of a model's parameters (names, shapes and values): the identity of the teacher."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return h.hexdigest()[:16]


def _byte_dtype():
    import torch

    return torch.uint8


def keep_layers(model, layers: list[int]):
    """Shrink a BERT-family model to a subset of its encoder layers, in the given order (DistilBERT-style)."""
    import torch

    base = getattr(model, model.base_model_prefix, None)
    encoder = getattr(base, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise KdqaError(f"{model.config.name_or_path}: student.init_layers needs a BERT-style encoder.layer list")
    n = len(encoder.layer)
    bad = [i for i in layers if not (0 <= i < n)]
    if bad or not layers:
        raise KdqaError(f"student.init_layers {layers}: layer indices must lie in 0..{n - 1}")
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    # Keep per-layer bookkeeping (attention layer index for caches) consistent with the new positions.
    for new_index, layer in enumerate(encoder.layer):
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    return model


def _hub_hint(name: str) -> str:
    # A name that is not a local path was looked up on the hub: say so, since a mistyped directory lands here.
    if _looks_local(name):
        return ""
    if is_offline():
        return f"; there is no local directory {name!r} either, and {OFFLINE_HELP}"
    return f"; there is no local directory {name!r} either"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
