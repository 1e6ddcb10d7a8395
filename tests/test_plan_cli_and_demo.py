"""`gpumerge plan` (writes nothing), `--plot`, and `gpumerge demo`."""

from __future__ import annotations

import numpy as np
from conftest import run_cli


def test_plan_prints_the_table_and_writes_nothing(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli("plan", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                                "--output_model_path", out, "--gradient_start", "0.9", "--gradient_end", "0.0",
                                "--layer_start", "1", "--layer_end", "4", capsys=capsys)
    assert code == 0, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rows = [line.split() for line in stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(int(r[0]), r[1], float(r[2]), float(r[3])) for r in rows] == [
        (1, "(all)", 0.1, 0.9), (2, "(all)", 0.55, 0.45), (3, "(all)", 1.0, 0.0)]
    assert all(int(r[4]) == 9 for r in rows)
    assert "copied from model 1" in stdout and "model.embed_tokens.weight" in stdout and "blocks 0, 4" in stdout
    assert "reads" in stdout and "writes" in stdout


def test_plan_reports_problems_like_a_merge(models, tmp_path, capsys):
    code, _, err = run_cli("plan", "--model_path1", models["fp16_a"], "--model_path2", models["wide"], capsys=capsys)
    assert code == 2 and err.startswith("gpumerge: error: 45 tensor(s)")


def test_plot_draws_each_models_share(models, tmp_path, capsys):
    import matplotlib.image

    png = tmp_path / "shares.png"
    code, stdout, err = run_cli("plan", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                                "--gradient_start", "0.9", "--gradient_end", "0.0", "--plot", png, capsys=capsys)
    assert code == 0, err
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # both bar colours are present: model 1 (blue) and model 2 (orange)
    rgb = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(rgb, axis=0)}
    assert (0x4c, 0x72, 0xb0) in colours and (0xdd, 0x84, 0x52) in colours


def test_demo_builds_merges_and_checks(tmp_path, capsys):
    code, stdout, err = run_cli("demo", "--workdir", tmp_path / "demo", "--quiet", capsys=capsys)
    assert code == 0, err
    assert str(tmp_path / "demo" / "merged") in stdout
    assert (tmp_path / "demo" / "merged" / "tokenizer.json").exists()


def test_demo_without_a_workdir_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes the demo's directory
    code, stdout, err = run_cli("demo", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "checked and removed" in stdout and "--workdir" in stdout
    assert list(tmp_path.iterdir()) == []
