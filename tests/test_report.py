"""Evidence a user can reproduce: every result file says where it came from (machine, date, command, commit,
library versions), and the README's results table is regenerated from raw files only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from bench import common, report

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
SERVING_ARGS = ["--quick", "--out", "out", "--pair", "none:STUDENT", "--threads", "1", "--data"]


@pytest.fixture(scope="module")
def quick_serving(tiny_assets, tmp_path_factory) -> tuple[Path, list[str]]:
    """One quick bench.serving run on the tiny models: its output folder and its arguments."""
    cwd = tmp_path_factory.mktemp("serving")
    args = [a.replace("STUDENT", str(tiny_assets.student)) for a in SERVING_ARGS] + [str(tiny_assets.dev)]
    proc = subprocess.run([sys.executable, "-m", "bench.serving", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd / "out", args


def test_a_quick_bench_run_records_its_provenance(quick_serving):
    """A results.json written by a real (quick) benchmark run carries every provenance key, with this checkout's
    commit and the command as typed; results.md starts with the same in one line."""
    out, args = quick_serving
    record = json.loads((out / "results.json").read_text())["provenance"]
    assert set(common.PROVENANCE_KEYS) <= set(record)
    # This checkout's commit when the run started (others may commit to the branch while it runs)
    recent = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-list", "-n", "20", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert record["commit"] in recent and isinstance(record["uncommitted_changes"], list)
    assert record["command"] == "python -m bench.serving " + " ".join(args)
    assert record["date_utc"].endswith("Z") and record["cores"] == os.cpu_count()
    for library in ("torch", "transformers", "onnxruntime"):
        assert record[library][0].isdigit()  # installed: the benchmark just ran on them
    markdown = (out / "results.md").read_text()
    first_line = markdown.splitlines()[0]
    assert first_line == common.provenance_line(record)
    assert record["command"] in first_line and record["commit"][:10] in first_line and record["cpu"] in first_line


def test_machine_slug_keeps_cpu_generations_and_gpus_apart():
    amd = {"cpu_vendor": "AuthenticAMD", "cpu_family_model": "26/2", "gpu": None}
    assert common.machine_slug(amd) == "amd-26-2"
    assert common.machine_slug({**amd, "cpu_family_model": "25/17"}) == "amd-25-17"
    assert common.machine_slug({"cpu_vendor": "GenuineIntel", "cpu_family_model": "6/143"}) == "intel-6-143"
    assert common.machine_slug({**amd, "gpu": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert common.machine_slug({"cpu_vendor": "unknown", "cpu_family_model": "unknown"}) == "unknown-unknown"


def test_git_head_reads_the_checkouts_commit(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert common.git_head(REPO_ROOT) == head
    assert common.git_head(tmp_path) == common.UNKNOWN


# ---------------------------------------------------------------- the tables and the raw files

def raw_figures(folder: Path) -> set[str]:
    """Every number in a machine's raw files, as a table may print it: at 0 to 4 decimals, and the two
    derivations the tables make (a fraction as a percentage, seconds as minutes)."""
    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, list):
            for v in x:
                yield from leaves(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            yield x
    out = set()
    for path in folder.glob("*.json"):
        for v in leaves(json.loads(path.read_text())):
            for value in (v, 100 * v, v / 60):
                out |= {f"{abs(value):.{digits}f}" for digits in range(5)}
    return out


NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w.])")


def figures_not_in_raw(readme: str, results: Path) -> list[str]:
    """The README table's figures (machine columns only) that no raw file of that machine holds."""
    table = readme.split("<!-- bench.report results begin")[1].split("<!-- bench.report results end")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    header, body = [c.strip("| ") for c in rows[0]], rows[2:]
    missing = []
    for column, slug in enumerate(header[1:], start=1):
        known = raw_figures(results / slug)
        for row in body:
            cell = re.sub(r"(\d)x\b", r"\1 x", row[column].strip("| "))
            missing += [f"{slug}: {n} in {cell!r}" for n in NUMBER.findall(cell) if n.replace(",", "") not in known]
    return missing


