"""mergekit configs (linear, slerp; slices or models) against a float64 reimplementation of mergekit 0.1.5's
arithmetic: t per layer within a slice, embed/norm/lm_head at x = 0 from the first/last slice, filters, dtype then
out_dtype. The bound is 2 ulp of the output dtype plus the input-scaled term of the core bound."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import load_state, run_cli
from test_cli_errors import assert_one_line_error

from gpumerge.kernels.lerp import ulp
from gpumerge.kernels.slerp import slerp_reference
from gpumerge.schedule import interpolate, layer_index

L = 5  # fixture models' layers


def mk_eval(setting, name, x):
    """mergekit's evaluate_setting, written again here from its documented behaviour."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(e, (int, float)) for e in setting):
        return interpolate(setting, x)
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return mk_eval(cond["value"], name, x)
    return None


def x_of(name, slices):
    """(slice index, x) mergekit evaluates a tensor at."""
    layer = layer_index(name)
    if layer is None:
        return (0, 0.0) if "embed_tokens" in name else (len(slices) - 1, 0.0)
    for k, (start, end) in enumerate(slices):
        if start <= layer < end:
            n = end - start
            return k, ((layer - start) / (n - 1) if n > 1 else 1.0)
    raise AssertionError(name)


def reference(method, a, b, name, params, x, dtype, out_dtype):
    """float64 result rounded as mergekit rounds it: cast inputs to dtype, math, round to dtype, then out_dtype."""
    a64, b64 = a.to(dtype).double(), b.to(dtype).double()
    if method == "slerp":
        ref = slerp_reference(a64, b64, mk_eval(params["t"], name, x))
    else:
        w1, w2 = mk_eval(params["w1"], name, x), mk_eval(params["w2"], name, x)
        ref = w1 * a64 + w2 * b64
        if params.get("normalize", True):
            ref = ref / (w1 + w2)
    return ref


def within(out, ref, a, b, dtype):
    """|out - ref| <= 2 ulp of the output dtype (+1 ulp of the intermediate dtype) + 2^-22 max(|a|, |b|)."""
    scale = torch.maximum(a.double().abs(), b.double().abs())
    bound = 2 * ulp(ref, out.dtype) + ulp(ref, dtype) + 2.0 ** -21 * scale
    return bool(((out.double() - ref).abs() <= bound).all())


def run_config(tmp_path, capsys, config, *extra):
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code, _, err = run_cli("--config", path, "--output_model_path", out, "--quiet", *extra, capsys=capsys)
    return code, err, out


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


@pytest.mark.parametrize("dtype, out_dtype", [("bfloat16", None), ("float16", None), ("float32", "bfloat16"),
                                               ("bfloat16", "float16")])
def test_slerp_slices(models, tmp_path, capsys, dtype, out_dtype):
    a_dir, b_dir = models["fp16_a"], models["bf16_b"]
    config = {"slices": [{"sources": [{"model": str(a_dir), "layer_range": [0, 2]},
                                      {"model": str(b_dir), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(a_dir), "layer_range": [2, 5]},
                                      {"model": str(b_dir), "layer_range": [2, 5]}],
                          "parameters": {"t": [0.2, 0.9]}}],
              "merge_method": "slerp", "base_model": str(a_dir), "parameters": {"t": SLERP_T}, "dtype": dtype}
    if out_dtype:
        config["out_dtype"] = out_dtype
    code, err, out = run_config(tmp_path, capsys, config)
    assert code == 0, err
    a, b, merged = load_state(a_dir), load_state(b_dir), load_state(out)
    mid = getattr(torch, dtype)
    slices = [(0, 2), (2, 5)]
    for name, value in merged.items():
        assert value.dtype == getattr(torch, out_dtype or dtype), name
        k, x = x_of(name, slices)
        t = SLERP_T if k == 0 else [0.2, 0.9]
        ref = reference("slerp", a[name], b[name], name, {"t": t}, x, mid, None)
        assert within(value, ref, a[name], b[name], mid), name
    assert (out / "gpumerge_recipe.yaml").exists()
    assert yaml.safe_load((out / "gpumerge_recipe.yaml").read_text())["mergekit"]["merge_method"] == "slerp"


def test_one_layer_slice_gets_its_last_anchor(models, tmp_path, capsys):
    a_dir, b_dir = models["fp16_a"], models["fp16_b"]
    config = {"slices": [{"sources": [{"model": str(a_dir), "layer_range": [0, 4]},
                                      {"model": str(b_dir), "layer_range": [0, 4]}]},
                         {"sources": [{"model": str(a_dir), "layer_range": [4, 5]},
                                      {"model": str(b_dir), "layer_range": [4, 5]}]}],
              "merge_method": "slerp", "base_model": str(a_dir), "parameters": {"t": [0.1, 0.6]}}
    code, err, out = run_config(tmp_path, capsys, config, "--dtype", "float32")
    assert code == 0, err
    a, b, merged = load_state(a_dir), load_state(b_dir), load_state(out)
    # --dtype overrides the output dtype only: the math is in the inputs' dtype (fp16), rounded there first
    name = "model.layers.4.mlp.up_proj.weight"
    assert within(merged[name], slerp_reference(a[name], b[name], 0.6), a[name], b[name], torch.float16)
    assert merged[name].dtype == torch.float32
    name = "model.norm.weight"  # x = 0 of the last slice: its first anchor
    assert within(merged[name], slerp_reference(a[name], b[name], 0.1), a[name], b[name], torch.float16)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_models_form(models, tmp_path, capsys, normalize):
    a_dir, b_dir = models["fp16_a"], models["fp16_b"]
    w2 = [{"filter": "lm_head", "value": 0.9}, {"value": [0.2, 0.6]}]
    config = {"models": [{"model": str(b_dir), "parameters": {"weight": w2}},
                         {"model": str(a_dir), "parameters": {"weight": 0.7}}],
              "merge_method": "linear", "base_model": str(a_dir), "dtype": "float16",
              "parameters": {"normalize": normalize}}
    code, err, out = run_config(tmp_path, capsys, config)
    assert code == 0, err
    a, b, merged = load_state(a_dir), load_state(b_dir), load_state(out)
    for name, value in merged.items():
        _, x = x_of(name, [(0, L)])
        ref = reference("linear", a[name], b[name], name, {"w1": 0.7, "w2": w2, "normalize": normalize}, x,
                        torch.float16, None)
        assert within(value, ref, a[name], b[name], torch.float16), name


