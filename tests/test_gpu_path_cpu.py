"""The GPU path's decisions, checked on a CPU: which devices ``--device auto`` chooses (with made-up CUDA answers),
the batch an evaluated sweep picks from a device's free memory (a made-up amount), where an evaluated sweep's time
went (results.json and the summary), and the model it scores, built empty and set from model 1's tensors."""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_cli, write_checkpoint
from test_cli_errors import assert_one_line_error
from test_sweep import in_process_sweep

import gpumerge.devices
import gpumerge.sweep_eval
from gpumerge.demo import DEMO_WORDS
from gpumerge.devices import gpu_budgets, resolve_devices
from gpumerge.errors import SpecError
from gpumerge.results import timings_text
from gpumerge.spec import MergeSpec
from gpumerge.sweep_eval import AUTO_BATCH_MAX, fit_batch, forward_bytes

GiB = 2**30


# ---- devices --------------------------------------------------------------------------------------------------------

def fake_cuda(monkeypatch, *, possible: bool, count: int | None) -> list[bool]:
    """cuda_possible answers ``possible``; cuda_count answers ``count`` and records each ask_torch (None: it must not
    be asked at all)."""
    asked: list[bool] = []

    def cuda_count(*, ask_torch: bool = False) -> int:
        if count is None:
            raise AssertionError("cuda_count was asked")
        asked.append(ask_torch)
        return count

    monkeypatch.setattr(gpumerge.devices, "cuda_possible", lambda: possible)
    monkeypatch.setattr(gpumerge.devices, "cuda_count", cuda_count)
    return asked


def test_auto_merges_on_the_cpu_without_asking_torch(monkeypatch):
    fake_cuda(monkeypatch, possible=True, count=None)
    devices, notice = resolve_devices("auto")
    assert devices == ["cpu"]
    assert "--device cuda" in notice and "CPU" in notice
    fake_cuda(monkeypatch, possible=False, count=None)
    assert resolve_devices("auto") == (["cpu"], "no CUDA device found; the merge runs on the CPU")
    assert resolve_devices("cpu", scoring=True, gpu_budgets=True) == (["cpu"], None)


@pytest.mark.parametrize("kind", [dict(scoring=True), dict(gpu_budgets=True), dict(scoring=True, gpu_budgets=True)])
def test_auto_for_scoring_or_a_gpu_budget_takes_every_gpu(kind, monkeypatch):
    asked = fake_cuda(monkeypatch, possible=True, count=3)
    assert resolve_devices("auto", **kind) == (["cuda:0", "cuda:1", "cuda:2"], None)
    assert asked == [False]  # the cheap probe, not torch's answer forced
    asked = fake_cuda(monkeypatch, possible=False, count=0)
    devices, notice = resolve_devices("auto", **kind)
    assert devices == ["cpu"] and asked == [False]
    if kind.get("scoring"):
        assert notice == "no CUDA device found; scoring runs on the CPU"
    else:
        assert notice is None


def test_cuda_asked_for_is_torchs_answer(monkeypatch):
    asked = fake_cuda(monkeypatch, possible=False, count=2)
    assert resolve_devices("cuda") == (["cuda:0", "cuda:1"], None)
    assert resolve_devices("cuda:1") == (["cuda:1"], None)
    assert asked == [True, True]
    with pytest.raises(SpecError, match="only 2 CUDA device"):
        resolve_devices("cuda:0,cuda:2")
    fake_cuda(monkeypatch, possible=True, count=0)
    with pytest.raises(SpecError, match="no CUDA device is available"):
        resolve_devices("cuda")


def test_gpu_budgets():
    assert gpu_budgets({0: 5, "cpu": 7}) is True
    assert gpu_budgets({1: 5}) is True
    assert gpu_budgets({"cpu": 7}) is False
    assert gpu_budgets(None) is False
    assert gpu_budgets({}) is False
    assert gpu_budgets(((0, 5), ("cpu", 7))) is True  # MergeSpec.max_memory's form: sorted pairs
    assert gpu_budgets((("cpu", 7),)) is False


def test_needs_cuda(monkeypatch):
    from gpumerge.merge import needs_cuda

    def spec(device, max_memory=None):
        return MergeSpec("m1", "m2", None, device=device, max_memory=max_memory)

    fake_cuda(monkeypatch, possible=True, count=None)
    assert needs_cuda(spec("cpu")) is False
    assert needs_cuda(spec("auto")) is False
    assert needs_cuda(spec("auto", (("cpu", GiB),))) is False
    assert needs_cuda(spec("cuda")) is True
    assert needs_cuda(spec("cuda:0")) is True
    assert needs_cuda(spec("auto", ((0, GiB), ("cpu", GiB)))) is True
    fake_cuda(monkeypatch, possible=False, count=None)  # a GPU budget on a machine with surely no CUDA
    assert needs_cuda(spec("auto", ((0, GiB), ("cpu", GiB)))) is False
    assert needs_cuda(spec("cuda")) is True  # asked for: torch decides


