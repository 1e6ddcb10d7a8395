"""The pipelined engine and its planner: bitwise equality with the sequential reference, batching with made-up
budgets (as accelerate tests infer_auto_device_map), backpressure, cancellation, the report; CUDA when present."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import load_state, run_cli
from test_plan import FakeIndex, llama_index, spec

import gpumerge.copier
import gpumerge.pipeline
import gpumerge.writer
from gpumerge.errors import OutputError, SpecError
from gpumerge.merge import run_merge
from gpumerge.plan import ALIGN, batch_capacity, make_batches, make_plan, needs_device
from gpumerge.spec import MergeSpec

MiB = 2**20
GiB = 2**30


def quiet(line: str) -> None:
    pass


def merge(models, out, *, pair=("fp16_a", "fp16_b"), **kwargs):
    merge_spec = MergeSpec(model_path1=str(models[pair[0]]), model_path2=str(models[pair[1]]),
                           output_model_path=out, gradient_start=0.9, gradient_end=0.0, layer_end=12,
                           device=kwargs.pop("device", "cpu"), dtype=kwargs.pop("dtype", "float16"), quiet=True,
                           readers=kwargs.pop("readers", 1))
    return run_merge(merge_spec, notice=quiet, **kwargs)


def same_bytes(dir1, dir2) -> None:
    s1, s2 = load_state(dir1), load_state(dir2)
    assert s1.keys() == s2.keys()
    for name in s1:
        assert s1[name].dtype == s2[name].dtype, name
        assert torch.equal(s1[name].view(torch.uint8), s2[name].view(torch.uint8)), name


# ---- planner ----------------------------------------------------------------------------------------------------

def covered(batches, plan):
    """Every element of every device job appears exactly once across the batches."""
    seen = {}
    for batch in batches:
        for piece in batch.pieces:
            seen.setdefault(piece.job.name, []).append((piece.start, piece.count))
    for job in plan.jobs:
        if not needs_device(job):
            assert job.name not in seen
            continue
        spans = sorted(seen[job.name])
        position = 0
        for start, count in spans:
            assert start == position
            position += count
        assert position == job.numel, job.name


@pytest.mark.parametrize("count", [1, 2, 8])
def test_batches_balance_bytes_over_devices(count):
    a, b = llama_index("a", layers=16, hidden=64, inter=160), llama_index("b", layers=16, hidden=64, inter=160)
    plan = make_plan(a, b, spec())
    devices = [f"cuda:{i}" for i in range(count)]
    budget = {d: 64 * MiB for d in devices} | {"cpu": 512 * MiB}
    batches = make_batches(plan, budget, devices=devices, batch_bytes=8 * 1024)
    covered(batches, plan)
    load = {d: sum(b.payload_bytes for b in batches if b.device == d) for d in devices}
    assert set(load) == set(devices) and all(load.values())
    biggest = max(b.payload_bytes for b in batches)
    assert max(load.values()) - min(load.values()) <= biggest
    for batch in batches:
        assert batch.nbytes <= 8 * 1024


def test_tensor_larger_than_the_budget_is_cut_in_rows():
    a, b = llama_index("a", vocab=4000, hidden=64), llama_index("b", vocab=4000, hidden=64)
    plan = make_plan(a, b, spec(dtype="float32", dtype_was_default=False))  # embeddings are cast: device work
    budget = {"cuda:0": 4 * 48 * 1024, "cpu": 2**30}
    cap = batch_capacity(["cuda:0"], budget)
    assert cap == 32 * 1024  # a ring of 4 on a GPU, each buffer a power of two
    batches = make_batches(plan, budget, devices=["cuda:0"])
    covered(batches, plan)
    embed = [p for batch in batches for p in batch.pieces if p.job.name == "model.embed_tokens.weight"]
    assert len(embed) > 1
    assert all(p.start % 64 == 0 and (p.count % 64 == 0 or p.start + p.count == p.job.numel) for p in embed)
    assert all(batch.nbytes <= cap for batch in batches)


def test_a_row_larger_than_the_budget_is_cut_in_element_ranges():
    tensors = llama_index("a", hidden=4096, vocab=2, layers=1, inter=8).tensors
    a = FakeIndex("a", tensors, {"num_hidden_layers": 1})
    plan = make_plan(a, a, spec())
    batches = make_batches(plan, {"cpu": 3 * 4096}, devices=["cpu"])
    covered(batches, plan)
    assert all(batch.nbytes <= 4096 for batch in batches)


def test_buffer_regions_are_aligned_and_disjoint():
    plan = make_plan(llama_index("a", dtype="BF16"), llama_index("b"), spec())
    for batch in make_batches(plan, {"cpu": 3 * MiB}, devices=["cpu"]):
        spans = []
        for piece in batch.pieces:
            job = piece.job
            spans.append((piece.a_offset, piece.count * 2))
            spans.append((piece.out_offset, piece.count * 2))
            if job.blended:
                spans.append((piece.b_offset, piece.count * 2))
                spans.append((piece.scratch_offset, piece.count * 12))  # bf16 + fp16 -> fp32 scratch
            assert batch.out_start <= piece.out_offset < batch.out_end
        assert all(start % ALIGN == 0 for start, _ in spans)
        spans.sort()
        assert all(s1 + n1 <= s2 for (s1, n1), (s2, _) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] <= batch.nbytes


def test_tiny_budget_is_a_clear_error():
    plan = make_plan(llama_index("a"), llama_index("b"), spec())
    with pytest.raises(SpecError, match="too small"):
        make_batches(plan, {"cuda:0": 100, "cpu": 2**30}, devices=["cuda:0"])


def test_pinned_staging_is_bounded_by_the_host_budget():
    """Each GPU's ring (4 buffers) is one power-of-two pinned block within its share of the host budget."""
    assert batch_capacity(["cuda:0", "cuda:1"], {"cuda:0": 2**34, "cuda:1": 2**34, "cpu": 600 * MiB}) == 64 * MiB
    eight = {f"cuda:{i}": 2**34 for i in range(8)}
    assert batch_capacity(list(eight), {**eight, "cpu": 8 * GiB}) == 256 * MiB  # the default on a >= 16 GiB host
    assert batch_capacity(["cuda:0"], {"cuda:0": 2**34, "cpu": GiB}) == 256 * MiB
    assert batch_capacity(["cuda:0"], {"cuda:0": 2**34, "cpu": GiB - 1}) == 128 * MiB


