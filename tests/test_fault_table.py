"""Issue 16: bad input and faults, one row each, every stage and command held to the same rules.

Each row breaks a private copy of a finished tiny workspace (prepare, teacher, student, evaluate all done)
in one way, runs one command in-process, and checks:

- the exit code; for 1 exactly one `kdqa: error:` line, holding every fragment of the row; never a traceback;
- no partial output: every file the workspace held is byte-identical afterwards and no new file appears,
  except under the row's `keeps` (work kept on purpose so that a rerun resumes: the teacher's work folder,
  the student's checkpoint); no staging folder, temporary file or write probe is left anywhere.

Rows that exit 0 (a stale lock taken over, stale staging cleaned, a warning) check the fragments in stderr
and the absence of leftovers. Disk-full and read-only folders are simulated (tests run as root, for whom
chmod does not bite): the writer or the probe is patched to raise the OSError a full or read-only disk gives.
A new stage or command gets its rows here.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import tiny
from reliability_kit import STUDENT as RELIABILITY_STUDENT
from reliability_kit import World, clone, disk_full_error, failing_on_call, get_world, kdqa, write_params

STUDENT = {**RELIABILITY_STUDENT, "student__checkpoint_every": 5}
LEFTOVER_MARKS = (".partial", ".tmp-", ".kdqa-write-probe")


@dataclass
class Ctx:
    ws: Path
    world: World
    mp: pytest.MonkeyPatch
    stack: contextlib.ExitStack
    tmp: Path
    values: dict = field(default_factory=dict)  # filled in by setups, for the fragments ({pid}, {model}...)


@dataclass(frozen=True)
class Row:
    name: str
    args: tuple[str, ...]
    setup: Callable[[Ctx], None] | None
    fragments: tuple[str, ...]
    exit_code: int = 1
    keeps: tuple[str, ...] = ()  # path prefixes where work may be kept (changed or added)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    """The world's workspace with the student trained and evaluated: every output there to be kept intact."""
    ws = clone(world, tmp_path_factory.mktemp("finished") / "ws")
    write_params(world, ws, **STUDENT)
    for stage in ("student", "evaluate"):
        result = kdqa(ws, "-q", stage)
        assert result.exit_code == 0, result.output
    assert not list((ws / "checkpoints").glob("student*"))
    return ws


# ---------------------------------------------------------------------------------------------------------
# Ways to break things
# ---------------------------------------------------------------------------------------------------------

def fail_with(code: int):
    def raise_it(*_a, **_k):
        raise OSError(code, os.strerror(code))
    return raise_it


def patch_params(**overrides):
    def setup(c: Ctx):
        write_params(c.world, c.ws, **{**STUDENT, **overrides})
    return setup


def parquet_write_fails(code: int, where: str, nth: int = 1):
    """pyarrow's write of the `nth` Parquet file whose path contains `where` fails with `code`."""
    def setup(c: Ctx):
        import pyarrow.parquet as pq

        original, seen = pq.write_table, []

        def write_table(table, path, *a, **k):
            if where in str(path):
                seen.append(path)
                if len(seen) == nth:
                    fail_with(code)()
            return original(table, path, *a, **k)
        c.mp.setattr(pq, "write_table", write_table)
    return setup


def json_write_fails(code: int, name: str):
    """Writing the JSON file called `name` fails with `code` (as a full disk does, inside the write)."""
    def setup(c: Ctx):
        original = json.dump

        def dump(obj, f, *a, **k):
            if Path(getattr(f, "name", "")).name.startswith(f".{name}.tmp-"):
                f.write("{")  # a few bytes made it to disk
                fail_with(code)()
            return original(obj, f, *a, **k)
        c.mp.setattr(json, "dump", dump)
    return setup


def read_only(folder: str, code: int = errno.EROFS):
    """The write probe in `folder` (or a folder above it) fails: a read-only or forbidden folder."""
    def setup(c: Ctx):
        import tempfile

        original = tempfile.mkstemp
        target = (c.ws / folder).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)  # e.g. a read-only checkpoints/ mount point

        def mkstemp(*a, dir=None, **k):
            if dir is not None and (Path(dir).resolve() == target or target.is_relative_to(Path(dir).resolve())
                                    and Path(dir).resolve() != c.ws.resolve()):
                fail_with(code)()
            return original(*a, dir=dir, **k)
        c.mp.setattr(tempfile, "mkstemp", mkstemp)
    return setup


def little_free_space(c: Ctx):
    usage = collections.namedtuple("usage", "total used free")
    c.mp.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))


def drop_teacher_logits(c: Ctx):
    shutil.rmtree(c.ws / "data/teacher")


def then(*setups):
    def setup(c: Ctx):
        for s in setups:
            s(c)
    return setup