# ---- the batch from free memory -------------------------------------------------------------------------------------

CONFIG = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 100, "num_attention_heads": 4}
SEQ, ITEM = 64, 2
MODEL = 3 * GiB


def forward(batch: int) -> int:
    return forward_bytes(CONFIG, batch, SEQ, ITEM)


def fit(monkeypatch, device: str, free: int, *, batch: int = 4, **kw) -> tuple[int, int]:
    monkeypatch.setattr(gpumerge.sweep_eval, "_free_bytes", lambda d, free_=None: free)
    return fit_batch(device, MODEL, CONFIG, types.SimpleNamespace(batch=batch, seq_len=SEQ), ITEM, **kw)


def test_forward_bytes_grows_with_the_batch_and_the_window():
    assert AUTO_BATCH_MAX == 32
    assert 0 < forward(1) < forward(2) < forward(32)
    assert forward_bytes(CONFIG, 1, 2 * SEQ, ITEM) > forward(1)
    assert forward_bytes(CONFIG, 1, SEQ, 4) > forward(1)


@pytest.mark.parametrize("windows, want", [(10, 10), (100, AUTO_BATCH_MAX), (0, AUTO_BATCH_MAX), (1, 1)])
def test_auto_batch_on_a_gpu_with_plenty_of_memory(windows, want, monkeypatch):
    plenty = MODEL + 100 * forward(AUTO_BATCH_MAX)
    assert fit(monkeypatch, "cuda:0", plenty, given=False, windows=windows) == (want, forward(want))


@pytest.mark.parametrize("fits", [8, 4, 2])
def test_auto_batch_on_a_gpu_halves_until_half_the_free_memory_holds_it(fits, monkeypatch):
    # exactly twice the forward pass of `fits` beside the model: `fits` is the batch; a byte less: half of it
    free = MODEL + 2 * forward(fits)
    assert fit(monkeypatch, "cuda:0", free, given=False, windows=100) == (fits, forward(fits))
    assert fit(monkeypatch, "cuda:0", free - 1, given=False, windows=100) == (fits // 2, forward(fits // 2))
    assert fit(monkeypatch, "cuda:0", MODEL, given=False, windows=100) == (1, forward(1))  # never under 1


def test_the_resident_inputs_make_the_auto_batch_smaller(monkeypatch):
    free = MODEL + 2 * forward(AUTO_BATCH_MAX)
    beside = 2 * (forward(AUTO_BATCH_MAX) - forward(4))  # leaves exactly twice batch 4's forward pass
    assert fit(monkeypatch, "cuda:0", free, given=False, windows=100) == (32, forward(32))
    assert fit(monkeypatch, "cuda:0", free, given=False, windows=100, beside=beside) == (4, forward(4))
    assert fit(monkeypatch, "cuda:0", free, given=False, windows=100, beside=beside + 1) == (2, forward(2))


def test_a_given_batch_is_kept_or_halved(monkeypatch):
    plenty = MODEL + 100 * forward(AUTO_BATCH_MAX)
    assert fit(monkeypatch, "cuda:0", plenty, batch=4, given=True, windows=100) == (4, forward(4))
    assert fit(monkeypatch, "cuda:0", plenty, batch=64, given=True, windows=2) == (64, forward(64))
    short = MODEL + 2 * forward(4)
    assert fit(monkeypatch, "cuda:0", short, batch=16, given=True, windows=100) == (4, forward(4))
    assert fit(monkeypatch, "cuda:0", short - 1, batch=16, given=True, windows=100) == (2, forward(2))


def test_on_a_cpu_the_batch_starts_from_the_settings(monkeypatch):
    plenty = MODEL + 100 * forward(AUTO_BATCH_MAX)
    assert fit(monkeypatch, "cpu", plenty, batch=4, given=False, windows=100) == (4, forward(4))
    assert fit(monkeypatch, "cpu", plenty, batch=4, given=False, windows=100, beside=plenty) == (4, forward(4))
    short = MODEL + 2 * forward(2)
    assert fit(monkeypatch, "cpu", short, batch=8, given=False, windows=100) == (2, forward(2))


# ---- an evaluated sweep's timings -----------------------------------------------------------------------------------

TIMINGS = ("setup_s", "load_s", "inputs_s", "baselines_s", "scoring_s", "writing_s")


def eval_text(tmp_path: Path) -> Path:
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(DEMO_WORDS * 6))
    return text


