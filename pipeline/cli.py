"""The `kdqa` command line: one sub-command per pipeline stage, plus `predict` and `inspect`.

Exit codes: 0 success, 1 a problem with the input or environment (one line on stderr naming the file and
record), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline import __version__
from pipeline.runtime.errors import KdqaError
DEFAULT_MODEL = "models/student"  # what evaluate and export read by default (Workspace.student_model)
from pipeline.stage_table import STAGES  # the stage table: plain data, no heavy imports

if TYPE_CHECKING:  # imported lazily at run time: `kdqa --help` stays fast
    from pipeline.params import Params

log = logging.getLogger("kdqa")


def _load(ctx, *sections: str) -> Params:
    """params.yaml (or --params); `sections`: the ones this stage reads (a missing one gets a warning)."""
    from pipeline.params import load_params

    ws = ctx.obj["ws"]
    return load_params(ws.path(ctx.obj["params"]), sections, ws, required=ctx.obj["params"] != "params.yaml")


@contextlib.contextmanager
def _stage(stage: str, params, ws, model_dir: Path | None = None):
    """One run of `stage` in this folder at a time, never beside a stage that writes what it reads (or reads what
    it writes), its outputs checked writable with room to spare first. `model_dir`: the model it reads in place
    of models/student (evaluate/export --model)."""
    from pipeline.runtime.allocator import keep_freed_memory
    from pipeline.runtime.locks import folder_locks, stage_lock
    from pipeline.runtime.preflight import outputs_ready
    from pipeline.stage_table import lock_folders

    keep_freed_memory()  # KDQA_MALLOC (pipeline/runtime/allocator.py); default: glibc as it comes
    reads, writes = lock_folders(STAGES[stage], None if model_dir is None else str(model_dir))
    with stage_lock(stage, ws), folder_locks(reads, writes, stage, ws), outputs_ready(stage, params, ws):
        yield


class KdqaGroup(click.Group):
    """Turns every KdqaError (also one re-raised from a DataLoader worker) and every failed write (disk full,
    read-only, no permission) into one line and exit 1."""

    def invoke(self, ctx):
        from pipeline.runtime.write_errors import describe

        try:
            return super().invoke(ctx)
        except KdqaError as exc:
            _fail(f"kdqa: error: {_one_line(str(exc))}", 1)
        except KeyboardInterrupt:
            _fail("kdqa: interrupted (completed work is kept; rerun to resume)", 130)
        except Exception as exc:  # a write nobody wrapped in write_errors.writing: still one line if it is one
            message = describe(exc)
            if message is None:
                raise
            _fail(f"kdqa: error: {_one_line(message)}", 1)


def _fail(line: str, code: int):
    from pipeline.runtime.progress import close_bars

    close_bars()  # a bar left open by the failure would otherwise share the error's line
    click.echo(line, err=True)
    sys.exit(code)


def _one_line(message: str) -> str:
    # torch's DataLoader wraps worker exceptions as "Caught KdqaError in ... Original Traceback ...".
    if "Original Traceback" in message:
        m = re.search(r"KdqaError: (.*)$", message.strip(), re.S)
        if m:
            message = m.group(1)
    return " ".join(message.split())


EXIT_CODES = """\b
Exit codes:
  0    success
  1    bad input or environment: one line on stderr, "kdqa: error: ...", naming the file and record
  2    usage error (unknown option, missing argument)
  130  interrupted (Ctrl-C); finished shards and checkpoints are kept, rerun to resume
