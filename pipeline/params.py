"""Every knob of the pipeline, one dataclass per `params.yaml` section.

Each stage reads only its own section (plus the few keys `dvc.yaml` lists for it), so DVC reruns exactly
the stages whose inputs changed. The defaults here are the values `params.yaml` ships with (a test keeps the
two equal): the reference configuration of deepset/bert-medium-squad2-distilled (batch 6, 2 epochs,
max_seq_len 384, lr 3e-5, T=5, weight 1) and the tuned batch, worker and checkpoint settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import EXTRA_SPLITS

log = logging.getLogger(__name__)

# The kinds of augmented views prepare can make (pipeline/text/augment.py makes them): context cut or reordered
# around the answer, another paragraph of the article, a distractor sentence.
AUGMENT_KINDS = ("sentences", "other_paragraph", "distractor")


@dataclass
class DataParams:
    # A path to a SQuAD-format JSON file, or a datasets-hub name: `squad_v2` (split train / validation) or
    # `squad_v2:SPLIT` with datasets' split syntax, e.g. `squad_v2:train[:2%]` for the first 2% of train.
    train: str = "squad_v2"
    dev: str = "squad_v2"
    # Question + context pairs only the teacher labels (their answers, if any, are ignored): SQuAD-format JSON
    # paths or hub names (split `train`, or `name:SPLIT`). Their rows form the `unlabeled` split (docs/extra-data.md).
    unlabeled: list[str] = field(default_factory=list)
    # Questions the no-answer threshold is chosen on (a path or hub name like `dev`; null: none). The student stage
    # picks the threshold that maximises F1 there (the official script's best_f1_thresh) and stores it with the
    # model (pipeline/model/answering.py); without it the threshold stays 0.0. Keep it apart from `dev`, or dev
    # scores are tuned on the questions they report.
    validation: str | None = None


@dataclass
class PrepareParams:
    max_seq_len: int = 384
    doc_stride: int = 128
    max_query_len: int = 64
    shard_size: int = 4000  # features per Parquet shard
    row_group_size: int = 2000
    strict: bool = False  # turn per-answer repairs/skips into errors
    # Augmented views of the training set, the `augmented` split (pipeline/text/augment.py): views per example
    # (0: none), the seed that makes them, and which kinds.
    augment_views: int = 0
    augment_seed: int = 0
    augment_kinds: list[str] = field(default_factory=lambda: list(AUGMENT_KINDS))


@dataclass
class TeacherParams:
    # The teacher, or (`models`) the teachers of an ensemble: each one's logits are computed once over the same
    # features (tokenized with the first teacher's tokenizer; a teacher of another tokenizer reads its own windows
    # and is carried onto them: pipeline/model/carried.py) and stored side by side; the student combines them
    # (student.teacher_weights, student.teacher_agreement). `model` is a list of one; give one of the two keys,
    # the other null / [] (`teachers` is the list either way).
    model: str | None = "deepset/bert-large-uncased-whole-word-masking-squad2"
    models: list[str] = field(default_factory=list)
    batch_size: int = 128  # upper bound on features per batch
    max_tokens_per_batch: int = 32768  # length-aware batches are capped by padded tokens too
    # Batch width rounded up to a multiple of this many tokens. Length-aware batches would otherwise bring a new
    # width almost every batch, and each new width costs kernel plans (cuDNN attention on CUDA) and, in bfloat16
    # on CPU, memory that stays (docs/faq.md). Like the batch sizes, it changes speed, not the logits' meaning.
    pad_to_multiple_of: int = 8
    nproc: int = 1  # processes under torchrun; not a dependency of the stage (output is identical)
    # auto = bfloat16 where the hardware computes it (CUDA, AVX512-BF16/AMX CPUs), else float32; or one of
    # bfloat16 | float16 | float32. Part of the logits' fingerprint.
    precision: str = "auto"
    trust_remote_code: bool = False

    @property
    def teachers(self) -> list[str]:
        """The teachers, in order: `models`, or `model` as a list of one (load_params ensures exactly one is set)."""
        return list(self.models) if self.models else [self.model]


@dataclass
class StudentParams:
    model: str = "prajjwal1/bert-medium"
    init_layers: list[int] | None = None  # build the student from these layers of `model` (DistilBERT-style)
    # The student's own windows (null: the teacher's, prepare.*). With them or a tokenizer other than the
    # teacher's, `kdqa align` carries the teacher's logits onto the student's features (pipeline/stages/align.py).
    max_seq_len: int | None = None
    doc_stride: int | None = None
    batch_size: int = 6  # per process
    epochs: int = 2
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup: float = 0.2  # proportion of steps with linear warmup, then linear decay
    max_grad_norm: float = 1.0
    temperature: float = 5.0
    distillation_weight: float = 1.0  # w in w*T^2*KL + (1-w)*CE; 0 is plain supervised fine-tuning
    dropout: float = 0.1  # hidden (and embeddings) dropout of the student
    # Dropout on the attention probabilities (null: the model's own, 0.1 in BERT).
    attention_dropout: float | None = None
    # auto: PyTorch's SDPA, except where a CPU training step has attention dropout: there kdqa's attention
    # (pipeline/model/attention.py) draws the dropout mask 16 bits per element instead of PyTorch's unfused fallback
    # (same function; its own random draws, probabilities in the step's precision where the fallback uses
    # float32). sdpa: PyTorch's SDPA everywhere.
    attention: str = "auto"
    # auto: a CPU training step draws the hidden and embeddings dropout masks as kdqa's attention draws its own,
    # 16 bits per element from 64-bit random words (pipeline/model/dropout.py: a third of the cost of PyTorch's
    # one draw per element; the probability rounded to 1/65536). torch: PyTorch's nn.Dropout.
    dropout_masks: str = "auto"
    # Keep only each layer's input during the forward pass and recompute the rest in the backward (the same
    # dropout masks, so the same results): less memory per training step for about a third more compute.
    # auto: on when training on a CPU, where the job's memory is the machine's RAM (a sixth less peak, which
    # is what keeps the whole job at half a peer's memory: docs/results.md), off on CUDA, where a small student
    # fits with room to spare and a third more compute is a third more time.
    gradient_checkpointing: bool | str = "auto"
    # Batch width rounded up to a multiple of this many tokens, 1 = exact. Few distinct shapes keep the training
    # process's memory flat: in bfloat16 oneDNN (CPU) keeps kernels per shape, and cuDNN (GPU) builds an
    # attention plan per shape, slow the first time. Rows in a length-grouped batch are alike in length, so the
    # extra padding is small (bench/performance.py measures steps and memory).
    pad_to_multiple_of: int = 32
    # Rows of similar length share a batch (random groups of rows sorted by length, batches in random order):
    # far less padding to compute on than random batches of SQuAD windows (bench/performance.py).
    group_by_length: bool = True
    # auto = bfloat16 autocast where the hardware computes it (CUDA, AVX512-BF16/AMX CPUs), else float32; or
    # bfloat16 | float16 (CUDA only: needs a gradient scaler) | float32. Weights and optimizer stay float32.
    precision: str = "auto"
    seed: int = 42
    max_steps: int | None = None  # optional cap on optimizer steps, for quick runs
    checkpoint_every: int = 2000  # steps between resumable checkpoints, plus one after the last step (0: none)
    log_every: int = 50
    eval_every: int = 0  # steps between dev F1 evaluations logged as a curve (0 disables)
    num_workers: int = 2  # DataLoader workers decoding shards off the training thread
    trust_remote_code: bool = False
    # Extra rows (teacher-labelled only: unlabeled data, augmented views) per labelled row in each epoch,
    # drawn as whole shards from the `extra_splits` that prepare made; 0: the labelled rows only. An epoch
    # is still one pass over the labelled rows: extra rows add steps.
    extra_ratio: float = 1.0
    extra_splits: list[str] = field(default_factory=lambda: list(EXTRA_SPLITS))
    # Several teachers (teacher.models): the one target each row trains on is the weighted mean of the teachers'
    # probabilities at `temperature` (pipeline/model/ensemble.py). Weights: one per teacher, in teacher.models'
    # order (null: equal). Agreement: none (every row counts fully), weight (each row's KD term weighs by how
    # much its teachers agree: 1 - their Jensen-Shannon divergence over its maximum), drop (rows whose teachers
    # disagree on whether the window holds an answer leave the KD term; their hard label still counts).
    teacher_weights: list[float] | None = None
    teacher_agreement: str = "none"


@dataclass
class EvaluateParams:
    n_best: int = 20
    max_answer_len: int = 30
    # Answer "" when null score - best span score exceeds this margin. auto: the threshold stored with the model
    # (chosen on data.validation by the student stage), else 0.0; a number forces that number.
    null_threshold: float | str = "auto"
    batch_size: int = 64


@dataclass
class ExportParams:
    int8: bool = True  # also write model-int8.onnx (dynamic quantisation); float32 model.onnx is always written
    opset: int = 20  # ONNX opset of the exported graph (torch's exporter implements 18 and up)
    max_f1_drop: float = 1.0  # the stage fails if the int8 model's dev F1 is this much below the PyTorch student's


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    student: StudentParams = field(default_factory=StudentParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)


# Allowed range of each numeric knob, inclusive (None: unbounded); below or above it a stage cannot run or
# would silently do something else. A third element True makes the lower bound exclusive.
_RANGES = {
    "prepare.max_seq_len": (8, None), "prepare.doc_stride": (1, None), "prepare.max_query_len": (1, None),
    "prepare.shard_size": (1, None), "prepare.row_group_size": (1, None),
    "prepare.augment_views": (0, None), "prepare.augment_seed": (0, None), "student.extra_ratio": (0, None),
    "teacher.batch_size": (1, None), "teacher.max_tokens_per_batch": (1, None), "teacher.nproc": (1, None),
    "teacher.pad_to_multiple_of": (1, None),
    "student.batch_size": (1, None), "student.epochs": (1, None), "student.learning_rate": (0, None, True),
    "student.weight_decay": (0, None), "student.warmup": (0, 1), "student.max_grad_norm": (0, None, True),
    "student.temperature": (0, None, True), "student.distillation_weight": (0, 1), "student.dropout": (0, 1),
    "student.attention_dropout": (0, 1),
    "student.max_steps": (1, None), "student.checkpoint_every": (0, None), "student.log_every": (0, None),
    "student.eval_every": (0, None), "student.num_workers": (0, None), "student.seed": (0, None),
    "student.pad_to_multiple_of": (1, None), "student.max_seq_len": (8, None), "student.doc_stride": (1, None),
    "evaluate.n_best": (1, None), "evaluate.max_answer_len": (1, None), "evaluate.batch_size": (1, None),
    "export.opset": (18, None), "export.max_f1_drop": (0, None),
}


_CHOICES = {"teacher.precision": ("auto", "bfloat16", "float16", "float32"),
            "student.precision": ("auto", "bfloat16", "float16", "float32"),
            "student.attention": ("auto", "sdpa"),
            "student.dropout_masks": ("auto", "torch"),
            "student.gradient_checkpointing": ("auto", True, False),
            "student.teacher_agreement": ("none", "weight", "drop")}
# Knobs that take `auto` or a number; knobs that take a path or hub name, or null.
_AUTO_OR_NUMBER = {"evaluate.null_threshold"}
_OPTIONAL_PATHS = {"data.validation"}
# Knobs that are lists of distinct strings, with the allowed values (None: any non-empty string).
_STRING_LISTS = {"data.unlabeled": None, "prepare.augment_kinds": AUGMENT_KINDS, "student.extra_splits": EXTRA_SPLITS,
                 "teacher.models": None}
# Keys whose null is meaningful although their default is not: teacher.model when teacher.models lists them.
_NULLABLE = {"teacher.model"}


def default_of(key: str):
    """The default of `section.name`, e.g. default_of("evaluate.n_best") == 20."""
    section, name = key.split(".")
    return getattr(getattr(Params(), section), name)


def check_setting(where, name: str, value, key: str | None = None) -> None:
    """Check one setting by the rules of the params.yaml key `key` (default: `name`), reporting it as `name`
    at `where`: the one validator of params.yaml and of the Python API (`QuestionAnswerer`'s arguments)."""
    key = key or name
    _check_value(where, name, value, default_of(key), rule=key)


def _check_value(path, key: str, value, default, rule: str | None = None) -> None:
    rule = rule or key  # the params key whose rules apply; `key` is the name the message gives
    if rule in _AUTO_OR_NUMBER and value is not None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value == "auto" or (number and math.isfinite(value)):
            return
        if not number:
            raise KdqaError(f"{path}: {key} must be auto or a number, got {value!r}")
        # a NaN or an infinity: the finite-number check below says so
    if rule in _OPTIONAL_PATHS and value is not None and not (isinstance(value, str) and value.strip()):
        raise KdqaError(f"{path}: {key} must be a SQuAD JSON path or hub name (or null), got {value!r}")
    if value is None and default is not None and rule not in _NULLABLE:
        raise KdqaError(f"{path}: {key} must be set (its default is {default!r}), got null")
    if isinstance(value, float) and not math.isfinite(value):
        # YAML's .nan/.inf pass every range comparison; a NaN learning rate or temperature trains a NaN model.
        raise KdqaError(f"{path}: {key} must be a finite number, got {value!r}")
    if rule in _CHOICES:
        # `is` for true/false: 1 == True, but `1` is not a yes/no answer
        if not any(value is c if isinstance(c, bool) else value == c and isinstance(value, str) for c in _CHOICES[rule]):
            choices = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in _CHOICES[rule])
            raise KdqaError(f"{path}: {key} must be one of {choices}, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str) and value is not None:
        raise KdqaError(f"{path}: {key} must be a string, got {value!r}")
    if rule in _STRING_LISTS:
        allowed = _STRING_LISTS[rule]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise KdqaError(f"{path}: {key} must be a list of {'names' if allowed else 'paths or hub names'}, "
                            f"got {value!r}")
        wrong = [v for v in value if allowed and v not in allowed]
        if wrong:
            raise KdqaError(f"{path}: {key}: unknown {wrong[0]!r} (known: {', '.join(allowed)})")
        twice = [v for i, v in enumerate(value) if v in value[:i]]
        if twice:
            raise KdqaError(f"{path}: {key} lists {twice[0]!r} twice")
    if rule == "student.teacher_weights" and value is not None:
        check_teacher_weights(path, value)
    if rule == "student.init_layers" and value is not None:
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise KdqaError(f"{path}: {key} must be a list of layer indices (or null), got {value!r}")
    if rule in _RANGES and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KdqaError(f"{path}: {key} must be a number, got {value!r}")
        if (isinstance(default, int) or default is None) and value != int(value):  # max_steps: default None
            raise KdqaError(f"{path}: {key} must be a whole number, got {value!r}")
        lo, hi, *exclusive = _RANGES[rule]
        too_low = value <= lo if exclusive and exclusive[0] else value < lo
        if too_low or (hi is not None and value > hi):
            bound = f"greater than {lo}" if exclusive and exclusive[0] else f"at least {lo}"
            raise KdqaError(f"{path}: {key} must be {bound}{f' and at most {hi}' if hi is not None else ''}, "
                            f"got {value!r}")


def check_teacher_weights(where, weights) -> None:
    """student.teacher_weights: finite numbers, none negative, not all zero (their count is checked against the
    teachers whose logits the student reads)."""
    key = "student.teacher_weights"
    if not isinstance(weights, list) or not weights or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise KdqaError(f"{where}: {key} must be a list of numbers, one per teacher (or null), got {weights!r}")
    bad = next((w for w in weights if not math.isfinite(w) or w < 0), None)
    if bad is not None:
        raise KdqaError(f"{where}: {key} must be finite and not negative, got {bad!r} in {weights!r}")
    if not any(weights):
        raise KdqaError(f"{where}: {key} are all zero: no teacher would teach; give at least one a positive weight")


def check_teachers(where, teacher: TeacherParams, given: dict) -> None:
    """Exactly one of teacher.model and teacher.models names the teachers (`given`: the section as written)."""
    if teacher.models and given.get("model") is not None:
        raise KdqaError(f"{where}: teacher.model ({given['model']!r}) and teacher.models are both set; list every "
                        "teacher in teacher.models and set teacher.model: null")
    if not teacher.models and teacher.model is None:
        raise KdqaError(f"{where}: no teacher: teacher.model is null and teacher.models is empty")


def check_window(where, max_seq_len: int, doc_stride: int, max_query_len: int, specials: int,
                 names: tuple[str, str, str] = ("prepare.max_seq_len", "prepare.doc_stride", "prepare.max_query_len"),
                 ) -> None:
    """A window must leave room for context beyond the overlap, even next to the longest allowed question:
    max_seq_len - max_query_len - special tokens > doc_stride. Otherwise the tokenizer cannot advance through
    a long context (the Rust tokenizer panics). `names`: what the caller calls the three settings."""
    seq_name, stride_name, query_name = names
    room = max_seq_len - max_query_len - specials
    if room <= doc_stride:
        raise KdqaError(
            f"{where}: {stride_name} ({doc_stride}) must be less than the context room of a window, "
            f"{seq_name} - {query_name} - {specials} special tokens = {room}; lower {stride_name} "
            f"or {query_name}, or raise {seq_name}")


def _build_section(cls, values: dict, path: Path, section: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KdqaError(f"{path}: unknown key(s) in section '{section}': {', '.join(unknown)}")
    obj = cls(**values)
    # Light type checks: YAML gives ints for "3" and floats for "3e-5" only with a dot, so coerce numbers.
    for name, f in known.items():
        value = getattr(obj, name)
        default = getattr(cls(), name)
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise KdqaError(f"{path}: {section}.{name} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool):
                raise KdqaError(f"{path}: {section}.{name} must be a number, got {value!r}")
            try:
                setattr(obj, name, type(default)(value))
            except (TypeError, ValueError, OverflowError):  # OverflowError: .inf for a whole number
                raise KdqaError(f"{path}: {section}.{name} must be a number, got {value!r}") from None
            if isinstance(default, int) and getattr(obj, name) != float(value):
                raise KdqaError(f"{path}: {section}.{name} must be a whole number, got {value!r}")
    for name in known:
        _check_value(path, f"{section}.{name}", getattr(obj, name), getattr(cls(), name))
    if cls is TeacherParams:
        check_teachers(path, obj, values)
        if obj.models and "model" not in values:
            obj.model = None  # the default teacher is not one of an ensemble the file lists
    if cls is StudentParams and obj.teacher_weights is not None:
        obj.teacher_weights = [float(w) for w in obj.teacher_weights]
    return obj


def load_params(path: str | Path = "params.yaml", sections: tuple[str, ...] = (), ws=None,
                required: bool | None = None) -> Params:
    """Read params.yaml; an unknown key is an error. A missing section, or a missing params.yaml (unless
    `required`; default: any other file name is), means the defaults: for each of `sections` (those the calling
    stage reads) that is missing, a warning says so and names the values used. `ws`: the workspace whose
    relative paths the local files and model folders named in the params are read under."""
    path = Path(path)
    if required is None:
        required = path.name != "params.yaml"
    if not path.exists():
        if required:
            raise KdqaError(f"{path}: params file not found")
        if sections:
            log.warning("%s not found: every setting is its default (the values of kdqa's own params.yaml); %s",
                        path, _defaults(sections))
        return Params()
    if path.is_dir():
        raise KdqaError(f"{path}: is a folder; --params takes a YAML file (e.g. params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise KdqaError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise KdqaError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise KdqaError(f"{path}: expected a mapping of sections at the top level")
    sections_known = {f.name: f for f in dataclasses.fields(Params)}
    built = {}
    for name, values in raw.items():
        if name not in sections_known:
            # Other tools (dvclive, your own stages) may keep their own sections here; a near-miss of one of
            # kdqa's names is a typo that would otherwise silently leave that section at its defaults.
            close = difflib.get_close_matches(str(name), list(sections_known), n=1, cutoff=0.8)
            if close:
                raise KdqaError(f"{path}: unknown section '{name}' (did you mean '{close[0]}'?)")
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise KdqaError(f"{path}: section '{name}' must be a mapping")
        built[name] = _build_section(sections_known[name].default_factory, values, path, name)
    missing = tuple(name for name in sections if name not in raw)
    if missing:
        log.warning("%s has no %s section%s: %s", path, ", ".join(f"'{m}'" for m in missing),
                    "s" if len(missing) > 1 else "", _defaults(missing))
    params = Params(**built)
    return params if ws is None else in_workspace(params, ws)


def in_workspace(params: Params, ws) -> Params:
    """The params with their local paths (SQuAD files, model folders) read under the workspace root."""
    data = dataclasses.replace(params.data, train=ws.local(params.data.train), dev=ws.local(params.data.dev),
                               unlabeled=[ws.local(u) for u in params.data.unlabeled],
                               validation=params.data.validation and ws.local(params.data.validation))
    return dataclasses.replace(params, data=data,
                               teacher=dataclasses.replace(params.teacher, model=ws.local(params.teacher.model),
                                                           models=[ws.local(m) for m in params.teacher.models]),
                               student=dataclasses.replace(params.student, model=ws.local(params.student.model)))


def _defaults(sections: tuple[str, ...]) -> str:
    """'using the defaults: prepare.max_seq_len=384, ...' for the given sections."""
    defaults = Params()
    values = [f"{name}.{key}={value!r}" for name in sections for key, value in vars(getattr(defaults, name)).items()]
    return "using the defaults " + ", ".join(values)
