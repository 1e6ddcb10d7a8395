"""Pure functions: schedules against numpy/float64 reimplementations, size and flag parsing."""

from __future__ import annotations

import numpy as np
import pytest

from gpumerge.errors import SpecError
from gpumerge.schedule import gradient_weights, layer_index, linspace, resolve_window, tensor_weight
from gpumerge.spec import MergeSpec, parse_device, parse_dtype, parse_size


@pytest.mark.parametrize("start, stop", [(0.0, 1.0), (0.9, 0.0), (0.3, 0.3), (-0.5, 1.5), (0.1, 0.7),
                                          (1 / 3, 2 / 3), (1e-9, 1 - 1e-9)])
@pytest.mark.parametrize("num", [1, 2, 3, 7, 12, 32, 80, 99])
def test_linspace_is_numpys_bit_for_bit(start, stop, num):
    assert linspace(start, stop, num) == np.linspace(start, stop, num).tolist()


@pytest.mark.parametrize("name, layer", [
    ("model.layers.0.self_attn.q_proj.weight", 0),
    ("model.layers.31.mlp.down_proj.weight", 31),
    ("transformer.h.7.attn.c_attn.weight", 7),
    ("gpt_neox.layers.12.attention.dense.weight", 12),
    ("model.decoder.layers.3.fc1.weight", 3),
    ("h.2.mlp.c_fc.weight", 2),
    ("model.embed_tokens.weight", None),
    ("model.norm.weight", None),
    ("lm_head.weight", None),
    ("model.layers_norm.weight", None),
    ("vision.model.layers.0.weight", None),
])
def test_layer_index(name, layer):
    assert layer_index(name) == layer


def test_window_is_clamped_and_exclusive():
    assert resolve_window(0, 99, 16) == range(0, 16)
    assert resolve_window(0, 12, 16) == range(0, 12)
    assert resolve_window(15, 16, 16) == range(15, 16)


@pytest.mark.parametrize("start, end", [(-1, 10), (16, 99), (5, 5), (6, 5), (0, 0), (0, -3)])
def test_empty_or_negative_windows_name_the_layer_count(start, end):
    with pytest.raises(SpecError, match="16 decoder blocks"):
        resolve_window(start, end, 16)


def test_gradient_weights_match_the_originals_arithmetic():
    """BlockMerge_Gradient: np.linspace(gradient_start, gradient_end, layer_end - layer_start)[i - layer_start]."""
    layers = 16
    for gs, ge, ls, le in [(0.9, 0.0, 0, 12), (0.0, 1.0, 0, 99), (0.2, 0.8, 4, 9), (0.5, 0.1, 15, 99)]:
        end = min(le, layers)
        ref = np.linspace(gs, ge, end - ls)
        weights = gradient_weights(gs, ge, resolve_window(ls, le, layers))
        assert list(weights) == list(range(ls, end))
        assert [weights[i] for i in range(ls, end)] == [float(ref[i - ls]) for i in range(ls, end)]


def test_tensor_weight_copies_everything_outside_the_window():
    layer_t = {2: 0.5, 3: 0.25}
    assert tensor_weight("model.layers.2.mlp.up_proj.weight", layer_t) == 0.5
    assert tensor_weight("model.layers.3.input_layernorm.weight", layer_t) == 0.25
    assert tensor_weight("model.layers.4.mlp.up_proj.weight", layer_t) is None
    assert tensor_weight("model.embed_tokens.weight", layer_t) is None
    assert tensor_weight("lm_head.weight", layer_t) is None
    assert tensor_weight("model.layers.2.self_attn.rotary_emb.inv_freq", layer_t) is None


@pytest.mark.parametrize("text, expected", [
    ("2000MiB", 2000 * 2**20), ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("300KB", 300 * 10**3),
    ("1048576", 1048576), (12345, 12345), ("5GiB", 5 * 2**30), ("1.5GB", 1_500_000_000), ("10 mb", 10**7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2 lots", "GB", "-5MB", "0", "1e3", "2.5.1GB"])
def test_parse_size_rejects(text):
    with pytest.raises(SpecError):
        parse_size(text)


def test_parse_dtype_and_device():
    assert parse_dtype("bf16") == "bfloat16"
    assert parse_dtype("AUTO") == "auto"
    assert parse_device("cuda:1") == "cuda:1"
    for bad in ("int8", "float64"):
        with pytest.raises(SpecError):
            parse_dtype(bad)
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(SpecError):
            parse_device(bad)


def test_spec_rejects_non_finite_gradients():
    with pytest.raises(SpecError, match="finite"):
        MergeSpec(model_path1="a", model_path2="b", output_model_path=None, gradient_start=float("inf"))