def test_default_host_budget_for_gpus(monkeypatch):
    import gpumerge.devices as devices

    monkeypatch.setattr(devices, "_total_ram", lambda: 64 * GiB)
    assert devices._default_host_budget(8, 40 * GiB) == 8 * GiB  # 1 GiB of pinned buffers per GPU
    assert devices._default_host_budget(8, 10 * GiB) == 5 * GiB  # at most half the available RAM
    assert devices._default_host_budget(0, 40 * GiB) == 512 * MiB  # a CPU merge: RSS stays small
    monkeypatch.setattr(devices, "_total_ram", lambda: 8 * GiB)
    assert devices._default_host_budget(1, 6 * GiB) == 512 * MiB  # a small host: the CPU rule


# ---- engine -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair, dtype", [(("fp16_a", "fp16_b"), "float16"), (("bf16_a", "fp16_b"), "float16"),
                                         (("bin_a", "bin_b"), "bfloat16"), (("fp32_a", "bf16_b"), "float32")])
def test_pipeline_is_bitwise_equal_to_the_sequential_merge(models, tmp_path, pair, dtype):
    reference = merge(models, tmp_path / "seq", pair=pair, dtype=dtype, engine="sequential").output
    for batch_bytes, ring in ((None, 3), (4096, 1), (1000, 2), (64 * 1024, 4)):
        out = tmp_path / f"pipe-{batch_bytes}-{ring}"
        result = merge(models, out, pair=pair, dtype=dtype, batch_bytes=batch_bytes, ring_depth=ring)
        same_bytes(reference, result.output)
        if batch_bytes == 1000:
            assert result.report["batches"] > 100


@pytest.mark.parametrize("readers", [2, 5])
def test_several_readers_per_device_give_the_same_bytes(models, tmp_path, readers):
    reference = merge(models, tmp_path / "seq", engine="sequential").output
    for staged in (False, True):
        result = merge(models, tmp_path / f"r{readers}{staged}", batch_bytes=4096, simulate_staging=staged,
                       readers=readers)
        same_bytes(reference, result.output)