def model_without_tokenizer(role: str):
    """`role` ("teacher", "student") as config.json + safetensors only, like the README's offline example."""
    def setup(c: Ctx):
        source = c.world.teacher if role == "teacher" else c.world.student
        bare = c.tmp / f"{role}-bare"
        shutil.copytree(source, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special_tokens*"))
        c.values["model"] = str(bare)
        if role in ("teacher", "student"):
            write_params(c.world, c.ws, **{**STUDENT, f"{role}__model": str(bare)})
    return setup


def teacher_with_tokenizer(vocab: list[str]):
    """The teacher's weights with a tokenizer of the given vocabulary, its files all present."""
    def setup(c: Ctx):
        from transformers import BertTokenizerFast

        folder = c.tmp / "teacher-other-tokenizer"
        shutil.copytree(c.world.teacher, folder,
                        ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special_tokens*"))
        BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
        c.values["model"] = str(folder)
        write_params(c.world, c.ws, **{**STUDENT, "teacher__model": str(folder)})
    return setup


def too_many_tokens(c: Ctx):
    vocab = (c.world.teacher / "vocab.txt").read_text().split()
    teacher_with_tokenizer(vocab + [f"extra{i}" for i in range(5)])(c)


def lock_held(stage: str):
    def setup(c: Ctx):
        from pipeline.runtime.locks import stage_lock
        from pipeline.runtime.workspace import Workspace

        c.stack.enter_context(stage_lock(stage, Workspace(c.ws)))
        c.values["pid"] = str(os.getpid())
    return setup


def stale_lock(stage: str):
    def setup(c: Ctx):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        lock = c.ws / ".kdqa/locks" / f"{stage}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"pid": int(dead), "host": "vm", "started": "then", "stage": stage}))
        c.values["pid"] = dead
    return setup


def stale_staging(*paths: str):
    def setup(c: Ctx):
        for p in paths:
            (c.ws / p).mkdir(parents=True)
            (c.ws / p / "part-00000.parquet").write_bytes(b"truncated")
        (c.ws / paths[0]).parent.joinpath(".manifest.json.tmp-999999").write_text("{")  # a dead run's temporary
    return setup


def contradictory_labels(c: Ctx):
    doc = json.loads(c.world.train.read_text())
    qa = next(qa for p in doc["data"][0]["paragraphs"] for qa in p["qas"] if qa["answers"])
    qa["is_impossible"] = True
    (c.ws / "train.json").write_text(json.dumps(doc))
    write_params(c.world, c.ws, **STUDENT, data__train=str(c.ws / "train.json"))
    c.values["id"] = qa["id"]


def zero_width_context(c: Ctx):
    doc = json.loads(c.world.dev.read_text())
    doc["data"][0]["paragraphs"][1]["context"] = "\u200b\u200b"
    (c.ws / "dev.json").write_text(json.dumps(doc))
    write_params(c.world, c.ws, **STUDENT, data__dev=str(c.ws / "dev.json"))
    c.values["id"] = doc["data"][0]["paragraphs"][1]["qas"][0]["id"]


def stale_dev_logits(c: Ctx):
    """Dev data changed and prepare reran, the teacher did not (what issue 16 case 3 saw)."""
    write_params(c.world, c.ws, **STUDENT, prepare__doc_stride=12)
    assert kdqa(c.ws, "-q", "prepare").exit_code == 0


def params_text(text: str):
    def setup(c: Ctx):
        (c.ws / "params.yaml").write_text(text)
    return setup


def without_section(section: str):
    def setup(c: Ctx):
        import yaml

        params = yaml.safe_load((c.ws / "params.yaml").read_text())
        del params[section]
        (c.ws / "params.yaml").write_text(yaml.safe_dump(params))
    return setup


def unreadable_params(c: Ctx):
    original = Path.read_text

    def read_text(self, *a, **k):
        if self.name == "params.yaml":
            fail_with(errno.EACCES)()
        return original(self, *a, **k)
    c.mp.setattr(Path, "read_text", read_text)


def nth_call_fails(module: str, name: str, n: int, error=disk_full_error):
    """The n-th call of `module.name` raises `error()` (a full disk, or Ctrl-C)."""
    def setup(c: Ctx):
        import importlib

        owner = importlib.import_module(module)
        c.mp.setattr(owner, name, failing_on_call(n, getattr(owner, name), error))
    return setup


def curve_append_fails(code: int):
    def setup(c: Ctx):
        original = Path.open

        def open_(self, mode="r", *a, **k):
            if self.suffix == ".tsv" and mode == "a":
                fail_with(code)()
            return original(self, mode, *a, **k)
        c.mp.setattr(Path, "open", open_)
    return setup


def model_save_fails(message_style: str):
    def setup(c: Ctx):
        from transformers import PreTrainedModel

        def save_pretrained(*_a, **_k):
            if message_style == "rust":  # how safetensors reports it: no errno, "(os error 28)" in the text
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            fail_with(errno.ENOSPC)()
        c.mp.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    return setup


def publish_copy_fails(c: Ctx):
    original = shutil.copy2

    def copy2(src, dst, *a, **k):
        if ".train.partial" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return original(src, dst, *a, **k)
    c.mp.setattr(shutil, "copy2", copy2)


def damage(relative: str):
    def setup(c: Ctx):
        path = c.ws / relative
        path.write_bytes(path.read_bytes()[:100])
    return setup


def remove(relative: str):
    def setup(c: Ctx):
        shutil.rmtree(c.ws / relative)
    return setup


def stored_threshold(text: str):
    """models/student/kdqa_answering.json (the no-answer threshold chosen on validation) holding `text`."""
    def setup(c: Ctx):
        (c.ws / "models/student/kdqa_answering.json").write_text(text)
    return setup


def validation_file(text: str):
    """data.validation naming a file that holds `text`."""
    def setup(c: Ctx):
        (c.ws / "validation.json").write_text(text)
        write_params(c.world, c.ws, **STUDENT, data__validation=str(c.ws / "validation.json"))
    return setup


# --- Reliability 3 ---

def nan_weights(folder: Path) -> None:
    """What a diverged run saved: every tensor of the model NaN (the safetensors file rewritten in place)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(str(path))
    save_file({k: v.float().fill_(float("nan")).to(v.dtype) if v.is_floating_point() else v
               for k, v in weights.items()}, str(path), metadata={"format": "pt"})


def diverged_student_model(c: Ctx):
    nan_weights(c.ws / "models/student")


def nan_model_elsewhere(c: Ctx):
    folder = c.tmp / "nan-model"
    shutil.copytree(c.ws / "models/student", folder)
    nan_weights(folder)
    c.values["model"] = str(folder)


def headless(role: str, plain_encoder: bool = False):
    """`role`'s model without its QA head: the qa_outputs tensors dropped, or (plain_encoder) a bare BertModel
    saved from the same config, as a pretrained encoder from a hub comes."""
    def setup(c: Ctx):
        from safetensors.torch import load_file, save_file

        source = c.world.teacher if role == "teacher" else c.world.student
        folder = c.tmp / f"{role}-headless"
        shutil.copytree(source, folder)
        if plain_encoder:
            from transformers import BertModel

            BertModel.from_pretrained(str(source)).save_pretrained(folder, safe_serialization=True)
        else:
            weights = load_file(str(folder / "model.safetensors"))
            save_file({k: v for k, v in weights.items() if not k.startswith("qa_outputs")},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
        c.values["model"] = str(folder)
        write_params(c.world, c.ws, **{**STUDENT, f"{role}__model": str(folder)})
        if role == "teacher":
            shutil.rmtree(c.ws / "data/teacher")
    return setup


def data_with_text(split: str, where: str, text: str):
    """data.`split` with `text` put into the first question's `where` (context, question, answer, title, id)."""
    def setup(c: Ctx):
        doc = json.loads((c.world.train if split == "train" else c.world.dev).read_text())
        article = doc["data"][0]
        paragraph = article["paragraphs"][0]
        qa = next(qa for qa in paragraph["qas"] if qa["answers"])
        if where == "context":
            paragraph["context"] = paragraph["context"] + text
        elif where == "question":
            qa["question"] += text
        elif where == "answer":
            qa["answers"][0]["text"] += text
        elif where == "title":
            article["title"] += text
        path = c.ws / f"{split}-text.json"
        path.write_text(json.dumps(doc))  # json escapes a lone surrogate as \\ud83d: valid JSON
        write_params(c.world, c.ws, **STUDENT, **{f"data__{split}": str(path)})
        c.values["id"] = paragraph["qas"][0]["id"] if where in ("context", "title") else qa["id"]
    return setup


def folder_lock_held(stage: str):
    """A running `stage`: its stage lock and its folder locks held by this process."""
    def setup(c: Ctx):
        from pipeline.runtime.locks import folder_locks, stage_lock
        from pipeline.runtime.workspace import Workspace
        from pipeline.stage_table import STAGES, lock_folders

        ws = Workspace(c.ws)
        reads, writes = lock_folders(STAGES[stage])
        c.stack.enter_context(stage_lock(stage, ws))
        c.stack.enter_context(folder_locks(reads, writes, stage, ws))
        c.values["pid"] = str(os.getpid())
    return setup


def jsonl_file(*lines: str):
    def setup(c: Ctx):
        path = c.tmp / "questions.jsonl"
        path.write_text("\n".join(lines) + "\n")
        c.values["jsonl"] = str(path)
    return setup


def another_teacher(c: Ctx, name: str = "teacher-2", **model) -> Path:
    """A second tiny teacher (the world's vocabulary unless `vocab`), another seed; `model`: tiny.make_model's."""
    return tiny.make_model(c.tmp / name, **{"layers": 2, "seed": 3, **model})


def ensemble_params(teacher_model=None, **model):
    """teacher.models: the world's teacher and another one (`model`: how that one differs)."""
    def setup(c: Ctx):
        second = another_teacher(c, **model)
        c.values["model"] = str(second)
        write_params(c.world, c.ws, **{**STUDENT, "teacher__model": teacher_model,
                                       "teacher__models": [str(c.world.teacher), str(second)]})
    return setup


def second_teacher_with_a_slow_tokenizer(c: Ctx):
    """A second teacher of another tokenizer, loaded as a slow (Python) tokenizer: no character offsets."""
    import transformers

    ensemble_params(vocab=tiny.CHARACTER_VOCAB)(c)
    slow = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # v5 | v4 name
    original = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(name, *a, **k):
        if str(name) == c.values["model"]:
            return slow(vocab_file=str(Path(name) / "vocab.txt"))
        return original(name, *a, **k)
    c.mp.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)


def second_teacher_reading_only_digits(c: Ctx):
    """A second teacher whose tokenizer deletes every character but digits and spaces: the data's contexts (words)
    have no tokens under it."""
    ensemble_params(vocab=tiny.CHARACTER_VOCAB)(c)
    tiny.make_stripping_tokenizer(Path(c.values["model"]), tiny.CHARACTER_VOCAB, keep="0-9 ")


def same_teacher_twice(c: Ctx):
    copy = c.tmp / "teacher-copy"
    shutil.copytree(c.world.teacher, copy)
    c.values["model"] = str(copy)
    write_params(c.world, c.ws, **{**STUDENT, "teacher__model": None,
                                   "teacher__models": [str(c.world.teacher), str(copy)]})


def ensemble_logits(**student):
    """data/teacher of two teachers (the teacher stage run in the setup), then the student's `student` params."""
    def setup(c: Ctx):
        ensemble_params()(c)
        assert kdqa(c.ws, "-q", "teacher").exit_code == 0
        write_params(c.world, c.ws, **{**STUDENT, "teacher__model": None,
                                       "teacher__models": [str(c.world.teacher), c.values["model"]], **student})
    return setup


def hub_name(**overrides):
    return patch_params(**overrides)


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------

ENOSPC, EROFS, EACCES, EDQUOT = (os.strerror(e) for e in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT))
TEACHER_WORK, CHECKPOINTS = ".kdqa/teacher-work", "checkpoints/"
LOGITS_CACHE = ".kdqa/teacher-cache"  # every computed logits shard is kept there too, on purpose
CTX = "The tower was built by Alice in the old city."