def test_every_readme_figure_is_in_a_raw_file_of_its_machine():
    readme = (REPO_ROOT / "README.md").read_text()
    assert figures_not_in_raw(readme, REPO_ROOT / "bench" / "results") == []
    # The check can fail: a figure typed by hand, or copied from another machine, is caught.
    body = readme.split("<!-- bench.report results begin")[1].split("| --- |")[-1]  # below the header
    row = next(line for line in body.splitlines()
               if line.startswith("| ") and NUMBER.search(line.split(" | ")[1]))  # a figure in a machine's column
    cells = row.split(" | ")
    cells[1] = cells[1].replace(NUMBER.search(cells[1]).group(), "987.654", 1)
    (caught,) = figures_not_in_raw(readme.replace(row, " | ".join(cells)), REPO_ROOT / "bench" / "results")
    assert re.match(r"[a-z0-9-]+: 987\.654 in ", caught), caught


def regenerate(results: Path, readme: Path, docs: Path) -> None:
    subprocess.run([sys.executable, "-m", "bench.report", "--tables-only", "--out", str(results), "--readme",
                    str(readme), "--docs", str(docs)], env=ENV, check=True, capture_output=True, timeout=120)


def test_tables_only_reproduces_the_committed_tables_byte_for_byte(tmp_path):
    """README.md's and docs/results.md's generated parts are what `--tables-only` makes of bench/results."""
    shutil.copytree(REPO_ROOT / "bench" / "results", tmp_path / "results")
    for name in ("README.md", "docs/results.md"):
        shutil.copyfile(REPO_ROOT / name, tmp_path / Path(name).name)
    regenerate(tmp_path / "results", tmp_path / "README.md", tmp_path / "results.md")
    assert (tmp_path / "README.md").read_text() == (REPO_ROOT / "README.md").read_text()
    assert (tmp_path / "results.md").read_text() == (REPO_ROOT / "docs" / "results.md").read_text()


def test_every_bench_has_its_rows_and_machines_never_mix(quick_serving, tmp_path):
    """Raw files of every benchmark (a fresh quick serving run; earlier runs' real files for the rest) filed under
    one machine give its rows, deterministically; a file written on another machine is refused."""
    out, _ = quick_serving
    slug = common.machine_slug(json.loads((out / "results.json").read_text())["provenance"])
    folder = tmp_path / "results" / slug
    folder.mkdir(parents=True)
    shutil.copyfile(out / "results.json", folder / "serving.json")
    here = json.loads((out / "results.json").read_text())["provenance"]
    for name, source in (("first-run", "first-run-cpu"), ("peer", "peer-cpu-gradient-checkpointing"),
                         ("accuracy", "accuracy-cpu"), ("performance", "amd-26-2/performance"),
                         ("serving-trained", "amd-26-2/serving-trained")):
        raw = json.loads((REPO_ROOT / "bench" / "results" / f"{source}.json").read_text())
        (folder / f"{name}.json").write_text(json.dumps({**raw, "provenance": here}))
    for doc in ("README.md", "results.md"):
        (tmp_path / doc).write_text(f"x\n<!-- bench.report {'results' if doc == 'README.md' else 'tables'} begin -->"
                                    f"\nSTALE-TABLE\n<!-- bench.report {'results' if doc == 'README.md' else 'tables'} end -->\ny\n")
    regenerate(tmp_path / "results", tmp_path / "README.md", tmp_path / "results.md")
    readme, docs = (tmp_path / "README.md").read_text(), (tmp_path / "results.md").read_text()
    assert "STALE-TABLE" not in readme and readme.startswith("x\n") and readme.endswith("y\n")
    assert report.NOT_RUN not in readme and figures_not_in_raw(readme, tmp_path / "results") == []
    for words in ("teacher stage", "QuestionAnswerer(export folder)", "first run", "Haystack v1",
                  "student.gradient_checkpointing: True, not the defaults", "held-out F1",
                  "gained over hard labels, with paired 95% intervals", "trained pair, F1 on held-out questions"):
        assert words in readme and words in docs
    # The trained pair's row stands beside the serving run's own (next line), and says how many questions its F1
    # rests on.
    lines = [line for line in readme.splitlines() if "QuestionAnswerer(export folder)" in line]
    assert len(lines) == 2 and "trained pair" in lines[1] and "on 2,658 questions**" in lines[1]
    assert readme.index(lines[1]) == readme.index(lines[0]) + len(lines[0]) + 1
    # Each raw file is named once in its machine's line of sources
    (sources,) = [line for line in readme.splitlines() if line.startswith(f"- **{slug}**")]
    names = re.findall(r"\[raw\]\(bench/results/[^/]+/([\w-]+)\.md\)", sources)
    assert sorted(names) == sorted(path.stem for path in folder.glob("*.json"))
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "results", again / "results")
    for doc in ("README.md", "results.md"):
        shutil.copyfile(tmp_path / doc, again / doc)
    regenerate(again / "results", again / "README.md", again / "results.md")
    assert (again / "README.md").read_text() == readme and (again / "results.md").read_text() == docs
    (folder.parent / "intel-6-143").mkdir()
    shutil.copyfile(folder / "serving.json", folder.parent / "intel-6-143" / "serving.json")
    with pytest.raises(SystemExit, match="written on"):
        report.machines(tmp_path / "results")


