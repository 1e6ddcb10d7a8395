"""`gpumerge sweep --eval-text` on a small trained pair: perplexities equal an independent computation with
transformers (the definition written again here), the kept model is its single merge, resident and streamed inputs
agree, the batch size does not matter, several texts give per-file columns, resume, refusals."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli_errors import assert_one_line_error
from test_sweep import assert_same_model, in_process_sweep, not_a_file, single_merge

SEQ = 64
PENDING = ".gpumerge-sweep.pending"  # an interrupted run's working directory in RUNS
TOKENS = 700  # per text: 10 full windows and a short last one of 60 tokens

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(trained):
    return trained / "model_1", trained / "model_2"


def texts(trained) -> list[Path]:
    return [trained / "texts" / "eval_code.txt", trained / "texts" / "eval_prose.txt"]


def eval_flags(trained, *extra, files=None):
    flags = []
    for path in files or texts(trained):
        flags += ["--eval-text", path]
    return (*flags, "--eval-tokens", TOKENS, "--seq-len", SEQ, *extra)


def reference_perplexity(model_dir: Path, files: list[Path]) -> tuple[float, dict]:
    """The definition, written again: each file tokenized alone (no special tokens), its first TOKENS tokens cut into
    windows of SEQ (the last kept with >= 2), every token but a window's first predicted, fp32 log-softmax; one window
    at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count, per_file = 0.0, 0, {}
    with torch.inference_mode():
        for path in files:
            ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:TOKENS]
            nll, n = 0.0, 0
            for start in range(0, len(ids), SEQ):
                window = ids[start:start + SEQ]
                if len(window) < 2:
                    continue
                logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
                nll -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(window[1:])[:, None]).sum())
                n += len(window) - 1
            per_file[path.name] = math.exp(nll / n)
            total, count = total + nll, count + n
    return math.exp(total / count), per_file


