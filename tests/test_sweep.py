"""`gpumerge sweep` (write mode): every variant is byte for byte the single merge of its settings, the inputs are
read once, aliases, resume, refusals, and nothing partial left on an error or a signal."""

from __future__ import annotations

import csv
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, snapshot, source_env
from test_cli_errors import assert_one_line_error

import gpumerge.checkpoint


@pytest.fixture
def pair(models):
    return models["fp16_a"], models["fp16_b"]


def sweep_args(a, b, runs, *extra):
    return ("sweep", "--model_path1", a, "--model_path2", b, "--output_dir", runs, "--quiet", *extra)


def swept(pair, runs: Path, capsys, *extra) -> str:
    code, out, err = run_cli(*sweep_args(*pair, runs, *extra), capsys=capsys)
    assert code == 0, err
    return out + err


def shard_parts(path: Path) -> tuple[dict, dict, bytes]:
    """(header without metadata, the merge record, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__")
    record = json.loads(metadata["gpumerge"])
    record.pop("command")
    return header, record, raw[8 + length:]


def assert_same_model(got: Path, want: Path) -> None:
    """The same files; tensors, layout and merge record (its command aside: it names the output) identical; aux
    files identical byte for byte."""
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in want.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            assert shard_parts(got / name) == shard_parts(want / name), name
        elif name == "gpumerge_digests.json":  # the same, but for the files that hold the record (it names OUT)
            files = [{k: v for k, v in json.loads((d / name).read_text())["files"].items()
                      if k != "README.md" and not k.endswith(".safetensors")} for d in (got, want)]
            assert files[0] == files[1]
        elif name != "README.md":  # the model card shows the re-run command, which names the output
            assert (got / name).read_bytes() == (want / name).read_bytes(), name


def single_merge(pair, out: Path, capsys, *flags) -> Path:
    a, b = pair
    code, _, err = run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", out, "--quiet", *flags,
                           capsys=capsys)
    assert code == 0, err
    return out


def rows(runs: Path) -> list[dict]:
    with open(runs / "variants.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def paused_sweep(argv, tmp_path: Path, point: str) -> tuple[subprocess.Popen, Path]:
    """A `gpumerge` subprocess stopped at the test pause ``point`` (signals land while it is really in flight)."""
    pause = tmp_path / "pause"
    proc = subprocess.Popen([sys.executable, "-m", "gpumerge", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=source_env(GPUMERGE_TEST_PAUSE=str(pause), GPUMERGE_TEST_PAUSE_AT=point))
    marker = Path(f"{pause}.{point}")
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc, marker


def not_a_file(kind: str, path: Path, *, link_to: Path) -> Path:
    """``path`` made a FIFO, a directory or a link (to ``link_to``); or /dev/zero: what a file flag must refuse."""
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind.startswith("symlink"):
        path.symlink_to(link_to)
    else:
        return Path("/dev/zero")
    return path


def variant_dirs(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if p.is_dir())


# ---- every variant is its single merge --------------------------------------------------------------------------

def test_window_grid_variants_equal_single_merges(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_start=0,0.25", "--grid", "gradient_end=0.5:1:2",
          "--grid", "layer_start=0,2", "--layer_end", "4")
    table = rows(runs)
    assert [r["name"] for r in table] == variant_dirs(runs) == sorted(
        f"gs{gs}-ge{ge}-ls{ls}" for gs in ("0", "0.25") for ge in ("0.5", "1") for ls in (0, 2))
    assert list(table[0]) == ["name", "gradient_start", "gradient_end", "layer_start"]
    for row in table:
        want = single_merge(pair, tmp_path / f"single-{row['name']}", capsys, "--gradient_start",
                            row["gradient_start"], "--gradient_end", row["gradient_end"], "--layer_start",
                            row["layer_start"], "--layer_end", "4")
        assert_same_model(runs / row["name"], want)
    record = json.loads((runs / "sweep.json").read_text())
    assert [v["name"] for v in record["variants"]] == [r["name"] for r in table]
    assert record["variants"][0]["settings"]["layer_end"] == 4


def test_gradient_values_grid_with_filters_equals_single_merges(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_values=[[1, 0.5, 0], [0.2, 0.8]]",
          "--grid", "custom_filter=mlp,norm", "--grid", "layer_only=true,false")
    # every name with "mlp" has "layer" (model.layers.N.mlp): layer_only changes nothing there, and those are aliases
    assert len(variant_dirs(runs)) == 6 == len(rows(runs))
    assert not (runs / "gv1_0.5_0-fmlp-lo0").exists() and (runs / "gv1_0.5_0-fnorm-lo0").is_dir()
    for row in rows(runs):
        flags = ["--gradient_values", row["gradient_values"], "--custom_filter", row["custom_filter"]]
        flags += ["--layer_only"] if row["layer_only"] == "true" else []
        assert_same_model(runs / row["name"], single_merge(pair, tmp_path / f"s-{row['name']}", capsys, *flags))


def test_method_grid_equals_single_merges(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "method=lerp,slerp", "--gradient_start", "0.2", "--gradient_end", "0.9")
    assert variant_dirs(runs) == ["lerp", "slerp"]
    for method in ("lerp", "slerp"):
        want = single_merge(pair, tmp_path / f"s-{method}", capsys, "--method", method, "--gradient_start", "0.2",
                            "--gradient_end", "0.9")
        assert_same_model(runs / method, want)


SETTINGS = """
- name: soft
  gradient_start: 0.2
  gradient_end: 0.6
  layer_end: 4
