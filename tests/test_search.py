"""`gpumerge sweep --search optuna`: trials chosen by optuna's sampler, scored like an evaluated sweep's variants,
resumable from RUNS/study.db, the best written as ordinary merges. The tiny fp16 pair (model 1 has a tokenizer)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, load_state, run_cli, source_env

from gpumerge.demo import DEMO_WORDS
from gpumerge.search import study_storage

pytest.importorskip("optuna", reason="the search extra (pip install 'gpumerge[search]') is not installed")


def text(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    if not path.exists():
        path.write_text(" ".join(DEMO_WORDS * 6))
    return path


def search_argv(models, runs: Path, tmp_path: Path, *extra) -> list[str]:
    return ["sweep", "--model_path1", str(models["fp16_a"]), "--model_path2", str(models["fp16_b"]),
            "--output_dir", str(runs), "--search", "optuna", "--eval-text", str(text(tmp_path)), "--seq-len", "16",
            "--quiet", *map(str, extra)]


def rows(runs: Path) -> list[dict]:
    with open(runs / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def trials_of(runs: Path) -> list[tuple]:
    """Every trial's name, parameters and perplexity, by name."""
    return sorted((r["name"], tuple((k, v) for k, v in r.items() if k not in ("rank", "kept", "blend_s", "eval_s")))
                  for r in rows(runs) if r["name"].startswith("t"))


TWO_D = ("--space", "gradient_start=0:1", "--space", "gradient_end=0:1")


def test_a_seeded_search_asks_the_same_trials_twice(models, tmp_path, capsys):
    for k in (1, 2):
        code, out, err = run_cli(*search_argv(models, tmp_path / f"runs{k}", tmp_path, "--trials", 6, "--seed", 7,
                                              "--keep", 0, *TWO_D), capsys=capsys)
        assert code == 0, err
    first, second = trials_of(tmp_path / "runs1"), trials_of(tmp_path / "runs2")
    assert len(first) == 6 and first == second
    values = {r["gradient_start"] for r in rows(tmp_path / "runs1") if r["name"].startswith("t")}
    assert len(values) == 6  # six different points, not one repeated
    assert (tmp_path / "runs1" / "study.db").is_file() and (tmp_path / "runs1" / "sweep.png").is_file()
    assert not list((tmp_path / "runs1").glob("study.db-*"))  # SQLite's log folded back in when the study closed


def test_interrupted_and_resumed_it_completes_the_study(models, tmp_path, capsys):
    """Killed after 2 trials, one more trial left RUNNING in the study (as a crash mid-trial leaves it): the rerun
    marks it failed, asks its parameters again, and completes 6 trials; the kept model is the single merge of its
    recorded settings."""
    import optuna

    runs = tmp_path / "runs"
    argv = search_argv(models, runs, tmp_path, "--trials", 6, "--seed", 1, *TWO_D)
    done = subprocess.run([sys.executable, "-m", "gpumerge", *argv], capture_output=True, text=True, cwd=REPO,
                          env=source_env(GPUMERGE_TEST_STOP_AFTER="2"))
    assert done.returncode == 130, done.stderr
    assert not (runs / "results.csv").exists()  # nothing committed yet: the study holds the trials
    storage = study_storage(runs, readonly=False)  # the test writes a trial left RUNNING
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    crashed = study.ask({"gradient_start": optuna.distributions.FloatDistribution(0, 1),
                         "gradient_end": optuna.distributions.FloatDistribution(0, 1)})
    del study, storage  # (its SQLite connection closed: the search opens study.db alone)
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    study = optuna.load_study(study_name=name, storage=study_storage(runs))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 and states.count(optuna.trial.TrialState.FAIL) == 1
    assert crashed.params in [t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    table = rows(runs)
    assert sum(r["name"].startswith("t") for r in table) == 6
    (kept,) = [r["name"] for r in table if r["kept"] == "true"]
    assert table[0]["name"] in (kept, "model_1", "model_2")
    recipe = runs / kept / "gpumerge_recipe.yaml"
    again = tmp_path / "again"
    code, _, err = run_cli("--config", recipe, "--output_model_path", again, "--quiet", capsys=capsys)
    assert code == 0, err
    want, got = load_state(again), load_state(runs / kept)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_per_module_anchors_reach_the_blend(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 3, "--keep", 1,
                                        "--space", "layer_gradients.mlp.0=0.2:1",
                                        "--space", "layer_gradients.mlp.1=0.2:1"), capsys=capsys)
    assert code == 0, err
    (kept,) = [r for r in rows(runs) if r["kept"] == "true"]
    recipe = yaml.safe_load((runs / kept["name"] / "gpumerge_recipe.yaml").read_text())
    anchors = recipe["layer_gradients"]["mlp"]
    assert anchors == [float(kept["layer_gradients.mlp.0"]), float(kept["layer_gradients.mlp.1"])]
    a, b, out = load_state(models["fp16_a"]), load_state(models["fp16_b"]), load_state(runs / kept["name"])
    for name, tensor in out.items():
        if ".mlp." in name:  # t >= 0.2 everywhere: a blend, neither model
            assert not torch.equal(tensor, a[name]) and not torch.equal(tensor, b[name]), name
        else:  # modules not searched keep model 1's weights
            assert torch.equal(tensor, a[name]), name


