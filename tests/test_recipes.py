"""Recipes: the Tensors edition's --gradient_values and filters, YAML operations and layer gradients, slerp,
vocabulary mismatch, re-running a merge from its recipe file. Each schedule against a float64 reimplementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import build, load_state, run_cli
from test_cli_errors import assert_one_line_error

from gpumerge.kernels.lerp import error_bound, lerp_reference, max_excess
from gpumerge.kernels.slerp import slerp_reference
from gpumerge.schedule import compose, interpolate, layer_index, tensors_edition


def original_tensors_edition(keys: list[str], values: list[float]) -> dict[str, float]:
    """BlockMerge_Gradient Tensors edition, as its code does it (numpy)."""
    if len(values) == 1:
        return {k: float(values[0]) for k in keys}
    sections = len(values) - 1
    per_section = len(keys) // sections
    gradient: list[float] = []
    for i in range(sections):
        gradient.extend(np.linspace(values[i], values[i + 1], per_section).tolist())
    gradient.extend([values[-1]] * (len(keys) - len(gradient)))
    return dict(zip(keys, gradient))


def state_dict_order(model_dir) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return list(model.state_dict().keys())


def check_blend(out_dir, a_dir, b_dir, weights: dict[str, float]) -> None:
    out, a, b = load_state(out_dir), load_state(a_dir), load_state(b_dir)
    for name, value in out.items():
        if name in weights:
            assert max_excess(value, a[name], b[name], weights[name]) <= 1.0, name
        else:
            assert torch.equal(value, a[name].to(value.dtype)), name


def merge_cli(models, tmp_path, capsys, *flags, pair=("fp16_a", "fp16_b"), out="out"):
    code, stdout, err = run_cli("--model_path1", models[pair[0]], "--model_path2", models[pair[1]],
                                "--output_model_path", tmp_path / out, "--quiet", *flags, capsys=capsys)
    assert code == 0, err
    return tmp_path / out


# ---- pure schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[1.0, 0.5, 0.0], [0.0, 1.0], [0.3], [0.1, 0.9, 0.2, 0.7], [1, 0]])
@pytest.mark.parametrize("count", [1, 2, 5, 7, 57, 291])
def test_tensors_edition_matches_the_originals_arithmetic(values, count):
    keys = [f"k{i}" for i in range(count)]
    assert tensors_edition(values, count) == list(original_tensors_edition(keys, values).values())


def test_compose_is_blending_again():
    a, b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    twice = lerp_reference(lerp_reference(a, b, 0.3), b, 0.6)
    assert torch.allclose(twice, lerp_reference(a, b, compose([0.3, 0.6])), rtol=0, atol=1e-12)
    assert compose([0.37]) == 0.37


@pytest.mark.parametrize("anchors", [[0.8, 0.2], [0.0, 0.5, 0.3, 0.7, 1.0], [0.5]])
def test_interpolate_is_mergekits_gradient(anchors):
    xs = np.linspace(0, 1, 33)
    expected = np.interp(xs, np.linspace(0, 1, len(anchors)), anchors) if len(anchors) > 1 else [anchors[0]] * 33
    assert np.allclose([interpolate(anchors, x) for x in xs], expected, rtol=0, atol=1e-12)


# ---- --gradient_values ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--layer_only"], ["--no_layers"], ["--custom_filter", "mlp"],
                                   ["--filter", "self_attn.q_proj"]])
def test_gradient_values_over_the_state_dict_order(models, tmp_path, capsys, flags):
    out = merge_cli(models, tmp_path, capsys, "--gradient_values", "[1.0, 0.5, 0.0]", *flags)
    keys = state_dict_order(models["fp16_a"])
    if "--layer_only" in flags:
        keys = [k for k in keys if "layer" in k]
    if "--no_layers" in flags:
        keys = [k for k in keys if "layer" not in k]
    for flag in ("--custom_filter", "--filter"):
        if flag in flags:
            keys = [k for k in keys if flags[flags.index(flag) + 1] in k]
    weights = original_tensors_edition(keys, [1.0, 0.5, 0.0])
    check_blend(out, models["fp16_a"], models["fp16_b"], weights)
    assert (out / "gpumerge_recipe.yaml").exists()


def original_tied_t(model_dir, selected_filter: str | None, values) -> float:
    """What the original Tensors edition leaves in a tied embedding: run its procedure (blend the state_dict
    entries, then load_state_dict into the model) on the real architecture with A = 0 and B = 1, so the stored
    tensor's value is its effective t."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).double()
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = model.state_dict()
    keys = [k for k in state if selected_filter is None or selected_filter in k]
    for key, g in original_tensors_edition(keys, values).items():
        state[key] = (1 - g) * state[key] + g * torch.ones_like(state[key])
    model.load_state_dict(state)
    embed = model.get_input_embeddings().weight
    assert embed.data_ptr() == model.lm_head.weight.data_ptr()
    assert bool((embed == embed.flatten()[0]).all())
    return float(embed.detach().flatten()[0])


