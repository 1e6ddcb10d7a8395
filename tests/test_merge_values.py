"""End-to-end merges of tiny checkpoints, every element compared with a float64 reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_state, run_cli
from safetensors import safe_open

from gpumerge.kernels.dtypes import torch_dtype
from gpumerge.kernels.lerp import max_excess
from gpumerge.schedule import layer_index, linspace

NUM_LAYERS = 5


def expected_t(gradient_start, gradient_end, layer_start, layer_end, num_layers=NUM_LAYERS):
    end = min(layer_end, num_layers)
    values = linspace(gradient_start, gradient_end, end - layer_start)
    return {layer_start + i: t for i, t in enumerate(values)}


def check_values(out_dir, a_dir, b_dir, layer_t, out_dtype):
    """Blended tensors within the bound; every other tensor bit-identical to model 1's after the cast."""
    out, a, b = load_state(out_dir), load_state(a_dir), load_state(b_dir)
    assert set(out) == set(a)
    blended = 0
    for name, value in out.items():
        assert value.dtype == out_dtype, name
        assert value.shape == a[name].shape, name
        layer = layer_index(name)
        if layer in layer_t:
            assert max_excess(value, a[name], b[name], layer_t[layer]) <= 1.0, name
            blended += 1
        else:
            assert torch.equal(value, a[name].to(out_dtype)), name
    return blended


@pytest.mark.parametrize("pair, out_dtype, flags", [
    (("fp16_a", "fp16_b"), torch.float16, []),
    (("bf16_a", "bf16_b"), torch.float16, []),  # the original's default: everything halved
    (("bf16_a", "bf16_b"), torch.bfloat16, ["--dtype", "bfloat16"]),
    (("bf16_a", "fp16_b"), torch.bfloat16, ["--dtype", "auto"]),  # mixed inputs: fp32 math, one rounding
    (("fp16_a", "bf16_b"), torch.float32, ["--dtype", "float32"]),
    (("tied_a", "tied_b"), torch.float16, []),
    (("bin_a", "bin_b"), torch.float16, []),
    (("fp32_a", "fp16_b"), torch.float16, []),
])
def test_original_example_settings(models, tmp_path, capsys, pair, out_dtype, flags):
    out = tmp_path / "out"
    code, stdout, err = run_cli("--model_path1", models[pair[0]], "--model_path2", models[pair[1]],
                                "--output_model_path", out, "--gradient_start", "0.9", "--gradient_end", "0.0",
                                "--layer_start", "0", "--layer_end", "12", "--quiet", *flags, capsys=capsys)
    assert code == 0, err
    layer_t = expected_t(0.9, 0.0, 0, 12)
    assert layer_t[0] == 0.9 and layer_t[4] == 0.0
    blended = check_values(out, models[pair[0]], models[pair[1]], layer_t, out_dtype)
    assert blended == NUM_LAYERS * 9


@pytest.mark.parametrize("start, end, layer_start, layer_end", [
    (0.0, 1.0, 0, 99),      # the defaults
    (0.25, 0.75, 1, 4),     # a window inside the model
    (0.3, 0.3, 2, 3),       # n = 1 gives gradient_start
    (1.0, 0.0, 3, 5),
    (-0.5, 1.5, 0, 5),      # extrapolation is allowed, as in the original
])
def test_windows_and_gradients(models, tmp_path, capsys, start, end, layer_start, layer_end):
    out = tmp_path / "out"
    code, _, err = run_cli("--model-path1", models["fp16_a"], "--model-path2", models["fp16_b"],
                           "--output-model-path", out, "--gradient-start", start, "--gradient-end", end,
                           "--layer-start", layer_start, "--layer-end", layer_end, "--quiet", capsys=capsys)
    assert code == 0, err
    layer_t = expected_t(start, end, layer_start, layer_end)
    blended = check_values(out, models["fp16_a"], models["fp16_b"], layer_t, torch.float16)
    assert blended == len(layer_t) * 9