def test_writer_takes_the_first_ready_batch():
    """One slow device does not hold the others back: the writer takes whichever batch's device work is done."""
    from gpumerge.pipeline import PipelinedEngine

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    engine = PipelinedEngine(None, None, devices=["cuda:0", "cuda:1"], capacity=1024)
    slow = ("lane0", "batch0", "slot0", [Event(False)])
    fast = ("lane1", "batch1", "slot1", [Event(True)])
    pending = [slow]
    engine._written.put(fast)
    item, finished = engine._next_ready(pending, producers=2, finished=0)
    assert item is fast and pending == [slow] and finished == 0
    slow[3][0].done = True
    engine._written.put(None)
    engine._written.put(None)
    assert engine._next_ready(pending, producers=2, finished=0) == (slow, 0)
    assert engine._next_ready(pending, producers=2, finished=0) == (None, 2)


def test_a_failed_pinned_allocation_is_one_clear_error():
    from gpumerge.pipeline import _host_block

    if torch.cuda.is_available():
        pytest.skip("pinning works here")
    with pytest.raises(OutputError, match="could not pin 4096 bytes .* --max_memory cpu="):
        _host_block(4096, pinned=True, device="cuda:0")  # no CUDA: torch raises a RuntimeError


@pytest.mark.parametrize("pair, dtype", [(("fp16_a", "fp16_b"), "float16"), (("bf16_a", "fp16_b"), "float16"),
                                         (("fp32_a", "bf16_b"), "bfloat16")])
def test_gpu_staging_path_simulated_on_the_cpu(models, tmp_path, pair, dtype):
    """The GPU path's H2D -> blend in a device buffer -> D2H logic (regions, spans, events, timings), run on the
    CPU with a second host buffer as the device: the same bytes as the sequential merge."""
    reference = merge(models, tmp_path / "seq", pair=pair, dtype=dtype, engine="sequential").output
    for batch_bytes in (None, 3000):
        result = merge(models, tmp_path / f"staged-{batch_bytes}", pair=pair, dtype=dtype, batch_bytes=batch_bytes,
                       simulate_staging=True)
        same_bytes(reference, result.output)
        stages = result.report["stages"]
        assert stages["h2d"]["bytes"] > 0 and stages["d2h"]["bytes"] > 0
        assert stages["d2h"]["bytes"] >= stages["write"]["bytes"]  # the out span, alignment padding included


def test_slow_writer_bounds_what_is_in_flight(models, tmp_path, monkeypatch):
    """Backpressure: readers never get more than ring_depth batches ahead of the writer."""
    events = []
    lock = threading.Lock()
    original_stage = gpumerge.pipeline.PipelinedEngine._stage

    def tracking(self, name, seconds, nbytes):
        if name in ("read", "write"):
            with lock:
                events.append(name)
        if name == "write":
            time.sleep(0.002)
        return original_stage(self, name, seconds, nbytes)

    monkeypatch.setattr(gpumerge.pipeline.PipelinedEngine, "_stage", tracking)
    result = merge(models, tmp_path / "out", batch_bytes=4096, ring_depth=2)
    in_flight = peak = 0
    for name in events:
        in_flight += 1 if name == "read" else -1
        peak = max(peak, in_flight)
    assert result.report["batches"] > 20
    assert events.count("read") == events.count("write") == result.report["batches"]
    assert peak <= 2
    ring = result.report["rings"]["cpu"]  # sized to the work: the largest batch, within the 4096-byte capacity
    assert ring["slots"] == 2 and 4096 - 1024 < ring["slot_bytes"] <= 4096
    assert result.report["peak_host_buffer_bytes"] == 2 * ring["slot_bytes"]


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("where", ["reader", "writer", "blender", "copier"])
def test_a_failing_stage_cancels_everything_and_leaves_nothing(models, tmp_path, monkeypatch, where, staged):
    calls = {"n": 0}

    def fail_third(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(5, f"injected {where} failure")
            return original(*args, **kwargs)
        return wrapped

    target = {"reader": (gpumerge.pipeline, "_read_piece"), "blender": (gpumerge.pipeline, "blend_piece"),
              "copier": (gpumerge.copier, "copy_unchanged"),
              "writer": (gpumerge.writer.ShardWriter, "pwrite")}[where]
    monkeypatch.setattr(*target, fail_third(getattr(*target)))
    out = tmp_path / "out"
    with pytest.raises(OSError, match=f"injected {where}"):
        merge(models, out, batch_bytes=4096, simulate_staging=staged)
    assert list(tmp_path.iterdir()) == []
    assert not any(t.name.startswith("gpumerge-") for t in threading.enumerate())


def test_report_json(models, tmp_path, capsys):
    report = tmp_path / "report.json"
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out", "--device", "cpu", "--quiet",
                           "--max_memory", "cpu=48MB", "--report", report, capsys=capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["wall_s"] > 0 and data["devices"][0]["device"] == "cpu"
    assert data["devices"][0]["budget_bytes"] == 48_000_000
    assert data["batch_capacity_bytes"] == 16_000_000
    for stage in ("read", "h2d", "blend", "d2h", "write"):
        assert set(data["stages"][stage]) == {"busy_s", "bytes", "gbps"}
    state_a = load_state(models["fp16_a"])
    total = sum(t.numel() * 2 for t in state_a.values())
    blended = sum(t.numel() * 2 for n, t in state_a.items() if n.startswith("model.layers."))
    assert data["bytes_written"] == total
    assert data["bytes_read"] == total + blended
    assert data["stages"]["read"]["bytes"] == 2 * blended
    assert data["stages"]["write"]["bytes"] + data["stages"]["copy"]["bytes"] == total
    assert data["stages"]["h2d"]["bytes"] == 0 and data["peak_pinned_bytes"] == 0
    assert data["peak_device_bytes"] == 0


def test_report_dir_must_exist(models, tmp_path, capsys):
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out", "--report", tmp_path / "no" / "r.json",
                           capsys=capsys)
    assert code == 2 and "--report" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [("0=20GiB,1=20GiB,cpu=8GiB", {0: 20 * 2**30, 1: 20 * 2**30,
                                                                           "cpu": 8 * 2**30}),
                                             ("cuda:0=1GB", {0: 10**9})])