@pytest.mark.parametrize("flt, values", [(None, [0.0, 1.0]), ("model.", [0.5]), ("embed_tokens", [0.3]),
                                         ("lm_head", [0.7]), (None, [0.9, 0.1, 0.4])])
def test_tied_embeddings_follow_the_originals_load_order(models, tmp_path, capsys, flt, values):
    flags = ["--gradient_values", json.dumps(values)] + (["--filter", flt] if flt else [])
    out = merge_cli(models, tmp_path, capsys, *flags, pair=("tied_a", "tied_b"))
    expected = original_tied_t(models["tied_a"], flt, values)
    keys = [k for k in state_dict_order(models["tied_a"]) if flt is None or flt in k]
    weights = original_tensors_edition(keys, values)
    weights.pop("lm_head.weight", None)
    weights["model.embed_tokens.weight"] = expected
    check_blend(out, models["tied_a"], models["tied_b"], weights)


@pytest.mark.parametrize("flags, needle", [
    (["--gradient_values", "[1, 0]", "--gradient_start", "0.2"], "replaces --gradient_start"),
    (["--gradient_values", "[1, 0]", "--layer_end", "3"], "replaces --layer_end"),
    (["--gradient_values", "[1, 0]", "--layer_only", "--no_layers"], "select nothing"),
    (["--gradient_values", "[1, 0]", "--filter", "no_such_module"], "matches no tensor"),
    (["--layer_only"], "give --gradient_values too"),
    (["--gradient_values", "1, 0]"], "not a list of numbers"),
    (["--gradient_values", "__import__('os')"], "not a list of numbers"),
    (["--gradient_values", "[]"], "non-empty list"),
    (["--method", "cubic"], "--method"),
    (["--tensor_order", "names"], "give one of those too"),
    (["--gradient_values", "[1, 0]", "--tensor_order", "alphabetical"], "not one of architecture, names"),
    (["--gradient_start", "0.5", "--tensor_order", "architecture"], "give one of those too"),
])
def test_gradient_values_errors(models, tmp_path, capsys, flags, needle):
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out", *flags, capsys=capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_blends_common_rows(models, tmp_path, capsys):
    bigger = build(tmp_path / "vocab_b", seed=11, vocab_size=101)
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", bigger, "--output_model_path",
                           tmp_path / "out", "--gradient_values", "[0.5]", capsys=capsys)
    assert code == 0, err
    assert "101 rows" in err and "97" in err and "tokenizer" in err
    out, a, b = load_state(tmp_path / "out"), load_state(models["fp16_a"]), load_state(bigger)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == a[name].shape
        assert max_excess(out[name], a[name], b[name][:97], 0.5) <= 1.0
    smaller = build(tmp_path / "vocab_c", seed=12, vocab_size=90)
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", smaller, "--output_model_path",
                           tmp_path / "out2", "--gradient_values", "[0.5]", "--quiet", capsys=capsys)
    assert code == 0, err
    out, c = load_state(tmp_path / "out2"), load_state(smaller)
    emb = "model.embed_tokens.weight"
    assert max_excess(out[emb][:90], a[emb][:90], c[emb], 0.5) <= 1.0
    assert torch.equal(out[emb][90:], a[emb][90:])  # model 1's extra rows kept
    # a different hidden size is still an error, whatever the recipe
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["wide"], "--output_model_path",
                           tmp_path / "out3", "--gradient_values", "[0.5]", capsys=capsys)
    assert_one_line_error(code, err, "differ between A")