def test_t_zero_and_one_are_exact(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_model_path", out,
                   "--gradient_start", "0", "--gradient_end", "1", "--layer_start", "3", "--layer_end", "5",
                   "--quiet", capsys=capsys)[0] == 0
    merged, a, b = load_state(out), load_state(models["fp16_a"]), load_state(models["fp16_b"])
    for name, value in merged.items():
        source = b if layer_index(name) == 4 else a
        assert torch.equal(value, source[name]), name


def test_output_layout_and_aux_files(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                              "--output_model_path", out, "--max_shard_size", "100KB", "--quiet", capsys=capsys)
    assert code == 0
    assert str(out) in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 1
    assert shards == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    order = []
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            names = list(f.keys())
            sizes = {n: f.get_slice(n).get_shape() for n in names}
            record = json.loads(f.metadata()["gpumerge"])
            assert record["settings"]["gradient_start"] == 0.0
            assert record["layer_t"]["4"] == 1.0
        shard_bytes = sum(torch.Size(s).numel() * 2 for s in sizes.values())
        assert shard_bytes <= 100_000 or len(names) == 1
        assert all(index["weight_map"][n] == shard for n in names)
        total += shard_bytes
        order += names
    assert index["metadata"]["total_size"] == total
    # greedy over model 1's on-disk order: a shard closes only when the next tensor would not fit
    a = load_state(models["fp16_a"])
    assert set(order) == set(a)
    # aux files: tokenizer, generation config, chat template; config with the dtype; our model card
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (models["fp16_a"] / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    card = (out / "README.md").read_text()
    assert "gpumerge" in card and "model 1's own card" not in card
    assert record["inputs"][0]["fingerprint"] != record["inputs"][1]["fingerprint"]
    assert not list(tmp_path.glob(".out.gpumerge-*"))


def test_greedy_shards_follow_model1_order(models, tmp_path, capsys):
    from gpumerge.checkpoint import Checkpoint

    out = tmp_path / "out"
    assert run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"], "--output_model_path", out,
                   "--max_shard_size", "70000", "--quiet", capsys=capsys)[0] == 0
    with Checkpoint(str(models["fp16_a"]), label="a") as a:
        order = [(n, info.nbytes) for n, info in a.tensors.items()]
    expected, _current, size = [[]], 0, 0
    for name, nbytes in order:
        if expected[-1] and size + nbytes > 70000:
            expected.append([])
            size = 0
        expected[-1].append(name)
        size += nbytes
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = [[n for n, _ in order if index[n] == f"model-{k + 1:05d}-of-{len(expected):05d}.safetensors"]
           for k in range(len(expected))]
    assert got == expected


def test_loads_with_transformers(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for pair in (("fp16_a", "fp16_b"), ("tied_a", "tied_b")):
        out = tmp_path / pair[0]
        assert run_cli("--model_path1", models[pair[0]], "--model_path2", models[pair[1]], "--output_model_path",
                       out, "--gradient_start", "0.9", "--gradient_end", "0.0", "--layer_end", "12", "--quiet",
                       capsys=capsys)[0] == 0
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert model.dtype == torch.float16
        if pair[0] == "tied_a":
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert AutoTokenizer.from_pretrained(tmp_path / "fp16_a")("the merge").input_ids


def test_single_file_output_and_torch_dtype_kept(models, tmp_path, capsys):
    src = models["fp32_a"]
    config = json.loads((src / "config.json").read_text())
    out = tmp_path / "out"
    assert run_cli("--model_path1", src, "--model_path2", models["fp16_b"], "--output_model_path", out,
                   "--dtype", "auto", "--quiet", capsys=capsys)[0] == 0
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == "float32"
    if "torch_dtype" in config:
        assert written["torch_dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_slice(n).get_dtype() == "F32" for n in f.keys())


def test_default_downcast_of_bf16_says_so(models, tmp_path, capsys):
    code, _, err = run_cli("--model_path1", models["bf16_a"], "--model_path2", models["bf16_b"],
                           "--output_model_path", tmp_path / "out", capsys=capsys)
    assert code == 0
    assert "bfloat16" in err and "float16" in err


def test_chunked_engine_is_bitwise_equal(models, tmp_path):
    """Tensors processed in many small chunks give the same bytes as whole-tensor processing."""
    from gpumerge.merge import run_merge
    from gpumerge.spec import MergeSpec

    outs = []
    for chunk in (7, 4097, 1 << 22):
        spec = MergeSpec(model_path1=str(models["bf16_a"]), model_path2=str(models["fp16_b"]),
                         output_model_path=tmp_path / f"out{chunk}", gradient_start=0.9, gradient_end=0.1,
                         dtype="float16", device="cpu", quiet=True)
        outs.append(run_merge(spec, notice=lambda line: None, engine="sequential", chunk_elements=chunk).output)
    states = [load_state(o) for o in outs]
    for name, value in states[0].items():
        raw = value.view(torch.uint8)
        assert torch.equal(raw, states[1][name].view(torch.uint8)), name
        assert torch.equal(raw, states[2][name].view(torch.uint8)), name


def test_overflow_is_an_error_that_suggests_bfloat16(tmp_path, capsys):
    from conftest import write_checkpoint

    big = torch.full((4, 4), 1.0e5, dtype=torch.float32)
    a = write_checkpoint(tmp_path / "a", {"model.layers.0.w": big, "model.embed.weight": big.clone()}, num_layers=1)
    b = write_checkpoint(tmp_path / "b", {"model.layers.0.w": big * 0.5, "model.embed.weight": big.clone()}, num_layers=1)
    code, _, err = run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", tmp_path / "out",
                           "--quiet", capsys=capsys)
    assert code == 2
    assert err.startswith("gpumerge: error:") and "--dtype bfloat16" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", tmp_path / "out2",
                           "--dtype", "bfloat16", "--quiet", capsys=capsys)
    assert code == 0, err