def test_no_dtype_promotes_the_inputs(models, tmp_path, capsys):
    a_dir, b_dir = models["fp16_a"], models["bf16_b"]
    config = {"models": [{"model": str(a_dir), "parameters": {"weight": 1.0}},
                         {"model": str(b_dir), "parameters": {"weight": 3.0}}], "merge_method": "linear"}
    code, err, out = run_config(tmp_path, capsys, config)
    assert code == 0, err
    merged = load_state(out)
    assert all(v.dtype == torch.float32 for v in merged.values())  # promote(fp16, bf16) = fp32
    a, b = load_state(a_dir), load_state(b_dir)
    name = "model.layers.2.self_attn.o_proj.weight"
    ref = (a[name].double() + 3 * b[name].double()) / 4
    assert within(merged[name], ref, a[name], b[name], torch.float32)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(merge_method="ties"), "merge_method 'ties' is not supported"),
    (lambda c: c["models"].append({"model": "/third"}), "exactly two models"),
    (lambda c: c.update(tokenizer_source="union"), "tokenizer surgery"),
    (lambda c: c.update(tokenizer={"source": "union"}), "tokenizer"),
    (lambda c: c.update(parameters={"density": 0.5}), "density"),
    (lambda c: c["models"][0].update(extra=1), "extra"),
    (lambda c: c.update(dtype="int8"), "dtype 'int8'"),
    (lambda c: c.update(slices=[]), "exactly one of slices or models"),
    (lambda c: c.update(merge_method=["linear"]), "is not supported"),
    (lambda c: c.update(merge_method="slerp", parameters={"t": 0.5}), "slerp needs base_model"),
    (lambda c: c["models"][0]["parameters"].update(weight=[{"filter": 5, "value": 0.3}]), "filtered value"),
    (lambda c: c["models"][0]["parameters"].update(weight=10**400), "finite number"),
])
def test_unsupported_mergekit_keys(models, tmp_path, capsys, mutate, needle):
    config = {"models": [{"model": str(models["fp16_a"]), "parameters": {"weight": 0.5}},
                         {"model": str(models["fp16_b"]), "parameters": {"weight": 0.5}}],
              "merge_method": "linear"}
    mutate(config)
    code, err, out = run_config(tmp_path, capsys, config)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_layer_remapping_is_refused(models, tmp_path, capsys):
    a_dir, b_dir = models["fp16_a"], models["fp16_b"]
    config = {"slices": [{"sources": [{"model": str(a_dir), "layer_range": [0, 3]},
                                      {"model": str(b_dir), "layer_range": [2, 5]}]}],
              "merge_method": "slerp", "base_model": str(a_dir), "parameters": {"t": 0.5}}
    code, err, out = run_config(tmp_path, capsys, config)
    assert_one_line_error(code, err, "layer remapping")
    config["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    code, err, out = run_config(tmp_path, capsys, config)
    assert_one_line_error(code, err, "cover")


def test_base_model_not_listed_joins_with_no_parameters(models, tmp_path, capsys):
    a_dir, b_dir = models["fp16_a"], models["fp16_b"]
    config = {"models": [{"model": str(b_dir), "parameters": {"weight": 1.0}}], "merge_method": "linear",
              "base_model": str(a_dir), "parameters": {"weight": 0.25}, "dtype": "float16"}
    code, err, out = run_config(tmp_path, capsys, config)
    assert code == 0, err
    a, b, merged = load_state(a_dir), load_state(b_dir), load_state(out)
    name = "model.layers.1.mlp.down_proj.weight"  # base gets the top-level weight 0.25, model 2 its own 1.0
    assert within(merged[name], (0.25 * a[name].double() + b[name].double()) / 1.25, a[name], b[name],
                  torch.float16)


def test_rerun_a_mergekit_config_from_its_output(models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(models["fp16_a"].parent)
    config = {"models": [{"model": "fp16_a", "parameters": {"weight": 0.3}},
                         {"model": "fp16_b", "parameters": {"weight": 0.7}}], "merge_method": "linear"}
    code, err, out = run_config(tmp_path, capsys, config, "--dtype", "bfloat16", "--max_shard_size", "100KB")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("--config", out / "gpumerge_recipe.yaml", "--output_model_path", tmp_path / "again",
                           "--quiet", capsys=capsys)
    assert code == 0, err
    s1, s2 = load_state(out), load_state(tmp_path / "again")
    assert all(v.dtype == torch.bfloat16 for v in s2.values())
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert len(list((tmp_path / "again").glob("*.safetensors"))) > 1


def test_method_flag_does_not_apply_to_mergekit(models, tmp_path, capsys):
    config = {"models": [{"model": str(models["fp16_a"]), "parameters": {"weight": 0.5}},
                         {"model": str(models["fp16_b"]), "parameters": {"weight": 0.5}}], "merge_method": "linear"}
    code, err, out = run_config(tmp_path, capsys, config, "--method", "slerp")
    assert_one_line_error(code, err, "--method does not apply")