def test_vocab_mismatch_batches_match_sequential(models, tmp_path):
    from gpumerge.merge import run_merge
    from gpumerge.spec import MergeSpec, OperationsRecipe, TensorOperation

    bigger = build(tmp_path / "vocab_b", seed=11, vocab_size=101)
    recipe = OperationsRecipe((TensorOperation((0.2, 0.8)),))
    outs = []
    for engine, batch in (("sequential", None), ("pipelined", 2048), ("pipelined", None)):
        spec = MergeSpec(model_path1=str(models["bf16_a"]), model_path2=str(bigger), recipe=recipe,
                         output_model_path=tmp_path / f"o-{engine}-{batch}", device="cpu", quiet=True)
        outs.append(load_state(run_merge(spec, notice=lambda s: None, engine=engine, batch_bytes=batch).output))
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]) and torch.equal(outs[0][name], outs[2][name]), name


# ---- YAML recipes -----------------------------------------------------------------------------------------------

def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_operations_compose(models, tmp_path, capsys):
    ops = [{"operation": "attention", "filter": "self_attn", "gradient_values": [0.2, 0.6]},
           {"operation": "layers", "gradient_values": [0.5], "layer_only": True},
           {"operation": "head", "gradient_values": [1.0], "no_layers": True, "filter": "lm_head"}]
    recipe = write_yaml(tmp_path / "r.yaml", {"model_path1": str(models["fp16_a"]),
                                              "model_path2": str(models["fp16_b"]),
                                              "output_model_path": str(tmp_path / "out"), "operations": ops})
    code, _, err = run_cli("--config", recipe, "--quiet", capsys=capsys)
    assert code == 0, err
    keys = state_dict_order(models["fp16_a"])
    a, b, out = load_state(models["fp16_a"]), load_state(models["fp16_b"]), load_state(tmp_path / "out")
    applied: dict[str, list[float]] = {}
    for op in ops:
        chosen = [k for k in keys if (not op.get("layer_only") or "layer" in k)
                  and (not op.get("no_layers") or "layer" not in k) and op.get("filter", "") in k]
        for name, t in original_tensors_edition(chosen, op["gradient_values"]).items():
            applied.setdefault(name, []).append(t)
    for name, value in out.items():
        if name not in applied:
            assert torch.equal(value, a[name]), name
            continue
        ref = a[name].to(torch.float64)
        for t in applied[name]:  # the original blends again for each operation
            ref = ref + t * (b[name].to(torch.float64) - ref)
        bound = error_bound(a[name], b[name], ref, value.dtype)
        assert bool(((value.to(torch.float64) - ref).abs() <= bound).all()), name
    assert any(len(ts) == 2 for ts in applied.values())


def test_yaml_layer_gradients(models, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", {
        "model_path1": str(models["fp16_a"]), "model_path2": str(models["fp16_b"]),
        "layer_gradients": {"self_attn": [0.8, 0.2], "mlp": [0.3, 0.7], "default": [0.5]}})
    out = tmp_path / "out"
    code, stdout, err = run_cli("--config", recipe, "--output_model_path", out, "--quiet", capsys=capsys)
    assert code == 0, err
    weights = {}
    for name in load_state(models["fp16_a"]):
        layer = layer_index(name)
        if layer is None:
            continue
        x = layer / 4
        weights[name] = (0.8 + (0.2 - 0.8) * x if "self_attn" in name else
                         0.3 + (0.7 - 0.3) * x if "mlp" in name else 0.5)
    check_blend(out, models["fp16_a"], models["fp16_b"], weights)
    png = tmp_path / "lines.png"
    code, stdout, _ = run_cli("plan", "--config", recipe, "--plot", png, capsys=capsys)
    assert code == 0 and "self_attn" in stdout and "mlp" in stdout and "input_layernorm" in stdout
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100


def test_cli_overrides_yaml_paths_and_dtype(models, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", {"model_path1": "/somebody/elses/model", "model_path2": "/x/y",
                                              "output_model_path": "/not/mine", "dtype": "float32",
                                              "gradient_values": [0.25]})
    out = merge_cli(models, tmp_path, capsys, "--config", recipe, "--dtype", "bfloat16")
    state = load_state(out)
    assert all(v.dtype == torch.bfloat16 for v in state.values())


