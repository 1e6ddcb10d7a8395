"""Bad input: one line `gpumerge: error: ...`, exit code 2, nothing at OUT, existing files untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, source_env, write_checkpoint

import gpumerge.pipeline
import gpumerge.writer


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gpumerge: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def merge_args(a, b, out, *extra):
    return ("--model_path1", a, "--model_path2", b, "--output_model_path", out, "--quiet", *extra)


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith(f".{out.name}")]


@pytest.fixture
def pair(models):
    return models["fp16_a"], models["fp16_b"]


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", [
    "missing_path", "no_weights", "truncated_shard", "corrupt_header", "index_missing_shard", "shape_mismatch",
    "empty_window", "negative_window", "window_past_end", "non_numeric_gradient", "nan_gradient", "bad_size",
    "out_inside_input", "out_contains_input", "out_is_input", "cuda_without_cuda", "bad_dtype", "bad_device",
    "no_config", "quantized", "unknown_flag", "auto_dtype_mixed", "readers_zero", "readers_many",
])
def test_bad_input(case, models, pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "out"
    extra: tuple = ()
    needles: tuple = ()
    if case == "missing_path":
        a, needles = tmp_path / "nope", ("does not exist",)
    elif case == "no_weights":
        a = tmp_path / "empty_model"
        a.mkdir()
        (a / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
        needles = ("no weights found",)
    elif case == "truncated_shard":
        a = corrupt_copy(a, tmp_path / "trunc")
        shard = sorted(a.glob("*.safetensors"))[-1]
        os.truncate(shard, shard.stat().st_size - 100)
        needles = ("truncated", shard.name)
    elif case == "corrupt_header":
        a = corrupt_copy(a, tmp_path / "corrupt")
        shard = sorted(a.glob("*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[10:20] = b"\x00garbage\xff\x01\x02"
        shard.write_bytes(bytes(data))
        needles = ("corrupt",)
    elif case == "index_missing_shard":
        b = corrupt_copy(b, tmp_path / "missing_shard")
        sorted(b.glob("*.safetensors"))[1].unlink()
        needles = ("model 2", "names 1 shard")
    elif case == "shape_mismatch":
        b, needles = models["wide"], ("differ", "A=(48,)", "B=(64,)", "model.layers.0.mlp.up_proj.weight")
    elif case == "empty_window":
        extra, needles = ("--layer_start", "5", "--layer_end", "99"), ("selects no block", "5 decoder blocks")
    elif case == "negative_window":
        extra, needles = ("--layer_start", "-2"), ("negative", "5 decoder blocks")
    elif case == "window_past_end":
        extra, needles = ("--layer_start", "3", "--layer_end", "3"), ("selects no block",)
    elif case == "non_numeric_gradient":
        extra, needles = ("--gradient_start", "abc"), ("gradient_start", "abc")
    elif case == "nan_gradient":
        extra, needles = ("--gradient_end", "nan"), ("finite",)
    elif case == "bad_size":
        extra, needles = ("--max_shard_size", "2 lots"), ("not a size",)
    elif case == "out_inside_input":
        out, needles = a / "merged", ("overlaps",)
    elif case == "out_contains_input":
        out, needles = a.parent, ("overlaps",)
        extra = ("--overwrite",)
    elif case == "out_is_input":
        out, extra, needles = b, ("--overwrite",), ("is the input",)
    elif case == "cuda_without_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra, needles = ("--device", "cuda"), ("no CUDA device",)
    elif case == "bad_dtype":
        extra, needles = ("--dtype", "int8"), ("--dtype",)
    elif case == "bad_device":
        extra, needles = ("--device", "tpu"), ("--device",)
    elif case == "no_config":
        a = corrupt_copy(a, tmp_path / "noconfig")
        (a / "config.json").unlink()
        needles = ("config.json",)
    elif case == "quantized":
        a = corrupt_copy(a, tmp_path / "quant")
        config = json.loads((a / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (a / "config.json").write_text(json.dumps(config))
        needles = ("quantized", "gptq")
    elif case in ("readers_zero", "readers_many"):
        extra, needles = ("--readers", "0" if case == "readers_zero" else "65"), ("--readers", "1 to 64")
    elif case == "unknown_flag":
        extra, needles = ("--gradient_vals", "[1,0]"), ("unrecognized",)
    elif case == "auto_dtype_mixed":
        a = write_checkpoint(tmp_path / "mixed", {"model.layers.0.w": torch.ones(2, dtype=torch.float16),
                                                  "model.norm.weight": torch.ones(2, dtype=torch.float32)},
                             num_layers=1)
        b = write_checkpoint(tmp_path / "mixed_b", {"model.layers.0.w": torch.zeros(2, dtype=torch.float16),
                                                    "model.norm.weight": torch.ones(2, dtype=torch.float32)},
                             num_layers=1)
        extra, needles = ("--dtype", "auto"), ("mixes float dtypes",)
    before = {p: p.stat().st_mtime_ns for p in Path(a).rglob("*")} if Path(a).exists() else {}
    code, _, err = run_cli(*merge_args(a, b, out, *extra), capsys=capsys)
    assert_one_line_error(code, err, *needles)
    if case not in ("out_inside_input", "out_contains_input", "out_is_input"):
        assert not out.exists()
        assert leftovers(out) == []
    assert not (Path(a) / "merged").exists()
    after = {p: p.stat().st_mtime_ns for p in Path(a).rglob("*")} if Path(a).exists() else {}
    assert before == after  # inputs untouched


def test_shape_mismatch_lists_every_problem(models, tmp_path, capsys):
    code, _, err = run_cli(*merge_args(models["fp16_a"], models["wide"], tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "differ between A", "and 33 more")  # 5 blocks x 9 tensors, 12 listed


def test_out_not_empty_needs_overwrite(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(*merge_args(a, b, out), capsys=capsys)
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces model directories only, never an arbitrary one
    code, _, err = run_cli(*merge_args(a, b, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "does not look like a model directory")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "config.json").write_text("{}")  # config but no weights: not a model directory either
    code, _, err = run_cli(*merge_args(a, b, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "holds no weights")
    (out / "model.safetensors").write_bytes(b"old")  # a model directory, but with a file that is not a model's
    code, _, err = run_cli(*merge_args(a, b, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "not a model's", "keep.txt")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()  # an earlier merge: replaced
    code, _, err = run_cli(*merge_args(a, b, out, "--overwrite"), capsys=capsys)
    assert code == 0, err
    assert (out / "model.safetensors").stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_refuses_the_current_directory(pair, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    code, _, err = run_cli(*merge_args(*pair, ".", "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "is the current directory")
    assert (work / "config.json").exists()


def test_stale_partial_output_of_a_killed_run_is_removed(pair, tmp_path, capsys):
    from gpumerge.outdir import sibling_stem

    stale = tmp_path / (sibling_stem(tmp_path / "out") + "-999999999-abcdefgh.partial")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    assert run_cli(*merge_args(*pair, tmp_path / "out"), capsys=capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_report_must_be_a_writable_file(pair, tmp_path, capsys):
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out", "--report", tmp_path), capsys=capsys)
    assert_one_line_error(code, err, "--report")
    assert not (tmp_path / "out").exists()


def test_corrupt_index_and_header_types(pair, tmp_path, capsys):
    a = corrupt_copy(pair[0], tmp_path / "badindex")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = 5
    (a / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(*merge_args(a, pair[1], tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "not a valid index")
    b = corrupt_copy(pair[1], tmp_path / "badheader")
    shard = sorted(b.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = ["F16"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    assert len(text) == n
    shard.write_bytes(raw[:8] + text + raw[8 + n:])
    code, _, err = run_cli(*merge_args(pair[0], b, tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "corrupt header entry")
    assert not (tmp_path / "out").exists()


def test_empty_out_dir_is_fine(pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(*merge_args(*pair, out), capsys=capsys)[0] == 0
    assert (out / "config.json").exists()


def test_failure_mid_merge_leaves_nothing_and_keeps_old_output(pair, tmp_path, capsys, monkeypatch):
    a, b = pair
    out = tmp_path / "out"
    assert run_cli(*merge_args(a, b, out, "--gradient_start", "0.3"), capsys=capsys)[0] == 0  # the old merge
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    original = gpumerge.writer.ShardWriter.pwrite

    def failing(self, data, offset, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, data, offset, **kwargs)

    monkeypatch.setattr(gpumerge.writer.ShardWriter, "pwrite", failing)
    code, _, err = run_cli(*merge_args(a, b, out, "--overwrite"), capsys=capsys)
    assert_one_line_error(code, err, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_ctrl_c_leaves_nothing(pair, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpumerge.pipeline, "_read_piece", interrupted)
    code, _, err = run_cli(*merge_args(*pair, out), capsys=capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space(pair, tmp_path, capsys, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "not enough disk space")
    assert list(tmp_path.iterdir()) == []


def test_hub_id_not_cached(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(*merge_args("no-such-org/no-such-model", pair[1], tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "no-such-org/no-such-model", "not in the local Hugging Face cache")


def test_hub_id_from_cache(pair, tmp_path, capsys, monkeypatch):
    """A hub id resolves to the cached snapshot (the cache laid out as huggingface_hub lays it out)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(pair[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(*merge_args("org/tiny", pair[1], tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    """The installed console script and `python -m gpumerge` both give the one-line error."""
    for cmd in (["gpumerge"], [sys.executable, "-m", "gpumerge"]):
        exe = shutil.which(cmd[0]) if cmd == ["gpumerge"] else cmd[0]
        if exe is None:
            continue
        proc = subprocess.run([exe, *cmd[1:], "--model_path1", str(tmp_path / "x"), "--model_path2",
                               str(tmp_path / "y"), "--output_model_path", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120, env=source_env())
        assert_one_line_error(proc.returncode, proc.stderr, "does not exist")
        assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpumerge", "--model_path1", str(tmp_path / "x"), "--model_path2",
                           str(tmp_path / "y"), "--output_model_path", str(tmp_path / "o"), "--debug"],
                          capture_output=True, text=True, timeout=120, env=source_env())
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