def test_searched_anchors_beside_a_configs_fixed_gradients(models, tmp_path, capsys):
    recipe = tmp_path / "fixed.yaml"
    recipe.write_text("layer_gradients:\n  self_attn: [0.25, 0.25]\n  mlp: [0.9, 0.9]\n")
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 1, "--config", recipe,
                                        "--space", "layer_gradients.mlp.0=0:0.5"), capsys=capsys)
    assert code == 0, err
    (kept,) = [r for r in rows(runs) if r["kept"] == "true"]
    written = yaml.safe_load((runs / kept["name"] / "gpumerge_recipe.yaml").read_text())["layer_gradients"]
    searched = float(kept["layer_gradients.mlp.0"])
    assert written == {"self_attn": [0.25, 0.25], "mlp": [searched]}  # the searched module replaced the fixed one
    a, b, out = load_state(models["fp16_a"]), load_state(models["fp16_b"]), load_state(runs / kept["name"])
    for name, tensor in out.items():
        t = 0.25 if ".self_attn." in name else searched if ".mlp." in name else None
        if t is None:
            assert torch.equal(tensor, a[name]), name
            continue
        want = a[name].double() + t * (b[name].double() - a[name].double())  # the float64 reference
        info = torch.finfo(tensor.dtype)  # within one rounding to the output dtype (subnormals: its smallest step)
        assert ((tensor.double() - want).abs() <= info.eps * want.abs() + info.smallest_normal * info.eps).all(), name
    # a --config with anything else than fixed layer_gradients beside searched anchors: one line
    for text, needle in (("gradient_values: [0.5]\n", "its recipe (gradient_values"),
                         ("gradient_start: 0.5\n", "sets gradient_start")):
        recipe.write_text(text)
        code, _, err = run_cli(*search_argv(models, tmp_path / "other", tmp_path, "--trials", 2, "--config", recipe,
                                            "--space", "layer_gradients.mlp.0=0:0.5"), capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "other").exists()


def test_choices_and_integer_ranges(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 5, "--keep", 0, "--seed", 3,
                                        "--space", "method=lerp|slerp", "--space", "layer_start=0:3:int",
                                        "--space", "gradient_end=0.5:1:log"), capsys=capsys)
    assert code == 0, err
    trials = [r for r in rows(runs) if r["name"].startswith("t")]
    assert len(trials) == 5
    assert {r["method"] for r in trials} <= {"lerp", "slerp"}
    assert all(r["layer_start"] in ("0", "1", "2", "3") for r in trials)
    assert all(0.5 <= float(r["gradient_end"]) <= 1 for r in trials)