- operations:
    - {operation: attn, filter: self_attn, gradient_values: [0.8, 0.2]}
    - {operation: mlp, filter: mlp, gradient_values: [0.3, 0.7]}
    - {operation: norms, filter: layernorm, gradient_values: [0.5, 0.5]}
- name: per-module
  layer_gradients: {self_attn: [0, 1], default: [0.5]}
- name: mk-slerp
  merge_method: slerp
  base_model: {A}
  slices:
    - sources:
        - {model: {A}, layer_range: [0, 5]}
        - {model: {B}, layer_range: [0, 5]}
  parameters:
    t: [0, 0.5, 1]
- name: mk-linear
  merge_method: linear
  models:
    - {model: {A}, parameters: {weight: 0.7}}
    - {model: {B}, parameters: {weight: 0.3}}
- gradient_values: [1, 0]
  filter: mlp
"""


def test_settings_file_mixing_recipe_forms_equals_single_merges(pair, tmp_path, capsys):
    import yaml

    a, b = pair
    text = SETTINGS.replace("{A}", str(a)).replace("{B}", str(b))
    settings = tmp_path / "variants.yaml"
    settings.write_text(text)
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--settings", settings)
    names = ["soft", "v002", "per-module", "mk-slerp", "mk-linear", "v006"]
    assert variant_dirs(runs) == sorted(names)
    assert [r["name"] for r in rows(runs)] == names
    for name, entry in zip(names, yaml.safe_load(text)):
        entry.pop("name", None)
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(entry, sort_keys=False))
        want = single_merge(pair, tmp_path / f"s-{name}", capsys, "--config", recipe)
        assert_same_model(runs / name, want)


def test_inputs_are_read_once(pair, tmp_path, capsys, monkeypatch):
    """A 4-variant sweep reads exactly the bytes of one merge that blends the union of what they blend."""
    read: dict[str, int] = {}
    original = gpumerge.checkpoint.Checkpoint.read_into

    def counting(self, name, dest, *, start=0):
        read[self.label] = read.get(self.label, 0) + dest.numel() * dest.element_size()
        return original(self, name, dest, start=start)

    monkeypatch.setattr(gpumerge.checkpoint.Checkpoint, "read_into", counting)
    swept(pair, tmp_path / "runs", capsys, "--grid", "layer_start=0,2", "--grid", "gradient_end=0.5,1",
          "--layer_end", "4", "--max_memory", "cpu=16MiB")
    sweep_read = dict(read)
    read.clear()
    single_merge(pair, tmp_path / "union", capsys, "--layer_start", "0", "--layer_end", "4")
    assert sweep_read == read and sum(read.values()) > 0


def in_process_sweep(pair, runs: Path, *extra, **engine):
    from gpumerge.cli import build_parser
    from gpumerge.sweep import run_sweep

    args = build_parser("sweep").parse_args([str(x) for x in sweep_args(*pair, runs, *extra)[1:]])
    return run_sweep(args, notice=lambda line: None, **engine)


@pytest.mark.parametrize("engine", [dict(budget={"cpu": 3 * 4096}, batch_bytes=4096), dict(simulate_staging=True),
                                    dict(budget={"cpu": 3 * 4096}, batch_bytes=4096, simulate_staging=True)])
def test_small_batches_and_staging_give_the_same_bytes(engine, pair, tmp_path, capsys):
    """Many variants' outputs in one batch shrink the pieces: tensors split into row chunks still land exactly; the
    GPU path's staging (inputs to the device, every output region back) run on the CPU gives the same bytes."""
    in_process_sweep(pair, tmp_path / "runs", "--grid", "gradient_end=0:1:3", "--grid", "method=lerp,slerp",
                     **engine)
    for row in rows(tmp_path / "runs"):
        want = single_merge(pair, tmp_path / f"s-{row['name']}", capsys, "--gradient_end", row["gradient_end"],
                            "--method", row["method"])
        assert_same_model(tmp_path / "runs" / row["name"], want)


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_sweep_equals_cpu_sweep(models, tmp_path):
    pair = (models["bf16_a"], models["fp16_b"])  # casts and mixed-dtype blends too
    grid = ("--grid", "gradient_end=0:1:3", "--grid", "method=lerp,slerp", "--dtype", "float16")
    in_process_sweep(pair, tmp_path / "cpu", *grid, "--device", "cpu")
    for batch_bytes in (None, 4096):
        in_process_sweep(pair, tmp_path / f"gpu{batch_bytes}", *grid, "--device", "cuda", batch_bytes=batch_bytes)
        for row in rows(tmp_path / "cpu"):
            assert_same_model(tmp_path / f"gpu{batch_bytes}" / row["name"], tmp_path / "cpu" / row["name"])