def test_timings_text():
    assert timings_text({"scoring_s": 10.0, "variants": 4}) == "scoring 10.0 s (4 rows, 2.50 s each)"
    made_up = {"writing_s": 0.04, "variants": 3, "scoring_s": 1.5, "baselines": 2, "baselines_s": 2.25,
               "load_s": 3.14, "setup_s": 0.5, "inputs_s": 0.0}
    assert timings_text(made_up) == ("setup 0.5 s, load 3.1 s, inputs 0.0 s, baselines 2.2 s (2 rows), scoring "
                                     "1.5 s (3 rows, 0.50 s each), writing 0.0 s")
    assert timings_text({"baselines_s": 0.0, "baselines": 0, "scoring_s": 0.0, "variants": 0}) == (
        "baselines 0.0 s, scoring 0.0 s")  # nothing scored in this run: no counts
    assert timings_text({}) == ""


def test_an_evaluated_sweep_says_where_its_time_went(models, tmp_path):
    pair = models["fp16_a"], models["fp16_b"]  # model 1 has a tokenizer
    runs = tmp_path / "runs"
    flags = ("--grid", "gradient_end=0:1:3", "--eval-text", eval_text(tmp_path), "--seq-len", "16",
             "--eval-tokens", "64", "--keep", "1")
    result = in_process_sweep(pair, runs, *flags)
    record = json.loads((runs / "results.json").read_text())
    timings = record["timings"]
    for key in TIMINGS:
        assert isinstance(timings[key], float) and timings[key] >= 0, (key, timings)
        assert timings[key] == round(result.timings[key], 3)
    assert timings["baselines"] == 2 and timings["variants"] == 3
    batch = record["eval"]["eval_batch"]
    assert isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
    assert batch == 4  # the CPU's default (a tiny model's forward pass fits anywhere)
    assert len(result.written) == 1
    summary = result.summary
    assert "time: " + timings_text(result.timings) in summary
    assert re.search(r"time: setup [\d.]+ s, load [\d.]+ s, inputs [\d.]+ s, baselines [\d.]+ s \(2 rows\), "
                     r"scoring [\d.]+ s \(3 rows, [\d.]+ s each\), writing [\d.]+ s", summary), summary
    # the same sweep again: every row is already scored, nothing is scored (or written) in this run
    again = in_process_sweep(pair, runs, *flags)
    timings = json.loads((runs / "results.json").read_text())["timings"]
    assert timings["baselines"] == 0 and timings["variants"] == 0
    assert timings["baselines_s"] == timings["scoring_s"] == 0.0
    assert timings["load_s"] == timings["inputs_s"] == 0.0  # a finished sweep's rerun reads no model
    assert again.written == () and "scoring 0.0 s" in again.summary and "rows" not in again.summary


def test_the_cli_prints_the_breakdown(models, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = run_cli("sweep", "--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                             "--output_dir", runs, "--quiet", "--grid", "gradient_end=0:1:3", "--eval-text",
                             eval_text(tmp_path), "--seq-len", "16", "--eval-tokens", "64", "--keep", "1",
                             capsys=capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("gpumerge: sweep at"))
    timings = json.loads((runs / "results.json").read_text())["timings"]
    assert "; time: setup " in line and ", load " in line and "scoring " in line and "(3 rows, " in line
    labels = re.findall(r"(?:^|, )([a-z]+) [\d.]+ s", line.split("; time: ", 1)[1])
    assert labels == ["setup", "load", "inputs", "baselines", "scoring", "writing"], line
    assert set(TIMINGS) | {"baselines", "variants", "loop_s"} == set(timings)  # loop_s: the scoring loop's wall


# ---- the model an evaluated sweep scores ----------------------------------------------------------------------------

def without(src: Path, dst: Path, drop: str) -> Path:
    """``src`` written again as one safetensors file, without the tensor ``drop`` (tokenizer files kept)."""
    state = load_state(src)
    assert drop in state
    del state[drop]
    config = json.loads((src / "config.json").read_text())
    write_checkpoint(dst, state, num_layers=config["num_hidden_layers"], config=config)
    for path in src.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, dst / path.name)
    return dst


