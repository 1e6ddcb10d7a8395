"""What a new user met on a fresh machine: messages that say what is missing, names that read well, notices that
tell the truth about what a command does."""

from __future__ import annotations

import pytest
from conftest import run_cli

from gpumerge.errors import brief
from gpumerge.spec import parse_grid
from gpumerge.sweep import grid_names


def test_a_model_1_without_a_tokenizer_is_said(models, tmp_path, capsys):
    code, _, err = run_cli("--model_path1", models["fp16_b"], "--model_path2", models["fp16_a"],
                           "--output_model_path", tmp_path / "out", capsys=capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "tokenizer" in line]
    assert len(lines) == 1 and "has no tokenizer (none of tokenizer.json" in lines[0], err
    assert str(models["fp16_b"]) in lines[0] and "cannot be used as it is" in lines[0]
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out2", capsys=capsys)
    assert code == 0, err
    assert "tokenizer" not in err


def test_plan_says_what_a_merge_would_do_not_that_it_merges(models, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the notice is for machines without CUDA")
    code, _, err = run_cli("plan", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           capsys=capsys)
    assert code == 0, err
    assert "a merge would run on the CPU" in err and "merging on" not in err


@pytest.mark.parametrize("grid, want", [
    ("gradient_end=0:1:6", ["ge0", "ge0.2", "ge0.4", "ge0.6", "ge0.8", "ge1"]),
    ("gradient_end=0.25,0.75", ["ge0.25", "ge0.75"]),  # short numbers keep every digit
    ("gradient_end=0.1234567,0.1234568", ["ge0.1234567", "ge0.1234568"]),
    ("gradient_values=[[1,0.5,0],[0.2,0.8]]", ["gv1_0.5_0", "gv0.2_0.8"]),
])
def test_variant_names_use_the_shortest_decimals_that_keep_them_apart(grid, want):
    axis = parse_grid(grid)
    assert grid_names([{axis.key: v} for v in axis.values], [axis]) == want


def test_a_hundred_linspace_values_get_short_distinct_names():
    axis = parse_grid("gradient_end=0:1:100")
    names = grid_names([{axis.key: v} for v in axis.values], [axis])
    assert len(set(names)) == 100 and names[41] == "ge0.414" and max(map(len, names)) <= len("ge0.000")
    for name, value in zip(names, axis.values):  # each name within a tenth of a step of its value
        assert abs(float(name[2:]) - value) <= 0.1 / 99 + 1e-12


def test_other_libraries_messages_are_cut_at_a_word_boundary():
    text = "Can't load tokenizer for '/m'. If you were trying to load it, make sure (3) an equivalent exists " * 3
    cut = brief(text, limit=100)
    assert cut.endswith(" ...") and len(cut) <= 104
    assert text.startswith(cut[:-4]) and text[len(cut) - 4] == " "  # the cut falls between words
    assert brief("short  message\non two lines") == "short message on two lines"