@pytest.mark.parametrize("extra, needle", [
    (("--trials", 2, "--space", "gradient_end"), "give KEY=LOW:HIGH"),
    (("--trials", 2, "--space", "gradient_end=1:0"), "LOW must be below HIGH"),
    (("--trials", 2, "--space", "gradient_end=0:1:int"), "a share of model 2"),
    (("--trials", 2, "--space", "layer_start=0.5:2"), "is not an integer"),
    (("--trials", 2, "--space", "temperature=0:1"), "cannot be searched"),
    (("--trials", 2, "--space", "method=lerp|ties"), "distinct values of lerp, slerp"),
    (("--trials", 2, "--space", "gradient_end=0:1:log"), "a log scale needs LOW > 0"),
    (("--trials", 2, "--space", "gradient_end=0:nan"), "not a finite number"),
    (("--trials", 2, "--space", "layer_gradients.mlp.1=0:1"), "anchors 1 are searched but not 0"),
    (("--trials", 2, "--space", "layer_gradients.mlp.0=0:1", "--space", "gradient_end=0:1"),
     "both set the blocks' gradient"),
    (("--trials", 2, "--space", "gradient_end=0:1", "--space", "gradient_end=0:0.5"), "given twice"),
    (("--trials", 2, "--space", "gradient_end=0:1", "--gradient_end", "0.5"), "also searched"),
    (("--trials", 0, "--space", "gradient_end=0:1"), "--trials N, from 1"),
    (("--space", "gradient_end=0:1"), "--trials N, from 1"),
    (("--trials", 2, "--space", "gradient_end=0:1", "--sampler", "random"), "use tpe or cmaes"),
    (("--trials", 2), "at least one --space"),
    (("--trials", 2, "--space", "gradient_end=0:1", "--grid", "gradient_start=0,1"), "not --grid"),
])
def test_a_malformed_search_is_one_line(models, tmp_path, capsys, extra, needle):
    runs = tmp_path / "runs"
    code, out, err = run_cli(*search_argv(models, runs, tmp_path, *extra), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gpumerge: error:"), err
    assert needle in lines[0], lines[0]
    assert not runs.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--search", "grid"], "the one search is optuna"),
    (["--grid", "gradient_end=0,1", "--space", "gradient_end=0:1"], "--space sets a search"),
    (["--grid", "gradient_end=0,1", "--trials", "3"], "--trials sets a search"),
])
def test_search_flags_without_a_search_are_refused(models, tmp_path, capsys, argv, needle):
    runs = tmp_path / "runs"
    code, _, err = run_cli("sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_dir", runs, "--quiet", "--eval-text", text(tmp_path), *argv, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not runs.exists()


def test_without_optuna_one_line_names_the_extra(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code, _, err = run_cli(*search_argv(models, tmp_path / "runs", tmp_path, "--trials", 2,
                                        "--space", "gradient_end=0:1"), capsys=capsys)
    assert code == 2 and "pip install 'gpumerge[search]'" in err and err.count("\n") == 1, err


def test_another_search_into_the_same_directory_is_refused(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 0,
                                        "--space", "gradient_end=0:1"), capsys=capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 0,
                                        "--space", "gradient_end=0:0.5"), capsys=capsys)
    assert code == 2 and "holds another sweep or search" in err
    assert before == {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}


def test_overwrite_replaces_an_earlier_search_and_verify_reads_a_search(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    first = search_argv(models, runs, tmp_path, "--trials", 3, "--keep", 2, "--seed", 1, "--space", "gradient_end=0:1")
    code, _, err = run_cli(*first, capsys=capsys)
    assert code == 0, err
    old_kept = {r["name"] for r in rows(runs) if r["kept"] == "true"}
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0 and err == "" and out.count(": ok (") == 2, (out, err)
    second = search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 1, "--seed", 2,
                         "--space", "gradient_start=0:0.5")
    code, _, err = run_cli(*second, capsys=capsys)
    assert code == 2 and "pass --overwrite to replace an earlier sweep or search" in err
    code, _, err = run_cli(*second, "--overwrite", capsys=capsys)
    assert code == 0, err
    (kept,) = [r["name"] for r in rows(runs) if r["kept"] == "true"]
    assert {p.name for p in runs.iterdir() if p.is_dir()} == {kept}  # the earlier search's kept trials retired
    assert old_kept  # (one of them may share the new one's name: written anew, with the new settings)
    recipe = yaml.safe_load((runs / kept / "gpumerge_recipe.yaml").read_text())
    assert "gradient_start" in recipe and float(recipe["gradient_start"]) <= 0.5
    import optuna

    assert len(optuna.get_all_study_names(study_storage(runs, readonly=True))) == 1  # the earlier study deleted
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0 and out.count(": ok (") == 1, (out, err)
    # a grid sweep over the search, with --overwrite: the study goes with the rest of the search's records
    code, _, err = run_cli("sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_dir", runs, "--grid", "gradient_end=0,1", "--quiet", "--overwrite",
                           capsys=capsys)
    assert code == 0, err
    assert not (runs / "study.db").exists() and not (runs / kept).exists()
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0 and out.count(": ok (") == 2, (out, err)