def test_integer_buffers_copied_when_equal(tmp_path, capsys):
    from conftest import write_checkpoint

    w = torch.randn(3, 5, dtype=torch.float16)
    ids = torch.arange(6, dtype=torch.int64)
    a = write_checkpoint(tmp_path / "a", {"model.layers.0.w": w, "model.layers.0.ids": ids}, num_layers=1)
    b = write_checkpoint(tmp_path / "b", {"model.layers.0.w": w * 2, "model.layers.0.ids": ids}, num_layers=1)
    assert run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", tmp_path / "out",
                   "--gradient_start", "0.5", "--quiet", capsys=capsys)[0] == 0
    out = load_state(tmp_path / "out")
    assert torch.equal(out["model.layers.0.ids"], ids)
    assert max_excess(out["model.layers.0.w"], w, w * 2, 0.5) <= 1.0
    c = write_checkpoint(tmp_path / "c", {"model.layers.0.w": w, "model.layers.0.ids": ids + 1}, num_layers=1)
    code, _, err = run_cli("--model_path1", a, "--model_path2", c, "--output_model_path", tmp_path / "out2",
                           "--quiet", capsys=capsys)
    assert code == 2 and "model.layers.0.ids" in err
    assert not (tmp_path / "out2").exists()


def test_odd_shapes_and_dtypes_against_reference(tmp_path, capsys):
    """Shapes 1, 7, 4097, 3x423x213 in each float dtype, with values that exercise rounding."""
    from conftest import write_checkpoint

    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (1,), "b": (7,), "c": (4097,), "d": (3, 423, 213)}
    for code in ("F16", "BF16", "F32"):
        dtype = torch_dtype(code)
        ta = {f"model.layers.0.{k}": (torch.randn(s, generator=gen) * 3).to(dtype) for k, s in shapes.items()}
        tb = {k: (torch.randn(v.shape, generator=gen) * 3).to(dtype) for k, v in ta.items()}
        a = write_checkpoint(tmp_path / f"a{code}", ta, num_layers=1)
        b = write_checkpoint(tmp_path / f"b{code}", tb, num_layers=1)
        out = tmp_path / f"out{code}"
        assert run_cli("--model_path1", a, "--model_path2", b, "--output_model_path", out, "--gradient_start",
                       "0.3", "--dtype", "auto", "--quiet", capsys=capsys)[0] == 0
        merged = load_state(out)
        for name in ta:
            assert merged[name].dtype == dtype
            assert max_excess(merged[name], ta[name], tb[name], 0.3) <= 1.0, (code, name)
