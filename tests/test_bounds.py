"""Memory and time bounded before work starts, and the last internal errors turned into one-line answers (the
hostile trial's round 3): incremental tokenization, the forward pass's batch, a huge grid refused from its counts, a
report that was asked for and not written, a tokenizer beyond the model's vocabulary, links named like working
files."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_cli_errors import assert_one_line_error, merge_args
from test_sweep import sweep_args

from gpumerge.evaluate import EvalSettings, load_texts


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [2, 97, 700, 5000])
def test_a_prefix_is_tokenized_and_gives_the_whole_texts_first_tokens(tokens, trained):
    from transformers import AutoTokenizer

    text = trained / "texts" / "eval_code.txt"
    whole = AutoTokenizer.from_pretrained(trained / "model_1")(text.read_text(), add_special_tokens=False)["input_ids"]
    settings = EvalSettings((text,), eval_tokens=tokens, seq_len=64)
    (got,) = load_texts(settings, trained / "model_1")
    assert [t for w in got.windows for t in w] == [t for w in
                                                   [whole[:tokens][i:i + 64] for i in range(0, tokens, 64)]
                                                   if len(w) >= 2 for t in w]


@pytest.mark.slow
def test_a_text_too_big_to_tokenize_is_refused_before_any_work(trained, tmp_path, capsys):
    from gpumerge.errors import SpecError

    text = trained / "texts" / "eval_code.txt"
    with pytest.raises(SpecError, match="give --eval-tokens N"):
        load_texts(EvalSettings((text,), seq_len=64), trained / "model_1", available_bytes=4 * 2**20)
    # with --eval-tokens only the prefix counts: the same small budget is enough
    (got,) = load_texts(EvalSettings((text,), eval_tokens=64, seq_len=64), trained / "model_1",
                        available_bytes=4 * 2**20)
    assert got.predicted == 63


@pytest.mark.slow
def test_token_ids_beyond_the_models_vocabulary_are_named(trained, tmp_path, capsys):
    import shutil

    mine = tmp_path / "model_1"
    shutil.copytree(trained / "model_1", mine)
    config = json.loads((mine / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer gives ids up to 767
    (mine / "config.json").write_text(json.dumps(config))
    from gpumerge.errors import SpecError

    with pytest.raises(SpecError, match=r"beyond the vocab_size 100 of .*config.json: the tokenizer is not this"):
        load_texts(EvalSettings((trained / "texts" / "eval_code.txt",), eval_tokens=200, seq_len=64), mine,
                   vocab_size=100)


@pytest.mark.slow
def test_an_eval_batch_too_big_for_memory_is_cut_with_a_notice(trained, tmp_path, capsys, monkeypatch):
    import re

    import gpumerge.sweep_eval as sweep_eval
    from conftest import load_state

    config = json.loads((trained / "model_1" / "config.json").read_text())
    model_bytes = sum(t.numel() * 4 for t in load_state(trained / "model_1").values())  # fp32 on a CPU
    assert sweep_eval.forward_bytes(config, 256, 256, 4) > 2**30  # what --eval-batch 256 asks for
    monkeypatch.setattr(sweep_eval, "_free_bytes", lambda device, free=None: model_bytes + 600 * 2**20)
    code, out, err = run_cli("sweep", "--model_path1", trained / "model_1", "--model_path2", trained / "model_2",
                             "--output_dir", tmp_path / "runs", "--grid", "gradient_end=0.5", "--keep", "0",
                             "--eval-text", trained / "texts" / "eval_code.txt", "--eval-tokens", "600",
                             "--seq-len", "256", "--eval-batch", "256", capsys=capsys)
    assert code == 0, err
    notice = [line for line in err.splitlines() if "--eval-batch 256 would need about" in line]
    assert len(notice) == 1, err
    batch = int(re.search(r"scoring with --eval-batch (\d+) ", notice[0]).group(1))
    assert 1 <= batch < 256 and sweep_eval.forward_bytes(config, batch, 256, 4) <= 300 * 2**20
    assert json.loads((tmp_path / "runs" / "results.json").read_text())["eval"]["eval_batch"] == batch


def test_a_grid_too_big_for_the_open_file_limit_is_refused_before_it_is_all_planned(models, tmp_path, capsys,
                                                                                     monkeypatch):
    import resource

    import gpumerge.merge

    planned = []
    real = gpumerge.merge.plan_merge
    monkeypatch.setattr(gpumerge.merge, "plan_merge", lambda *a, **k: planned.append(1) or real(*a, **k))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 256))
    code, _, err = run_cli(*sweep_args(models["fp16_a"], models["fp16_b"], tmp_path / "runs", "--grid",
                                       "gradient_end=0:1:2000", "--max-variants", "2000"), capsys=capsys)
    assert_one_line_error(code, err, "distinct variants, which need about", "the limit is 256")
    assert len(planned) < 200  # refused as soon as the count says so, not after planning all 2000
    assert not (tmp_path / "runs").exists()


def test_a_report_that_cannot_be_written_is_an_error_after_a_complete_merge(models, tmp_path, capsys, monkeypatch):
    import gpumerge.outdir

    def refuse(self):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(gpumerge.outdir.AtomicFile, "commit", refuse)
    out = tmp_path / "out"
    code, _, err = run_cli(*merge_args(models["fp16_a"], models["fp16_b"], out, "--report", tmp_path / "r.json"),
                           capsys=capsys)
    assert_one_line_error(code, err, f"the merge is complete at {out}", "r.json could not be written")
    assert (out / "gpumerge_digests.json").is_file() and not (tmp_path / "r.json").exists()


def test_eval_text_with_an_unknown_user_is_one_line(models, tmp_path, capsys):
    code, _, err = run_cli(*sweep_args(models["fp16_a"], models["fp16_b"], tmp_path / "runs", "--grid",
                                       "gradient_end=0.5", "--eval-text", "~nouser_gpumerge/t.txt"), capsys=capsys)
    assert_one_line_error(code, err, "no user named nouser_gpumerge")


def test_a_link_named_like_a_stale_working_directory_is_never_moved_into_place(models, tmp_path, capsys):
    from gpumerge.outdir import sibling_stem

    runs = tmp_path / "runs"
    runs.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    for suffix in (".old", ".partial"):
        (runs / f"{sibling_stem(runs / 'ge0.5')}-4242-abcdefgh{suffix}").symlink_to(elsewhere)
    code, _, err = run_cli(*sweep_args(models["fp16_a"], models["fp16_b"], runs, "--grid", "gradient_end=0.5"),
                           capsys=capsys)
    assert code == 0, err
    assert (runs / "ge0.5").is_dir() and not (runs / "ge0.5").is_symlink()
    assert (runs / "ge0.5" / "gpumerge_digests.json").is_file()
    assert (elsewhere / "keep.txt").read_text() == "mine"


def test_results_rows_are_trusted_only_with_this_directorys_mark(tmp_path):
    """A row edited by hand (a better perplexity), copied from another directory (another history key), or with no
    per-file scores is scored again, never trusted."""
    from gpumerge.sweep_eval import Row, append_row, load_done

    log = tmp_path / "results.jsonl"
    mine, other = "ab" * 16, "cd" * 16
    append_row(log, Row("v1", {}, "k1", 12.5, per_file={"t.txt": 12.5}, tokens=10), mine)
    append_row(log, Row("v2", {}, "k2", 13.5, per_file={"t.txt": 13.5}, tokens=10), other)
    append_row(log, Row("v3", {}, "k3", 14.5, per_file={}, tokens=10), mine)
    lines = log.read_text().splitlines()
    forged = json.loads(lines[0])
    forged.update(key="k4", perplexity=1.0001, per_file={"t.txt": 1.0001})
    log.write_text("\n".join(lines + [json.dumps(forged)]) + "\n")
    assert set(load_done(log, mine)) == {"k1"}
    assert set(load_done(log, other)) == {"k2"}