def test_a_kept_trial_that_is_no_longer_whole_is_in_the_way(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 1, "--space", "gradient_end=0:1")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    (kept,) = [r["name"] for r in rows(runs) if r["kept"] == "true"]
    shard = sorted((runs / kept).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])  # a shard cut short
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and f"is in the way of the kept trial {kept}" in err, err
    code, _, err = run_cli(*argv, "--overwrite", capsys=capsys)  # written again, swapped in over it
    assert code == 0, err
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0 and out.count(": ok (") == 1, (out, err)
    shutil.rmtree(runs / kept)
    code, _, err = run_cli(*argv, capsys=capsys)  # gone: written again
    assert code == 0, err
    code, out, err = run_cli("verify", runs, capsys=capsys)
    assert code == 0 and out.count(": ok (") == 1, (out, err)


def test_a_study_in_an_awkward_path_and_a_study_of_another_format(models, tmp_path, capsys):
    import contextlib
    import sqlite3

    import optuna

    runs = tmp_path / "a#b%20c?d"  # URI syntax in the path: the read-only open quotes it
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 0,
                                        "--space", "gradient_end=0:1"), capsys=capsys)
    assert code == 0, err
    assert len(optuna.get_all_study_names(study_storage(runs))) == 1
    old = tmp_path / "old"
    old.mkdir()
    with contextlib.closing(sqlite3.connect(old / "study.db")) as db:  # optuna's RDB tables, as on 2026-12-04
        db.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY, study_name TEXT)")
        db.commit()
    before = (old / "study.db").read_bytes()
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(*search_argv(models, old, tmp_path, "--trials", 2, "--space", "gradient_end=0:1"),
                               *extra, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("gpumerge: error: --output_dir"), err
    assert (old / "study.db").read_bytes() == before and sorted(p.name for p in old.iterdir()) == ["study.db"]


# ---- scorers -----------------------------------------------------------------------------------------------------

SCORER_MODULE = '''
import torch


def head_mean(model, tokenizer):
    """A number that moves with the blend: the mean of the output layer's weights (and the tokenizer is model 1's)."""
    assert tokenizer.encode("hello") is not None
    return float(model.lm_head.weight.double().mean())
'''


def scorer_file(tmp_path: Path, text_: str) -> Path:
    path = tmp_path / "scorers.yaml"
    path.write_text(text_)
    return path


def test_a_custom_scorer_beside_perplexity(models, tmp_path, capsys, monkeypatch):
    import math

    (tmp_path / "myscores.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = scorer_file(tmp_path, "- {kind: perplexity, weight: 1}\n"
                                    "- {kind: function, function: 'myscores:head_mean', weight: 0.5, "
                                    "direction: maximize}\n")
    runs = tmp_path / "runs"
    code, out, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 4, "--keep", 1, "--scorers", scorers,
                                          "--space", "gradient_end=0:1"), capsys=capsys)
    assert code == 0, err
    table = rows(runs)
    assert {"objective", "score:perplexity", "score:head_mean"} <= set(table[0])
    for row in table:
        ppl, head = float(row["score:perplexity"]), float(row["score:head_mean"])
        assert float(row["objective"]) == 1.0 * math.log(ppl) + 0.5 * (1.0 - head)
        assert float(row["perplexity"]) == ppl
    objectives = [float(r["objective"]) for r in table]
    assert objectives == sorted(objectives)  # ranked by the objective
    kept = [r["name"] for r in table if r["kept"] == "true"]
    assert kept == [next(r["name"] for r in table if r["name"].startswith("t"))]
    assert "objective" in out.splitlines()[0]


