"""Evidence a user can reproduce: run the README's benchmarks at the project's defaults on this machine, file their
raw results by machine, and regenerate the README's results table and docs/results.md's per-machine tables.

    python -m bench.report --data-dir DIR [--quick] [--out bench/results]
    python -m bench.report --tables-only [--out bench/results]

The benchmarks run one after another, each as its own process (timings never overlap), with kdqa's settings at
their defaults; what a tier changes is the benchmark's size, never a kdqa setting, and the command it ran is in
every raw file. Each run's results.json and results.md are copied to OUT/SLUG/NAME.json and NAME.md, where SLUG
names the machine (common.machine_slug: CPU vendor-family-model such as amd-26-2, or the GPU's name): two
machines never share a folder, and a table never takes a figure from another machine's folder.

`--tables-only` rereads the raw files and rewrites the tables (in seconds, deterministic): the README's part
between its bench.report markers (one column per machine) and docs/results.md's (one table per machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .common import ROOT, UNKNOWN, fmt, machine_slug, need_file, provenance, pythonpath, write_json_atomic

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "out" / "report"  # each benchmark's --out: work folders, models, venvs
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "results.md"
DATA_DIR = "a folder with squad2-sample.json and squad2-train-sample.json (SQuAD 2.0 dev and train samples)"
NOT_RUN = "not run on this machine"


@dataclass(frozen=True)
class Run:
    name: str  # the raw files' name in OUT/SLUG/
    bench: str  # bench.NAME
    args: tuple[str, ...]  # {data} stands for --data-dir, {work} for the report's work folder (bench/out/report)
    # What its rows measure (default: the bench's). Of the runs of one topic on a machine, the tables read one: the
    # first in (*FULL, *QUICK) order, so a full tier's run over a quick tier's.
    measures: str = ""

    @property
    def topic(self) -> str:
        return self.measures or self.bench


SAMPLE = "{data}/squad2-sample.json"
SERVING = Run("serving", "serving", ("--data", SAMPLE, "--pair", "minilm:minilm-3layers"))
FIRST_RUN = Run("first-run", "first_run", ("--data-dir", "{data}"))
# The student step at the defaults beside each of kdqa's CPU training kernels put back: a default that wins on one
# CPU family is measured on every family the tier runs on.
STUDENT_STEP = Run("student-step", "student_step", ())
# The quick tier fits a 2-core laptop in under 20 minutes (each machine's time: bench/README.md): the performance
# benchmark on 50 questions and one run per configuration instead of 100 and 2-4.
QUICK = (Run("performance-50-questions", "performance", ("--data", SAMPLE, "--examples", "50", "--sweep-runs", "1",
                                                         "--hard-runs", "1", "--variant-runs", "1")),
         SERVING, FIRST_RUN, STUDENT_STEP)
FULL = (Run("performance", "performance", ("--data", SAMPLE)), SERVING, FIRST_RUN, STUDENT_STEP,
        Run("peer", "peer", ("--data", SAMPLE)),
        # Distillation at the defaults against the student that never sees the teacher, 3 seeds each (the preset's
        # whole sweep of weights and temperatures is bench.accuracy's own default: hours more).
        Run("accuracy", "accuracy", ("--train-data", "{data}/squad2-train-sample.json", "--data", SAMPLE,
                                     "--students", "bench/accuracy-defaults.yaml")),
        # The default serving path on a trained pair, with F1 on every test question: the accuracy run's teacher and
        # its student distilled at the defaults (seed 13), at the windows they were trained with.
        Run("serving-trained", "serving", (
            "--data", "{work}/accuracy/split/test.json", "--pair",
            "{work}/accuracy/teacher/models/student:"
            "{work}/accuracy/student-distilled-at-the-defaults--cut-from-the-teacher/models/student",
            "--max-seq-len", "256", "--doc-stride", "96", "--throughput-questions", "0"), measures="serving-trained"))
RUN_NAMES = {run.name: run for run in (*QUICK, *FULL)}


# ---------------------------------------------------------------- running the benchmarks

def command(run: Run, data_dir: str, out: Path) -> list[str]:
    relative = os.path.relpath(out)  # as a user would type it: the command is recorded in the raw file
    return ["-m", f"bench.{run.bench}",
            *(a.replace("{data}", data_dir).replace("{work}", os.path.relpath(WORK)) for a in run.args),
            "--out", relative]


def run_tier(runs: tuple[Run, ...], data_dir: str, results: Path) -> tuple[str, list[dict]]:
    """Each benchmark in turn; its raw files copied into results/SLUG/. Returns the slug and what ran."""
    slug = machine_slug(provenance())
    env = {**os.environ, "PYTHONPATH": pythonpath(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1"}
    done = []
    for run in runs:
        out = WORK / run.name
        argv = command(run, data_dir, out)
        print(f"[report] python {' '.join(argv)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        status = subprocess.run([sys.executable, *argv], env=env).returncode
        record = {"name": run.name, "command": "python " + " ".join(argv), "returncode": status,
                  "wall_s": round(time.perf_counter() - started, 1)}
        done.append(record)
        if status != 0:
            print(f"[report] {run.name} failed (exit {status}); its earlier raw files, if any, are kept",
                  file=sys.stderr, flush=True)
            continue
        raw = json.loads((out / "results.json").read_text())
        ran_on = machine_slug(raw["provenance"])
        if ran_on != slug:  # never: the same machine wrote both; checked because a table trusts the folder
            raise SystemExit(f"{run.name}: written on {ran_on}, filed under {slug}")
        (results / slug).mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md"):
            shutil.copyfile(out / f"results{suffix}", results / slug / f"{run.name}{suffix}")
    return slug, done


# ---------------------------------------------------------------- reading raw files: one small reader per bench

@dataclass(frozen=True)
class Row:
    key: str  # the same measure on every machine has the same key (the README's row)
    measure: str
    kdqa: str
    against: str
    ratio: str
    readme: bool = True  # False: docs/results.md only


def performance_rows(r: dict) -> list[Row]:
    from .performance import DEFAULT_STEP

    s, t = r["summary"], r["teacher"]
    fps, sv = s["teacher_features_per_s"], s["step_variants"]
    precision = t.get("precision", "float32")
    same = (f"; {fmt(fps['plain_same_precision'])} in {precision} ({s['teacher_speedup_same_precision']:.2f}x)"
            if fps.get("plain_same_precision") else "")
    base, default = sv["float32, random batches"], sv[DEFAULT_STEP]
    growth = s["stage_memory_growth"]["main"]
    factor = r["settings"]["scale_factor"]
    return [
        Row("teacher", "teacher stage vs a plain padded loop, features/s",
            f"{fmt(fps['stage'])} ({precision})", f"{fmt(fps['plain'])} in float32{same}",
            f"{s['teacher_speedup']:.2f}x"),
        Row("step", "student step, s: the defaults vs float32, random batches, PyTorch's attention",
            f"{fmt(default['step_s'], 3)} ({DEFAULT_STEP})", fmt(base["step_s"], 3), f"{default['speedup']:.2f}x"),
        Row("epoch", "student epoch, s: offline (streamed logits) vs online distillation",
            fmt(s["student"]["offline"]["epoch_s"]), fmt(s["student"]["online"]["epoch_s"]),
            f"{s['offline_vs_online_epoch']:.2f}x", readme=False),
        Row("streaming", "student step, s: streamed logits vs hard labels", fmt(s["student"]["offline"]["step_s"], 3),
            fmt(s["student"]["hard"]["step_s"], 3), f"{100 * s['streaming_overhead_step']:+.1f}%", readme=False),
        Row("shard", "logits shard, bytes per feature vs float16 dense", fmt(r["shards"]["bytes_per_feature"], 0),
            fmt(r["shards"]["dense_float16_bytes_per_feature"], 0), f"{s['shard_vs_fp16_dense']:.2f}x", readme=False),
        Row("scale", f"student stage peak RSS, MB, {factor}x vs 1x the data",
            fmt(r["stage"][f"{factor}x"]["peak_rss_mb"], 0), fmt(r["stage"]["1x"]["peak_rss_mb"], 0),
            "–" if growth is None else f"{100 * growth:+.1f}%", readme=False),
    ]


def serving_rows(r: dict) -> list[Row]:
    rows = []
    for pair in r["pairs"]:
        g, by = pair["goals"], {x["row"]: x for x in pair["rows"]}
        student = pair["pair"].split(":", 1)[1]
        if "default_path" not in g:  # written before bench.serving timed the default path
            continue
        if g.get("f1_meaningful"):  # a trained pair, whichever run trained it (its command is in the raw file)
            student, key, f1_words = "trained pair", "serving trained", ", F1 on held-out questions"
        else:  # random weights (a preset of bench.serving's, or a model folder): speed only
            key, f1_words = f"serving {student}", ""
        default, baseline = by[g["default_path"]], by["student, PyTorch float32"]
        drop = (f"; F1 {0.0 - g['default_f1_drop']:+.2f} on {r['questions']:,} questions" if g.get("f1_meaningful")
                else "; random weights: no F1")
        rows.append(Row(key, f"answer latency at batch 1, p50 ms: `QuestionAnswerer(export folder)` "
                             f"vs PyTorch float32 ({student}{f1_words})",
                        f"{fmt(default['latency_ms']['p50'], 2)} ({default['row'].split('-> ')[-1]})",
                        fmt(baseline["latency_ms"]["p50"], 2),
                        f"{g['speedups_over_pytorch_float32'][g['default_path']]['batch1_p50']:.2f}x{drop}"))
        for x in pair["rows"]:
            if x is not baseline and x is not default:
                rows.append(Row(f"{key}: {x['row']}", f"p50 ms, {x['row']} ({student})",
                                fmt(x["latency_ms"]["p50"], 2), fmt(baseline["latency_ms"]["p50"], 2), "–",
                                readme=False))
    return rows


def first_run_rows(r: dict) -> list[Row]:
    total = r["total_seconds"]
    return [Row("first run", "first run (presets/first-run.yaml with local stand-ins), wall s",
                f"{fmt(total)} ({total / 60:.1f} min); CPU {fmt(r['total_cpu_seconds'])} s", "–", "–")]


def student_step_rows(r: dict) -> list[Row]:
    """Each setting put back against the defaults, per batch width (docs/results.md only)."""
    from .student_step import DEFAULTS

    rows = []
    for name, by_width in r["rows"].items():
        if name == DEFAULTS:
            continue
        for width, x in by_width.items():
            defaults = r["rows"][DEFAULTS][width]["median_s"]
            rows.append(Row(f"student step {name} {width}", f"student step at width {width}, median s: the defaults "
                                                            f"vs {name}", fmt(defaults, 3), fmt(x["median_s"], 3),
                            f"{x['defaults_vs_this']:.2f}x", readme=False))
    return rows


def peer_rows(r: dict) -> list[Row]:
    k, p, s = r["kdqa"], r.get("haystack"), r["summary"]
    if not p:
        return []
    settings = ", ".join(f"student.{key}: {value}" for key, value in (r.get("kdqa_student_settings") or {}).items())
    label = f" ({settings}, not the defaults)" if settings else ""
    return [Row("peer time" + label, f"whole KD job vs Haystack v1, wall s{label}", fmt(k["wall_s"]),
                fmt(p["wall_s"]), f"{s['wall_ratio']:.2f}x"),
            Row("peer memory" + label, f"whole KD job vs Haystack v1, peak RSS of the largest process, MB{label}",
                fmt(k["peak_rss_mb"], 0), fmt(p["peak_rss_mb"], 0), f"{s['rss_ratio']:.2f}x")]


def accuracy_rows(r: dict) -> list[Row]:
    """Held-out F1 and forced span F1 per model, as bench.accuracy wrote them (the mean over seeds, with the
    seeds' F1 range, where it trained several)."""
    partial = "" if r.get("complete") else " (partial run)"

    def seeds(x):
        spread = (x.get("spread") or {}).get("f1")
        return f" (F1 over {len(x['seeds'])} seeds: {fmt(spread[0], 2)} to {fmt(spread[1], 2)})" if spread else ""
    rows = [Row(f"accuracy {x['model']}", f"held-out F1 / forced span F1: {x['model']}{partial}",
                f"{fmt(x.get('f1'), 2)} / {fmt(x.get('HasAns_f1_forced'), 2)}{seeds(x)}", "–", "–")
            for x in r["rows"]]
    goals = r.get("goals")
    if goals:  # what distillation adds, with bench.accuracy's paired intervals (test paragraphs; seed by seed)
        m, ci = goals["measured"], goals.get("ci95") or {}

        def gain(value, key):
            bounds = [f"paragraphs {ci[key][0]:+.2f} to {ci[key][1]:+.2f}"] if ci.get(key) else []
            by_seed = (ci.get("by_seed") or {}).get(key)
            bounds += [f"seeds {by_seed['ci95'][0]:+.2f} to {by_seed['ci95'][1]:+.2f}"] if by_seed else []
            return f"{value:+.2f}" + (f" ({'; '.join(bounds)})" if bounds else "")
        who = (goals["best_by_f1"] if goals["best_by_f1"] == goals["best_by_forced_f1"]
               else f"{goals['best_by_f1']} (F1), {goals['best_by_forced_f1']} (forced span F1)")
        rows.append(Row("accuracy gain", f"held-out F1 / forced span F1 gained over hard labels, with paired 95% "
                        f"intervals: {who} minus {goals['hard_labels']}{partial}", f"{gain(m['student_f1_gain'], 'f1_gain')} / "
                        f"{gain(m['student_forced_f1_gain'], 'forced_f1_gain')}", "–", "–"))
    return rows


# The README's row for a benchmark no machine has run yet.
UNMEASURED_ROWS = {"serving": "answer latency at batch 1, p50 ms: `QuestionAnswerer(export folder)` vs PyTorch float32",
                   "serving-trained": "answer latency at batch 1, p50 ms: `QuestionAnswerer(export folder)` vs "
                                      "PyTorch float32 (trained pair, F1 on held-out questions)",
                   "first_run": "first run (presets/first-run.yaml with local stand-ins), wall s",
                   "peer": "whole KD job vs Haystack v1: wall s and peak RSS",
                   "accuracy": "held-out F1 / forced span F1"}
MISSING_WORDS = {"serving-trained": "bench.serving on the accuracy run's trained pair"}
READERS = {"performance": performance_rows, "serving": serving_rows, "serving-trained": serving_rows,
           "first_run": first_run_rows,
           "peer": peer_rows, "accuracy": accuracy_rows, "student_step": student_step_rows}


# ---------------------------------------------------------------- the tables

@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    raw: dict


def machines(results: Path) -> dict[str, list[Source]]:
    """The raw files bench.report knows, by machine folder; a file written on another machine is an error."""
    # each name once (both tiers run serving, first run, student step), a full tier's run before a quick tier's
    found, order = {}, list(dict.fromkeys(run.name for run in (*FULL, *QUICK)))
    order.insert(order.index("serving") + 1, order.pop(order.index("serving-trained")))  # in the tables: side by side
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        sources = []
        for name in order:
            path = folder / f"{name}.json"
            if path.exists():
                raw = json.loads(path.read_text())
                if machine_slug(raw["provenance"]) != folder.name:
                    raise SystemExit(f"{path}: written on {machine_slug(raw['provenance'])}, not {folder.name}")
                sources.append(Source(name, path, raw))
        if sources:
            found[folder.name] = sources
    return found


def rows_of(sources: list[Source]) -> list[tuple[Source, Row]]:
    """Every row of a machine; where a full-tier run and a quick-tier run of one benchmark both exist, the
    full one."""
    taken, out = set(), []
    for source in sources:
        topic = RUN_NAMES[source.name].topic
        if topic in taken:
            continue
        taken.add(topic)
        # keyed by topic too: a trained pair's rows never take the cells of a serving run's own rows
        out += [(source, replace(row, key=f"{topic}: {row.key}")) for row in READERS[topic](source.raw)]
    return out


def machine_words(sources: list[Source]) -> str:
    p = sources[0].raw["provenance"]
    flags = p["cpu_kernel_flags"]
    flags = [f for f in flags if f not in ("avx2", "avx512f")] if isinstance(flags, list) else []
    words = f"{p['cpu']} (family/model {p['cpu_family_model']}{'; ' + ', '.join(flags) if flags else ''})"
    return words + f", {p['cores']} cores" + (f", GPU {p['gpu']}" if p.get("gpu") else "")


def source_line(slug: str, sources: list[Source], link_prefix: str) -> str:
    runs = []
    for s in sources:
        p = s.raw["provenance"]
        commit = p["commit"] if p["commit"] == UNKNOWN else p["commit"][:10]
        runs.append(f"{s.name} {p['date_utc'][:10]}, `{p['command']}`, commit {commit}, torch {p['torch']} "
                    f"([raw]({link_prefix}{slug}/{s.name}.md))")
    return f"- **{slug}**: {machine_words(sources)}. " + "; ".join(runs) + "."


def readme_table(found: dict[str, list[Source]]) -> str:
    slugs = list(found)
    cells: dict[str, dict[str, str]] = {}
    measures: dict[str, str] = {}
    ran: dict[str, set[str]] = {slug: {RUN_NAMES[s.name].topic for s in found[slug]} for slug in slugs}
    topic_of: dict[str, str] = {}
    for slug in slugs:
        for source, row in rows_of(found[slug]):
            if row.readme:
                measures.setdefault(row.key, row.measure)
                topic_of[row.key] = RUN_NAMES[source.name].topic
                ratio = "" if row.ratio == "–" else f" = **{row.ratio}**"
                against = "" if row.against == "–" else f" vs {row.against}"
                cells.setdefault(row.key, {})[slug] = f"{row.kdqa}{against}{ratio}"
    for topic, measure in UNMEASURED_ROWS.items():  # a benchmark no machine has run still has its row
        if not any(topic in topics for topics in ran.values()):
            measures[topic], topic_of[topic] = measure, topic
    lines = ["| measure, at the defaults (kdqa vs the alternative) | " + " | ".join(slugs) + " |",
             "| --- | " + " | ".join("---" for _ in slugs) + " |"]
    for key, measure in measures.items():
        row = [cells.get(key, {}).get(slug, "–" if topic_of[key] in ran[slug] else NOT_RUN) for slug in slugs]
        lines.append(f"| {measure} | " + " | ".join(row) + " |")
    lines += ["", *(source_line(slug, found[slug], "bench/results/") for slug in slugs)]
    return "\n".join(lines)


def docs_tables(found: dict[str, list[Source]]) -> str:
    parts = []
    for slug, sources in found.items():
        parts += [f"### {slug}: {machine_words(sources)}", "",
                  "| measure | kdqa | alternative | ratio | raw |", "| --- | --- | --- | --- | --- |"]
        parts += [f"| {row.measure} | {row.kdqa} | {row.against} | {row.ratio} | "
                  f"[{source.name}](../bench/results/{slug}/{source.name}.md) |" for source, row in rows_of(sources)]
        missing = [topic for topic in ("performance", "serving", "first_run", "student_step", "peer", "accuracy",
                                       "serving-trained") if topic not in {RUN_NAMES[s.name].topic for s in sources}]
        if missing:
            parts += ["", f"Not run on this machine: {', '.join(MISSING_WORDS.get(m, f'bench.{m}') for m in missing)}."]
        parts += ["", source_line(slug, sources, "../bench/results/"), ""]
    return "\n".join(parts).rstrip()


def replace_between(path: Path, marker: str, text: str) -> None:
    """Rewrite the part of `path` between `<!-- marker begin ... -->` and `<!-- marker end -->`."""
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {re.escape(marker)} begin[^\n]*-->\n).*?(<!-- {re.escape(marker)} end -->)",
                         re.DOTALL)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no <!-- {marker} begin --> ... <!-- {marker} end --> markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), doc), encoding="utf-8")


