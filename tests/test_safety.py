"""The data-safety promises, each defect of the hostile trial reproduced: inputs are never written, the output
appears atomically and replaces only what --overwrite may replace, one run per output, signals leave nothing behind
and print one true line, non-finite inputs are refused (or blended in IEEE arithmetic when asked)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_cli, snapshot, source_env, write_checkpoint
from test_cli_errors import assert_one_line_error, leftovers, merge_args

import gpumerge.outdir


@pytest.fixture
def pair(models):
    return models["fp16_a"], models["fp16_b"]


def merged(pair, out: Path, capsys, *extra) -> Path:
    code, _, err = run_cli(*merge_args(*pair, out, *extra), capsys=capsys)
    assert code == 0, err
    return out


def only(tmp_path: Path, *names: str) -> None:
    """Nothing but these entries in tmp_path: no partial, lock or temporary file left."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


# ---- 1. --report is checked against the inputs and the output -------------------------------------------------

@pytest.mark.parametrize("where", ["input_shard", "input_config", "link_to_input", "out_dir", "inside_out",
                                   "inside_input_dir", "dev_full", "directory", "unknown_user"])
def test_report_never_lands_on_an_input_or_the_output(where, pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "out"
    report = {
        "input_shard": sorted(b.glob("*.safetensors"))[0],
        "input_config": a / "config.json",
        "link_to_input": tmp_path / "report.json",
        "out_dir": out,
        "inside_out": out / "report.json",
        "inside_input_dir": a / "report.json",
        "dev_full": Path("/dev/full"),
        "directory": tmp_path,
        "unknown_user": Path("~no-such-user-gpumerge/report.json"),
    }[where]
    if where == "link_to_input":
        report.symlink_to(sorted(b.glob("*.safetensors"))[1])
    code, _, err = run_cli(*merge_args(a, b, out, "--report", report), capsys=capsys)
    assert_one_line_error(code, err, "--report")
    assert not out.exists()
    assert not (a / "report.json").exists()


def test_report_written_before_the_output_appears(pair, tmp_path, capsys, monkeypatch):
    """A report that cannot be written stops the merge before OUT appears; a good one appears with OUT."""
    out, report = tmp_path / "out", tmp_path / "report.json"

    def full(self, data):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gpumerge.outdir.AtomicFile, "write_bytes", full)
        code, _, err = run_cli(*merge_args(*pair, out, "--report", report), capsys=capsys)
    assert_one_line_error(code, err, "No space left")
    only(tmp_path)
    merged(pair, out, capsys, "--report", report)
    assert json.loads(report.read_text())["bytes_written"] > 0
    only(tmp_path, "out", "report.json")


# ---- 2. an OUT that appears during the merge; two runs into one OUT -----------------------------------------------

def _at_pause(marker: Path, action) -> threading.Thread:
    """Run ``action`` once the merge reaches the pause point, then let the merge go on."""
    def work():
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            action()
        finally:
            marker.unlink()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("overwrite", [False, True])
