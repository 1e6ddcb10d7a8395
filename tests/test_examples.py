"""Every recipe in examples/ runs as shared, with the model paths given on the command line (the files' own are
Windows paths on someone else's machine)."""

from __future__ import annotations

import pytest
from conftest import REPO, build, run_cli

EXAMPLES = REPO / "examples"
RECIPES = sorted(p.name for p in EXAMPLES.iterdir()
                 if p.suffix in (".yaml", ".yml") and p.name != "sweep_variants.yaml")


@pytest.fixture(scope="module")
def pair32(tmp_path_factory):
    """A tiny 32-block pair: the mergekit examples' slices cover layers 0..31."""
    root = tmp_path_factory.mktemp("pair32")
    shape = dict(num_layers=32, hidden_size=16, intermediate_size=24, shard=None)
    return build(root / "a", seed=1, **shape), build(root / "b", seed=2, **shape)


def test_every_example_is_listed():
    listed = (EXAMPLES / "README.md").read_text()
    assert RECIPES and all(f"`{name}`" in listed for name in RECIPES + ["sweep_variants.yaml"])


@pytest.mark.parametrize("name", RECIPES)
def test_example_plans_and_merges_with_paths_from_the_command_line(name, pair32, tmp_path, capsys):
    a, b = pair32
    recipe = EXAMPLES / name
    code, out, err = run_cli("plan", "--config", recipe, "--model_path1", a, "--model_path2", b, capsys=capsys)
    assert code == 0, err
    assert "blended" in out
    if name == "no_layers_and_blocks.yaml":
        assert "layer_only and no_layers are both set; as in the original YAML edition, layer_only wins" in err
    code, _, err = run_cli("--config", recipe, "--model_path1", a, "--model_path2", b, "--output_model_path",
                           tmp_path / "out", "--quiet", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


def test_the_command_line_still_refuses_layer_only_with_no_layers(pair32, capsys):
    a, b = pair32
    code, _, err = run_cli("plan", "--model_path1", a, "--model_path2", b, "--gradient_values", "[1, 0]",
                           "--layer_only", "--no_layers", capsys=capsys)
    assert code == 2 and "layer_only and no_layers together select nothing" in err


def test_sweep_settings_example(pair32, tmp_path, capsys):
    a, b = pair32
    code, _, err = run_cli("sweep", "--model_path1", a, "--model_path2", b, "--output_dir", tmp_path / "runs",
                           "--settings", EXAMPLES / "sweep_variants.yaml", "--quiet", capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["attn-mlp", "gentle", "per-module"]


def test_the_slerp_example_on_other_models_says_to_edit_layer_range(models, capsys):
    """The slerp example's slices are for 32-block models; on the 5-block test pair the message says what to do."""
    code, _, err = run_cli("plan", "--config", EXAMPLES / "mergekit_slerp.yml", "--model_path1", models["fp16_a"],
                           "--model_path2", models["fp16_b"], capsys=capsys)
    assert code == 2 and "edit the config's layer_range to end at 5" in err and "layer_range: [0, 5]" in err
    assert len(err.strip().splitlines()) == 1