@pytest.mark.parametrize("data, needle", [
    ({"operations": [{"gradient_values": [1, 0], "fliter": "mlp"}]}, "unknown key(s) fliter"),
    ({"gradient_values": [1, 0], "colour": "red"}, "unknown key(s) colour"),
    ({"operations": [{"filter": "mlp"}]}, "gradient_values is missing"),
    ({"operations": []}, "non-empty list"),
    ({"gradient_values": [1, 0], "layer_start": 2}, "replaces layer_start"),
    ({"layer_gradients": {"mlp": "high"}}, "is not a list of numbers"),
    ({"operations": [{"gradient_values": [1], "layer_only": "yes"}]}, "true or false"),
    ({"gradient_values": [1, 0], "filter": "mlp", "custom_filter": "attn"}, "not both"),
    ({"gradient_values": [10 ** 400]}, "finite number"),
    ({"gradient_values": "[" * 5000}, "not a list of numbers"),
    ({"output_model_path": 5, "gradient_values": [1]}, "must be a string"),
    ("just a string", "YAML mapping"),
])
def test_yaml_errors(models, tmp_path, capsys, data, needle):
    path = tmp_path / "r.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    code, _, err = run_cli("--config", path, "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out", capsys=capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_cli_gradient_values_conflicts_with_a_yaml_window(models, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", {"model_path1": str(models["fp16_a"]),
                                              "model_path2": str(models["fp16_b"]), "layer_start": 2})
    code, _, err = run_cli("--config", recipe, "--gradient_values", "[1, 0]", "--output_model_path",
                           tmp_path / "out", capsys=capsys)
    assert_one_line_error(code, err, "replaces layer_start")
    recipe = write_yaml(tmp_path / "r2.yaml", {"model_path1": str(models["fp16_a"]),
                                               "model_path2": str(models["fp16_b"]), "gradient_values": [1, 0]})
    code, _, err = run_cli("--config", recipe, "--filter", "mlp", "--output_model_path", tmp_path / "out",
                           capsys=capsys)
    assert_one_line_error(code, err, "cannot change the recipe")


def test_stored_rotary_buffers_keep_the_architecture_order(models, tmp_path, capsys):
    """Old Llama checkpoints store rotary_emb.inv_freq: not a position, model 1's, and the order stays."""
    from safetensors.torch import save_file

    dirs = []
    for key in ("fp16_a", "fp16_b"):
        d = tmp_path / key
        d.mkdir()
        state = load_state(models[key])
        for i in range(5):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(6)
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text((models[key] / "config.json").read_text())
        dirs.append(d)
    out = tmp_path / "out"
    code, _, err = run_cli("--model_path1", dirs[0], "--model_path2", dirs[1], "--output_model_path", out,
                           "--gradient_values", "[0, 1]", capsys=capsys)
    assert code == 0, err
    assert "natural sort" not in err
    weights = original_tensors_edition(state_dict_order(models["fp16_a"]), [0, 1])
    check_blend(out, dirs[0], dirs[1], weights)


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("operations: [\n  - {a: 1\n")
    assert_one_line_error(*run_cli("--config", bad, capsys=capsys)[::2], "not valid YAML")
    assert_one_line_error(*run_cli("--config", tmp_path / "none.yaml", capsys=capsys)[::2], "cannot read")


def test_rerun_from_the_recipe_in_the_output(models, tmp_path, capsys):
    first = merge_cli(models, tmp_path, capsys, "--gradient_values", "[0.9, 0.1]", "--no_layers", out="first")
    again = tmp_path / "again"
    code, _, err = run_cli("--config", first / "gpumerge_recipe.yaml", "--output_model_path", again, "--quiet",
                           capsys=capsys)
    assert code == 0, err
    s1, s2 = load_state(first), load_state(again)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    plain = merge_cli(models, tmp_path, capsys, "--gradient_start", "0.9", "--gradient_end", "0.2", "--layer_end",
                      "3", out="plain")
    code, _, err = run_cli("--config", plain / "gpumerge_recipe.yaml", "--output_model_path", tmp_path / "plain2",
                           "--quiet", capsys=capsys)
    assert code == 0, err
    s1, s2 = load_state(plain), load_state(tmp_path / "plain2")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


# ---- slerp ------------------------------------------------------------------------------------------------------

