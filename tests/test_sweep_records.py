"""A sweep's record files survive every interruption: SIGKILL and SIGINT at every pause point of a sweep and of an
evaluated sweep, into a new directory and over an earlier sweep with --overwrite. After each: the records are the
earlier set byte for byte or the new complete set, never a mix; no working name is in a record; and the next run
(the same command, then the same command again, then the earlier sweep's command) handles the directory without
hand-editing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli_errors import assert_one_line_error
from test_sweep import paused_sweep, sweep_args

from gpumerge.demo import DEMO_WORDS
from gpumerge.outdir import is_working_name
from gpumerge.runs import PENDING_DIR, RUNS_FILES

OLD = ("--grid", "gradient_end=0,1")
NEW = ("--grid", "gradient_end=0.5,1")

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(models):
    return models["fp16_a"], models["fp16_b"]  # model 1 has a tokenizer: an evaluated sweep can score


def records(runs: Path) -> dict[str, bytes]:
    return {name: (runs / name).read_bytes() for name in RUNS_FILES if (runs / name).is_file()}


def eval_flags(tmp_path: Path) -> tuple:
    text = tmp_path / "eval.txt"
    if not text.exists():
        text.write_text(" ".join(DEMO_WORDS * 6))
    return ("--eval-text", text, "--seq-len", "16", "--eval-tokens", "64", "--keep", "all")


def complete(pair, runs: Path, capsys, *flags) -> None:
    code, _, err = run_cli(*sweep_args(*pair, runs, *flags), capsys=capsys)
    assert code == 0, err


def interrupt(argv, tmp_path: Path, point: str, sig: int) -> int:
    """Run ``argv`` in a subprocess, land ``sig`` at the first pause at ``point``; its exit code."""
    proc, marker = paused_sweep(argv, tmp_path, point)
    proc.send_signal(sig)
    deadline = time.monotonic() + 60
    while proc.poll() is None:  # a deferred signal lets the run go on to the next pause: let it through
        marker.unlink(missing_ok=True)
        time.sleep(0.005)
        assert time.monotonic() < deadline
    proc.communicate(timeout=60)
    marker.unlink(missing_ok=True)
    return proc.returncode


def check_records(runs: Path) -> None:
    """Whatever records are there name no working file and only variants that are directories in RUNS (or are to
    be written by the same sweep again)."""
    if not (runs / "sweep.json").exists():
        assert not any((runs / name).exists() for name in RUNS_FILES)
        return
    sweep = json.loads((runs / "sweep.json").read_text())
    named = [v["name"] for v in sweep["variants"]] + sweep["retiring"]
    assert not any(is_working_name(n) or n.startswith(".") for n in named), named


@pytest.mark.parametrize("scored", [False, True], ids=["write", "eval"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("over", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("point", ["score", "write", "finalize", "records"])
def test_records_survive_every_interruption(point, over, sig, scored, pair, tmp_path, capsys):
    if point == "score" and not scored:
        pytest.skip("only an evaluated sweep scores")
    runs = tmp_path / "runs"
    extra = eval_flags(tmp_path) if scored else ()
    if over:
        complete(pair, runs, capsys, *OLD, *extra)
    earlier = records(runs) if over else {}
    new = sweep_args(*pair, runs, *NEW, *extra, *(("--overwrite",) if over else ()))
    code = interrupt(new, tmp_path, point, sig)
    assert code in (-signal.SIGKILL, 128 + signal.SIGINT, 0)
    check_records(runs)
    now = records(runs) if runs.exists() else {}
    # a SIGINT once the variants are being put in place waits until they and their records are: the new set
    committed = point in ("finalize", "records") and sig == signal.SIGINT
    if committed:
        assert json.loads(now["sweep.json"])["variants"][0]["name"] == "ge0.5"
    else:
        assert now == earlier  # nothing new is a record until the whole set is
    # the same command again finishes the sweep
    code, out, err = run_cli(*new, capsys=capsys)
    assert code == 0, err
    check_records(runs)
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["ge0.5", "ge1"]
    assert not (runs / PENDING_DIR).exists()
    assert [v["name"] for v in json.loads((runs / "sweep.json").read_text())["variants"]] == ["ge0.5", "ge1"]
    if scored:
        rows = [json.loads(line)["name"] for line in (runs / "results.jsonl").read_text().splitlines()]
        assert sorted(rows) == ["ge0.5", "ge1", "model_1", "model_2"]
    # and again, plainly: nothing left to do
    code, out, err = run_cli(*sweep_args(*pair, runs, *NEW, *extra), capsys=capsys)
    assert code == 0 and ("nothing to write" in out or scored), err
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0, out + err
    # the earlier sweep's command is refused for a stated reason, never confused
    code, _, err = run_cli(*sweep_args(*pair, runs, *OLD, *extra), capsys=capsys)
    assert_one_line_error(code, err, "holds another sweep (other variants)")
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["ge0.5", "ge1", "sweep.json", "variants.csv"]
        + (["results.csv", "results.json", "results.jsonl", "sweep.png"] if scored else []))


def test_a_commit_cut_short_is_finished_by_any_next_run(pair, tmp_path, capsys):
    """Killed after its commit marker: the next run, even one that is refused, finds the new records complete."""
    runs = tmp_path / "runs"
    complete(pair, runs, capsys, *OLD)
    assert interrupt(sweep_args(*pair, runs, *NEW, "--overwrite"), tmp_path, "records", signal.SIGKILL) == -9
    code, _, err = run_cli(*sweep_args(*pair, runs, *OLD), capsys=capsys)
    assert_one_line_error(code, err, "holds another sweep")
    assert [r.split(",")[0] for r in (runs / "variants.csv").read_text().splitlines()] == ["name", "ge0.5", "ge1"]
    assert not (runs / PENDING_DIR).exists()


def test_a_working_directory_in_the_way_is_refused(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    complete(pair, runs, capsys, *OLD)
    (runs / PENDING_DIR).write_text("not ours")
    code, _, err = run_cli(*sweep_args(*pair, runs, *OLD), capsys=capsys)
    assert_one_line_error(code, err, "is in the way of the sweep's working directory")


def test_planted_files_in_the_working_directory_are_never_followed(pair, tmp_path, capsys):
    """A link at the pending log's name (to an input file) makes the run start its working directory afresh; a
    directory where a record file goes, met while a cut commit is finished, is one line, and the next run after it
    is removed finishes the commit."""
    runs = tmp_path / "runs"
    extra = eval_flags(tmp_path)
    new = sweep_args(*pair, runs, *NEW, *extra)
    assert interrupt(new, tmp_path, "score", signal.SIGKILL) == -signal.SIGKILL
    log = runs / PENDING_DIR / "results.jsonl"
    victim = next(pair[0].glob("*.safetensors"))
    before = victim.read_bytes()
    log.unlink()
    log.symlink_to(victim)
    code, _, err = run_cli(*new, capsys=capsys)
    assert code == 0, err
    assert victim.read_bytes() == before
    # a commit cut short, then a directory in the way of one of its files
    assert interrupt(sweep_args(*pair, runs, *OLD, *extra, "--overwrite"), tmp_path, "records",
                     signal.SIGKILL) == -signal.SIGKILL
    (runs / "sweep.png").unlink(missing_ok=True)
    (runs / "sweep.png").mkdir()
    code, _, err = run_cli(*sweep_args(*pair, runs, *OLD, *extra), capsys=capsys)
    assert_one_line_error(code, err, "the sweep's new records could not be put in place")
    (runs / "sweep.png").rmdir()
    code, _, err = run_cli(*sweep_args(*pair, runs, *OLD, *extra), capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["ge0", "ge1"]