ROWS = [
    # --- case 1: a model folder whose tokenizer is not the model's ---
    Row("prepare: teacher folder without tokenizer files", ("prepare",), model_without_tokenizer("teacher"),
        ("{model}", "no tokenizer files", "tokenizer.save_pretrained")),
    Row("teacher: teacher folder without tokenizer files", ("teacher",),
        then(drop_teacher_logits, model_without_tokenizer("teacher")), ("{model}", "no tokenizer files")),
    Row("student: student folder without tokenizer files", ("student",), model_without_tokenizer("student"),
        ("{model}", "no tokenizer files")),
    Row("evaluate --model: folder without tokenizer files", ("evaluate", "--model", "{model}"),
        model_without_tokenizer("bare"), ("{model}", "no tokenizer files")),
    Row("predict --model: folder without tokenizer files", ("predict", "--model", "{model}", "--question", "who?",
                                                           "--context", CTX),
        model_without_tokenizer("bare"), ("{model}", "no tokenizer files")),
    Row("prepare: tokenizer with only special tokens", ("prepare",),
        teacher_with_tokenizer(tiny.SPECIAL), ("{model}", "knows only its 5 special tokens")),
    Row("prepare: tokenizer larger than the embedding table", ("prepare",), too_many_tokens,
        ("{model}", "embedding table has only", "rows")),
    # --- case 2: write failures, unwritable folders, full disks ---
    Row("prepare: disk full writing a features shard", ("prepare",), parquet_write_fails(errno.ENOSPC, "features"),
        ("data/features/", ENOSPC, "free some space", "completed work is kept")),
    Row("prepare: quota exceeded writing report.json", ("prepare",), json_write_fails(errno.EDQUOT, "report.json"),
        ("data/features/report.json", EDQUOT, "quota")),
    Row("prepare: data/features read-only", ("prepare",), read_only("data/features"),
        ("data/features", EROFS, "writable folder", "nothing was done yet")),
    Row("prepare: not enough free space", ("prepare",), little_free_space,
        ("data/features", "free on this disk", "larger disk")),
    Row("teacher: disk full writing a logits shard", ("teacher",),
        then(drop_teacher_logits, parquet_write_fails(errno.ENOSPC, "teacher-work", nth=3)),
        (".kdqa/teacher-work/train/part-00002.parquet", ENOSPC), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: quota exceeded writing a done record", ("teacher",),
        then(drop_teacher_logits, json_write_fails(errno.EDQUOT, "part-00001.parquet.done.json")),
        ("part-00001.parquet.done.json", EDQUOT), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: disk full while publishing", ("teacher",), then(drop_teacher_logits, publish_copy_fails),
        ("data/teacher/train", ENOSPC), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: data/teacher not writable", ("teacher",), read_only("data/teacher", errno.EACCES),
        ("data/teacher", EACCES, "permissions")),
    Row("teacher: not enough free space", ("teacher",), then(drop_teacher_logits, little_free_space),
        ("free on this disk", ".kdqa/teacher-work")),
    Row("student: models/ read-only, found before training", ("student",), read_only("models/student"),
        ("models/student", EROFS, "nothing was done yet")),
    Row("student: checkpoints/ not writable", ("student",), read_only("checkpoints/student", errno.EACCES),
        ("checkpoints/student", EACCES)),
    Row("student: logs/ read-only", ("student",), read_only("logs/student"), ("logs/student", EROFS)),
    Row("student: not enough free space", ("student",), little_free_space,
        ("models/student", "checkpoints/student", "free on this disk")),
    Row("student: disk full saving the model keeps a final checkpoint", ("student",), model_save_fails("os"),
        ("models/student", ENOSPC, "completed work is kept"), keeps=(CHECKPOINTS,)),
    Row("student: disk full, reported the safetensors way", ("student",), model_save_fails("rust"),
        ("models/student", ENOSPC), keeps=(CHECKPOINTS,)),
    Row("student: disk full writing a checkpoint keeps the previous one", ("student",), nth_call_fails("pipeline.training.checkpoint", "save_file", 2),
        ("checkpoints/student", ENOSPC), keeps=(CHECKPOINTS,)),
    Row("student: disk full appending to the curve", ("student",), curve_append_fails(errno.ENOSPC),
        ("logs/student/train.tsv", ENOSPC)),
    Row("evaluate: metrics/ read-only", ("evaluate",), read_only("metrics"), ("metrics", EROFS)),
    Row("evaluate: disk full writing predictions", ("evaluate",), json_write_fails(errno.ENOSPC, "predictions.json"),
        ("results/predictions.json", ENOSPC)),
    Row("evaluate: disk full writing metrics leaves results as they were", ("evaluate",),
        json_write_fails(errno.ENOSPC, "eval.json"), ("metrics/eval.json", ENOSPC)),
    Row("teacher: stale staging and temporaries are cleaned", ("teacher",),
        stale_staging("data/teacher/.dev.partial", "data/teacher/.train.partial"), ("shards to compute",),
        exit_code=0),
    Row("student: stale model staging and checkpoint staging are cleaned", ("student",),
        stale_staging("models/.student.partial", "checkpoints/.student.partial"), ("saved student",), exit_code=0),
    # --- case 3: stored logits or a model that do not belong to the features ---
    Row("evaluate: teacher dev logits of other features", ("evaluate",), stale_dev_logits,
        ("data/teacher/dev", "teacher logits were computed for features", "kdqa teacher"), keeps=()),
    Row("evaluate --model: other vocabulary than the features", ("evaluate", "--model", "{model}"),
        lambda c: c.values.update(model=str(c.world.student_other_vocab)),
        ("{model}", "tokenizer differs from the one", "data/features/dev was prepared with")),
    Row("student: teacher logits of other features", ("student",),
        lambda c: _rewrite_json(c.ws / "data/teacher/train/manifest.json",
                                lambda m: m["fingerprint_parts"].update(features="0123456789abcdef")),
        ("data/teacher/train", "0123456789abcdef", "kdqa teacher")),
    # --- case 4: predict with nothing to read ---
    Row("predict: empty context", ("predict", "--model", "{student}", "--question", "who?", "--context", ""),
        None, ("cannot answer", "the context is empty")),
    Row("predict: blank context", ("predict", "--model", "{student}", "--question", "who?", "--context", " \n\t"),
        None, ("the context is empty",)),
    Row("predict: zero-width context", ("predict", "--model", "{student}", "--question", "who?",
                                       "--context", "\u200b"), None, ("the context is empty",)),
    Row("predict: blank question", ("predict", "--model", "{student}", "--question", "  ", "--context", CTX),
        None, ("the question is empty",)),
    # --- case 5 ---
    Row("prepare: max_seq_len past the teacher's positions", ("prepare",), patch_params(prepare__max_seq_len=200),
        ("prepare.max_seq_len 200", "128 positions")),
    # --- case 6: one run of a stage per folder ---
    *[Row(f"{stage}: lock held by a running {stage}", (stage,), lock_held(stage),
          (f".kdqa/locks/{stage}.lock", f"`kdqa {stage}` is already running in this folder", "pid {pid}"))
      for stage in ("prepare", "teacher", "student", "evaluate", "export")],
    Row("teacher: lock of a dead run is taken over", ("teacher",), stale_lock("teacher"),
        ("taking over the lock of pid {pid}", "shards to compute"), exit_code=0),
    # --- case 7 ---
    Row("prepare --strict: is_impossible with answers", ("prepare", "--strict"), contradictory_labels,
        ("train.json", "(id {id})", "is_impossible is true but it has 1 answer(s)")),
    Row("prepare: is_impossible with answers counted", ("prepare",), contradictory_labels,
        ("1 marked impossible despite answers",), exit_code=0),
    # --- case 8: a failed or interrupted student keeps the previous run's curves ---
    Row("student: interrupted keeps the previous curves", ("student",), nth_call_fails("pipeline.training.step", "distillation_loss", 7, KeyboardInterrupt),
        ("interrupted",), exit_code=130, keeps=(CHECKPOINTS,)),
    # --- case 9: params ---
    Row("--params at a folder", ("--params", "data", "prepare"), None, ("data: is a folder",)),
    Row("params.yaml unreadable", ("prepare",), unreadable_params, ("params.yaml: cannot read", EACCES)),
    Row("params.yaml without 'prepare': a warning naming the defaults", ("prepare",), without_section("prepare"),
        ("has no 'prepare' section", "prepare.max_seq_len=384", "prepare.max_seq_len 384 is longer")),
    Row("params.yaml without 'evaluate': a warning, then the run", ("evaluate",), without_section("evaluate"),
        ("has no 'evaluate' section", "evaluate.n_best=20"), exit_code=0),
    # --- case 10: hub names without hub access (tests run with HF_HUB_OFFLINE=1) ---
    Row("prepare: teacher.model a hub name, no hub", ("prepare",),
        hub_name(teacher__model="someone/not-downloaded-model"),
        ("someone/not-downloaded-model", "teacher.model", "data.train", "An offline example")),
    Row("prepare: data.train a hub name, no hub", ("prepare",), hub_name(data__train="squad_v2"),
        ("squad_v2", "datasets hub", "data.train", "An offline example")),
    Row("predict --model: a hub name, no hub", ("predict", "--model", "someone/not-downloaded-model",
                                                 "--question", "who?", "--context", CTX),
        None, ("someone/not-downloaded-model", "An offline example")),
    # --- other missing or damaged inputs ---
    Row("prepare: a context with only zero-width characters", ("prepare",), zero_width_context,
        ("dev.json", "question id {id}", "has no tokens")),
    Row("student: no features", ("student",), remove("data/features"), ("data/features/train", "kdqa prepare")),
    Row("evaluate: no model", ("evaluate",), remove("models/student"), ("models/student", "kdqa student")),
    Row("teacher: damaged features shard", ("teacher",), damage("data/features/train/part-00001.parquet"),
        ("data/features/train/part-00001.parquet", "kdqa prepare")),
    Row("evaluate: damaged dev features", ("evaluate",), damage("data/features/dev/part-00000.parquet"),
        ("data/features/dev/part-00000.parquet",)),
    Row("evaluate: damaged teacher dev logits", ("evaluate",), damage("data/teacher/dev/part-00000.parquet"),
        ("data/teacher/dev/part-00000.parquet", "kdqa teacher")),
    Row("inspect: logits of other features give no teacher accuracy", ("inspect", "data/teacher/train"),
        lambda c: _rewrite_json(c.ws / "data/teacher/train/manifest.json",
                                lambda m: m["fingerprint_parts"].update(features="0123456789abcdef")),
        ("logits were computed for other features than", "data/features/train", "features_match"), exit_code=0),
    Row("inspect: no shards", ("inspect", "data/nowhere"), None, ("data/nowhere", "no part-NNNNN.parquet shards")),
    Row("export: no model", ("export",), remove("models/student"), ("models/student", "kdqa student")),
    Row("export: damaged dev features", ("export",), damage("data/features/dev/part-00000.parquet"),
        ("data/features/dev/part-00000.parquet", "kdqa prepare")),
    Row("export: models/ read-only, found before exporting", ("export",), read_only("models/student-onnx"),
        ("models/student-onnx", EROFS, "nothing was done yet")),
    Row("export: disk full writing the int8 model", ("export",), nth_call_fails("pipeline.stages.export", "quantize_int8", 1),
        ("models/student-onnx", ENOSPC)),
    Row("predict --model: folder that does not exist", ("predict", "--model", "no/such/./folder", "--question",
                                                       "who?", "--context", CTX), None, ("no/such/./folder",)),
    # --- Reliability 3, class 1: a diverged run never replaces a good model; non-finite settings refused ---
    Row("student: learning rate 3e5 diverges, models/student kept", ("student",),
        patch_params(student__learning_rate=3e5),
        ("not finite", "training diverged", "student.learning_rate 300000", "models/student is unchanged"),
        keeps=(CHECKPOINTS,)),
    Row("student: temperature 1e30 makes the loss non-finite", ("student",), patch_params(student__temperature=1e30),
        ("step 1", "is not finite", "student.temperature 1e+30", "models/student is unchanged"),
        keeps=(CHECKPOINTS,)),
    *[Row(f"student: {key} {value}", ("student",), patch_params(**{f"student__{key}": value}),
          (f"student.{key} must be a finite number", repr(value)))
      for key, value in (("learning_rate", float("nan")), ("temperature", float("nan")),
                         ("temperature", float("inf")), ("weight_decay", float("nan")),
                         ("max_grad_norm", float("inf")), ("dropout", float("nan")))],
    Row("evaluate: null_threshold nan", ("evaluate",), patch_params(evaluate__null_threshold=float("nan")),
        ("evaluate.null_threshold must be a finite number",)),
    # --- issue 32: the no-answer threshold chosen on data.validation and stored with the model ---
    Row("evaluate: null_threshold a word", ("evaluate",), patch_params(evaluate__null_threshold="high"),
        ("evaluate.null_threshold must be auto or a number", "'high'")),
    Row("prepare: data.validation not a path", ("prepare",), patch_params(data__validation=5),
        ("data.validation must be a SQuAD JSON path or hub name", "5")),
    Row("prepare: data.validation missing", ("prepare",), patch_params(data__validation="no/such/validation.json"),
        ("no/such/validation.json", "file not found")),
    Row("prepare: data.validation malformed", ("prepare",), validation_file('{"data": [}'),
        ("validation.json", "malformed JSON at line 1")),
    Row("prepare: data.validation a question without id", ("prepare",),
        validation_file('{"data": [{"title": "t", "paragraphs": [{"context": "Alice built it.", '
                        '"qas": [{"question": "who?", "answers": []}]}]}]}'),
        ("validation.json", "data[0].paragraphs[0].qas[0]", "id")),
    Row("evaluate: stored threshold not JSON", ("evaluate",), stored_threshold("{not json"),
        ("models/student/kdqa_answering.json", "unreadable JSON")),
    Row("export: stored threshold not a number", ("export",), stored_threshold('{"null_threshold": "high"}'),
        ("models/student/kdqa_answering.json", "null_threshold must be a finite number", "'high'")),
    Row("predict: stored threshold a list", ("predict", "--model", "{student}", "--question", "who?", "--context", CTX),
        stored_threshold("[0.5]"), ("models/student/kdqa_answering.json", "expected a JSON object")),
    Row("evaluate: a model with NaN weights", ("evaluate",), diverged_student_model,
        ("models/student", "weights are not finite", "diverged")),
    Row("export: a model with NaN weights", ("export",), diverged_student_model,
        ("models/student", "weights are not finite")),
    Row("predict: a model with NaN weights", ("predict", "--model", "{model}", "--question", "who?", "--context", CTX),
        nan_model_elsewhere, ("{model}", "weights are not finite")),
    Row("evaluate --model: a model with NaN weights", ("evaluate", "--model", "{model}"), nan_model_elsewhere,
        ("{model}", "weights are not finite")),
    # --- class 2: a model without its QA head is never a teacher (nor evaluated, exported or served) ---
    Row("teacher: head tensors missing", ("teacher",), headless("teacher"),
        ("{model}", "not a trained extractive QA model", "qa_outputs.weight", "qa_outputs.bias"),
        keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: a plain pretrained encoder", ("teacher",), headless("teacher", plain_encoder=True),
        ("{model}", "not a trained extractive QA model", "qa_outputs"), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("evaluate --model: a plain encoder", ("evaluate", "--model", "{model}"),
        headless("student", plain_encoder=True), ("{model}", "not a trained extractive QA model")),
    Row("predict --model: head tensors missing", ("predict", "--model", "{model}", "--question", "who?",
                                                  "--context", CTX),
        headless("student"), ("{model}", "qa_outputs")),
    Row("student: from a plain encoder, said once", ("-v", "student"), headless("student", plain_encoder=True),
        ("no QA head in its weights", "saved student"), exit_code=0),
    # --- class 3: predict reads long passages from a file or standard input, many questions as JSON lines ---
    Row("predict --jsonl: a line that is not JSON", ("predict", "--model", "{student}", "--jsonl", "{jsonl}"),
        jsonl_file('{"question": "who?", "context": "Alice built it."}', "{not json"),
        ("{jsonl}: line 2: not JSON",)),
    Row("predict --jsonl: a context that is a number", ("predict", "--model", "{student}", "--jsonl", "{jsonl}"),
        jsonl_file('{"question": "who?", "context": 5}'), ("{jsonl}: line 1", '"context" must be a string, got int')),
    Row("predict --jsonl: a list, not an object", ("predict", "--model", "{student}", "--jsonl", "{jsonl}"),
        jsonl_file('["who?", "Alice built it."]'), ("{jsonl}: line 1", "expected an object", "got list")),
    Row("predict --context-file: missing file", ("predict", "--model", "{student}", "--question", "who?",
                                                "--context-file", "no/such/file.txt"), None,
        ("no/such/file.txt", "cannot read")),
    # --- class 4: text the tokenizer cannot encode, named where the file is read ---
    *[Row(f"prepare: a lone surrogate in a {split} {where}", ("prepare",), data_with_text(split, where, " \ud83d"),
          (f"{split}-text.json", "(id {id})", "lone UTF-16 surrogate", "'\\ud83d'"))
      for split, where in (("train", "context"), ("train", "question"), ("dev", "answer"), ("train", "title"),
                           ("dev", "context"))],
    Row("predict --jsonl: a lone surrogate", ("predict", "--model", "{student}", "--jsonl", "{jsonl}"),
        jsonl_file('{"question": "who?", "context": "Alice \\ud83d built it."}'),
        ("{jsonl}: line 1", "lone UTF-16 surrogate")),
    # --- issue 33: several teachers (teacher.models) ---
    Row("teacher: teacher.model and teacher.models both set", ("teacher",),
        ensemble_params(teacher_model="someone/teacher"), ("teacher.model ('someone/teacher')", "both set",
                                                           "teacher.model: null")),
    Row("teacher: a teacher listed twice", ("teacher",),
        patch_params(teacher__model=None, teacher__models=["a/teacher", "b/teacher", "a/teacher"]),
        ("teacher.models lists 'a/teacher' twice",)),
    Row("teacher: one teacher's weights under two names", ("teacher",), same_teacher_twice,
        ("{model}", "teacher.models[1] has the same weights and tokenizer as teacher.models[0]"),
        keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: no teacher at all", ("teacher",), patch_params(teacher__model=None, teacher__models=[]),
        ("no teacher", "teacher.model is null and teacher.models is empty")),
    Row("teacher: a second teacher of another tokenizer fails half-way, the first's shards kept", ("teacher",),
        then(ensemble_params(vocab=tiny.CHARACTER_VOCAB), parquet_write_fails(errno.ENOSPC, "teacher-work/teacher-1",
                                                                              nth=3)),
        (".kdqa/teacher-work/teacher-1/train/part-00002.parquet", ENOSPC), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    # a teacher that cannot be carried onto the features stops the stage before any teacher runs (keeps nothing)
    Row("teacher: a second teacher of another tokenizer, slow (no offsets)", ("teacher",),
        second_teacher_with_a_slow_tokenizer, ("{model}", "fast (Rust) tokenizer for offset mappings")),
    Row("teacher: a context without tokens under a second teacher's tokenizer", ("teacher",),
        second_teacher_reading_only_digits,
        ("{model}", "teacher.models[1] cannot be carried onto the features", "question id", "has no tokens")),
    Row("teacher: a second teacher shorter than the features' windows", ("teacher",), ensemble_params(positions=32),
        ("{model}", "reads at most 32 tokens", "prepare.max_seq_len 48"), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("teacher: the second teacher fails half-way, the first's shards kept", ("teacher",),
        then(ensemble_params(), parquet_write_fails(errno.ENOSPC, "teacher-work/teacher-1", nth=3)),
        (".kdqa/teacher-work/teacher-1/train/part-00002.parquet", ENOSPC), keeps=(TEACHER_WORK, LOGITS_CACHE)),
    Row("student: one teacher's logits made for other features", ("student",),
        then(ensemble_logits(), lambda c: _rewrite_json(
            c.ws / "data/teacher/train/teacher-1/manifest.json",
            lambda m: m["fingerprint_parts"].update(features="0123456789abcdef"))),
        ("data/teacher/train/teacher-1", "0123456789abcdef", "kdqa teacher")),
    Row("align: one of several teachers' logits made for other features", ("align",),
        then(ensemble_logits(student__max_seq_len=40), lambda c: _rewrite_json(
            c.ws / "data/teacher/train/teacher-1/manifest.json",
            lambda m: m["fingerprint_parts"].update(features="0123456789abcdef"))),
        ("data/teacher/train/teacher-1", "0123456789abcdef", "kdqa teacher")),
    Row("student: teacher_weights of another length than the teachers", ("student",),
        patch_params(student__teacher_weights=[1.0, 2.0]),
        ("student.teacher_weights: 2 weight(s)", "data/teacher/train holds the logits of 1 teacher(s)")),
    Row("student: teacher_weights for two of three teachers", ("student",),
        ensemble_logits(student__teacher_weights=[1.0, 2.0, 3.0]),
        ("student.teacher_weights: 3 weight(s)", "holds the logits of 2 teacher(s)")),
    *[Row(f"student: teacher_weights {weights}", ("student",), patch_params(student__teacher_weights=weights),
          ("student.teacher_weights", fragment))
      for weights, fragment in (([1.0, -0.5], "must be finite and not negative, got -0.5"),
                                ([0, 0.0], "are all zero"), ([1.0, float("nan")], "got nan"),
                                ([1.0, float("inf")], "got inf"), ("1,2", "must be a list of numbers"))],
    Row("student: teacher_agreement unknown", ("student",), patch_params(student__teacher_agreement="vote"),
        ("student.teacher_agreement must be one of none, weight, drop", "'vote'")),
    # --- class 5: no stage rewrites what a running stage reads (folder locks), and back ---
    Row("prepare: while a student reads data/features", ("prepare",), folder_lock_held("student"),
        ("data/features: in use by `kdqa student` (pid {pid}", "wait for it to finish")),
    Row("teacher: while an align reads data/teacher", ("teacher",), folder_lock_held("align"),
        ("data/teacher: in use by `kdqa align`",)),
    Row("student: while a teacher rewrites data/teacher", ("student",), folder_lock_held("teacher"),
        ("data/teacher: being rewritten by `kdqa teacher` (pid {pid}", "half-written")),
    Row("evaluate: while a student rewrites models/student", ("evaluate",), folder_lock_held("student"),
        ("models/student: being rewritten by `kdqa student`",)),
    Row("student: while an export reads models/student", ("student",), folder_lock_held("export"),
        ("models/student: in use by `kdqa export`",)),
]


def _rewrite_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_the_table_has_at_least_40_rows():
    assert len(ROWS) >= 40
    assert len({r.name for r in ROWS}) == len(ROWS)


def files(ws: Path) -> dict[str, bytes]:
    """Every file of the workspace but the lock files (the harness holds some of those itself; a folder's lock
    file stays, empty, once a stage has locked it)."""
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*"))
            if p.is_file() and not str(p.relative_to(ws)).startswith((".kdqa/locks", ".kdqa/folder-locks"))}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row(row: Row, world, finished, tmp_path, monkeypatch):
    ws = Path(shutil.copytree(finished, tmp_path / "ws"))
    with contextlib.ExitStack() as stack:
        ctx = Ctx(ws, world, monkeypatch, stack, tmp_path,
                  values={"student": str(ws / "models/student"), "pid": str(os.getpid())})
        if row.setup:
            row.setup(ctx)
        before = files(ws)
        args = [a.format(**ctx.values) for a in row.args]
        result = kdqa(ws, *args)
        monkeypatch.undo()
    fragments = [f.format(**ctx.values) for f in row.fragments]
    output = result.stdout + result.stderr

    assert "Traceback" not in output, output
    assert result.exit_code == row.exit_code, f"exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert isinstance(result.exception, (SystemExit, type(None))), f"escaped: {result.exception!r}"
    if row.exit_code == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("kdqa: error:")]
        assert len(errors) == 1, result.stderr
        for fragment in fragments:
            # A warning before the error may carry a fragment (a missing section), the error line the rest.
            assert fragment in errors[0] or fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"
        assert any(f in errors[0] for f in fragments), errors[0]
    else:
        for fragment in fragments:
            assert fragment in output, f"{fragment!r} not in {output!r}"

    leftovers = [str(p.relative_to(ws)) for p in ws.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS)]
    assert not leftovers, leftovers
    assert not list((ws / ".kdqa/locks").glob("*")) if (ws / ".kdqa/locks").is_dir() else True
    if row.exit_code != 0:  # nothing partial: every output as it was, except the work kept on purpose
        after = files(ws)
        kept = lambda path: path.startswith(row.keeps) if row.keeps else False  # noqa: E731
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p) and not kept(p))
        assert not changed, changed