# ---- aliases, resume, another sweep --------------------------------------------------------------------------------

def test_variants_with_the_same_rules_are_one_variant(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    said = swept(pair, runs, capsys, "--grid", "layer_end=3,5,16")  # the fixture has 5 blocks: 5 and 16 are one
    assert variant_dirs(runs) == ["le3", "le5"]
    assert "1 alias(es): le16 = le5" in said
    record = json.loads((runs / "sweep.json").read_text())
    assert [v["same_as"] for v in record["variants"]] == [None, None, "le5"]
    assert [r["name"] for r in rows(runs)] == ["le3", "le5"]


def test_rerun_skips_complete_variants(pair, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    grid = ("--grid", "gradient_end=0:1:3")
    swept(pair, runs, capsys, *grid)
    kept = {name: (runs / name / "config.json").stat().st_mtime_ns for name in ("ge0", "ge1")}
    shutil.rmtree(runs / "ge0.5")
    said = swept(pair, runs, capsys, *grid)
    assert "wrote 1 variant(s)" in said and "2 already complete" in said
    assert variant_dirs(runs) == ["ge0", "ge0.5", "ge1"]
    assert {name: (runs / name / "config.json").stat().st_mtime_ns for name in kept} == kept
    assert_same_model(runs / "ge0.5", single_merge(pair, tmp_path / "s", capsys, "--gradient_end", "0.5"))
    said = swept(pair, runs, capsys, *grid)
    assert "nothing to write" in said and "3 already complete" in said


def test_another_sweep_into_runs_is_refused_unless_overwrite(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_end=0,1")
    before = snapshot([runs])
    code, _, err = run_cli(*sweep_args(*pair, runs, "--grid", "gradient_end=0.5,1"), capsys=capsys)
    assert_one_line_error(code, err, "holds another sweep (other variants)", "--overwrite")
    assert snapshot([runs]) == before
    swept(pair, runs, capsys, "--grid", "gradient_end=0.5,1", "--overwrite")
    assert variant_dirs(runs) == ["ge0.5", "ge1"]
    assert [r["name"] for r in rows(runs)] == ["ge0.5", "ge1"]


def test_overwrite_touches_only_the_earlier_sweeps_own_variants(pair, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_end=0,1")
    shutil.copytree(runs / "ge0", runs / "my-finetune")  # a model directory of the user's, not the sweep's
    (runs / "my-finetune" / "README.md").write_text("mine")
    before = snapshot([runs])
    code, _, err = run_cli(*sweep_args(*pair, runs, "--grid", "gradient_end=0.5,1", "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "not its sweep's (my-finetune)")
    assert snapshot([runs]) == before
    shutil.rmtree(runs / "my-finetune")
    (runs / "ge0").rename(runs / "ge0.5")  # a directory named like a new variant that the earlier sweep never wrote
    code, _, err = run_cli(*sweep_args(*pair, runs, "--grid", "gradient_end=0.5,1", "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "ge0.5, which the earlier sweep did not write")


def test_interrupted_overwrite_keeps_the_earlier_sweep(pair, tmp_path):
    runs = tmp_path / "runs"
    code = subprocess.run([sys.executable, "-m", "gpumerge", *map(str, sweep_args(*pair, runs, "--grid",
                                                                                "gradient_end=0,1"))],
                          env=source_env(), capture_output=True, timeout=120).returncode
    assert code == 0
    before = snapshot([runs])
    proc, marker = paused_sweep(sweep_args(*pair, runs, "--grid", "gradient_end=0.5,1", "--overwrite"), tmp_path,
                                "write")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    marker.unlink(missing_ok=True)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    after = snapshot([runs])  # the earlier sweep whole, its records put back (a new mtime: compare the bytes)
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}


def test_overwrite_leaves_other_runs_working_files_and_retires_stale_locks(pair, tmp_path, capsys):
    from gpumerge.outdir import sibling_stem

    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_end=0,1")
    live = runs / f"{sibling_stem(runs / 'mine')}-123-abcdefgh.partial"  # another run's work in progress
    live.mkdir()
    (live / "config.json").write_text("{}")
    stale_lock = runs / f"{sibling_stem(runs / 'ge0')}.lock"  # a killed run's, for a variant the new sweep drops
    stale_lock.write_text("99999999")
    swept(pair, runs, capsys, "--grid", "gradient_end=0.5,1", "--overwrite")
    assert (live / "config.json").read_text() == "{}"
    assert not stale_lock.exists()
    assert sorted(p.name for p in runs.iterdir()) == sorted(["ge0.5", "ge1", "sweep.json", "variants.csv",
                                                              live.name])


def test_resume_never_takes_a_foreign_directory_for_a_variant(pair, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    grid = ("--grid", "gradient_end=0,0.5,1")
    swept(pair, runs, capsys, *grid)
    shutil.rmtree(runs / "ge0.5")
    single_merge(pair, runs / "ge0.5", capsys, "--gradient_end", "0.3")  # another merge at the variant's name
    code, _, err = run_cli(*sweep_args(*pair, runs, *grid), capsys=capsys)
    assert_one_line_error(code, err, "ge0.5 is in the way of variant ge0.5")
    shutil.rmtree(runs / "ge0.5")
    (runs / "ge0.5").mkdir()
    code, _, err = run_cli(*sweep_args(*pair, runs, *grid), capsys=capsys)
    assert_one_line_error(code, err, "is in the way of variant ge0.5")
    (runs / "ge0.5").rmdir()
    shard = sorted((runs / "ge1").glob("*.safetensors"))[-1]
    with open(shard, "r+b") as handle:  # a variant cut short (by hand: gpumerge never leaves one)
        handle.truncate(shard.stat().st_size - 1)
    code, _, err = run_cli(*sweep_args(*pair, runs, *grid), capsys=capsys)
    assert_one_line_error(code, err, "is in the way of variant ge1")


def test_settings_file_entries_are_never_overridden_by_flags(pair, tmp_path, capsys):
    settings = tmp_path / "variants.yaml"
    settings.write_text("- {name: x, method: slerp, gradient_start: 0.2}\n- {name: y, gradient_start: 0.7}\n")
    code, _, err = run_cli(*sweep_args(*pair, tmp_path / "runs", "--settings", settings, "--method", "lerp"),
                           capsys=capsys)
    assert_one_line_error(code, err, "--method cannot be given with --settings")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variants.yaml"]


@pytest.mark.parametrize("content", ["no_record", "foreign_file"])
def test_a_directory_that_is_not_a_sweep_is_never_replaced(content, pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    swept(pair, runs, capsys, "--grid", "gradient_end=0,1")
    if content == "no_record":
        (runs / "sweep.json").unlink()
    else:
        (runs / "notes.txt").write_text("mine")
    before = snapshot([runs])
    code, _, err = run_cli(*sweep_args(*pair, runs, "--grid", "gradient_end=0.5,1", "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "no sweep.json" if content == "no_record" else "notes.txt")
    assert snapshot([runs]) == before


# ---- refusals: one line, exit 2, nothing written ----------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (("--grid", "gradient_start="), "gives no value"),
    (("--grid", "learning_rate=1,2"), "KEY one of"),
    (("--grid", "gradient_end=0,x"), "'x' is not a number"),
    (("--grid", "gradient_end=0,0"), "twice"),
    (("--grid", "layer_end=0:10:4"), "not whole numbers"),
    (("--grid", "method=lerp,ties"), "not one of lerp, slerp"),
    (("--grid", "gradient_end=0:1:40", "--grid", "gradient_start=0:1:30"), "1200 variants, more than 1000"),
    (("--grid", "gradient_end=0:1:40", "--grid", "gradient_start=0:1:30", "--max-variants", "1100"),
     "more than --max-variants 1100"),
    (("--grid", "gradient_end=0,1", "--gradient_end", "0.5"), "also swept"),
    (("--grid", "gradient_end=0,1", "--grid", "gradient_end=0.5"), "given twice"),
    ((), "needs --grid"),
    (("--grid", "layer_start=1,7"), "variant ls7: the layer window"),
    (("--grid", "gradient_end=0,1e39"), "variant ge1e+39: the recipe gives"),
    (("--grid", "gradient_values=[[1, 0]]", "--grid", "gradient_start=0,1"), "variant gs0: --gradient_values "
     "replaces --gradient_start"),
])
def test_bad_sweeps_are_one_line_errors(extra, needle, pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(*sweep_args(*pair, runs, *extra), capsys=capsys)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, needle", [
    ("- {gradient_start: 0.1}\n- {dtype: bfloat16, gradient_start: 0.2}\n", "variant v002 sets dtype bfloat16"),
    ("- {name: a, gradient_start: 0.1}\n- {name: A, gradient_start: 0.2}\n", "used twice"),
    ("- {name: model_1, gradient_start: 0.1}\n", "reserved"),
    ("- {name: ../up, gradient_start: 0.1}\n", "must be 1 to 100 letters"),
    ("- {gradient_start: 0.1, output_model_path: x}\n", "output_model_path is the same for every variant"),
    ("- {gradient_start: 0.1, device: cpu}\n", "device is the same for every variant"),
    ("- {gradient_start: 0.1, learning_rate: 3}\n", "unknown key(s) learning_rate"),
    ("- {model_path1: /elsewhere, gradient_start: 0.1}\n", "which is not the sweep's"),
    ("gradient_start: 0.1\n", "a YAML list of variants"),
    ("- {}\n", "sets nothing"),
])
def test_bad_settings_files_are_one_line_errors(text, needle, pair, tmp_path, capsys):
    settings = tmp_path / "variants.yaml"
    settings.write_text(text)
    code, _, err = run_cli(*sweep_args(*pair, tmp_path / "runs", "--settings", settings), capsys=capsys)
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variants.yaml"]


def test_not_enough_disk_for_every_variant_is_refused_first(pair, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    free = 66 * 2**20  # the margin (64 MiB) and one variant, not three
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40, free))
    code, _, err = run_cli(*sweep_args(*pair, tmp_path / "runs", "--grid", "gradient_end=0:1:3"), capsys=capsys)
    assert_one_line_error(code, err, "not enough disk space for the sweep's 3 variant(s)")
    assert list(tmp_path.iterdir()) == []


def test_runs_is_checked_like_an_output(pair, tmp_path, capsys):
    a, b = pair
    code, _, err = run_cli(*sweep_args(a, b, a / "runs", "--grid", "gradient_end=0,1"), capsys=capsys)
    assert_one_line_error(code, err, "input directory of model 1")
    code, _, err = run_cli(*sweep_args(a, b, a, "--grid", "gradient_end=0,1"), capsys=capsys)
    assert_one_line_error(code, err, "is the input directory of model 1")


@pytest.mark.parametrize("where", ["new/parents/runs", "empty_runs"])
def test_a_failure_mid_sweep_leaves_no_partial_variant(where, pair, tmp_path, capsys, monkeypatch):
    import gpumerge.writer

    calls = []
    original = gpumerge.writer.finish_model_dir

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(gpumerge.writer, "finish_model_dir", failing)
    if where == "empty_runs":
        (tmp_path / where).mkdir()
    code, _, err = run_cli(*sweep_args(*pair, tmp_path / where, "--grid", "gradient_end=0:1:3"), capsys=capsys)
    assert_one_line_error(code, err, "No space left on device")
    # no variant completed: not even the sweep's records are left, nor the directories the run made
    assert [p.name for p in tmp_path.iterdir()] == ([] if where.startswith("new") else [where])
    assert list((tmp_path / where).iterdir()) == [] if where == "empty_runs" else True


@pytest.mark.parametrize("pause_at", ["write", "finalize"])
def test_ctrl_c_leaves_no_partial_variant(pause_at, pair, tmp_path):
    runs = tmp_path / "runs"
    before = snapshot(pair)
    proc, marker = paused_sweep(sweep_args(*pair, runs, "--grid", "gradient_end=0:1:3"), tmp_path, pause_at)
    deadline = time.monotonic() + 120
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    while proc.poll() is None:  # each variant's finalize pauses: let every one go on
        marker.unlink(missing_ok=True)
        time.sleep(0.005)
        assert time.monotonic() < deadline + 60
    _, stderr = proc.communicate(timeout=60)
    marker.unlink(missing_ok=True)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert snapshot(pair) == before
    leftover = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    if pause_at == "write":
        assert "interrupted (SIGINT); no partial variant was left" in stderr
        assert leftover == [] and not runs.exists()
    else:  # the signal waits until the finished variants are in place
        assert f"interrupted (SIGINT); every variant was already complete in {runs}" in stderr
        assert leftover == ["ge0", "ge0.5", "ge1", "sweep.json", "variants.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["runs"] if runs.exists() else [])


@pytest.mark.parametrize("where, needle", [
    ("symlink", "is a symbolic link"),
    ("symlink_to_input", "is a symbolic link"),
    ("fifo", "exists and is not a directory"),
    ("dotdot_into_input", "input directory of model 1"),
    ("parent_of_inputs", "overlaps the input directory of model 1"),
    ("cwd", "the current directory"),
])
def test_output_dir_paths_are_checked_before_any_work(where, needle, pair, tmp_path, capsys, monkeypatch):
    import os

    a, _ = pair
    runs = {"symlink": tmp_path / "link", "symlink_to_input": tmp_path / "link", "fifo": tmp_path / "fifo",
            "dotdot_into_input": a / ".." / a.name / "runs", "parent_of_inputs": a.parent, "cwd": Path(".")}[where]
    if where == "symlink":
        (tmp_path / "target").mkdir()
        runs.symlink_to(tmp_path / "target")
    if where == "symlink_to_input":
        runs.symlink_to(a)
    if where == "fifo":
        os.mkfifo(runs)
    if where == "cwd":
        monkeypatch.chdir(tmp_path)
    before = snapshot([tmp_path]) if where not in ("parent_of_inputs", "dotdot_into_input") else None
    code, _, err = run_cli(*sweep_args(*pair, runs, "--grid", "gradient_end=0,1"), capsys=capsys)
    assert_one_line_error(code, err, needle)
    if before is not None:
        assert snapshot([tmp_path]) == before


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink_to_directory", "dev_zero"])
def test_a_settings_path_that_is_not_a_regular_file_is_refused(kind, pair, tmp_path, capsys):
    settings = not_a_file(kind, tmp_path / "variants.yaml", link_to=pair[0])
    code, _, err = run_cli(*sweep_args(*pair, tmp_path / "runs", "--settings", settings), capsys=capsys)
    assert_one_line_error(code, err, f"--settings {settings}")
    assert not (tmp_path / "runs").exists()
