"""The order position-based recipes count tensors in is part of the result: model 1's architecture order, or a
natural sort of the names only when asked for (--tensor_order names); never a silent swap of one for the other.
The order used is in the merge record, and verify recomputes with it, whatever transformers the environment has."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO, load_state, run_cli, source_env, write_checkpoint
from test_cli_errors import assert_one_line_error
from test_recipes import check_blend, original_tensors_edition, state_dict_order, write_yaml

from gpumerge.schedule import natural_key

VALUES = "[0.9, 0.2, 0.6]"


def _unknown_pair(tmp_path):
    """Two checkpoints of an architecture transformers does not know (its names are Llama-like)."""
    dirs = []
    for seed in (11, 12):
        gen = torch.Generator().manual_seed(seed)
        tensors = {"model.embed_tokens.weight": torch.randn(17, 8, generator=gen).half(),
                   "model.norm.weight": torch.randn(8, generator=gen).half()}
        for i in range(3):
            for part in ("mlp.up_proj", "self_attn.q_proj"):
                tensors[f"model.layers.{i}.{part}.weight"] = torch.randn(8, 8, generator=gen).half()
        dirs.append(write_checkpoint(tmp_path / f"m{seed}", tensors, num_layers=3,
                                     config={"model_type": "gpumerge_nosuch", "architectures": ["NoSuchForCausalLM"],
                                             "tie_word_embeddings": False}))
    return dirs


def test_an_order_that_cannot_be_had_is_an_error_not_a_fallback(tmp_path, capsys):
    a, b = _unknown_pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", out,
                           "--gradient_values", VALUES, capsys=capsys)
    assert_one_line_error(code, err, "architecture order", "--tensor_order names", "other bytes")
    assert not out.exists()
    recipe = write_yaml(tmp_path / "r.yaml", {"model_path1": str(a), "model_path2": str(b),
                                              "output_model_path": str(out),
                                              "operations": [{"gradient_values": [0.1, 0.7], "filter": "mlp"}]})
    code, _, err = run_cli("--config", recipe, capsys=capsys)
    assert_one_line_error(code, err, "tensor_order: names")
    assert not out.exists()


def test_names_order_when_asked_for_and_recorded(tmp_path, capsys):
    a, b = _unknown_pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", out, "--quiet",
                           "--gradient_values", VALUES, "--tensor_order", "names", capsys=capsys)
    assert code == 0, err
    names = sorted(load_state(a), key=natural_key)
    check_blend(out, a, b, original_tensors_edition(names, json.loads(VALUES)))
    record = _record(out)
    assert record["tensor_order"]["source"] == "names"
    assert record["tensor_order"]["names"] == names
    assert "tensor_order: names" in (out / "gpumerge_recipe.yaml").read_text()
    # the recipe in the output re-runs the merge with the same order, byte for byte
    again = tmp_path / "again"
    code, _, err = run_cli("--config", out / "gpumerge_recipe.yaml", "--output_model_path", again, "--quiet",
                           capsys=capsys)
    assert code == 0, err
    assert_same_tensors(again, out)
    code, stdout, err = run_cli("verify", out, "--full", capsys=capsys)
    assert code == 0, stdout + err


def _tensor_part(shard) -> tuple[dict, bytes]:
    """A shard's header without its metadata (the record names the output's path), and its data bytes."""
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    return header, raw[8 + length:]


def assert_same_tensors(one, other) -> None:
    """Two outputs hold the same shards with the same tensors, byte for byte."""
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in other.glob("*.safetensors"))
    for name in shards:
        assert _tensor_part(one / name) == _tensor_part(other / name), name


def _record(out) -> dict:
    from safetensors import safe_open

    shard = sorted(out.glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        return json.loads(f.metadata()["gpumerge"])


def test_the_architecture_order_is_recorded(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", out, "--quiet", "--gradient_values", VALUES, capsys=capsys)
    assert code == 0, err
    kept = _record(out)["tensor_order"]
    assert kept["source"] == "architecture"
    assert kept["names"] == state_dict_order(models["fp16_a"])
    assert "tensor_order" not in (out / "gpumerge_recipe.yaml").read_text()  # the default stays implicit
    plain = tmp_path / "plain"
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", plain, "--quiet", capsys=capsys)
    assert code == 0, err
    assert "tensor_order" not in _record(plain)  # only position-based recipes count positions


def test_tensor_order_in_a_recipe_without_positions_is_refused(models, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", {"model_path1": str(models["fp16_a"]),
                                              "model_path2": str(models["fp16_b"]), "tensor_order": "names",
                                              "output_model_path": str(tmp_path / "out")})
    assert_one_line_error(*run_cli("--config", recipe, capsys=capsys)[::2], "has neither")


def _broken_transformers(tmp_path) -> str:
    """A directory that shadows transformers with one that fails to import, as a broken install would."""
    site = tmp_path / "broken"
    (site / "transformers").mkdir(parents=True)
    (site / "transformers" / "__init__.py").write_text("raise ImportError('transformers broken for this test')\n")
    return str(site)


def _gpumerge(*argv, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpumerge", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_same_bytes_from_the_root_and_elsewhere(models, tmp_path):
    """A position-based recipe run from the repository root (its kernels/ folder on sys.path) and from another
    directory (-P: no current directory on the path) gives the same bytes."""
    flags = ["--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--gradient_values", VALUES,
             "--quiet"]
    outs = []
    for where, cwd, argv in (("root", REPO, []), ("elsewhere", tmp_path, ["-P"])):
        out = tmp_path / where
        proc = subprocess.run([sys.executable, *argv, "-m", "gpumerge", *map(str, flags), "--output_model_path",
                               out], capture_output=True, text=True, timeout=300, cwd=cwd, env=source_env())
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        outs.append(out)
    assert_same_tensors(*outs)
    check_blend(outs[0], models["fp16_a"], models["fp16_b"],
                original_tensors_edition(state_dict_order(models["fp16_a"]), json.loads(VALUES)))


def test_verify_recomputes_with_the_recorded_order_whatever_transformers_does(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", out, "--quiet", "--gradient_values", VALUES, capsys=capsys)
    assert code == 0, err
    env = source_env()
    env["PYTHONPATH"] = _broken_transformers(tmp_path) + ":" + env["PYTHONPATH"]
    proc = _gpumerge("verify", out, "--full", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and a merge in that environment stops with one line instead of counting in another order
    proc = _gpumerge("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_model_path",
                     tmp_path / "again", "--gradient_values", VALUES, cwd=tmp_path, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, "ImportError: transformers broken for this test",
                          "--tensor_order names")
    assert not (tmp_path / "again").exists()