def test_a_parameter_no_tensor_sets_is_refused(models, tmp_path, capsys):
    a = without(models["fp16_a"], tmp_path / "a", "model.norm.weight")
    b = without(models["fp16_b"], tmp_path / "b", "model.norm.weight")
    runs = tmp_path / "runs"
    code, _, err = run_cli("sweep", "--model_path1", a, "--model_path2", b, "--output_dir", runs, "--quiet",
                           "--grid", "gradient_end=0:1:3", "--eval-text", eval_text(tmp_path), "--seq-len", "16",
                           "--eval-tokens", "64", "--keep", "1", capsys=capsys)
    assert_one_line_error(code, err, "has no tensor for the parameter", "model.norm.weight")
    # refused before any row is scored or any variant written: the directory this run made is gone again (its
    # working directory held nothing worth resuming)
    assert not runs.exists(), sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))
    # the same pair written, not scored: planning accepts it
    code, _, err = run_cli("sweep", "--model_path1", a, "--model_path2", b, "--output_dir", tmp_path / "write",
                           "--quiet", "--grid", "gradient_end=0.5", capsys=capsys)
    assert code == 0, err


def resident(models, first: str, second: str, *, dtype: str, eval_dtype: str, budget: int | None):
    """A ResidentModel built as gpumerge.sweep's _score builds it, on the CPU; with its checkpoints (to close)."""
    from gpumerge.merge import open_pair, plan_merge
    from gpumerge.sweep_eval import ResidentModel

    spec = MergeSpec(str(models[first]), str(models[second]), None, gradient_end=0.5, dtype=dtype)
    a, b = open_pair(spec)
    plan = plan_merge(spec, a, b, notice=lambda line: None)
    notices: list[str] = []
    model = ResidentModel(a, b, [plan], device="cpu", eval_dtype=eval_dtype, budget_bytes=budget,
                          notice=notices.append, max_memory=None)
    return model, a, b, plan, notices


CASES = [  # (model 1, model 2, --dtype, eval dtype)
    ("fp16_a", "fp16_b", "float16", "float32"),  # _score's choice on a CPU
    ("bf16_a", "fp16_b", "float16", "float32"),  # bf16 -> fp16 (output) -> fp32
    ("fp32_a", "fp16_b", "float16", "bfloat16"),  # fp32 -> fp16 -> bf16: not fp32 -> bf16
    ("tied_a", "tied_b", "float16", "float32"),
]


@pytest.mark.parametrize("budget", [None, 0], ids=["resident", "streamed"])
@pytest.mark.parametrize("first, second, dtype, eval_dtype", CASES, ids=[c[0] for c in CASES])
def test_the_resident_model_holds_model_1_in_the_output_dtype(first, second, dtype, eval_dtype, budget, models):
    from transformers import AutoModelForCausalLM

    model, a, b, plan, notices = resident(models, first, second, dtype=dtype, eval_dtype=eval_dtype, budget=budget)
    with a, b:
        out = getattr(torch, dtype)
        forward_dtype = getattr(torch, eval_dtype)
        state = load_state(models[first])
        params = dict(model.model.named_parameters())
        tied = first.startswith("tied")
        assert set(params) == set(state)  # every parameter set from a tensor, every tensor a parameter
        differs = 0
        for name, param in params.items():
            assert param.device.type == "cpu" and param.dtype == forward_dtype, name
            want = state[name].to(out).to(forward_dtype)
            assert torch.equal(param.detach(), want), name
            differs += not torch.equal(want, state[name].to(forward_dtype))
        if first == "fp32_a":  # the rounding to the output dtype is there, not only the cast to the eval dtype
            assert differs > 0
        lm_head, embed = model.model.lm_head.weight, model.model.model.embed_tokens.weight
        assert (lm_head is embed) == tied  # tied again after the model was built empty
        if tied:
            assert "lm_head.weight" not in state
        # the buffers the model computes itself are those transformers computes loading model 1
        reference = AutoModelForCausalLM.from_pretrained(models[first], dtype=forward_dtype)
        want_buffers = dict(reference.named_buffers())
        got_buffers = dict(model.model.named_buffers())
        assert set(got_buffers) == set(want_buffers) and "model.rotary_emb.inv_freq" in got_buffers
        for name, buffer in want_buffers.items():
            assert got_buffers[name].dtype == buffer.dtype and torch.equal(got_buffers[name], buffer), name
        assert float(got_buffers["model.rotary_emb.inv_freq"][0]) == 1.0  # base ** 0
        # the blends' inputs: kept when they fit, else streamed (said once)
        blended = {job.name for job in plan.jobs if job.blended}
        assert set(model.blended) == blended and blended
        if budget is None:
            assert set(model.resident) == blended and notices == []
        else:
            assert model.resident == {} and len(notices) == 1 and "do not fit" in notices[0]
        assert model.load_s >= 0 and model.inputs_s >= 0