# ---------------------------------------------------------------------------------------------------------
# Reliability 3, class 3 and 4 in the Python API: QuestionAnswerer checks every argument by params.yaml's rules
# ---------------------------------------------------------------------------------------------------------

LONG_CONTEXT = " ".join(["the old tower was built by alice in the north of the city"] * 40)


@dataclass(frozen=True)
class ApiRow:
    name: str
    kwargs: dict = field(default_factory=dict)  # QuestionAnswerer's arguments
    call: Callable | None = None  # what is done with the built QuestionAnswerer (None: only building it)
    fragments: tuple[str, ...] = ()


def _generator_of_pairs(qa):
    return qa.answer_many((q, c) for q, c in [("who built it?", CTX), ("where?", CTX)])


API_ROWS = [
    ApiRow("max_seq_len 4", {"max_seq_len": 4}, None, ("max_seq_len must be at least 8, got 4",)),
    ApiRow("max_seq_len as a string", {"max_seq_len": "384"}, None, ("max_seq_len must be a number",)),
    ApiRow("doc_stride -5", {"doc_stride": -5}, None, ("doc_stride must be at least 1, got -5",)),
    ApiRow("doc_stride past the window's context room", {"max_seq_len": 16, "doc_stride": 8}, None,
           ("doc_stride (8) must be less than the context room", "max_seq_len - max_query_len")),
    ApiRow("max_query_len 0", {"max_query_len": 0}, None, ("max_query_len must be at least 1",)),
    ApiRow("n_best 0", {"n_best": 0}, None, ("n_best must be at least 1, got 0",)),
    ApiRow("max_answer_len 0", {"max_answer_len": 0}, None, ("max_answer_len must be at least 1",)),
    ApiRow("n_best 2.5", {"n_best": 2.5}, None, ("n_best must be a whole number",)),
    ApiRow("null_threshold nan", {"null_threshold": float("nan")}, None, ("null_threshold must be a finite number",)),
    ApiRow("batch_size 0", {"batch_size": 0}, None, ("batch_size must be at least 1",)),
    ApiRow("precision fp8", {"precision": "fp8"}, None, ("precision must be one of float32, bfloat16, int8",)),
    ApiRow("precision int8 of a PyTorch model", {"precision": "int8"}, None,
           ("int8 and threads apply to ONNX exports (`kdqa export`), not to PyTorch models",)),
    ApiRow("threads 0", {"threads": 0}, None, ("threads must be a whole number at least 1",)),
    ApiRow("answer_many of a string", {}, lambda qa: qa.answer_many("who built it?"),
           ("answer_many takes an iterable of (question, context) pairs, got str",)),
    ApiRow("answer_many of bare strings", {}, lambda qa: qa.answer_many(["who?", CTX]),
           ("pairs[0] must be a (question, context) pair, got str",)),
    ApiRow("answer_many of triples", {}, lambda qa: qa.answer_many([("who?", CTX, "x")]),
           ("pairs[0] must be a (question, context) pair, got tuple of length 3",)),
    ApiRow("answer_many with a number as context", {}, lambda qa: qa.answer_many([("who?", CTX), ("who?", 5)]),
           ("pairs[1]", "the context must be a string, got int")),
    ApiRow("a None question", {}, lambda qa: qa(None, CTX), ("the question must be a string, got NoneType",)),
    ApiRow("a bytes context", {}, lambda qa: qa("who?", CTX.encode()), ("the context must be a string, got bytes",)),
    ApiRow("a lone surrogate in the context", {}, lambda qa: qa("who?", CTX + " \ud83d"),
           ("the context holds a lone UTF-16 surrogate",)),
    ApiRow("a lone surrogate in a question of many", {}, lambda qa: qa.answer_many([("who?", CTX), ("\udc00?", CTX)]),
           ("pairs[1]", "the question holds a lone UTF-16 surrogate")),
]