def results(runs: Path) -> list[dict]:
    with open(runs / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def close(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-5 * abs(y)


def test_scores_equal_an_independent_computation_and_the_kept_model_is_its_merge(pair, trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs,
                             "--quiet", "--grid", "gradient_start=0,0.5", "--grid", "gradient_end=0.5,1",
                             *eval_flags(trained), capsys=capsys)
    assert code == 0, err
    table = results(runs)
    assert list(table[0]) == ["rank", "name", "gradient_start", "gradient_end", "perplexity",
                              "perplexity:eval_code.txt", "perplexity:eval_prose.txt", "tokens", "blend_s", "eval_s",
                              "kept", "model_1_itself"]
    rows = {r["name"]: r for r in table}
    assert set(rows) == {"model_1", "model_2", "gs0-ge0.5", "gs0-ge1", "gs0.5-ge0.5", "gs0.5-ge1"}
    assert [float(r["perplexity"]) for r in table] == sorted(float(r["perplexity"]) for r in table)
    for name, directory in (("model_1", pair[0]), ("model_2", pair[1])):
        want, per_file = reference_perplexity(directory, texts(trained))
        assert close(float(rows[name]["perplexity"]), want), (name, rows[name]["perplexity"], want)
        for file, value in per_file.items():
            assert close(float(rows[name][f"perplexity:{file}"]), value)
    kept = [r["name"] for r in table if r["kept"] == "true"]
    assert len(kept) == 1 and kept[0] == next(r["name"] for r in table if not r["name"].startswith("model_"))
    name = kept[0]
    merged = single_merge(pair, tmp_path / "single", capsys, "--gradient_start", rows[name]["gradient_start"],
                          "--gradient_end", rows[name]["gradient_end"])
    assert_same_model(runs / name, merged)
    want, _ = reference_perplexity(merged, texts(trained))
    assert close(float(rows[name]["perplexity"]), want)
    other = next(r for r in table if r["kept"] == "false" and not r["name"].startswith("model_"))
    merged = single_merge(pair, tmp_path / "other", capsys, "--gradient_start", other["gradient_start"],
                          "--gradient_end", other["gradient_end"])
    assert close(float(other["perplexity"]), reference_perplexity(merged, texts(trained))[0])
    assert sorted(p.name for p in runs.iterdir()) == sorted([name, "results.csv", "results.json", "results.jsonl",
                                                             "sweep.json", "sweep.png", "variants.csv"])
    record = json.loads((runs / "results.json").read_text())
    assert record["eval"]["seq_len"] == SEQ and [t["name"] for t in record["eval"]["texts"]] == [
        "eval_code.txt", "eval_prose.txt"]
    assert "rank" in out and "vs model_1" in out and f"best: {name}" in out


@pytest.mark.parametrize("engine", [dict(input_budget=0), dict(batch=1)])
def test_streamed_inputs_and_batch_size_agree(engine, pair, trained, tmp_path):
    grid = ("--grid", "gradient_end=0.3,0.9", "--grid", "method=lerp,slerp", "--no-baselines", "--keep", "all")
    batch = engine.pop("batch", None)
    in_process_sweep(pair, tmp_path / "a", *grid, *eval_flags(trained, "--eval-batch", 4))
    in_process_sweep(pair, tmp_path / "b", *grid, *eval_flags(trained, "--eval-batch", batch or 4), **engine)
    first, second = ({r["name"]: float(r["perplexity"]) for r in results(tmp_path / d)} for d in ("a", "b"))
    assert first.keys() == second.keys() == {"ge0.3-lerp", "ge0.3-slerp", "ge0.9-lerp", "ge0.9-slerp"}
    for name in first:
        assert close(second[name], first[name]), name
        if batch is None:  # the same batches: the same arithmetic
            assert second[name] == first[name]
    for name in first:  # every variant kept: each its merge
        assert_same_model(tmp_path / "a" / name, tmp_path / "b" / name)


def test_resume_scores_only_what_is_missing(pair, trained, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    argv = ("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs, "--quiet",
            "--grid", "gradient_end=0:1:4", *eval_flags(trained, files=texts(trained)[:1]))
    monkeypatch.setenv("GPUMERGE_TEST_STOP_AFTER", "3")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 130, err
    # nothing of a run cut short is a record yet: its scored rows wait in its working directory
    assert [p.name for p in runs.iterdir()] == [PENDING]
    lines = (runs / PENDING / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    monkeypatch.delenv("GPUMERGE_TEST_STOP_AFTER")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    after = (runs / "results.jsonl").read_text().splitlines()
    assert after[:3] == lines and len(after) == 6  # model_1, model_2 and 4 variants, each scored once
    assert not (runs / PENDING).exists()
    assert len({json.loads(line)["key"] for line in after}) == 6
    assert len(results(runs)) == 6 and "perplexity:eval_code.txt" not in results(runs)[0]


def test_another_eval_setting_into_the_same_runs_is_refused(pair, trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs, "--quiet",
            "--grid", "gradient_end=0.5,1", "--no-baselines")
    code, _, err = run_cli(*base, *eval_flags(trained), capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli(*base, "--eval-text", texts(trained)[0], "--seq-len", 32, capsys=capsys)
    assert_one_line_error(code, err, "holds another sweep")


@pytest.mark.parametrize("extra, needle", [
    (("--eval-text", "TEXT", "--seq-len", "100000"), "beyond model 1's max_position_embeddings"),
    (("--eval-text", "TEXT", "--keep", "-1"), "--keep must be"),
    (("--eval-text", "TEXT", "--keep", "abc"), "--keep must be"),
    (("--keep", "2"), "--keep sets how variants are scored; give --eval-text"),
    (("--seq-len", "0"), "--seq-len sets how variants are scored"),
    (("--eval-batch", "8"), "--eval-batch sets how"),
    (("--no-baselines",), "--no-baselines sets how"),
    (("--eval-text", "TEXT", "--seq-len", "1"), "--seq-len must be"),
    (("--eval-text", "TEXT", "--eval-dtype", "int8"), "--eval-dtype 'int8' is not one of"),
    (("--eval-text", "MISSING"), "MISSING"),
    (("--eval-text", "TINY"), "at least 2 are needed"),
])
def test_bad_evaluations_are_one_line_errors(extra, needle, pair, trained, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("a")
    extra = [str(trained / "texts" / "eval_code.txt") if x == "TEXT" else str(tmp_path / "missing.txt")
             if x == "MISSING" else str(tmp_path / "tiny.txt") if x == "TINY" else x for x in extra]
    code, _, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir",
                           tmp_path / "runs", "--quiet", "--grid", "gradient_end=0.5,1", *extra, capsys=capsys)
    assert_one_line_error(code, err, needle.replace("MISSING", "missing.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


def test_non_finite_scores_rank_last_and_are_never_best():
    from gpumerge.sweep_eval import Row, ranked

    rows = [Row("nan", {}, "k1", perplexity=math.nan), Row("b", {}, "k2", perplexity=9.0),
            Row("inf", {}, "k3", perplexity=math.inf), Row("a", {}, "k4", perplexity=3.0)]
    assert [r.name for r in ranked(rows)] == ["a", "b", "inf", "nan"]


def stopped_run(pair, trained, runs, capsys, monkeypatch, stop_after: int, *extra):
    argv = ("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs, "--quiet",
            "--grid", "gradient_end=0:1:3", *eval_flags(trained, files=texts(trained)[1:]), *extra)
    monkeypatch.setenv("GPUMERGE_TEST_STOP_AFTER", str(stop_after))
    code, _, err = run_cli(*argv, capsys=capsys)
    monkeypatch.delenv("GPUMERGE_TEST_STOP_AFTER")
    assert code == 130, err
    return argv


def _keys(path: Path) -> tuple[list[str], int]:
    keys, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            keys.append(json.loads(line)["key"])
        except ValueError:
            torn += 1
    return keys, torn


def test_a_torn_results_line_costs_only_that_row(pair, trained, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    argv = stopped_run(pair, trained, runs, capsys, monkeypatch, 2)
    log = runs / PENDING / "results.jsonl"
    first = _keys(log)[0]
    log.write_bytes(log.read_bytes()[:-40])  # a crash in the middle of writing the second row
    stopped_run(pair, trained, runs, capsys, monkeypatch, 1)
    keys, torn = _keys(log)
    assert torn == 1  # the fragment stays on a line of its own; the next row starts a new line
    assert keys == first  # model_1 kept, model_2 (torn) scored again, and only it
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    keys, torn = _keys(runs / "results.jsonl")
    assert torn == 0 and len(set(keys)) == len(keys) == 5  # the records hold each row once


def test_a_results_log_that_is_not_a_regular_file_is_never_read(pair, trained, tmp_path, capsys, monkeypatch):
    """A FIFO at the working directory's log (never read: it would hang) makes the run start that directory afresh;
    one at the records' results.jsonl is in the way, said in one line."""
    import os

    runs = tmp_path / "runs"
    argv = stopped_run(pair, trained, runs, capsys, monkeypatch, 1)
    (runs / PENDING / "results.jsonl").unlink()
    os.mkfifo(runs / PENDING / "results.jsonl")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    assert len((runs / "results.jsonl").read_text().splitlines()) == 5 and not (runs / PENDING).exists()
    (runs / "results.jsonl").unlink()
    os.mkfifo(runs / "results.jsonl")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert_one_line_error(code, err, "results.jsonl is in the way")


def test_another_tokenizer_is_another_evaluation(pair, trained, tmp_path, capsys, monkeypatch):
    import shutil

    mine = tmp_path / "model_1"
    shutil.copytree(pair[0], mine)
    runs = tmp_path / "runs"
    argv = ("sweep", "--model_path1", mine, "--model_path2", pair[1], "--output_dir", runs, "--quiet", "--grid",
            "gradient_end=0.5,1", "--no-baselines", *eval_flags(trained, files=texts(trained)[1:]))
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    data = json.loads((mine / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[40:42]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # the same text, other token ids
    (mine / "tokenizer.json").write_text(json.dumps(data))
    code, _, err = run_cli(*argv, capsys=capsys)
    assert_one_line_error(code, err, "holds another sweep (other evaluation settings")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink_to_shard", "dev_zero"])
def test_an_eval_text_that_is_not_a_text_file_is_refused(kind, pair, tmp_path, capsys):
    text = not_a_file(kind, tmp_path / "text.txt", link_to=next(pair[0].glob("*.safetensors")))
    code, _, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir",
                           tmp_path / "runs", "--quiet", "--grid", "gradient_end=0.5,1", "--eval-text", text,
                           capsys=capsys)
    assert_one_line_error(code, err, f"--eval-text {text}")
    assert not (tmp_path / "runs").exists()


def test_score_only_and_a_best_that_is_model_1_itself(pair, trained, tmp_path, capsys):
    """--keep 0 scores and plots and writes no model; a variant with t = 0 everywhere is model 1's weights, and
    when it is the best the summary and results.json say that no blend beat model 1."""
    runs = tmp_path / "runs"
    code, out, err = run_cli("sweep", "--model_path1", pair[0], "--model_path2", pair[1], "--output_dir", runs,
                             "--quiet", "--grid", "gradient_end=0", "--keep", "0", *eval_flags(trained),
                             capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in runs.iterdir()) == ["results.csv", "results.json", "results.jsonl", "sweep.json",
                                                      "sweep.png", "variants.csv"]
    rows = {r["name"]: r for r in results(runs)}
    assert rows["ge0"]["model_1_itself"] == "true" and rows["ge0"]["kept"] == "false"
    assert rows["model_1"]["model_1_itself"] == "false"
    assert float(rows["ge0"]["perplexity"]) == float(rows["model_1"]["perplexity"])  # the same weights
    verdict = json.loads((runs / "results.json").read_text())["verdict"]
    assert verdict["best"] == "ge0" and verdict["model_1_itself"] is True and verdict["beats_model_1"] is False
    assert "is model 1 itself (t = 0 everywhere): no blend beat model 1" in out


def test_the_verdict_names_no_best_without_a_finite_score_and_says_when_model_1_won():
    from gpumerge.sweep_eval import Row, verdict

    rows = [Row("model_1", {}, "k1", 10.0, baseline=True), Row("a", {}, "k2", math.nan),
            Row("b", {}, "k3", math.inf)]
    assert verdict(rows)["best"] is None and "no variant" in verdict(rows)["note"]
    rows.append(Row("c", {}, "k4", 11.0))
    outcome = verdict(rows)
    assert outcome["best"] == "c" and outcome["beats_model_1"] is False and "no blend beat model 1" in outcome["note"]
    rows.append(Row("d", {}, "k5", 9.0))
    assert verdict(rows) == {"best": "d", "beats_model_1": True, "model_1_itself": False, "note": None}