def write_tables(results: Path, readme: Path, docs: Path) -> None:
    found = machines(results)
    replace_between(readme, "bench.report results", readme_table(found))
    replace_between(docs, "bench.report tables", docs_tables(found))


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=f"required unless --tables-only: {DATA_DIR}")
    parser.add_argument("--quick", action="store_true",
                        help="the laptop tier (under 20 min on 2 cores): performance on 50 questions, "
                             "serving, first run, the student step; without it the full tier adds the peer job and "
                             "accuracy (hours)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the raw files go, one folder per machine")
    parser.add_argument("--tables-only", action="store_true", help="only reread the raw files and rewrite the tables")
    parser.add_argument("--only", action="append", choices=sorted(RUN_NAMES), metavar="NAME",
                        help=f"run only this benchmark of the tier (repeatable; {', '.join(sorted(RUN_NAMES))}), "
                             "e.g. to measure one row again after a change")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)  # tests: a copy
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    failed = []
    if not args.tables_only:
        for name in ("squad2-sample.json", "squad2-train-sample.json"):
            need_file(parser, args.data_dir and Path(args.data_dir) / name, "--data-dir", DATA_DIR)
        tier = "quick" if args.quick else "full"
        runs = tuple(run for run in (QUICK if args.quick else FULL) if not args.only or run.name in args.only)
        if not runs:
            parser.error(f"--only {', '.join(args.only)}: not in the {tier} tier")
        slug, done = run_tier(runs, args.data_dir, args.out)
        if not args.only:  # the tier's wall time: only a whole tier's run replaces it
            write_json_atomic(args.out / slug / f"report-{tier}.json",
                              {"provenance": provenance(), "tier": tier, "runs": done,
                               "wall_s": round(sum(r["wall_s"] for r in done), 1)})
        failed = [r["name"] for r in done if r["returncode"] != 0]
    write_tables(args.out, args.readme, args.docs)
    if failed:
        print(f"[report] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