@pytest.fixture(scope="module")
def api_model(world) -> str:
    return str(world.teacher)


@pytest.mark.parametrize("row", API_ROWS, ids=[r.name for r in API_ROWS])
def test_api_row(row: ApiRow, api_model):
    from pipeline.runtime.errors import KdqaError
    from pipeline.serving.qa import QuestionAnswerer

    with pytest.raises(KdqaError) as raised:  # a ValueError: `except Exception` (a server's) catches it
        qa = QuestionAnswerer(api_model, **row.kwargs)
        row.call(qa) if row.call else None
    assert isinstance(raised.value, ValueError)
    for fragment in row.fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {str(raised.value)!r}"


@pytest.mark.parametrize("kwargs", [{"max_seq_len": 16}, {"max_seq_len": 24, "max_query_len": 4},
                                    {"max_seq_len": 8}], ids=str)
def test_api_small_windows_answer_long_contexts(kwargs, api_model):
    """A small window (the Rust tokenizer once panicked at max_seq_len 16) reads a long passage; and a generator
    of pairs is answered like a list."""
    from pipeline.serving.qa import Answer, QuestionAnswerer

    qa = QuestionAnswerer(api_model, **kwargs)
    assert isinstance(qa("who built the tower?", LONG_CONTEXT), Answer)
    assert len(_generator_of_pairs(qa)) == 2