def test_a_search_scored_by_a_function_alone_needs_no_text(models, tmp_path, capsys, monkeypatch):
    (tmp_path / "myscores.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = scorer_file(tmp_path, "- {kind: function, function: 'myscores:head_mean', direction: maximize}\n")
    argv = search_argv(models, tmp_path / "runs", tmp_path, "--trials", 3, "--keep", 1, "--eval-batch", 2,
                       "--space", "gradient_end=0:1")
    cut = argv.index("--eval-text")
    del argv[cut:cut + 2]
    del argv[argv.index("--seq-len"):argv.index("--seq-len") + 2]
    code, _, err = run_cli(*argv, "--scorers", scorers, capsys=capsys)
    assert code == 0, err
    table = rows(tmp_path / "runs")
    heads = {r["name"]: float(r["score:head_mean"]) for r in table}
    # model 2's head mean and model 1's differ, and each trial's lies between them (lerp of the two heads)
    low, high = sorted((heads["model_1"], heads["model_2"]))
    assert low < high and all(low <= v <= high for n, v in heads.items() if n.startswith("t"))
    assert all(r["perplexity"] in ("", "nan") for r in table)
    # a perplexity scorer (or none) without texts, and a text's flag without texts: one line each
    for extra, needle in ((("--scorers", scorer_file(tmp_path, "- {kind: perplexity}\n")), "has a perplexity scorer"),
                          ((), "or a --scorers file without a perplexity scorer")):
        code, _, err = run_cli(*argv, *map(str, extra), capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    scorers = scorer_file(tmp_path, "- {kind: function, function: 'myscores:head_mean', direction: maximize}\n")
    code, _, err = run_cli(*argv, "--scorers", scorers, "--seq-len", "16", capsys=capsys)
    assert code == 2 and "--seq-len sets how variants are scored; give --eval-text" in err, err


@pytest.mark.parametrize("content, needle", [
    ("kind: perplexity\n", "a YAML list of scorers"),
    ("- {kind: bleu}\n", "kind must be one of perplexity, function, lm_eval"),
    ("- {kind: perplexity, weight: -1}\n", "weight must be a positive number"),
    ("- {kind: perplexity, weight: .nan}\n", "weight must be a positive number"),
    ("- {kind: function, function: 'C:/scores.py'}\n", "function must be package.module:function"),
    ("- {kind: function, function: 'no_such_module_xyz:f'}\n", "cannot import no_such_module_xyz"),
    ("- {kind: function, function: 'json:no_such_function'}\n", "json has no function no_such_function"),
    ("- {kind: perplexity, temperature: 2}\n", "unknown key 'temperature'"),
    ("- {kind: perplexity}\n- {kind: perplexity}\n", "the name perplexity is used twice"),
    ("- {kind: function, function: 'json:dumps', direction: up}\n", "direction must be minimize or maximize"),
    ("- {kind: lm_eval, task: 'a b'}\n", "task must be an lm-evaluation-harness task name"),
    ("- {kind: lm_eval, task: t, limit: 0}\n", "limit must be a number of samples"),
])
def test_a_malformed_scorer_file_is_one_line(models, tmp_path, capsys, content, needle):
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--scorers",
                                        scorer_file(tmp_path, content), "--space", "gradient_end=0:1"),
                           capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gpumerge: error:") and needle in lines[0], err
    assert not runs.exists()


LOCAL_TASK = """task: gpumerge_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_a_local_lm_eval_task_scores_the_model_in_memory(models, tmp_path, capfd, monkeypatch):
    """An lm-evaluation-harness task built from a local JSON file, offline, on the resident model (no reload)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval; CI leaves "
                                          "it out: it is a large install)")
    import json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    words = ["alpha", "beta", "gamma", "delta"]
    questions = [{"question": f"Which word comes after {words[i % 4]}?", "choices": words, "answer": (i + 1) % 4}
                 for i in range(12)]
    (tasks / "data.json").write_text(json.dumps(questions))
    (tasks / "gpumerge_local.yaml").write_text(LOCAL_TASK.format(data=tasks / "data.json"))
    scorers = scorer_file(tmp_path, f"- {{kind: perplexity, weight: 1}}\n- {{kind: lm_eval, task: gpumerge_local, "
                                    f"include_path: '{tasks}', limit: 8, weight: 2}}\n")
    runs = tmp_path / "runs"
    code, _, err = run_cli(*search_argv(models, runs, tmp_path, "--trials", 2, "--keep", 0, "--scorers", scorers,
                                        "--space", "gradient_end=0:1"), capsys=capfd)
    assert code == 0, err
    assert err == ""  # --quiet: nothing from lm-eval either (no progress bars, no git messages), at the fd level
    import math

    for row in rows(runs):
        accuracy = float(row["score:gpumerge_local"])
        assert accuracy in {k / 8 for k in range(9)}  # 8 samples scored
        assert float(row["objective"]) == math.log(float(row["score:perplexity"])) + 2 * (1.0 - accuracy)
