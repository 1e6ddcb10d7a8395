"""`gpumerge verify`, checksums and the read-back of the shards before the rename: a fresh output verifies; a
flipped byte in a blended tensor, in a copied tensor or in a header, a missing shard, a wrong checksum and inputs that
are not the recorded ones each fail with the right line."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli_errors import assert_one_line_error, merge_args

import gpumerge.writer


@pytest.fixture
def pair(models):
    return models["fp16_a"], models["fp16_b"]


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory) -> Path:
    """A sharded merge with checksums (60 KB shards: an index and several files)."""
    out = tmp_path_factory.mktemp("verify") / "out"
    code = run_cli(*merge_args(models["fp16_a"], models["fp16_b"], out, "--gradient_start", "0.2",
                               "--max_shard_size", "60KB", "--checksums"))[0]
    assert code == 0
    return out


def copy_of(merged: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(merged, out)
    return out


def verified(path: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli("verify", path, *extra, capsys=capsys)


def flip_tensor_byte(out: Path, name: str, at: int = 3) -> None:
    """Flip one byte of a tensor's data in whichever shard holds it."""
    for shard in sorted(out.glob("*.safetensors")):
        raw = bytearray(shard.read_bytes())
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        if name in header:
            position = 8 + length + header[name]["data_offsets"][0] + at
            raw[position] ^= 0x40
            shard.write_bytes(bytes(raw))
            return
    raise AssertionError(name)


def test_a_fresh_output_verifies_and_sha256sum_agrees(merged, capsys):
    code, out, err = verified(merged, capsys)
    assert code == 0, err
    assert "ok (" in out and "checksums checked" in out and "recomputed bit for bit" in out
    code, out, err = verified(merged, capsys, "--full")
    assert code == 0 and "all " in out, err
    check = subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=merged, capture_output=True)
    assert check.returncode == 0, check.stdout
    names = [line.split("  ", 1)[1] for line in (merged / "checksums.sha256").read_text().splitlines()]
    assert names == sorted(p.name for p in merged.iterdir() if p.name != "checksums.sha256")