def test_predict_reads_a_context_file_standard_input_and_json_lines(world, tmp_path):
    """`kdqa predict` takes a passage too long for a command line from a file or standard input, and many
    questions as JSON lines, each answered on a line with its id."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    long_context = LONG_CONTEXT * 200  # about 480 KB: past a shell's argument limit of 128 KB per argument
    (tmp_path / "context.txt").write_text(long_context)
    model = str(world.teacher)
    by_file = CliRunner().invoke(cli, ["predict", "--model", model, "--question", "who built it?", "--json",
                                       "--context-file", str(tmp_path / "context.txt")])
    by_stdin = CliRunner().invoke(cli, ["predict", "--model", model, "--question", "who built it?", "--json",
                                        "--context-file", "-"], input=long_context)
    assert by_file.exit_code == 0 and by_stdin.exit_code == 0, by_file.output + by_stdin.output
    assert json.loads(by_file.stdout) == json.loads(by_stdin.stdout)
    lines = "\n".join(json.dumps({"id": f"q{i}", "question": q, "context": CTX})
                       for i, q in enumerate(["who built it?", "where?", "   "]))
    many = CliRunner().invoke(cli, ["predict", "--model", model, "--jsonl", "-"], input=lines + "\n")
    assert many.exit_code == 0, many.output
    answers = [json.loads(line) for line in many.stdout.splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2"]
    assert answers[2]["answer"] == "" and answers[2]["no_answer_probability"] == 1.0  # blank question: no answer
    both = CliRunner().invoke(cli, ["predict", "--model", model, "--question", "who?", "--context", CTX,
                                    "--context-file", "-"])
    assert both.exit_code == 2 and "exactly one of --context or --context-file" in both.output


def test_evaluate_without_teacher_dev_logits_removes_the_old_teacher_scores(finished, tmp_path):
    """Class 5: metrics/teacher.json of an earlier run is not left beside this run's eval.json."""
    ws = Path(shutil.copytree(finished, tmp_path / "ws"))
    assert (ws / "metrics/teacher.json").is_file()
    shutil.rmtree(ws / "data/teacher/dev")
    result = kdqa(ws, "evaluate")
    assert result.exit_code == 0, result.output
    assert "metrics/teacher.json removed" in result.stderr and "data/teacher/dev" in result.stderr
    assert not (ws / "metrics/teacher.json").exists() and (ws / "metrics/eval.json").is_file()


def test_a_diverged_run_leaves_the_model_byte_identical_and_resumable(world, finished, tmp_path):
    """Class 1 end to end: a good model in place, a diverging run after a checkpoint; the model's bytes are
    unchanged, the checkpoint holds finite weights, and no step after the divergence was applied."""
    from safetensors.torch import load_file

    ws = Path(shutil.copytree(finished, tmp_path / "ws"))
    before = {p.name: p.read_bytes() for p in (ws / "models/student").iterdir()}
    write_params(world, ws, **{**STUDENT, "student__learning_rate": 3e5, "student__checkpoint_every": 1})
    result = kdqa(ws, "student")
    assert result.exit_code == 1 and "training diverged" in result.stderr
    assert "the last checkpoint (" in result.stderr and "checkpoints/student) is kept" in result.stderr
    assert {p.name: p.read_bytes() for p in (ws / "models/student").iterdir()} == before
    import torch

    saved = load_file(str(ws / "checkpoints/student/model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values() if t.is_floating_point())