"""


@click.group(cls=KdqaGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.option("-C", "--workspace", "workspace", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Run as if started in this folder (the DVC project root): every path is relative to it.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(),
              help="Parameters file (sections data, prepare, teacher, student, evaluate, export).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, including transformers' own.")
@click.version_option(__version__, prog_name="kdqa")
@click.pass_context
def cli(ctx, workspace, params_path, quiet, verbose):
    """Offline knowledge distillation for extractive QA (SQuAD 2.0).

    Stages, in order (or run them all with `dvc repro`): prepare -> teacher -> align -> student -> evaluate, and
    export (after student: ONNX float32 and int8 for serving).
    Every stage reads params.yaml (or --params FILE) and writes paths relative to the workspace (-C DIR;
    default: the working directory).
    `kdqa COMMAND --help` says what each command reads and writes.
    """
    from pipeline.runtime.progress import configure_output

    configure_output(quiet=quiet, verbose=verbose)
    from pipeline.runtime.workspace import Workspace

    ctx.obj = {"params": params_path, "ws": Workspace(workspace)}


@cli.command(short_help=STAGES["prepare"].summary)
@click.option("--strict", is_flag=True,
              help="Treat repairable data problems (answer offsets, unlocatable answers) as errors, "
                   "like prepare.strict: true.")
@click.pass_context
def prepare(ctx, strict):
    """Tokenize train/dev data into feature shards under data/features/.

    \b
    Reads:  data.train, data.dev, data.unlabeled (SQuAD JSON, or hub name[:split]), prepare.*,
            teacher.model's tokenizer (teacher.models: the first teacher's)
    Writes: data/features/{train,dev}/part-NNNNN.parquet + manifest.json,
            data/features/unlabeled/ (data.unlabeled), data/features/augmented/ (prepare.augment_views),
            data/features/dev_examples.parquet, data/features/report.json

    Structural problems in the data stop with one line naming the file and record; per-answer problems
    are repaired or skipped and counted in data/features/report.json.
    """

    params = _load(ctx, "data", "prepare", "teacher")
    if strict:  # only ever turns a run into an error, never changes its output: safe outside DVC's params
        params.prepare.strict = True
    with _stage("prepare", params, ctx.obj["ws"]):
        STAGES["prepare"].function()(params, ctx.obj["ws"])


@cli.command(short_help=STAGES["teacher"].summary)
@click.pass_context
def teacher(ctx):
    """Run each teacher once over the features; write its logits shards to data/teacher/.

    \b
    Reads:  data/features/{train,dev,unlabeled,augmented}, teacher.* (model or models, batch sizes, nproc);
            for a teacher of another tokenizer than teacher.models[0]'s also the examples (data.*, prepare.*)
    Writes: data/teacher/{split}/part-NNNNN.parquet (float16 start/end logits, same rows as the
            features shard of the same name) + manifest.json (fingerprint); several teachers
            (teacher.models): the same in data/teacher/{split}/teacher-N/ per teacher (a teacher of another
            tokenizer: its distributions carried onto the features' tokens, as log-probabilities); work in
            .kdqa/teacher-work/; every shard also into .kdqa/teacher-cache/, so a shard of the same
            features is never computed twice by the same teacher (adding a teacher computes only its own)
    (The teacher's dev scores, metrics/teacher.json, come from `kdqa evaluate`.)

    Resumes after a crash. Under `torchrun --nproc-per-node N -m pipeline teacher` each process takes
    every N-th shard. With `teacher.nproc` > 1 (and not already under torchrun) it starts itself again
    under torch.distributed.run with that many processes, so the DVC stage command stays `kdqa teacher`.
    """
    from pipeline.training import distributed

    params = _load(ctx, "data", "prepare", "teacher")
    top = ctx.parent.params  # the group's own options, passed on to the relaunched workers
    distributed.relaunch(params.teacher.nproc, ["-C", str(top["workspace"]), "--params", top["params_path"],
                                                *(["-q"] if top["quiet"] else []),
                                                *(["-v"] if top["verbose"] else []), "teacher"])
    with _stage("teacher", params, ctx.obj["ws"]):
        STAGES["teacher"].function()(params, ctx.obj["ws"])


@cli.command(short_help=STAGES["align"].summary)
@click.pass_context
def align(ctx):
    """Carry the teacher's logits onto the student's own features when its tokenizer or windows differ.

    \b
    Reads:  data/features/, data/teacher/train (and unlabeled/, augmented/ where prepare made them), data.*,
            prepare.*, student.model (its tokenizer), student.max_seq_len, student.doc_stride
    Writes: data/aligned/manifest.json; when the student's tokenizer or windows differ from the teacher's,
            also data/aligned/features/{train,dev,...}/ (the student's own features, extra splits included)
            and data/aligned/teacher/train/ (and unlabeled/, augmented/: the teacher's targets over the
            student's tokens; several teachers: one teacher-N/ folder each, as in data/teacher)

    The teacher is not run again: its logits go through character offsets onto the student's tokens.
    """

    params = _load(ctx, "data", "prepare", "student")
    with _stage("align", params, ctx.obj["ws"]):
        STAGES["align"].function()(params, ctx.obj["ws"])


@cli.command(short_help=STAGES["student"].summary)
@click.option("--resume/--no-resume", default=None,
              help="--resume: continue from the checkpoint (error if none); --no-resume: start over. "
                   "Default: continue a checkpoint made with the same settings, if any.")
@click.pass_context
def student(ctx, resume):
    """Train the student on streamed teacher logits; save it to models/student/ (never loads the teacher).

    \b
    Reads:  data/features/train (and dev, for the model card's scores), data/teacher/train, student.*;
            a student of another tokenizer or windows: data/aligned/ instead (`kdqa align` first);
            with student.extra_ratio > 0, the unlabeled/augmented splits' features and logits too
    Writes: models/student/ (safetensors weights, tokenizer, README.md model card, kdqa_training.json),
            logs/student/train.tsv and eval.tsv (curves for `dvc plots`),
            checkpoints/student/ while training (removed when done)

    Under `torchrun --nproc-per-node N -m pipeline student` it trains with DDP (student.batch_size per process).
    """
    from pipeline.training.curves import previous_curves_kept

    params = _load(ctx, "student")
    # A run that fails leaves the previous run's curves beside the previous run's model (rank 0 writes them).
    ws = ctx.obj["ws"]
    curves = previous_curves_kept(ws.student_logs) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with _stage("student", params, ws), curves:
        STAGES["student"].function()(params, ws, resume={None: "auto", True: "require", False: "never"}[resume])


@cli.command(short_help=STAGES["evaluate"].summary)
@click.option("--model", "model_dir", default=DEFAULT_MODEL, show_default=True, help="Model to evaluate.")
@click.pass_context
def evaluate(ctx, model_dir):
    """Score a model (and the teacher's stored logits) on the dev set with official SQuAD 2.0 metrics.

    \b
    Reads:  --model (default models/student), data/features/dev (data/aligned/features/dev for a model of
            the tokenizer `kdqa align` made them for), data/features/dev_examples.parquet,
            data/teacher/dev (if present), evaluate.*
    Writes: metrics/eval.json, metrics/teacher.json (teacher, same post-processing),
            results/predictions.json, results/na_probs.json, results/forced_predictions.json
    """

    params = _load(ctx, "evaluate")
    ws = ctx.obj["ws"]
    with _stage("evaluate", params, ws, Path(model_dir)):
        STAGES["evaluate"].function()(params, ws, ws.path(model_dir))


@cli.command(short_help="Export the student to ONNX (float32, int8), checked on dev.")
@click.option("--model", "model_dir", default=DEFAULT_MODEL, show_default=True,
              type=click.Path(path_type=Path), help="Model to export.")
@click.option("--out", "out_dir", default="models/student-onnx", show_default=True, type=click.Path(path_type=Path),
              help="Folder to write.")
@click.pass_context
def export(ctx, model_dir, out_dir):
    """Export a model to ONNX for serving: float32 and (export.int8) dynamic int8, scored on dev first.

    \b
    Reads:  --model (default models/student), data/features/dev, data/features/dev_examples.parquet,
            export.*, evaluate.* (post-processing, as `kdqa evaluate`)
    Writes: models/student-onnx/ (--out: model.onnx, model-int8.onnx, config.json, tokenizer, README.md,
            kdqa_export.json), metrics/export.json (EM/F1 per precision beside the PyTorch model's)

    Fails, publishing nothing, if the float32 model's logits differ from PyTorch's by more than float
    rounding, or if the int8 model's dev F1 is more than export.max_f1_drop below the PyTorch model's.
    """

    params = _load(ctx, "export")
    ws = ctx.obj["ws"]
    with _stage("export", params, ws, model_dir):
        STAGES["export"].function()(params, ws, ws.path(model_dir), ws.path(out_dir))


@cli.command(short_help="Answer questions about passages with any QA model.")
@click.option("--model", required=True, help="Model directory or hub name (any extractive QA model).")
@click.option("--question", default=None, help="The question (one question; or --jsonl for many).")
@click.option("--context", default=None, help="The passage; long ones are read in overlapping windows.")
@click.option("--context-file", type=click.Path(allow_dash=True, path_type=Path), default=None,
              help="Read the passage from this file (UTF-8), or from standard input with '-'.")
@click.option("--jsonl", "jsonl", type=click.Path(allow_dash=True, path_type=Path), default=None,
              help="Many questions: a JSON-lines file ('-': standard input), one object per line with "
                   "\"question\" and \"context\" (and optionally \"id\"); prints one JSON object per line.")
@click.option("--null-threshold", default=None, type=float,
              help="Answer \"no answer\" when null score - best span score exceeds this [default: the threshold "
                   "stored with the model (chosen on data.validation by `kdqa student`), else 0.0].")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "int8"]), default=None,
              help="float32 or int8 for an ONNX export (`kdqa export`), float32 or bfloat16 for a PyTorch model "
                   "[default: the fastest this machine runs: int8 for an export that has it].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.pass_context
def predict(ctx, model, question, context, context_file, jsonl, null_threshold, precision, as_json):
    """Answer a question about a passage; prints the answer and its score, or "no answer".

    The passage comes from --context, or --context-file (a file, or '-' for standard input: for passages too long
    for a command line). With --jsonl, many questions at once, each answered on its own line of JSON.
    Reads only --model (a directory or hub name, or an ONNX export folder, run with ONNX Runtime);
    params.yaml is not used.
    """
    from pipeline.serving.qa import QuestionAnswerer

    ws = ctx.obj["ws"]
    model = ws.local(model)  # a folder under the workspace, else a hub name
    context_file, jsonl = (p if p is None or str(p) == "-" else ws.path(p) for p in (context_file, jsonl))

    if jsonl is not None:
        if question is not None or context is not None or context_file is not None:
            raise click.UsageError("--jsonl gives the questions and passages itself: drop --question/--context")
        records = _read_jsonl(jsonl)
    else:
        if question is None:
            raise click.UsageError("give --question (or --jsonl FILE for many)")
        if (context is None) == (context_file is None):
            raise click.UsageError("give the passage with exactly one of --context or --context-file")
        records = [{"question": question, "context": context if context is not None else _read_text(context_file)}]
    qa = QuestionAnswerer(model, null_threshold=null_threshold, precision=precision)
    if jsonl is not None:
        answers = qa.answer_many([(r["question"], r["context"]) for r in records])
        for record, answer in zip(records, answers):
            click.echo(json.dumps({**({"id": record["id"]} if "id" in record else {}), **_answer_json(answer)}))
        return
    answer = qa(records[0]["question"], records[0]["context"])
    if as_json:
        click.echo(json.dumps(_answer_json(answer)))
    elif answer.has_answer:
        click.echo(f"{answer.text}\t(score {answer.score:.2f}, no-answer probability {answer.no_answer_probability:.2f})")
    else:
        click.echo(f"no answer\t(no-answer probability {answer.no_answer_probability:.2f}; best span: {answer.span_text!r})")


def _answer_json(answer) -> dict:
    return {"answer": answer.text, "score": answer.score, "no_answer_probability": answer.no_answer_probability,
            "best_span": answer.span_text}


def _read_text(path: Path) -> str:
    """A UTF-8 file, or standard input for '-': one KdqaError naming the file when it cannot be read."""
    name = "standard input" if str(path) == "-" else str(path)
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KdqaError(f"{name}: not UTF-8 (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise KdqaError(f"{name}: cannot read ({exc.strerror})") from None


def _read_jsonl(path: Path) -> list[dict]:
    """--jsonl's records, each checked: a JSON object with string "question" and "context" (and "id")."""
    name = "standard input" if str(path) == "-" else str(path)
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KdqaError(f"{name}: line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise KdqaError(f"{name}: line {number}: expected an object with \"question\" and \"context\", "
                            f"got {type(record).__name__}")
        for field in ("question", "context"):
            if not isinstance(record.get(field), str):
                got = "nothing" if field not in record else type(record[field]).__name__
                raise KdqaError(f"{name}: line {number}: \"{field}\" must be a string, got {got}")
        from pipeline.text.squad import check_text

        for field in ("question", "context"):
            check_text(f"{name}: line {number}", f"\"{field}\"", record[field])
        records.append(record)
    if not records:
        raise KdqaError(f"{name}: no questions (expected one JSON object per line)")
    return records


@cli.command("inspect", short_help="Describe a folder of feature or logits shards.")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--features", "features_dir", type=click.Path(path_type=Path), default=None,
              help="Features folder matching FOLDER (default: data/features/<split>).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.pass_context
def inspect_cmd(ctx, folder, features_dir, as_json):
    """Describe a folder of shards: shards, rows, bytes, fingerprint.

    For teacher logits (e.g. data/teacher/train) also the teacher's accuracy against the training labels
    and the mean entropy of its start/end distributions (over CLS and context positions), unless the logits
    were computed for other features than those there now (then a warning and features_match: false).
    Several teachers (teacher.models): each teacher's, and the accuracy of their ensemble (e.g. on
    data/teacher/dev: each teacher's dev accuracy and the ensemble's).
    Writes nothing.
    """
    from pipeline.store.inspect import inspect_folder

    ws = ctx.obj["ws"]
    info = inspect_folder(ws.path(folder), ws, None if features_dir is None else ws.path(features_dir))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in flattened(info):  # several teachers: one line per teacher's value, `teacher-0.rows`
            click.echo(f"{key:40s} {value}")


def flattened(info: dict, prefix: str = ""):
    """(dotted key, value) of every value of nested dicts: `teacher-2.carried.tokenizer`."""
    for k, v in info.items():
        if isinstance(v, dict):
            yield from flattened(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def main():
    from pipeline.runtime.allocator import arrow_on_system_allocator

    arrow_on_system_allocator()  # before anything imports pyarrow
    cli(prog_name="kdqa")


if __name__ == "__main__":
    main()