def slerp_excess(out, a, b, t) -> float:
    """max |out - ref| / (1 ulp(ref) + 2^-22 * max(|a|, |b|) * 2), the core bound with room for the two fp32
    coefficients of s0*a + s1*b."""
    ref = slerp_reference(a, b, t)
    bound = error_bound(a, b, ref, out.dtype) + 2.0 ** -22 * torch.maximum(a.double().abs(), b.double().abs())
    return float(((out.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("pair, dtype", [(("fp16_a", "fp16_b"), "float16"), (("bf16_a", "fp16_b"), "bfloat16"),
                                         (("fp32_a", "fp16_b"), "float32")])
def test_slerp_against_float64(models, tmp_path, capsys, pair, dtype):
    out = merge_cli(models, tmp_path, capsys, "--method", "slerp", "--gradient_start", "0.2", "--gradient_end",
                    "0.8", "--dtype", dtype, pair=pair)
    a, b, merged = load_state(models[pair[0]]), load_state(models[pair[1]]), load_state(out)
    t_by_layer = dict(zip(range(5), np.linspace(0.2, 0.8, 5).tolist()))
    blended = 0
    for name, value in merged.items():
        layer = layer_index(name)
        if layer is None:
            assert torch.equal(value, a[name].to(value.dtype))
            continue
        assert slerp_excess(value, a[name], b[name], t_by_layer[layer]) <= 1.0, name
        blended += 1
    assert blended == 45


def test_slerp_colinear_falls_back_to_lerp_and_batching_does_not_matter(tmp_path, capsys):
    from conftest import write_checkpoint

    from gpumerge.merge import run_merge
    from gpumerge.spec import MergeSpec

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 33, generator=gen)
    ta = {"model.layers.0.w": base.half(), "model.layers.0.v": torch.randn(3, 423, 213, generator=gen).half()}
    tb = {"model.layers.0.w": (base * 1.5).half(), "model.layers.0.v": torch.randn(3, 423, 213, generator=gen).half()}
    a = write_checkpoint(tmp_path / "a", ta, num_layers=1)
    b = write_checkpoint(tmp_path / "b", tb, num_layers=1)
    outs = []
    for engine, batch in (("sequential", None), ("pipelined", 4096), ("pipelined", None)):
        spec = MergeSpec(model_path1=str(a), model_path2=str(b), output_model_path=tmp_path / f"o{engine}{batch}",
                         gradient_start=0.3, method="slerp", device="cpu", quiet=True)
        outs.append(load_state(run_merge(spec, notice=lambda s: None, engine=engine, batch_bytes=batch).output))
    for name in ta:
        assert slerp_excess(outs[0][name], ta[name], tb[name], 0.3) <= 1.0, name
        assert torch.equal(outs[0][name], outs[1][name]) and torch.equal(outs[0][name], outs[2][name])
    # colinear: exactly the lerp path
    assert max_excess(outs[0]["model.layers.0.w"], ta["model.layers.0.w"], tb["model.layers.0.w"], 0.3) <= 1.0


def test_slerp_recorded_in_the_recipe(models, tmp_path, capsys):
    out = merge_cli(models, tmp_path, capsys, "--method", "slerp")
    recipe = yaml.safe_load((out / "gpumerge_recipe.yaml").read_text())
    assert recipe["method"] == "slerp" and recipe["gradient_end"] == 1.0
    card = (out / "README.md").read_text()
    record = json.loads(card.split("<!-- gpumerge-record\n")[1].split("\n-->")[0])
    assert record["settings"]["method"] == "slerp"
    assert math.isclose(record["t_groups"][-1][2], 1.0)



def test_recipe_writer_quotes_number_like_strings():
    """write_recipe's dumper quotes what the YAML 1.2 float rule of the recipe loader would read as a number
    (a filter or a hub id like "1e10"); PyYAML's safe_dump writes it bare."""
    from gpumerge.recipes import load_yaml, recipe_dumper

    data = {"model_path1": "1e10", "operations": [{"filter": "2.5E-3", "gradient_values": [0.5]}]}
    assert load_yaml(yaml.dump(data, Dumper=recipe_dumper(), sort_keys=False), source="r") == data
    assert load_yaml(yaml.safe_dump(data, sort_keys=False), source="r") != data  # the defect this avoids