@pytest.mark.parametrize("tensor, needle", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight differs from its recomputed "
                                               "blend"),
    ("model.embed_tokens.weight", "model.embed_tokens.weight differs from model 1's tensor"),
])
def test_a_flipped_byte_in_a_tensor_fails(tensor, needle, merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    flip_tensor_byte(out, tensor)
    code, _, err = verified(out, capsys)
    assert code == 1 and "its sha256 differs from checksums.sha256" in err, err
    (out / "checksums.sha256").unlink()  # without checksums, the recomputation finds it
    code, _, err = verified(out, capsys, "--full")
    assert code == 1 and needle in err, err
    assert all(line.startswith(f"gpumerge: verify: {out}: ") for line in err.splitlines())


def test_a_flipped_header_byte_and_a_missing_shard_fail(merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    (out / "checksums.sha256").unlink()
    shard = sorted(out.glob("model-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    at = raw.index(b'"F16"', 8)
    raw[at + 1:at + 4] = b"I16"
    shard.write_bytes(bytes(raw))
    code, _, err = verified(out, capsys)
    assert code == 1 and "the tensors or their layout differ from what the recorded settings make" in err, err
    shard.unlink()
    code, _, err = verified(out, capsys)
    assert code == 1 and shard.name in err and len(err.splitlines()) == 1, err


def test_a_wrong_checksum_fails(merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    lines = (out / "checksums.sha256").read_text().splitlines()
    lines[0] = "0" * 64 + lines[0][64:]
    (out / "checksums.sha256").write_text("\n".join(lines) + "\n")
    code, _, err = verified(out, capsys)
    assert code == 1 and f"{lines[0][66:]}: its sha256 differs from checksums.sha256" in err, err


def test_inputs_that_are_not_the_recorded_ones_fail(merged, models, capsys):
    code, _, err = verified(merged, capsys, "--model_path1", models["fp16_a"], "--model_path2", models["wide"])
    assert code == 1 and "model 2 at" in err and "is not the recorded input" in err, err
    code, _, err = verified(merged, capsys, "--model_path1", models["fp16_a"], "--model_path2", models["tied_b"])
    assert code == 1 and "model 2 at" in err and "is not the recorded input" in err, err


def test_bad_usage_is_exit_2(tmp_path, capsys):
    code, _, err = verified(tmp_path / "missing", capsys)
    assert_one_line_error(code, err, "is not a directory")


def test_a_sweeps_directory_verifies_variant_by_variant(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs,
                           "--grid", "gradient_end=0,1", "--checksums", "--quiet", capsys=capsys)
    assert code == 0, err
    assert (runs / "ge0" / "checksums.sha256").is_file()
    code, out, err = verified(runs, capsys)
    assert code == 0 and out.count(": ok (") == 2, err
    flip_tensor_byte(runs / "ge1", "model.layers.2.mlp.up_proj.weight")
    code, out, err = verified(runs, capsys)
    assert code == 1 and f"{runs / 'ge1'}: model.safetensors: its sha256 differs from checksums.sha256" in err, err
    assert out.count(": ok (") == 1


def test_shards_are_read_back_before_the_output_is_put_in_place(pair, tmp_path, capsys, monkeypatch):
    original = gpumerge.writer.close_writers

    def close_and_grow(writers):
        original(writers)
        with open(writers[0].path, "ab") as handle:  # a disk that wrote one byte too many
            handle.write(b"\0")

    monkeypatch.setattr(gpumerge.writer, "close_writers", close_and_grow)
    code, _, err = run_cli(*merge_args(*pair, tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "read back before it is put in place, is wrong")
    assert list(tmp_path.iterdir()) == []


def test_files_beside_the_weights_are_checked_too(merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    (out / "checksums.sha256").unlink()
    (out / "modeling_evil.py").write_text("import os\n")
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = 1.0
    (out / "config.json").write_text(json.dumps(config))
    (out / "gpumerge_recipe.yaml").write_text((out / "gpumerge_recipe.yaml").read_text().replace("0.2", "0.3"))
    code, _, err = verified(out, capsys)
    assert code == 1, err
    assert "holds files the merge does not write: modeling_evil.py" in err
    assert "config.json is not what the merge writes" in err
    assert "gpumerge_recipe.yaml is missing or does not hold the recorded settings" in err


def test_without_the_inputs_full_is_a_failure_and_the_default_says_so(pair, tmp_path, capsys):
    a, b = (shutil.copytree(p, tmp_path / name) for p, name in zip(pair, ("a", "b")))
    out = tmp_path / "out"
    assert run_cli(*merge_args(a, b, out, "--checksums"))[0] == 0
    shutil.rmtree(b)  # the recorded model 2 is gone
    code, text, err = verified(out, capsys)
    assert code == 0 and "nothing was recomputed" in text, err
    code, _, err = verified(out, capsys, "--full")
    assert code == 1 and "the inputs are not here: nothing was recomputed" in err, err
    code, _, err = verified(out, capsys, "--full", "--model_path1", a, "--model_path2", tmp_path / "nowhere")
    assert code == 1 and "cannot recompute it" in err, err
    code, text, err = verified(out, capsys, "--full", "--model_path1", a, "--model_path2", pair[1])
    assert code == 0 and "all " in text, err


def test_a_sweep_is_checked_against_its_record(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs,
                           "--grid", "gradient_end=0,0.5,1", "--quiet", capsys=capsys)
    assert code == 0, err
    (runs / "ge0").rename(tmp_path / "ge0")
    (runs / "ge1").rename(runs / "ge0")
    (tmp_path / "ge0").rename(runs / "ge1")  # two variants swapped
    shutil.rmtree(runs / "ge0.5")
    code, _, err = verified(runs, capsys)
    assert code == 1, err
    assert f"{runs}: variant ge0.5 is missing" in err
    assert f"{runs / 'ge0'}: its recorded settings are not those sweep.json gives this variant" in err


def test_a_checksums_file_that_is_a_fifo_never_hangs(merged, tmp_path, capsys):
    import os

    out = copy_of(merged, tmp_path)
    (out / "checksums.sha256").unlink()
    os.mkfifo(out / "checksums.sha256")
    code, _, err = verified(out, capsys)
    assert code == 1 and "checksums.sha256 cannot be read" in err, err


# ---- every byte against the record (gpumerge_digests.json) ---------------------------------------------------------

@pytest.fixture(scope="module")
def plain(models, tmp_path_factory) -> Path:
    """A merge without checksums.sha256: the default verify must still check every byte."""
    out = tmp_path_factory.mktemp("verify_plain") / "out"
    assert run_cli(*merge_args(models["fp16_a"], models["fp16_b"], out, "--gradient_start", "0.2"))[0] == 0
    return out


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                                    "model.layers.3.mlp.down_proj.weight"])
def test_the_default_verify_finds_a_flipped_byte_in_any_tensor(tensor, plain, tmp_path, capsys):
    out = copy_of(plain, tmp_path)
    code, text, err = verified(out, capsys)
    assert code == 0, err
    assert "every byte of its" in text and "against the record" in text
    assert "blends recomputed bit for bit" in text and "copied tensors compared with model 1's" in text
    flip_tensor_byte(out, tensor)
    code, _, err = verified(out, capsys)
    assert code == 1 and "model.safetensors differs from its recorded digest (a byte changed)" in err, err
    shutil.rmtree(Path(str(out)))
    # without the inputs too: the digests need no model to check against
    out = copy_of(plain, tmp_path)
    flip_tensor_byte(out, tensor)
    code, _, err = verified(out, capsys, "--model_path1", tmp_path / "nowhere", "--model_path2", tmp_path / "nope")
    assert code == 1 and "differs from its recorded digest" in err, err


def test_any_file_changed_added_or_removed_fails(plain, tmp_path, capsys):
    out = copy_of(plain, tmp_path)
    (out / "tokenizer_config.json").write_text((out / "tokenizer_config.json").read_text() + " ")
    (out / "notes.txt").write_text("mine")
    code, _, err = verified(out, capsys, "--model_path1", tmp_path / "a", "--model_path2", tmp_path / "b")
    assert code == 1, err
    assert "tokenizer_config.json differs from its recorded digest" in err
    assert "holds files its digests do not list: notes.txt" in err
    (out / "gpumerge_digests.json").unlink()
    code, _, err = verified(out, capsys)
    assert code == 1 and "gpumerge_digests.json is missing" in err, err


def test_a_shortened_or_deleted_checksums_file_fails(merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    lines = (out / "checksums.sha256").read_text().splitlines()
    (out / "checksums.sha256").write_text("\n".join(lines[1:]) + "\n")
    code, _, err = verified(out, capsys)
    assert code == 1 and "checksums.sha256 does not list 1 file(s) of the directory" in err, err
    (out / "checksums.sha256").unlink()
    code, _, err = verified(out, capsys)
    assert code == 1 and "checksums.sha256 was written with the merge and is missing" in err, err


@pytest.mark.parametrize("name", ["README.md", "gpumerge_recipe.yaml", "tokenizer.json"])
def test_a_fifo_in_the_output_never_hangs(name, plain, tmp_path, capsys):
    import os

    out = copy_of(plain, tmp_path)
    (out / name).unlink()
    os.mkfifo(out / name)
    code, _, err = verified(out, capsys)  # pytest's timeout is the hang detector: it returns at once
    assert code == 1 and name in err, err


def test_a_huge_recipe_or_a_link_to_a_huge_file_is_not_read_whole(plain, tmp_path, capsys):
    out = copy_of(plain, tmp_path)
    (out / "gpumerge_recipe.yaml").write_text("# padding\n" * 2_000_000)  # 20 MB
    big = tmp_path / "sparse"
    with open(big, "wb") as handle:
        handle.truncate(10 * 2**30)  # 10 GiB, sparse
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(big)
    code, _, err = verified(out, capsys)
    assert code == 1 and "gpumerge_recipe.yaml is missing or does not hold the recorded settings" in err, err
    assert "README.md is not the model card of its merge record" in err


@pytest.mark.parametrize("edit, needle", [
    (lambda index: index.__setitem__("metadata", ["x"]), "total_size is not the shards'"),
    (lambda index: index.__setitem__("metadata", "x"), "total_size is not the shards'"),
])
def test_a_malformed_index_is_a_problem_not_a_crash(edit, needle, merged, tmp_path, capsys):
    out = copy_of(merged, tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    edit(index)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = verified(out, capsys)
    assert code == 1 and needle in err and "Traceback" not in err, err


def test_a_record_with_malformed_inputs_is_a_problem_not_a_crash(plain, tmp_path, capsys):
    out = copy_of(plain, tmp_path)
    shard = out / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    record = json.loads(header["__metadata__"]["gpumerge"])
    record["inputs"] = "somewhere"
    header["__metadata__"]["gpumerge"] = json.dumps(record)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    code, _, err = verified(out, capsys)
    assert code == 1 and "its merge record cannot be used: its inputs are not two entries" in err, err


@pytest.mark.parametrize("path, needle", [("", "'' is not a directory"), ("~nouser_gpumerge/x", "no user named")])
def test_bad_paths_are_one_line_errors(path, needle, capsys):
    assert_one_line_error(*verified(path, capsys)[::2], needle)


def test_a_sweeps_directory_hides_nothing(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs,
                           "--grid", "gradient_end=0,0.5,1", "--quiet", capsys=capsys)
    assert code == 0, err
    shutil.copytree(runs / "ge1", runs / "extra")  # a directory sweep.json does not name
    code, _, err = verified(runs, capsys)
    assert code == 1 and "holds extra, which its sweep.json does not name" in err, err
    shutil.rmtree(runs / "extra")
    shutil.rmtree(runs / "ge0.5")
    record = json.loads((runs / "sweep.json").read_text())
    for edit in ({"eval": {}}, {"same_as": "ge0"}):
        changed = json.loads(json.dumps(record))
        if "eval" in edit:
            changed["eval"] = {}
        else:
            changed["variants"][1]["same_as"] = "ge0"  # ge0.5 said to be ge0: its absence hidden
        (runs / "sweep.json").write_text(json.dumps(changed))
        code, _, err = verified(runs, capsys)
        assert code == 1, (edit, err)
        assert ("not an evaluation record" in err) if "eval" in edit else (
            "variant ge0.5 is said to be the same as 'ge0', which is not a variant of the same rules" in err), err


def test_resume_takes_a_variant_with_a_flipped_byte_for_incomplete(pair, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs, "--grid",
            "gradient_end=0,1", "--quiet")
    assert run_cli(*argv, capsys=capsys)[0] == 0
    flip_tensor_byte(runs / "ge1", "model.norm.weight")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert_one_line_error(code, err, "is in the way of variant ge1", "bytes differ from what it recorded")
    code, _, err = run_cli(*argv, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert verified(runs, capsys)[0] == 0
