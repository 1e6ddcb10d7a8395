"""Many processes: `accelerate launch --multi_gpu --num_processes 2 -m gpumerge sweep ...` on this CPU machine runs two
processes (MULTI_CPU, gloo) that share an evaluated sweep's rows; the main process alone writes RUNS. The tiny fp16
pair (model 1 has a tokenizer).

Both sides run with one thread per process (OMP_NUM_THREADS=1, what accelerate gives each launched process here):
a CPU forward pass with another thread count sums in another order, and perplexities then differ in their last
digits (about 1e-9 relative, seen here); with the same threads they are the same to the bit.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_state, source_env

from gpumerge.demo import DEMO_WORDS
from gpumerge.search import study_storage

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow  # each test starts processes through accelerate's launcher (~8 s a launch)
TIMINGS = ("blend_s", "eval_s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(argv, *, processes: int, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """gpumerge under accelerate's launcher (processes > 1), or plainly (1); one thread per process either way."""
    env = source_env(OMP_NUM_THREADS="1", **(env or {}))
    if processes > 1:
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "gpumerge"]
    else:
        command = [sys.executable, "-m", "gpumerge"]
    return subprocess.run([*command, *map(str, argv)], capture_output=True, text=True, env=env, timeout=timeout)


def text(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    if not path.exists():
        path.write_text(" ".join(DEMO_WORDS * 6))
    return path


def grid(models, runs: Path, tmp_path: Path, *extra) -> list:
    return ["sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_dir", runs,
            "--eval-text", text(tmp_path), "--seq-len", "16", "--grid", "gradient_start=0:1:3",
            "--grid", "gradient_end=0,1", "--quiet", *extra]


def table(runs: Path) -> list[dict]:
    with open(runs / "results.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


def logged(runs: Path) -> list[dict]:
    return [json.loads(line) for line in (runs / "results.jsonl").read_text().splitlines()]


def test_a_grid_on_two_processes_gives_what_one_gives(models, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    done = launch(grid(models, one, tmp_path, "--no-baselines", "--keep", 1), processes=1)
    assert done.returncode == 0, done.stderr
    done = launch(grid(models, two, tmp_path, "--no-baselines", "--keep", 1), processes=2)
    assert done.returncode == 0, done.stderr
    assert len(table(two)) == 6 and table(one) == table(two)  # every figure, to the bit
    by_process = {}
    for row in logged(two):
        by_process.setdefault(row["process"], []).append(row["name"])
    assert sorted(by_process) == [0, 1] and [len(v) for v in by_process.values()] == [3, 3]
    assert all("process" not in row for row in logged(one))
    # the main process alone reports (one summary line) and writes: the kept variant's tensors are one's
    assert done.stdout.count("gpumerge: sweep at") == 1, done.stdout
    (kept,) = [r["name"] for r in table(two) if r["kept"] == "true"]
    assert sorted(p.name for p in (two / kept).iterdir()) == sorted(p.name for p in (one / kept).iterdir())
    want, got = load_state(one / kept), load_state(two / kept)  # (the records differ: they name their paths)
    assert want.keys() == got.keys() and all(torch.equal(want[k].view(-1).view(torch.uint8),
                                                         got[k].view(-1).view(torch.uint8)) for k in want)


def test_a_failing_process_stops_the_run_and_the_rows_gathered_are_kept(models, tmp_path):
    runs = tmp_path / "runs"
    done = launch(grid(models, runs, tmp_path, "--keep", 0), processes=2,
                  env={"GPUMERGE_TEST_FAIL_ON_PROCESS": "1"})
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("gpumerge:")]
    assert said == ["gpumerge: error: process 1 failed on purpose (GPUMERGE_TEST_FAIL_ON_PROCESS)"], done.stderr
    assert not (runs / "results.csv").exists()  # no record of a sweep that did not finish
    pending = runs / ".gpumerge-sweep.pending" / "results.jsonl"
    first = [json.loads(line)["name"] for line in pending.read_text().splitlines()]
    # the first round (a row from each process), and the main process's row of the second, when process 1 failed
    assert len(first) == 3
    again = launch(grid(models, runs, tmp_path, "--keep", 0), processes=2)
    assert again.returncode == 0, again.stderr
    rows = logged(runs)
    assert len(rows) == 8 and [r["name"] for r in rows if "process" not in r] == first  # reused, not rescored


def test_an_interrupted_run_on_two_processes_resumes(models, tmp_path):
    runs = tmp_path / "runs"
    done = launch(grid(models, runs, tmp_path, "--keep", 1), processes=2, env={"GPUMERGE_TEST_STOP_AFTER": "4"})
    assert done.returncode != 0 and "gpumerge: interrupted (SIGINT)" in done.stderr, done.stderr
    assert not (runs / "results.csv").exists()
    done = launch(grid(models, runs, tmp_path, "--keep", 1), processes=2)
    assert done.returncode == 0, done.stderr
    one = tmp_path / "one"
    assert launch(grid(models, one, tmp_path, "--keep", 1), processes=1).returncode == 0
    assert table(one) == table(runs)
    assert sum("process" in row for row in logged(runs)) == 4  # the rest came from the interrupted run


def test_a_sweep_that_writes_every_variant_is_one_process(models, tmp_path):
    argv = ["sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_dir",
            tmp_path / "runs", "--grid", "gradient_end=0,1", "--quiet"]
    done = launch(argv, processes=2)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("gpumerge:")]
    assert len(said) == 1 and "a sweep that writes every variant runs in one process" in said[0], done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_search_on_two_processes_asks_the_same_trials_twice(models, tmp_path):
    pytest.importorskip("optuna", reason="the search extra (pip install 'gpumerge[search]') is not installed")
    found = []
    for k in (1, 2):
        runs = tmp_path / f"runs{k}"
        argv = ["sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_dir", runs,
                "--eval-text", text(tmp_path), "--seq-len", "16", "--search", "optuna", "--trials", 6, "--seed", 5,
                "--keep", 1, "--space", "gradient_start=0:1", "--space", "gradient_end=0:1", "--quiet"]
        done = launch(argv, processes=2)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("gpumerge: sweep at") == 1
        trials = [r for r in table(runs) if r["name"].startswith("t")]
        assert len(trials) == 6 and len({r["gradient_start"] for r in trials}) == 6
        found.append(sorted(tuple(r.items()) for r in trials))
        by_process = [row["process"] for row in logged(runs) if row["name"].startswith("t")]
        assert sorted(by_process) == [0, 0, 0, 1, 1, 1]  # a batch of two trials at a time, one on each process
        assert (runs / "study.db").is_file() and not list(runs.glob("study.db-*"))
    assert found[0] == found[1]


def test_a_search_on_two_processes_stopped_by_a_failure_or_a_signal_resumes(models, tmp_path):
    pytest.importorskip("optuna", reason="the search extra (pip install 'gpumerge[search]') is not installed")
    runs = tmp_path / "runs"
    argv = ["sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_dir", runs,
            "--eval-text", text(tmp_path), "--seq-len", "16", "--search", "optuna", "--trials", 6, "--seed", 3,
            "--keep", 1, "--space", "gradient_end=0:1", "--quiet"]
    done = launch(argv, processes=2, env={"GPUMERGE_TEST_FAIL_ON_PROCESS": "1"})
    said = [line for line in done.stderr.splitlines() if line.startswith("gpumerge:")]
    assert done.returncode != 0 and said == ["gpumerge: error: process 1 failed on purpose "
                                             "(GPUMERGE_TEST_FAIL_ON_PROCESS)"], done.stderr
    done = launch(argv, processes=2, env={"GPUMERGE_TEST_STOP_AFTER": "2"})
    assert done.returncode != 0 and "gpumerge: interrupted (SIGINT)" in done.stderr, done.stderr
    assert not (runs / "results.csv").exists()
    done = launch(argv, processes=2)
    assert done.returncode == 0, done.stderr
    import optuna

    study = optuna.load_study(study_name=json.loads((runs / "sweep.json").read_text())["search"]["study"],
                              storage=study_storage(runs, readonly=True))
    states = [t.state for t in study.get_trials()]
    # the trial process 1 failed is a failed trial; the trials before each stop count, the rest were asked again
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 and optuna.trial.TrialState.FAIL in states
    assert len([r for r in table(runs) if r["name"].startswith("t")]) == 6