def test_directory_appearing_at_out_during_the_merge_is_kept(overwrite, pair, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("GPUMERGE_TEST_PAUSE", str(tmp_path / "pause"))
    monkeypatch.setenv("GPUMERGE_TEST_PAUSE_AT", "finalize")

    def user_writes_notes():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    thread = _at_pause(tmp_path / "pause.finalize", user_writes_notes)
    code, _, err = run_cli(*merge_args(*pair, out, *(["--overwrite"] if overwrite else [])), capsys=capsys)
    thread.join()
    assert_one_line_error(code, err, "during the merge", "left as it is")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    only(tmp_path, "out")


def _default_signals() -> None:
    """In the child, before gpumerge starts: the signals the tests send at their defaults. A run under `nohup` (or
    as a background job) inherits SIGHUP (SIGINT) ignored, and gpumerge leaves an ignored signal ignored, by design
    (test_an_ignored_sighup_stays_ignored); the tests here are about signals that do arrive."""
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _spawn(argv, *, env_extra=None) -> subprocess.Popen:
    env = source_env(PYTHONFAULTHANDLER="1", **(env_extra or {}))  # SIGABRT dumps every thread's stack (_finish)
    return subprocess.Popen([sys.executable, "-m", "gpumerge", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_signals)


def _finish(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    """The process's stderr once it exits; if it hangs, its threads' stacks in the failure (a hang is a bug)."""
    try:
        return proc.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the process did not exit within {timeout_s} s; its threads:\n{stderr[-6000:]}")


def _wait_for(marker: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the merge ended before the pause: {proc.communicate()}")
        assert time.monotonic() < deadline, "the merge never reached the pause"
        time.sleep(0.005)


def test_second_run_into_a_held_out_is_refused_at_once(pair, tmp_path, capsys):
    out = tmp_path / "out"
    pause = tmp_path / "pause"
    first = _spawn(merge_args(*pair, out), env_extra={"GPUMERGE_TEST_PAUSE": str(pause),
                                                      "GPUMERGE_TEST_PAUSE_AT": "write"})
    try:
        _wait_for(Path(f"{pause}.write"), first)
        began = time.monotonic()
        code, _, err = run_cli(*merge_args(*pair, out, "--overwrite"), capsys=capsys)
        assert_one_line_error(code, err, "being written by another gpumerge run", f"pid {first.pid}")
        assert time.monotonic() - began < 30
    finally:
        Path(f"{pause}.write").unlink(missing_ok=True)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    only(tmp_path, "out")


def test_lock_of_a_killed_run_is_released_and_its_partial_removed(pair, tmp_path, capsys):
    out = tmp_path / "out"
    pause = tmp_path / "pause"
    first = _spawn(merge_args(*pair, out), env_extra={"GPUMERGE_TEST_PAUSE": str(pause),
                                                      "GPUMERGE_TEST_PAUSE_AT": "write"})
    _wait_for(Path(f"{pause}.write"), first)
    first.kill()
    first.communicate(timeout=60)
    Path(f"{pause}.write").unlink()
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # what SIGKILL leaves
    merged(pair, out, capsys)
    only(tmp_path, "out")


# ---- 3. --overwrite: never the current directory or above; strictly a model directory -----------------------------

def test_overwrite_dotdot_from_a_subdirectory_is_refused(pair, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "project"
    (parent / "sub").mkdir(parents=True)
    (parent / "config.json").write_text("{}")
    (parent / "model.safetensors").write_bytes(b"x")
    (parent / "sub" / "work.txt").write_text("mine")
    monkeypatch.chdir(parent / "sub")
    before = snapshot([parent])
    code, _, err = run_cli(*merge_args(*pair, "..", "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "above the current directory")
    assert snapshot([parent]) == before


@pytest.mark.parametrize("target", ["home", "above_home"])
def test_overwrite_never_replaces_home_or_above(target, pair, tmp_path, capsys, monkeypatch):
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for place in (home, home.parent):
        (place / "config.json").write_text("{}")
        (place / "model.safetensors").write_bytes(b"x")
    out = home if target == "home" else home.parent
    before = snapshot([tmp_path / "users"])
    code, _, err = run_cli(*merge_args(*pair, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "home directory")
    assert snapshot([tmp_path / "users"]) == before


def test_overwrite_refuses_a_directory_with_subdirectories(pair, tmp_path, capsys):
    out = merged(pair, tmp_path / "out", capsys)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step1.txt").write_text("mine")
    code, _, err = run_cli(*merge_args(*pair, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "subdirectories", "checkpoints")
    assert (out / "checkpoints" / "step1.txt").read_text() == "mine"


# ---- 4. inputs that are links into OUT --------------------------------------------------------------------------

@pytest.mark.parametrize("linked", ["shards", "index", "config"])
def test_input_files_linked_into_out_are_inputs(linked, pair, tmp_path, capsys):
    a, b = pair
    out = merged(pair, tmp_path / "out", capsys, "--max_shard_size", "60KB")
    model = tmp_path / "links"
    model.mkdir()
    for path in out.iterdir():
        if path.name.endswith(".safetensors") and linked == "shards":
            (model / path.name).symlink_to(path)
        elif path.name.endswith(".index.json") and linked == "index":
            (model / path.name).symlink_to(path)
        elif path.name == "config.json" and linked == "config":
            (model / path.name).symlink_to(path)
        else:
            shutil.copy(path, model / path.name)
    before = snapshot([out])
    code, _, err = run_cli(*merge_args(model, b, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "holds model 1's file", "a link to")
    assert snapshot([out]) == before
    assert all(p.exists() for p in model.iterdir())  # no dangling link


# ---- 5. the swap of an --overwrite'd OUT --------------------------------------------------------------------------

def test_overwrite_swaps_in_one_step(pair, tmp_path, capsys, monkeypatch):
    out = merged(pair, tmp_path / "out", capsys, "--gradient_start", "0.3")
    calls = []
    real = gpumerge.outdir.exchange
    monkeypatch.setattr(gpumerge.outdir, "exchange", lambda x, y: (calls.append((x, y)), real(x, y)))
    merged(pair, out, capsys, "--overwrite", "--gradient_start", "0.7")
    assert len(calls) == 1 and calls[0][1] == out
    assert json.loads((out / "README.md").read_text().split("<!-- gpumerge-record\n")[1].split("-->")[0])[
        "settings"]["gradient_start"] == 0.7
    only(tmp_path, "out")


def test_swap_without_renameat2_keeps_the_old_copy_recoverable(pair, tmp_path, capsys, monkeypatch):
    """Where the exchange is unavailable the old OUT is moved aside first, then the new one in; if the process dies
    between the two renames, the next run into OUT puts the old one back before anything else."""
    import errno

    out = merged(pair, tmp_path / "out", capsys, "--gradient_start", "0.3")

    def no_exchange(x, y):
        raise OSError(errno.ENOSYS, "no renameat2")

    with monkeypatch.context() as patch:
        patch.setattr(gpumerge.outdir, "exchange", no_exchange)
        merged(pair, out, capsys, "--overwrite", "--gradient_start", "0.7")
    assert '"gradient_start": 0.7' in (out / "README.md").read_text()
    only(tmp_path, "out")
    old = snapshot([out])
    # a death between the two renames leaves OUT at the hidden '.old' name and nothing at OUT
    aside = tmp_path / (gpumerge.outdir.sibling_stem(out) + "-4242-abcdefgh.old")
    os.rename(out, aside)
    for argv in (merge_args(*pair, out), ("plan", "--model_path1", pair[0], "--model_path2", pair[1],
                                          "--output_model_path", out)):
        code, _, err = run_cli(*argv, capsys=capsys)
        assert_one_line_error(code, err, "interrupted while replacing", str(aside), "--overwrite")
        assert not out.exists() and aside.is_dir()
    os.rename(aside, out)  # what the message says to do
    assert snapshot([out]) == old
    os.rename(out, aside)
    merged(pair, out, capsys, "--overwrite")  # the old one is put back, then replaced
    only(tmp_path, "out")


def test_signal_while_out_is_swapped_gives_a_true_message(pair, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, "-m", "gpumerge", *map(str, merge_args(*pair, out))],
                           capture_output=True, text=True, timeout=120, env=source_env())
    assert first.returncode == 0, first.stderr
    pause = tmp_path / "pause"
    proc = _spawn(merge_args(*pair, out, "--overwrite", "--gradient_start", "0.5"),
                  env_extra={"GPUMERGE_TEST_PAUSE": str(pause), "GPUMERGE_TEST_PAUSE_AT": "finalize"})
    marker = Path(f"{pause}.finalize")
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    marker.unlink()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == [f"gpumerge: interrupted (SIGTERM); the merge was already complete and is "
                                           f"at {out}"]
    assert '"gradient_start": 0.5' in (out / "README.md").read_text()
    only(tmp_path, "out")


# ---- 6. signals: INT, TERM, HUP, and a second one during the cleanup -----------------------------------------------

@pytest.mark.parametrize("signals,pause_at", [
    ((signal.SIGINT,), "write"),
    ((signal.SIGTERM,), "write"),
    ((signal.SIGHUP,), "write"),
    ((signal.SIGTERM, signal.SIGTERM), "write"),
    ((signal.SIGINT, signal.SIGTERM), "write,cleanup"),
])
def test_signals_leave_nothing_and_print_one_true_line(signals, pause_at, pair, tmp_path):
    out = tmp_path / "out"
    pause = tmp_path / "pause"
    before = snapshot(pair)
    proc = _spawn(merge_args(*pair, out), env_extra={"GPUMERGE_TEST_PAUSE": str(pause),
                                                     "GPUMERGE_TEST_PAUSE_AT": pause_at})
    _wait_for(Path(f"{pause}.write"), proc)
    proc.send_signal(signals[0])
    if "cleanup" in pause_at:  # the second signal lands while the partial output is being removed
        _wait_for(Path(f"{pause}.cleanup"), proc)
        proc.send_signal(signals[1])
        time.sleep(0.02)
        Path(f"{pause}.cleanup").unlink()
    elif len(signals) > 1:
        time.sleep(0.01)
        proc.send_signal(signals[1])
    stderr = _finish(proc)
    for marker in tmp_path.glob("pause.*"):
        marker.unlink()
    assert proc.returncode == 128 + signals[0], stderr
    assert stderr.strip().splitlines() == [f"gpumerge: interrupted ({signal.Signals(signals[0]).name}); nothing was "
                                           "written to the output path"]
    only(tmp_path)
    assert snapshot(pair) == before


# ---- 12. OUT a symlink; long names ---------------------------------------------------------------------------------

def test_out_symlink_is_refused_up_front(pair, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "symbolic link")
    assert list(target.iterdir()) == []


def test_long_output_names(pair, tmp_path, capsys):
    name = "m" * 254
    merged(pair, tmp_path / name, capsys)
    only(tmp_path, name)
    code, _, err = run_cli(*merge_args(*pair, tmp_path / ("m" * 256)), capsys=capsys)
    assert_one_line_error(code, err, "256 bytes", "255")


def test_missing_parents_are_created_and_removed_on_failure(pair, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x" / "y" / "out"
    monkeypatch.setattr(gpumerge.pipeline, "_read_piece", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    code, _, err = run_cli(*merge_args(*pair, out), capsys=capsys)
    assert_one_line_error(code, err, "I/O error")
    only(tmp_path)


# ---- --plot and demo --workdir are checked the same way ---------------------------------------------------------

@pytest.mark.parametrize("where", ["input_file", "inside_input", "inside_out"])
def test_plot_never_lands_on_an_input_or_the_output(where, pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "out"
    plot = {"input_file": a / "config.json", "inside_input": b / "plot.png", "inside_out": out / "plot.png"}[where]
    argv = ["plan", "--model_path1", a, "--model_path2", b, "--plot", plot, "--quiet"]
    if where == "inside_out":
        argv += ["--output_model_path", out]
    code, _, err = run_cli(*argv, capsys=capsys)
    assert_one_line_error(code, err, "--plot")
    assert not (b / "plot.png").exists()


def test_demo_never_writes_into_a_users_directory(tmp_path, capsys):
    (tmp_path / "model1").mkdir()
    (tmp_path / "model1" / "weights.bin").write_bytes(b"mine")
    code, _, err = run_cli("demo", "--workdir", tmp_path, "--quiet", capsys=capsys)
    assert_one_line_error(code, err, "--workdir", "not empty")
    assert (tmp_path / "model1" / "weights.bin").read_bytes() == b"mine"


# ---- plan fails wherever a merge fails before its first byte ------------------------------------------------------

@pytest.mark.parametrize("case", ["out_is_input", "out_not_empty", "cuda", "unequal_buffers"])
def test_plan_fails_where_merge_fails(case, pair, tmp_path, capsys):
    a, b = pair
    extra: list = []
    if case == "out_is_input":
        extra = ["--output_model_path", b]
    elif case == "out_not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("x")
        extra = ["--output_model_path", tmp_path / "out", "--overwrite"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    elif case == "unequal_buffers":
        t = {"model.layers.0.w": torch.ones(3, dtype=torch.float16),
             "model.layers.0.count": torch.tensor([1, 2], dtype=torch.int64)}
        a = write_checkpoint(tmp_path / "ia", t, num_layers=1)
        b = write_checkpoint(tmp_path / "ib", {**t, "model.layers.0.count": torch.tensor([1, 3])}, num_layers=1)
    plan_code, _, plan_err = run_cli("plan", "--model_path1", a, "--model_path2", b, "--quiet", *extra,
                                     capsys=capsys)
    assert plan_code == 2, plan_err
    out = extra[extra.index("--output_model_path") + 1] if "--output_model_path" in extra else tmp_path / "m"
    rest = [x for x in extra if x not in ("--output_model_path", out)]
    merge_code, _, merge_err = run_cli(*merge_args(a, b, out, *rest), capsys=capsys)
    assert merge_code == 2
    assert plan_err.split(":")[2] == merge_err.split(":")[2]  # the same check, the same words


# ---- non-finite inputs ----------------------------------------------------------------------------------------------

def _nonfinite_pair(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    a = {f"model.layers.{i}.w": torch.randn(7, 5, generator=g).half() for i in range(3)}
    b = {k: torch.randn(7, 5, generator=g).half() for k in a}
    a["model.layers.0.w"][0, 0] = -0.0
    b["model.layers.0.w"][1, 1] = float("inf")
    b["model.layers.1.w"][2, 3] = float("nan")
    a["model.layers.2.w"][0, 4] = float("-inf")
    return (write_checkpoint(tmp_path / "na", a, num_layers=3), write_checkpoint(tmp_path / "nb", b, num_layers=3),
            a, b)


def test_nonfinite_inputs_are_refused_naming_tensor_and_model(tmp_path, capsys):
    a, b, _, _ = _nonfinite_pair(tmp_path)
    code, _, err = run_cli(*merge_args(a, b, tmp_path / "out", "--gradient_start", "0.2"), capsys=capsys)
    assert_one_line_error(code, err, "model.layers.0.w", "model 2", "NaN or infinite", "--allow-nonfinite")
    assert not (tmp_path / "out").exists()


def test_nonfinite_inputs_with_t_zero_are_refused_too(tmp_path, capsys):
    a, b, _, _ = _nonfinite_pair(tmp_path)
    code, _, err = run_cli(*merge_args(a, b, tmp_path / "out", "--gradient_start", "0", "--gradient_end", "0.5"),
                           capsys=capsys)
    assert_one_line_error(code, err, "model.layers.0.w", "model 2")


def test_allow_nonfinite_blends_in_ieee_arithmetic(tmp_path, capsys):
    a, b, ta, tb = _nonfinite_pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(*merge_args(a, b, out, "--gradient_start", "0", "--gradient_end", "0.8",
                                       "--allow-nonfinite"), capsys=capsys)
    assert code == 0, err
    got = load_state(out)
    # t = 0: model 1's values exactly, -0.0 included, whatever model 2 holds
    assert got["model.layers.0.w"].view(torch.int16).equal(ta["model.layers.0.w"].view(torch.int16))
    for i, t in ((1, 0.4), (2, 0.8)):
        name = f"model.layers.{i}.w"
        x, y = ta[name].double(), tb[name].double()
        ref = torch.where(torch.tensor(t) < 0.5, x + t * (y - x), y - (y - x) * (1 - t))
        assert torch.equal(torch.isnan(got[name]), torch.isnan(ref))
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isinf(got[name]), torch.isinf(ref))
        assert ((got[name].double() - ref)[finite].abs() <= 2 ** -10 * ref[finite].abs() + 2 ** -24).all()


def test_extrapolation_overflow_says_so(pair, tmp_path, capsys):
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out", "--gradient_start", "1e30"), capsys=capsys)
    assert_one_line_error(code, err, "overflow float16", "extrapolates")
    assert "range of the inputs" not in err
    assert leftovers(tmp_path / "out") == []


def test_names_that_are_not_utf8_are_refused_before_the_merge(pair, tmp_path, capsys):
    bad = os.fsdecode(b"out-\xff")
    code, _, err = run_cli(*merge_args(*pair, tmp_path / bad), capsys=capsys)
    assert_one_line_error(code, err, "--output_model_path", "not a valid UTF-8 name")
    only(tmp_path)
    link = tmp_path / os.fsdecode(b"model-\xfe")
    link.symlink_to(pair[0])
    code, _, err = run_cli(*merge_args(link, pair[1], tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "--model_path1", "not a valid UTF-8 name")
    only(tmp_path, link.name)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_config_json_must_be_utf8(encoding, pair, tmp_path, capsys):
    a = tmp_path / "a"
    shutil.copytree(pair[0], a)
    config = json.loads((a / "config.json").read_text())
    config["_name_or_path"] = "modèle"
    (a / "config.json").write_bytes(json.dumps(config, ensure_ascii=False).encode(encoding))
    code, _, err = run_cli(*merge_args(a, pair[1], tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "config.json", "UTF-16" if encoding == "utf-16" else "not UTF-8")
    assert not (tmp_path / "out").exists()


# ---- the second hostile trial's findings ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".partial", ".old"])
def test_input_named_like_a_hidden_working_directory_is_never_removed(suffix, pair, tmp_path, capsys):
    """A leftover partial directory beside OUT is removed and an '.old' one moved back to OUT: an input that goes by
    such a name is refused instead (by path, and again under the lock)."""
    out = tmp_path / "out"
    model = tmp_path / (gpumerge.outdir.sibling_stem(out) + "-1-abcdefgh" + suffix)
    shutil.copytree(pair[0], model)
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(*merge_args(model, pair[1], out, *extra), capsys=capsys)
        assert_one_line_error(code, err, "named like gpumerge's hidden working files")
    same = {p.name: p.read_bytes() for p in pair[0].iterdir() if p.is_file()}
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == same  # still model 1, whole


def test_report_named_like_the_lock_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "out"
    report = tmp_path / (gpumerge.outdir.sibling_stem(out) + ".lock")
    code, _, err = run_cli(*merge_args(*pair, out, "--report", report), capsys=capsys)
    assert_one_line_error(code, err, "--report", "hidden working files")
    only(tmp_path)


def test_input_moved_to_out_during_the_merge_is_not_replaced(pair, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m1"
    shutil.copytree(pair[0], model)
    out = merged((model, pair[1]), tmp_path / "out", capsys)
    monkeypatch.setenv("GPUMERGE_TEST_PAUSE", str(tmp_path / "pause"))
    monkeypatch.setenv("GPUMERGE_TEST_PAUSE_AT", "finalize")
    before = snapshot([model])

    def user_moves_the_input_to_out():
        os.rename(out, tmp_path / "out.old")
        os.rename(model, out)

    thread = _at_pause(tmp_path / "pause.finalize", user_moves_the_input_to_out)
    from gpumerge.cli import main  # not run_cli: the test itself moves the input away

    code = main([str(x) for x in merge_args(model, pair[1], out, "--overwrite")])
    err = capsys.readouterr().err
    thread.join()
    assert_one_line_error(code, err, "is or holds model 1's", "left as it is")
    assert {k.replace(str(out), str(model)): v for k, v in snapshot([out]).items()} == before


def test_hard_links_to_input_files_in_out_are_refused(pair, tmp_path, capsys):
    out = merged(pair, tmp_path / "out", capsys)
    shard = sorted(pair[0].glob("*.safetensors"))[0]
    os.link(shard, out / shard.name)
    code, _, err = run_cli(*merge_args(*pair, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "(the same file)")


def test_demo_never_writes_through_a_link_in_an_earlier_demo_directory(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("mine")
    work = tmp_path / "w"
    work.mkdir()
    (work / ".gpumerge-demo").write_text("gpumerge demo\n")
    (work / "model1").symlink_to(victim)
    code, _, err = run_cli("demo", "--workdir", work, "--quiet", capsys=capsys)
    assert_one_line_error(code, err, "--workdir", "model1")
    assert (victim / "config.json").read_text() == "mine"


def test_a_signal_outside_a_wait_is_raised_at_the_next_step():
    """The handler raises only where an exception is safe (a wait on threads); elsewhere (an import, a mkdtemp) it
    records the signal and the next poll raises it: a signal can neither deadlock an import nor split a step."""
    from gpumerge.signals import Interrupted, SignalGuard

    guard = SignalGuard()
    guard.install()
    try:
        guard._handle(signal.SIGTERM, None)  # outside any region: recorded only
        guard._handle(signal.SIGINT, None)
        with pytest.raises(Interrupted) as raised:
            guard.poll()
        assert raised.value.signum == signal.SIGTERM
        guard.poll()  # once only: the cleanup it starts is not cut short
    finally:
        guard.restore()
    guard.install()
    try:
        with pytest.raises(Interrupted):
            with guard.interruptible():
                guard._handle(signal.SIGHUP, None)  # inside a wait: at once
        with guard.critical():
            guard._handle(signal.SIGTERM, None)  # recorded, the first one was raised already
    finally:
        guard.restore()


def test_the_signal_that_arrived_first_decides_the_exit_code():
    """Python runs pending handlers in signal-number order; the wakeup pipe keeps the order of arrival."""
    from gpumerge.signals import Interrupted, SignalGuard

    guard = SignalGuard()
    guard.install()
    try:
        # what the C-level handler writes when SIGTERM arrives, then SIGINT 5 ms later, both before Python runs
        # its handlers; Python then runs SIGINT's first (signal-number order)
        os.write(guard._order[1], bytes([signal.SIGTERM, signal.SIGINT]))
        guard._handle(signal.SIGINT, None)
        guard._handle(signal.SIGTERM, None)
        with pytest.raises(Interrupted) as raised:
            guard.poll()
        assert raised.value.signum == signal.SIGTERM
    finally:
        guard.restore()


def test_an_ignored_sighup_stays_ignored(pair, tmp_path):
    """nohup: a signal ignored when gpumerge starts stays ignored, and the merge completes."""
    out = tmp_path / "out"
    pause = tmp_path / "pause"
    proc = subprocess.Popen([sys.executable, "-m", "gpumerge", *map(str, merge_args(*pair, out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=source_env(GPUMERGE_TEST_PAUSE=str(pause), GPUMERGE_TEST_PAUSE_AT="write"),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    _wait_for(Path(f"{pause}.write"), proc)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    Path(f"{pause}.write").unlink()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    only(tmp_path, "out")


def test_a_removed_current_directory_is_one_line(pair, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "gpumerge", *map(str, merge_args(*pair, tmp_path / "out"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=gone, env=source_env(),
                            preexec_fn=lambda: os.rmdir(gone))
    _, stderr = proc.communicate(timeout=60)
    assert_one_line_error(proc.returncode, stderr, "current directory no longer exists")
    only(tmp_path)


def test_signal_while_swapping_keeps_the_report(pair, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    stale = tmp_path / ".r.json.gpumerge-999999999-0123abcd.tmp"  # a SIGKILLed run's temporary report
    stale.write_text("{}")
    pause = tmp_path / "pause"
    proc = _spawn(merge_args(*pair, out, "--report", report),
                  env_extra={"GPUMERGE_TEST_PAUSE": str(pause), "GPUMERGE_TEST_PAUSE_AT": "finalize"})
    _wait_for(Path(f"{pause}.finalize"), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    Path(f"{pause}.finalize").unlink()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "already complete" in stderr
    assert json.loads(report.read_text())["bytes_written"] > 0
    only(tmp_path, "out", "r.json")


@pytest.mark.parametrize("case", ["out_under_a_file", "lock_path_is_a_directory"])
def test_plan_fails_where_the_merge_cannot_start(case, pair, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "a" / "out"
    else:
        (tmp_path / (gpumerge.outdir.sibling_stem(out) + ".lock")).mkdir()
    for argv in (merge_args(*pair, out), ("plan", "--model_path1", pair[0], "--model_path2", pair[1],
                                          "--output_model_path", out)):
        code, _, err = run_cli(*argv, capsys=capsys)
        assert_one_line_error(code, err, "not a directory" if case == "out_under_a_file" else "in the way")


# ---- the third hostile trial's findings -----------------------------------------------------------------------------

def test_a_hard_link_at_the_lock_path_is_never_truncated(pair, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "m1" / "config.json"
    shutil.copytree(pair[0], tmp_path / "m1")
    os.link(config, tmp_path / (gpumerge.outdir.sibling_stem(out) + ".lock"))
    before = config.read_bytes()
    code, _, err = run_cli(*merge_args(tmp_path / "m1", pair[1], out), capsys=capsys)
    assert_one_line_error(code, err, "in the way of gpumerge's lock file")
    assert config.read_bytes() == before


def test_report_directory_swapped_for_a_link_to_an_input_during_the_merge(pair, tmp_path):
    """The report's directory is held open from the check on: the report lands where it was checked."""
    model = tmp_path / "m1"
    shutil.copytree(pair[0], model)
    (tmp_path / "d").mkdir()
    before = snapshot([model])
    pause = tmp_path / "pause"
    proc = _spawn(merge_args(model, pair[1], tmp_path / "out", "--report", tmp_path / "d" / "config.json"),
                  env_extra={"GPUMERGE_TEST_PAUSE": str(pause), "GPUMERGE_TEST_PAUSE_AT": "write"})
    _wait_for(Path(f"{pause}.write"), proc)
    os.rename(tmp_path / "d", tmp_path / "d.bak")
    (tmp_path / "d").symlink_to(model)
    Path(f"{pause}.write").unlink()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert snapshot([model]) == before
    assert json.loads((tmp_path / "d.bak" / "config.json").read_text())["bytes_written"] > 0


def test_a_stale_report_temporary_that_is_an_input_is_kept(pair, tmp_path, capsys):
    model = tmp_path / "m1"
    shutil.copytree(pair[0], model)
    shard = sorted(model.glob("*.safetensors"))[0]
    hidden = tmp_path / ".r.json.gpumerge-999999999-0123abcd.tmp"  # named like a dead run's temporary report
    os.rename(shard, hidden)
    shard.symlink_to(hidden)
    code, _, err = run_cli(*merge_args(model, pair[1], tmp_path / "out", "--report", tmp_path / "r.json"),
                           capsys=capsys)
    assert code == 0, err
    assert hidden.is_file() and shard.resolve() == hidden


def test_outputs_whose_names_share_a_prefix_keep_their_own_partials(pair, tmp_path, capsys):
    first = tmp_path / "a"
    second = tmp_path / (gpumerge.outdir.sibling_stem(first)[1:] + "-" + "z" * 30)  # its partial starts like a's
    pause = tmp_path / "pause"
    proc = _spawn(merge_args(*pair, second), env_extra={"GPUMERGE_TEST_PAUSE": str(pause),
                                                        "GPUMERGE_TEST_PAUSE_AT": "write"})
    try:
        _wait_for(Path(f"{pause}.write"), proc)
        merged(pair, first, capsys)
    finally:
        Path(f"{pause}.write").unlink(missing_ok=True)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    only(tmp_path, "a", second.name)


@pytest.mark.parametrize("name", [".out-0123abcd.gpumerge.lock", ".x-0123abcd.gpumerge-12-abcdefgh.partial",
                                  ".r.json.gpumerge-12-0123abcd.tmp"])
def test_reports_named_like_any_working_file_are_refused(name, pair, tmp_path, capsys):
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "other", "--report", tmp_path / name), capsys=capsys)
    assert_one_line_error(code, err, "--report", "hidden working files")


def test_too_few_open_files_is_one_line_before_any_work(pair, tmp_path):
    import resource

    proc = subprocess.run([sys.executable, "-m", "gpumerge", *map(str, merge_args(*pair, tmp_path / "out"))],
                          capture_output=True, text=True, timeout=120, env=source_env(),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24)))
    assert_one_line_error(proc.returncode, proc.stderr, "open files", "ulimit -n")
    only(tmp_path)


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_a_finished_merge_is_not_failed_by_its_stdout(stdout, pair, tmp_path):
    target = subprocess.DEVNULL if stdout == "closed" else open("/dev/full", "w")
    argv = [sys.executable, "-m", "gpumerge", *map(str, merge_args(*pair, tmp_path / "out"))]
    if stdout == "closed":
        argv = ["bash", "-c", 'exec "$@" >&-', "bash", *argv]
    proc = subprocess.run(argv, stdout=target, stderr=subprocess.PIPE, text=True, timeout=120, env=source_env())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (tmp_path / "out" / "config.json").exists()


def test_plan_plot_is_drawn_even_when_the_reader_stops_early(pair, tmp_path):
    plot = tmp_path / "shares.png"
    proc = subprocess.run(["bash", "-c", '"$@" | true', "bash", sys.executable, "-m", "gpumerge", "plan",
                           "--model_path1", str(pair[0]), "--model_path2", str(pair[1]), "--quiet", "--plot",
                           str(plot)], capture_output=True, text=True, timeout=120, env=source_env())
    assert proc.returncode == 0, proc.stderr
    assert plot.read_bytes()[:4] == b"\x89PNG"
    only(tmp_path, "shares.png")


@pytest.mark.parametrize("name", ["x.pgf", "x.eps", "x"])
def test_plot_formats_are_png_svg_pdf(name, pair, tmp_path, capsys):
    code, _, err = run_cli("plan", "--model_path1", pair[0], "--model_path2", pair[1], "--quiet", "--plot",
                           tmp_path / name, capsys=capsys)
    assert_one_line_error(code, err, "--plot", ".png")
    only(tmp_path)


def test_report_where_no_file_can_be_made_fails_before_the_merge(pair, tmp_path, capsys):
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out", "--report", "/proc/gpumerge-report.json"),
                           capsys=capsys)
    assert_one_line_error(code, err, "--report")
    only(tmp_path)


def test_sigquit_is_handled_like_the_others(pair, tmp_path):
    out, pause = tmp_path / "out", tmp_path / "pause"
    proc = _spawn(merge_args(*pair, out), env_extra={"GPUMERGE_TEST_PAUSE": str(pause),
                                                     "GPUMERGE_TEST_PAUSE_AT": "write"})
    _wait_for(Path(f"{pause}.write"), proc)
    proc.send_signal(signal.SIGQUIT)
    _, stderr = proc.communicate(timeout=60)
    Path(f"{pause}.write").unlink(missing_ok=True)
    assert proc.returncode == 128 + signal.SIGQUIT, stderr
    assert stderr.strip().splitlines() == ["gpumerge: interrupted (SIGQUIT); nothing was written to the output path"]
    only(tmp_path)