def test_max_memory_parsing(text, expected):
    from gpumerge.spec import parse_max_memory

    assert parse_max_memory(text) == expected


@pytest.mark.parametrize("text", ["0=lots", "gpu=1GB", "=1GB", "", "0=0"])
def test_max_memory_rejects(text):
    from gpumerge.spec import parse_max_memory

    with pytest.raises(SpecError):
        parse_max_memory(text)


def test_max_memory_for_an_unused_device_is_an_error(models, tmp_path, capsys):
    code, _, err = run_cli("--model_path1", models["fp16_a"], "--model_path2", models["fp16_b"],
                           "--output_model_path", tmp_path / "out", "--device", "cpu", "--max_memory", "3=1GiB",
                           capsys=capsys)
    assert code == 2 and "--max_memory" in err


# ---- CUDA (skipped without it) -------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("pair", [("fp16_a", "fp16_b"), ("bf16_a", "fp16_b"), ("fp32_a", "bf16_b")])
def test_gpu_output_bytes_equal_cpu_output_bytes(models, tmp_path, pair):
    cpu = merge(models, tmp_path / "cpu", pair=pair, device="cpu").output
    for batch_bytes in (None, 4096):
        gpu = merge(models, tmp_path / f"gpu{batch_bytes}", pair=pair, device="cuda", batch_bytes=batch_bytes)
        same_bytes(cpu, gpu.output)
        assert gpu.report["stages"]["h2d"]["bytes"] > 0 and gpu.report["peak_pinned_bytes"] > 0


@pytest.mark.cuda
@cuda
def test_gpu_device_flags(models, tmp_path):
    count = torch.cuda.device_count()
    result = merge(models, tmp_path / "one", device="cuda:0")
    assert result.report["devices"][0]["device"] == "cuda:0"
    if count > 1:
        both = merge(models, tmp_path / "two", device="cuda:0,cuda:1", batch_bytes=4096)
        assert [d["device"] for d in both.report["devices"]] == ["cuda:0", "cuda:1"]
        same_bytes(result.output, both.output)


@pytest.mark.cuda
@cuda
def test_gpu_report_is_this_merges(models, tmp_path):
    """The device peak is this merge's (reset before the lanes), the pinned bytes a power of two per GPU ring, and
    the stage timings each stage's own."""
    held = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda:0")
    del held
    result = merge(models, tmp_path / "out", device="cuda:0")
    report = result.report
    assert 0 < report["peak_device_bytes"] < 512 * MiB
    pinned = report["peak_pinned_bytes"]
    assert pinned > 0 and pinned & (pinned - 1) == 0
    assert report["pinned_allocator_bytes"] is None or report["pinned_allocator_bytes"] >= pinned
    assert all(report["stages"][s]["busy_s"] > 0 for s in ("h2d", "blend", "d2h"))