def test_the_full_tiers_trained_pair_is_the_accuracy_runs_student_at_the_defaults():
    """bench.report's trained-pair serving run reads the folders the full tier's accuracy run writes: its teacher
    and the first seed of its student distilled at the defaults (as the committed accuracy raw file names them)."""
    (run,) = [r for r in report.FULL if r.name == "serving-trained"]
    argv = report.command(run, "DATA", report.WORK)
    teacher, student = argv[argv.index("--pair") + 1].split(":")
    accuracy = json.loads((REPO_ROOT / "bench" / "results" / "amd-26-2" / "accuracy.json").read_text())
    (distilled,) = [row for row in accuracy["rows"]
                    if row["model"].endswith("distilled at the defaults, cut from the teacher")]
    first_seed = Path(distilled["seeds"][0]["workdir"])
    assert Path(student) == Path(os.path.relpath(report.WORK)) / "accuracy" / first_seed.name / "models" / "student"
    assert Path(teacher).parent.parent.name == Path(accuracy["rows"][0]["workdir"]).name == "teacher"
    order = [r.name for r in report.FULL]
    assert order.index("serving-trained") > order.index("accuracy")  # it serves what the accuracy run trained


def test_every_kept_raw_file_says_where_it_came_from():
    """Every JSON file in bench/results/ has a provenance with every key; what its run did not record is
    "unknown", said, not left out."""
    files = sorted((REPO_ROOT / "bench" / "results").rglob("*.json"))
    assert files
    for path in files:
        record = json.loads(path.read_text()).get("provenance")
        assert record is not None, path
        assert set(common.PROVENANCE_KEYS) <= set(record), (path, set(common.PROVENANCE_KEYS) - set(record))


def test_only_runs_the_named_benchmarks_of_the_tier(tmp_path, monkeypatch):
    for name in ("squad2-sample.json", "squad2-train-sample.json"):
        (tmp_path / name).write_text("{}")
    ran = []
    monkeypatch.setattr(report, "run_tier", lambda runs, data_dir, out: (ran.extend(r.name for r in runs), ("x", []))[1])
    monkeypatch.setattr(report, "write_tables", lambda *a: None)
    assert report.main(["--data-dir", str(tmp_path), "--quick", "--only", "serving", "--out", str(tmp_path)]) == 0
    assert ran == ["serving"]
    assert not list(tmp_path.glob("x/report-*.json"))  # one benchmark does not replace the tier's wall time
    with pytest.raises(SystemExit):  # the peer job is in the full tier only
        report.main(["--data-dir", str(tmp_path), "--quick", "--only", "peer", "--out", str(tmp_path)])
