"""One script for a GPU machine: a markdown table for benchmarks/RESULTS.md, row by row as each is measured.

Sections, in the order they run (each with its time budget on one H200, data generation included; each runs in its
own try/except, so a failing section says why in its row and the others still run):

    search  (200 s) `gpumerge sweep --search optuna`: 200 TPE trials over 4 per-module anchors on the 7B-shaped
                    pair generated on the GPU, 16k tokens a trial, timed as a whole (goal <= 3 minutes)
    evalsweep (200 s) evaluated sweeps through the command line: the trained pair (benchmarks/trained_pair.py, the
                    carried benchmarks/data/trained_pair when present) on the GPU against --device cpu (perplexities
                    within 1e-4 relative, the same ranking); a 7B-shaped pair generated on the GPU into /dev/shm
                    (the work directory when /dev/shm lacks room) swept over 100 settings with 16k tokens of text,
                    timed as a whole with its breakdown (goals: <= 80 s; fixed cost <= 25 s)
    e2e     (90 s)  a generated 2 x ~4 GB pair: the I/O floor; the merge on the GPU, with --device cpu and with
                    --device auto (best of 2 each; goal: auto within 5 % of the better); more CPU readers; small
                    batches
    sweep   (60 s)  `gpumerge sweep`, 8 variants of a ~0.7 GB pair from one read, on the GPU, the CPU and auto
                    (best of 2 each; goal: auto within 5 % of the better); a GPU variant's bytes against a single CPU
                    merge of its settings
    eval    (60 s)  an evaluated sweep's loop on a 7B-shaped Llama built on the GPU: the per-variant blend against
                    a device-to-device copy (goal >= 0.8x), the perplexity of 16k tokens at --eval-batch 4, 8, 16,
                    32 (TFLOP/s against the H200's ~790; goal >= 70 % at the default batch; equal across batches)
    bytes   (60 s)  GPU bytes == CPU bytes, for every blend path: fp16/bf16/fp32/mixed inputs, slerp, mergekit
                    linear (coefficients), a vocabulary mismatch; each also with small batches
    pinned  (15 s)  the pinned host bytes torch really holds (torch.cuda.host_memory_stats) vs the report's figure
    kernel  (15 s)  torch.lerp fp16 into a buffer vs a device-to-device copy (goal >= 80 %); many small tensors
    processes (150 s, only when named) the 7B-shaped pair's evaluated sweep (40 variants, 8k tokens each) in one
                    process and under `accelerate launch --multi_gpu --num_processes 2` (two processes on one GPU:
                    each holds its own model, A and B; skipped when the GPU lacks room for both), and N processes
                    on N GPUs when there are more than 2: variants a minute in the loop

    python benchmarks/gpu_check.py [--out DIR] [SECTION ...]        # on a GPU machine (default: all but processes)
    python benchmarks/gpu_check.py --cpu-dry-run [--out DIR]         # the same steps on the CPU, tiny data
benchmarks/gpu_check.sh runs it together with the CUDA tests. GB/s counts bytes read plus bytes written. Without
CUDA (and without --cpu-dry-run) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the source tree imports as it is (no install)
from make_pair import PairShape, ensure_pair  # noqa: E402

from gpumerge.merge import run_merge  # noqa: E402
from gpumerge.spec import MergeSpec  # noqa: E402

MID = PairShape(layers=4, hidden=2048, intermediate=5632, vocab=32000)  # ~0.67 GB per model
BIG = PairShape(layers=16, hidden=3072, intermediate=8192, vocab=32000, heads=24)  # ~4.0 GB per model
TINY = PairShape(layers=2, hidden=256, intermediate=512, vocab=500, heads=4)
MERGE = dict(gradient_start=0.9, gradient_end=0.0, layer_start=0, layer_end=12)
Row = tuple[str, str, str]  # check, result, goal


@dataclass(frozen=True)
class Context:
    device: str  # "cuda:0", or "cpu" in a dry run
    work: Path
    dry_run: bool

    def small_batches(self) -> dict[str, int]:
        """A budget that cuts the work into ~256 KiB batches (one key per device: a dry run's device is the CPU)."""
        budget = {self.device: 3 * 256 * 1024}
        if self.device != "cpu":
            budget["cpu"] = 2**30
        return budget


def merge(a: Path, b: Path, out: Path, *, device: str, budget=None, **settings):
    shutil.rmtree(out, ignore_errors=True)
    fields = {**MERGE, **settings}
    spec = MergeSpec(model_path1=str(a), model_path2=str(b), output_model_path=out, device=device, quiet=True,
                     **fields)
    return run_merge(spec, notice=lambda line: None, budget=budget)


def output_bytes(directory: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                state[name] = (str(tensor.dtype), tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return state


# ---- bytes: every path, GPU vs CPU ---------------------------------------------------------------------------------

def write_model(directory: Path, *, seed: int, dtype: torch.dtype, norm_dtype: torch.dtype | None = None,
                vocab: int = 500, hidden: int = 256, intermediate: int = 512, layers: int = 4) -> Path:
    """A small Llama-shaped checkpoint written with safetensors (norms in ``norm_dtype`` for mixed inputs)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, kind=dtype):
        return (torch.randn(*shape, generator=g) * 0.02 + mean).to(kind)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + f"self_attn.{x}_proj.weight": rand(hidden, hidden) for x in "qkvo"})
        tensors.update({p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                        p + "mlp.up_proj.weight": rand(intermediate, hidden),
                        p + "mlp.down_proj.weight": rand(hidden, intermediate),
                        p + "input_layernorm.weight": rand(hidden, mean=1.0, kind=norm_dtype or dtype),
                        p + "post_attention_layernorm.weight": rand(hidden, mean=1.0, kind=norm_dtype or dtype)})
    tensors["model.norm.weight"] = rand(hidden, mean=1.0, kind=norm_dtype or dtype)
    tensors["lm_head.weight"] = rand(vocab, hidden)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab,
              "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def mergekit_linear() -> dict:
    from gpumerge.mergekit import parse_mergekit

    config = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.7}},
                                                   {"model": "b", "parameters": {"weight": 0.5}}],
              "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "bfloat16"}
    settings = parse_mergekit(config, source="gpu_check")
    return {"recipe": settings["recipe"], "dtype_was_default": True}


BYTE_CASES: list[tuple[str, dict, dict, Callable[[], dict]]] = [
    # label, model 1 kwargs, model 2 kwargs, merge settings
    ("fp16 pair -> float16", {"dtype": torch.float16}, {"dtype": torch.float16}, lambda: {"dtype": "float16"}),
    ("fp16 pair -> bfloat16", {"dtype": torch.float16}, {"dtype": torch.float16}, lambda: {"dtype": "bfloat16"}),
    ("bf16 pair -> bfloat16", {"dtype": torch.bfloat16}, {"dtype": torch.bfloat16}, lambda: {"dtype": "bfloat16"}),
    ("fp32 pair -> float16", {"dtype": torch.float32}, {"dtype": torch.float32}, lambda: {"dtype": "float16"}),
    ("fp32 pair -> float32", {"dtype": torch.float32}, {"dtype": torch.float32}, lambda: {"dtype": "float32"}),
    ("mixed (fp16 weights, fp32 norms) vs bf16 -> bfloat16", {"dtype": torch.float16, "norm_dtype": torch.float32},
     {"dtype": torch.bfloat16}, lambda: {"dtype": "bfloat16"}),
    ("slerp, fp16 pair", {"dtype": torch.float16}, {"dtype": torch.float16}, lambda: {"method": "slerp"}),
    ("mergekit linear (weights 0.7/0.5, normalize; float32 then bfloat16)", {"dtype": torch.float16},
     {"dtype": torch.float16}, mergekit_linear),
    ("vocabulary mismatch (model 2 has 16 more rows)", {"dtype": torch.float16},
     {"dtype": torch.float16, "vocab": 516}, lambda: {"dtype": "float16"}),
]


def bytes_rows(ctx: Context) -> Iterator[Row]:
    for k, (label, kwargs_a, kwargs_b, settings) in enumerate(BYTE_CASES):
        pair = ctx.work / f"bytes{k}"
        a = write_model(pair / "a", seed=1, **kwargs_a)
        b = write_model(pair / "b", seed=2, **kwargs_b)
        extra = settings()
        cpu = output_bytes(merge(a, b, pair / "cpu", device="cpu", **extra).output)
        dev = output_bytes(merge(a, b, pair / "dev", device=ctx.device, **extra).output)
        small = output_bytes(merge(a, b, pair / "small", device=ctx.device, budget=ctx.small_batches(),
                                   **extra).output)
        differ = sorted(n for n in cpu if dev.get(n) != cpu[n])
        differ_small = sorted(n for n in cpu if small.get(n) != cpu[n])
        result = ("equal" if not differ else f"DIFFERENT in {len(differ)} tensors, e.g. {differ[0]}") + \
                 ("; with 256 KiB batches: equal" if not differ_small else
                  f"; with 256 KiB batches: DIFFERENT in {len(differ_small)}")
        shutil.rmtree(pair, ignore_errors=True)
        yield f"(1) {ctx.device} bytes == CPU bytes: {label}", result, "equal"


# ---- kernel -------------------------------------------------------------------------------------------------------

def timed_device(fn, device: str, repeats: int = 10) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def kernel_rows(ctx: Context) -> Iterator[Row]:
    device = ctx.device
    elements = 2**20 if ctx.dry_run else 2**27
    a = torch.randn(elements, device=device).half()
    b = torch.randn(elements, device=device).half()
    out = torch.empty_like(a)
    copy_s = timed_device(lambda: out.copy_(a), device)
    lerp_s = timed_device(lambda: torch.lerp(a, b, 0.3, out=out), device)
    copy_gbps = 2 * a.nbytes / copy_s / 1e9
    lerp_gbps = 3 * a.nbytes / lerp_s / 1e9
    yield (f"(2) blend kernel: torch.lerp fp16 into a buffer, {a.nbytes / 2**20:.0f} MiB per operand",
           f"{lerp_gbps:.0f} GB/s = {100 * lerp_gbps / copy_gbps:.0f} % of a d2d copy ({copy_gbps:.0f} GB/s)",
           ">= 80 %")
    norms_a = [torch.randn(4096, device=device).half() for _ in range(512)]
    norms_b = [torch.randn(4096, device=device).half() for _ in range(512)]
    norms_out = [torch.empty_like(x) for x in norms_a]
    nbytes = 3 * sum(x.nbytes for x in norms_a)

    def per_tensor():
        for x, y, o in zip(norms_a, norms_b, norms_out):
            torch.lerp(x, y, 0.3, out=o)

    def foreach():
        torch._foreach_copy_(norms_out, norms_a)
        torch._foreach_lerp_(norms_out, norms_b, 0.3)

    loop_s = timed_device(per_tensor, device, 5)
    foreach_s = timed_device(foreach, device, 5)
    yield ("(2b) 512 norm-sized tensors (4096 fp16): per-tensor lerp vs _foreach_copy_+_foreach_lerp_",
           f"{nbytes / loop_s / 1e9:.1f} GB/s vs {nbytes / foreach_s / 1e9:.1f} GB/s", "information")


# ---- end to end ----------------------------------------------------------------------------------------------------

def io_floor_s(a: Path, b: Path, scratch: Path) -> float:
    """cat of both inputs to /dev/null + dd bs=16M of model 1's shards into a new directory (min of 2)."""
    best = float("inf")
    for _ in range(2):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        began = time.perf_counter()
        subprocess.run(["cat", *map(str, sorted(a.glob("*.safetensors")) + sorted(b.glob("*.safetensors")))],
                       check=True, stdout=subprocess.DEVNULL)
        for shard in sorted(a.glob("*.safetensors")):
            subprocess.run(["dd", f"if={shard}", f"of={scratch / shard.name}", "bs=16M", "status=none"], check=True)
        best = min(best, time.perf_counter() - began)
    shutil.rmtree(scratch, ignore_errors=True)
    return best


def _merge_row(label: str, result, floor: float, goal: str) -> Row:
    report = result.report
    moved = report["bytes_read"] + report["bytes_written"]
    stages = ", ".join(f"{name} {s['gbps']}" for name, s in report["stages"].items() if s["bytes"])
    return (f"{label} ({moved / 1e9:.1f} GB read+written, {report['batches']} batches)",
            f"{report['wall_s']:.2f} s / floor {floor:.2f} s = {report['wall_s'] / floor:.2f}x; "
            f"{moved / report['wall_s'] / 1e9:.1f} GB/s; stages GB/s: {stages}; peak pinned "
            f"{report['peak_pinned_bytes'] / 2**20:.0f} MiB, device {report['peak_device_bytes'] / 2**20:.0f} MiB",
            goal)


def best_of(runs: int, fn):
    """The fastest of ``runs`` results (by their wall time): shared machines are noisy."""
    return min((fn() for _ in range(runs)), key=lambda r: r.report["wall_s"] if hasattr(r, "report") else r.elapsed_s)


def auto_row(label: str, seconds: dict[str, float], gpu: str) -> Row:
    """--device auto against the better of the CPU and the GPU (issue #18: within 5 %)."""
    better = min(seconds["cpu"], seconds[gpu])
    return (f"{label}: --device auto against the better of cpu and {gpu}",
            f"auto {seconds['auto']:.2f} s, cpu {seconds['cpu']:.2f} s, {gpu} {seconds[gpu]:.2f} s: "
            f"{seconds['auto'] / better:.3f}x the better" + (" (MISSED)" if seconds["auto"] > 1.05 * better else ""),
            "<= 1.05x")


def end_to_end_rows(ctx: Context) -> Iterator[Row]:
    began = time.perf_counter()
    a, b = ensure_pair(ctx.work / "big", TINY if ctx.dry_run else BIG, device=ctx.device)
    yield ("pair generation (not part of any ratio)", f"{time.perf_counter() - began:.0f} s, "
           f"{sum(p.stat().st_size for p in a.glob('*.safetensors')) / 1e9:.2f} GB per model", "")
    floor = io_floor_s(a, b, ctx.work / "floor")
    results = {device: best_of(2, lambda device=device: merge(a, b, ctx.work / "e2e", device=device))
               for device in dict.fromkeys((ctx.device, "cpu", "auto"))}
    yield _merge_row(f"(3) end-to-end merge on {ctx.device} (best of 2): wall_s / I/O floor", results[ctx.device],
                     floor, "<= 1.15x")
    yield _merge_row("(3b) the same merge with --device cpu (best of 2)", results["cpu"], floor, "information")
    yield _merge_row("(3c) the same merge with --device auto, the default (best of 2)", results["auto"], floor,
                     "information")
    seconds = {device: r.report["wall_s"] for device, r in results.items()}
    yield auto_row("(3d) end-to-end merge", seconds, ctx.device)
    for readers in (2, 4):
        more = merge(a, b, ctx.work / "e2e", device="cpu", readers=readers)
        yield _merge_row(f"(3e) --device cpu with {readers} reader threads", more, floor, "information")
    small = merge(a, b, ctx.work / "e2e", device=ctx.device,
                  budget={ctx.device: 3 * 8 * 2**20} | ({} if ctx.device == "cpu" else {"cpu": 3 * 8 * 2**20}))
    yield _merge_row(f"(4) {ctx.device}, budgets forcing 8 MiB batches", small, floor, "<= 1.5x")
    shutil.rmtree(ctx.work / "e2e", ignore_errors=True)


# ---- pinned memory -------------------------------------------------------------------------------------------------

def pinned_rows(ctx: Context) -> Iterator[Row]:
    if ctx.device == "cpu":
        yield "(5) pinned host bytes (torch.cuda.host_memory_stats)", "n/a in a CPU dry run", ""
        return
    a = write_model(ctx.work / "pin" / "a", seed=1, dtype=torch.float16, hidden=1024, intermediate=2816)
    b = write_model(ctx.work / "pin" / "b", seed=2, dtype=torch.float16, hidden=1024, intermediate=2816)
    report = merge(a, b, ctx.work / "pin" / "out", device=ctx.device).report
    held = report["pinned_allocator_bytes"]
    yield ("(5) pinned host bytes: the report's peak_pinned_bytes (the ring, rounded up as torch does) vs "
           "torch.cuda.host_memory_stats allocated_bytes.current (the process, cached blocks included)",
           f"report {report['peak_pinned_bytes'] / 2**20:.0f} MiB; torch "
           + (f"{held / 2**20:.0f} MiB" if held is not None else "reports nothing"), "report <= torch")
    shutil.rmtree(ctx.work / "pin", ignore_errors=True)


# ---- sweeps --------------------------------------------------------------------------------------------------------

def sweep(a: Path, b: Path, runs: Path, *, device: str, count: int):
    from gpumerge.cli import build_parser
    from gpumerge.sweep import run_sweep

    shutil.rmtree(runs, ignore_errors=True)
    args = build_parser("sweep").parse_args([
        "--model_path1", str(a), "--model_path2", str(b), "--output_dir", str(runs), "--device", device, "--quiet",
        "--grid", f"gradient_end=0:1:{count}", *(t for k in ("gradient_start", "layer_start", "layer_end")
                                                  for t in (f"--{k}", str(MERGE[k])))])
    return run_sweep(args, notice=lambda line: None)


def floor_n_s(a: Path, b: Path, scratch: Path, copies: int) -> float:
    """cat of both inputs + dd of model 1's shards into ``copies`` directories: a sweep's least I/O."""
    shutil.rmtree(scratch, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(["cat", *map(str, sorted(a.glob("*.safetensors")) + sorted(b.glob("*.safetensors")))],
                   check=True, stdout=subprocess.DEVNULL)
    for k in range(copies):
        (scratch / str(k)).mkdir(parents=True)
        for shard in sorted(a.glob("*.safetensors")):
            subprocess.run(["dd", f"if={shard}", f"of={scratch / str(k) / shard.name}", "bs=16M", "status=none"],
                           check=True)
    took = time.perf_counter() - began
    shutil.rmtree(scratch, ignore_errors=True)
    return took


def sweep_rows(ctx: Context) -> Iterator[Row]:
    a, b = ensure_pair(ctx.work / "mid", TINY if ctx.dry_run else MID, device=ctx.device)
    floor = floor_n_s(a, b, ctx.work / "floor8", 8)
    results = {}
    for device in dict.fromkeys((ctx.device, "cpu", "auto")):
        results[device] = best_of(2, lambda device=device: sweep(a, b, ctx.work / "sweep", device=device, count=8))
        if device == ctx.device:
            import csv

            with open(ctx.work / "sweep" / "variants.csv", newline="") as handle:
                chosen = list(csv.DictReader(handle))[4]  # its name and exact gradient_end, as the sweep wrote them
            got = output_bytes(ctx.work / "sweep" / chosen["name"])
    shutil.rmtree(ctx.work / "sweep", ignore_errors=True)
    on_device = results[ctx.device]
    moved = on_device.bytes_read + on_device.bytes_written
    yield ("(6) `gpumerge sweep`, 8 variants from one read, on " + ctx.device + " (best of 2): elapsed / I/O floor "
           "(cat both + dd model 1 x8)", f"{on_device.elapsed_s:.2f} s / {floor:.2f} s = "
           f"{on_device.elapsed_s / floor:.2f}x; {moved / on_device.elapsed_s / 1e9:.1f} GB/s read+written", "<= 1.1x")
    for device in ("cpu", "auto"):
        yield (f"(6b) the same sweep with --device {device} (best of 2)", f"{results[device].elapsed_s:.2f} s = "
               f"{results[device].elapsed_s / floor:.2f}x floor", "information")
    yield auto_row("(6c) write-mode sweep", {d: r.elapsed_s for d, r in results.items()}, ctx.device)
    merge(a, b, ctx.work / "single", device="cpu", gradient_end=float(chosen["gradient_end"]))
    want = output_bytes(ctx.work / "single")
    shutil.rmtree(ctx.work / "single", ignore_errors=True)
    yield (f"(6d) variant {chosen['name']} from the {ctx.device} sweep == a single CPU merge of its settings",
           "same bytes" if got == want else f"DIFFER in {sum(got[k] != want.get(k) for k in got)} tensors",
           "same bytes")


# ---- an evaluated sweep's loop ---------------------------------------------------------------------------------------

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=500, max_position_embeddings=512)


def eval_rows(ctx: Context) -> Iterator[Row]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpumerge.evaluate import EvalText, perplexity
    from gpumerge.pipeline import blend_values
    from gpumerge.plan import TensorJob

    began = time.perf_counter()
    shape = LLAMA_TINY if ctx.dry_run else LLAMA_7B
    dtype = torch.float32 if ctx.dry_run else torch.float16
    code = "F32" if ctx.dry_run else "F16"
    with torch.device(ctx.device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(dtype).eval()
    blended = [(n, p) for n, p in model.named_parameters() if ".layers." in n]
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    inputs = {n: (torch.randn(p.shape, generator=generator, device=ctx.device, dtype=dtype) * 0.02,
                  torch.randn(p.shape, generator=generator, device=ctx.device, dtype=dtype) * 0.02)
              for n, p in blended}
    nbytes = sum(p.numel() * p.element_size() for _, p in blended)
    yield (f"(7) {'a tiny' if ctx.dry_run else 'a 7B-shaped'} Llama and the inputs of its {len(blended)} block tensors on "
           f"{ctx.device}",
           f"built in {time.perf_counter() - began:.0f} s; blended bytes per variant {nbytes / 2**30:.2f} GiB",
           "")

    def blend(t: float) -> None:
        for name, param in blended:
            a, b = inputs[name]
            job = TensorJob(name, tuple(param.shape), code, code, code, t, None, 0, 0, 0, False)
            blend_values(job, a.view(-1), param.data.view(-1), b.view(-1))

    def copy() -> None:  # the same bytes moved: read a and b, write the parameter
        for name, param in blended:
            a, b = inputs[name]
            param.data.copy_(a)
            param.data.copy_(b)

    blend_s = timed_device(lambda: blend(0.37), ctx.device, 3)
    copy_s = timed_device(copy, ctx.device, 3)
    moved = 3 * nbytes
    yield ("(7a) per-variant blend into the resident model vs device-to-device copies of the same bytes",
           f"blend {blend_s * 1e3:.1f} ms ({moved / blend_s / 1e9:.0f} GB/s) vs copy {copy_s * 1e3:.1f} ms "
           f"({moved / copy_s / 1e9:.0f} GB/s) = {copy_s / blend_s:.2f}x", ">= 0.8x")
    tokens = 16384 if not ctx.dry_run else 1024
    seq = 512
    windows = tuple(tuple(int(x) for x in torch.randint(0, shape["vocab_size"], (seq,), generator=torch.Generator()
                                                        .manual_seed(k))) for k in range(tokens // seq))
    text = EvalText("random.txt", Path("random.txt"), "", windows)
    synchronize = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device != "cpu" else (lambda: None)
    flops = forward_flops(shape, tokens, seq)
    timings, scores = {}, {}
    for batch in (4, 8, 16, 32):
        perplexity(model, [text], batch=batch, device=ctx.device)  # warm-up (kernels, allocator) at this batch
        synchronize()
        start = time.perf_counter()
        scores[batch] = perplexity(model, [text], batch=batch, device=ctx.device).perplexity
        synchronize()
        timings[batch] = time.perf_counter() - start
        achieved = flops / timings[batch] / 1e12
        yield (f"(7b) perplexity of {tokens} tokens, --eval-batch {batch} (seq {seq}, {str(dtype).split('.')[-1]} "
               "forward, sdpa)", f"{timings[batch]:.3f} s ({tokens / timings[batch]:.0f} tokens/s), "
               f"{achieved:.0f} TFLOP/s = {100 * achieved / PEAK_TFLOPS:.0f} % of {PEAK_TFLOPS} TFLOP/s",
               ">= 70 % (at the chosen batch)")
    spread = max(scores.values()) / min(scores.values()) - 1
    yield ("(7c) the same perplexity at every batch size", f"max relative difference {spread:.2e}"
           + (" (DIFFERENT beyond float noise)" if spread > 1e-3 else ""), "<= 1e-3")
    from gpumerge.sweep_eval import AUTO_BATCH_MAX

    best = min(timings, key=timings.get)
    per_variant = blend_s + timings[min(AUTO_BATCH_MAX, 32)]
    yield ("(7d) 100 variants extrapolated at the default GPU batch: 100 x (blend + evaluation)",
           f"{100 * per_variant:.0f} s ({per_variant:.2f} s per variant; fastest batch here: {best})", "< 300 s")


# bf16/fp16 dense matrix rate of one H200 on random data (the device README's KINDS.md); a goal's yardstick
PEAK_TFLOPS = 790


def forward_flops(shape: dict, tokens: int, seq: int) -> float:
    """Multiply-adds x 2 of a Llama forward over ``tokens`` in windows of ``seq``: the weight matrices (blocks and
    lm_head) and attention's two products (causal: half the square, as sdpa's flash kernel computes it)."""
    h, inner, layers, vocab = (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                               shape["vocab_size"])
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * inner) + h * vocab
    attention = layers * 2 * (seq / 2) * h  # QK^T and AV per token, over half the window on average
    return 2 * tokens * (per_token + attention)


# ---- evaluated sweeps through the command line -------------------------------------------------------------------

SEVEN_B = PairShape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32)  # 13.5 GB per model
SEVEN_B_DRY = PairShape(layers=2, hidden=256, intermediate=512, vocab=1024, heads=4)
CARRIED_TRAINED = Path(__file__).resolve().parent / "data" / "trained_pair"


def trained_pair(ctx: Context) -> Path:
    """benchmarks/trained_pair.py's pair: the one carried in benchmarks/data/trained_pair when it is there (built
    elsewhere: the same files whatever machine scores them), else built here."""
    if (CARRIED_TRAINED / "pair.json").exists():
        return CARRIED_TRAINED
    from trained_pair import build

    return build(ctx.work / "trained", quiet=True)


def cli_sweep(a: Path, b: Path, runs: Path, *, device: str, grid: str, text: Path, more: tuple = ()) -> float:
    """`python -m gpumerge sweep ...` from the source tree, timed as a whole (process start to exit)."""
    shutil.rmtree(runs, ignore_errors=True)
    command = [sys.executable, "-m", "gpumerge", "sweep", "--model_path1", str(a), "--model_path2", str(b),
               "--output_dir", str(runs), "--device", device, "--grid", grid, "--eval-text", str(text), "--quiet",
               *more]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])}: exit {done.returncode}: {done.stderr[-600:]}")
    return took


def ranked_perplexities(runs: Path) -> list[tuple[str, float]]:
    import csv

    with open(runs / "results.csv", newline="") as handle:
        return [(row["name"], float(row["perplexity"])) for row in csv.DictReader(handle)]


def evalsweep_rows(ctx: Context) -> Iterator[Row]:
    began = time.perf_counter()
    pair = trained_pair(ctx)
    text = pair / "texts" / "eval_code.txt"
    ranked = {}
    for device in dict.fromkeys((ctx.device, "cpu")):
        runs = ctx.work / f"trained_{device.replace(':', '_')}"
        cli_sweep(pair / "model_1", pair / "model_2", runs, device=device, grid="gradient_end=0:1:6", text=text,
                  more=("--keep", "0"))
        ranked[device] = ranked_perplexities(runs)
        shutil.rmtree(runs, ignore_errors=True)
    gpu, cpu = ranked[ctx.device], ranked["cpu"]
    by_name = dict(cpu)
    worst = max(abs(p / by_name[n] - 1) for n, p in gpu)
    same_order = [n for n, _ in gpu] == [n for n, _ in cpu]
    yield (f"(8) the trained pair's evaluated sweep (6 variants + parents) on {ctx.device} vs --device cpu",
           f"perplexities within {worst:.1e} relative; ranking {'the same' if same_order else 'DIFFERENT'}"
           + (" (DIFFERENT beyond 1e-4)" if worst > 1e-4 else "") + f"; {time.perf_counter() - began:.0f} s",
           "<= 1e-4, same ranking")
    shape = SEVEN_B_DRY if ctx.dry_run else SEVEN_B
    free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    where = Path("/dev/shm/gpumerge_7b") if free > 3 * shape.total_bytes() + 8 * 2**30 else ctx.work / "7b"
    began = time.perf_counter()
    a, b = ensure_pair(where, shape, device=ctx.device)
    for model in (a, b):  # a real tokenizer: the trained pair's (its ids are all below the 7B shape's vocabulary)
        for file in (pair / "model_1").glob("tokenizer*"):
            shutil.copy(file, model / file.name)
    yield (f"(9) {'a tiny' if ctx.dry_run else 'a 7B-shaped'} pair generated on {ctx.device} into {where}",
           f"{shape.total_bytes() / 1e9:.1f} GB per model in {time.perf_counter() - began:.0f} s", "")
    count, tokens = (5, 1024) if ctx.dry_run else (100, 16384)
    runs = where / "runs"
    try:
        wall = cli_sweep(a, b, runs, device="auto", grid=f"gradient_end=0:1:{count}", text=pair / "texts" /
                         "train_code.txt", more=("--eval-tokens", str(tokens)))
        results = json.loads((runs / "results.json").read_text())
    finally:
        shutil.rmtree(where, ignore_errors=True)
    from gpumerge.results import timings_text

    timings = results["timings"]
    fixed = wall - timings["scoring_s"]
    yield (f"(9a) `gpumerge sweep --grid gradient_end=0:1:{count} --eval-text ... --eval-tokens {tokens}` "
           "(default device and batch; the best kept), whole process",
           f"{wall:.1f} s; eval batch {results['eval']['eval_batch']}; {timings_text(timings)}",
           "<= 80 s" if not ctx.dry_run else "")
    yield ("(9b) its fixed cost: the whole process less the variants' scoring (start, planning, load, inputs, "
           "baselines, writing)", f"{fixed:.1f} s", "<= 25 s" if not ctx.dry_run else "")


def search_rows(ctx: Context) -> Iterator[Row]:
    """`gpumerge sweep --search optuna`: TPE trials over 4 per-module anchors on the 7B-shaped pair (16k tokens a
    trial), the whole process timed; GPUMERGE_CHECK_TRIALS sets the trials (default 200)."""
    import os

    pair = trained_pair(ctx)
    shape = SEVEN_B_DRY if ctx.dry_run else SEVEN_B
    free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    where = Path("/dev/shm/gpumerge_7b") if free > 3 * shape.total_bytes() + 8 * 2**30 else ctx.work / "7b"
    began = time.perf_counter()
    a, b = ensure_pair(where, shape, device=ctx.device)
    for model in (a, b):
        for file in (pair / "model_1").glob("tokenizer*"):
            shutil.copy(file, model / file.name)
    yield (f"(10) {'a tiny' if ctx.dry_run else 'a 7B-shaped'} pair generated on {ctx.device}",
           f"{shape.total_bytes() / 1e9:.1f} GB per model in {time.perf_counter() - began:.0f} s", "")
    trials = int(os.environ.get("GPUMERGE_CHECK_TRIALS", "5" if ctx.dry_run else "200"))
    tokens = 1024 if ctx.dry_run else 16384
    runs = where / "search"
    anchors = [f"--space=layer_gradients.{m}.{k}=0:1" for m in ("self_attn", "mlp") for k in (0, 1)]
    try:
        shutil.rmtree(runs, ignore_errors=True)
        command = [sys.executable, "-m", "gpumerge", "sweep", "--model_path1", str(a), "--model_path2", str(b),
                   "--output_dir", str(runs), "--search", "optuna", "--trials", str(trials), "--seed", "0",
                   "--eval-text", str(pair / "texts" / "train_code.txt"), "--eval-tokens", str(tokens), "--quiet",
                   *anchors]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"search: exit {done.returncode}: {done.stderr[-600:]}")
        results = json.loads((runs / "results.json").read_text())
    finally:
        shutil.rmtree(where, ignore_errors=True)
    from gpumerge.results import timings_text

    timings = results["timings"]
    goal = "<= 180 s for 200 trials" if not ctx.dry_run else ""
    yield (f"(10a) `gpumerge sweep --search optuna --trials {trials}` over 4 per-module anchors, {tokens} tokens a "
           "trial (default device and batch; the best kept), whole process",
           f"{wall:.1f} s = {60 * trials / wall:.0f} trials a minute overall, "
           f"{60 * timings['variants'] / timings['scoring_s']:.0f} a minute in the loop; {timings_text(timings)}", goal)


def gpumerge_command(argv: list[str], *, processes: int) -> list[str]:
    """`python -m gpumerge ARGV`, or under `accelerate launch --multi_gpu --num_processes N` when N > 1 (on a machine
    without CUDA too: accelerate then starts N CPU processes with gloo)."""
    if processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gpumerge", *argv]
    return [sys.executable, "-m", "gpumerge", *argv]


def launched_sweep(a: Path, b: Path, runs: Path, *, processes: int, grid: str, text: Path, tokens: int) -> dict:
    """The evaluated sweep through `accelerate launch --multi_gpu --num_processes N` (N = 1: plain), whole process
    timed; returns results.json with the wall time."""
    shutil.rmtree(runs, ignore_errors=True)
    sweep = ["sweep", "--model_path1", str(a), "--model_path2", str(b), "--output_dir", str(runs), "--grid", grid,
             "--eval-text", str(text), "--eval-tokens", str(tokens), "--keep", "0", "--quiet"]
    began = time.perf_counter()
    done = subprocess.run(gpumerge_command(sweep, processes=processes), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es): exit {done.returncode}: {done.stderr[-600:]}")
    results = json.loads((runs / "results.json").read_text())
    shutil.rmtree(runs, ignore_errors=True)
    return {**results, "wall_s": wall}


def processes_rows(ctx: Context) -> Iterator[Row]:
    """Issue #20: does a second process on one GPU raise variants per minute (each process holds its own model, A and
    B: 3 x 13.5 GB for the 7B shape), and what do N processes on N GPUs give? 40 variants of 8k tokens each."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        yield ("(11) many processes", "skipped: accelerate is not installed here", "")
        return
    pair = trained_pair(ctx)
    shape = SEVEN_B_DRY if ctx.dry_run else SEVEN_B
    free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    where = Path("/dev/shm/gpumerge_7b") if free > 3 * shape.total_bytes() + 8 * 2**30 else ctx.work / "7b"
    a, b = ensure_pair(where, shape, device=ctx.device)
    for model in (a, b):
        for file in (pair / "model_1").glob("tokenizer*"):
            shutil.copy(file, model / file.name)
    count, tokens = (6, 1024) if ctx.dry_run else (40, 8192)
    text = pair / "texts" / "train_code.txt"
    gpus = torch.cuda.device_count() if not ctx.dry_run else 0
    need = 3 * shape.total_bytes() + 8 * 2**30  # the model, A and B, and a forward pass, per process
    free_gpu = torch.cuda.mem_get_info(0)[0] if gpus else 0
    plans = [(1, "1 process"), (2, "2 processes on one GPU" if gpus == 1 else "2 processes")]
    if gpus > 2:
        plans.append((gpus, f"{gpus} processes on {gpus} GPUs"))
    try:
        base = None
        for processes, label in plans:
            if gpus == 1 and processes == 2 and free_gpu < 2 * need:
                yield (f"(11) {label}", f"skipped: two processes need {2 * need / 2**30:.0f} GiB, the GPU has "
                       f"{free_gpu / 2**30:.0f} GiB free", "")
                continue
            results = launched_sweep(a, b, where / "runs", processes=processes, grid=f"gradient_end=0:1:{count}",
                                     text=text, tokens=tokens)
            timings = results["timings"]
            per_minute = 60 * (timings["variants"] + timings["baselines"]) / timings["loop_s"]  # rows / wall
            base = base or per_minute
            yield (f"(11) {'tiny' if ctx.dry_run else '7B-shaped'} pair, {count} variants of {tokens} tokens, {label}",
                   f"{per_minute:.0f} rows a minute in the loop ({per_minute / base:.2f}x one process); whole "
                   f"process {results['wall_s']:.1f} s", "more than 1x" if processes > 1 else "")
    finally:
        shutil.rmtree(where, ignore_errors=True)


SECTIONS: dict[str, tuple[int, Callable[[Context], Iterator[Row]]]] = {
    "evalsweep": (200, evalsweep_rows),
    "search": (200, search_rows),
    "e2e": (90, end_to_end_rows),
    "sweep": (60, sweep_rows),
    "eval": (60, eval_rows),
    "bytes": (60, bytes_rows),
    "pinned": (15, pinned_rows),
    "kernel": (15, kernel_rows),
    "processes": (150, processes_rows),
}
OPT_IN = ("processes",)  # beyond the default set's time: run alone (gpu_check.sh OUT processes)


class Table:
    """Prints each row as it is measured (flushed), and keeps the table in OUT/table.md when --out is given."""

    def __init__(self, out: Path | None) -> None:
        self.path = out / "table.md" if out else None
        self.failures: list[str] = []  # rows that say a section failed or the bytes differ: the script's exit code

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")

    def row(self, check: str, result: str, goal: str) -> None:
        if "FAILED" in result or "DIFFER" in result:
            self.failures.append(check)
        self.line(f"| {check} | {result} | {goal} |")


def run_section(name: str, ctx: Context, table: Table) -> None:
    budget_s, fn = SECTIONS[name]
    began = time.perf_counter()
    try:
        for row in fn(ctx):
            table.row(*row)
    except Exception as exc:  # noqa: BLE001 - one failing section must not cost the others their rows
        traceback.print_exc(file=sys.stderr)
        table.row(f"section {name}", f"FAILED after {time.perf_counter() - began:.0f} s: {type(exc).__name__}: "
                  f"{' '.join(str(exc).split())[:300]}", "")
    took = time.perf_counter() - began
    table.row(f"section {name} time", f"{took:.0f} s (budget {budget_s} s)" + (" OVER BUDGET" if took > budget_s
                                                                                else ""), f"<= {budget_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "gpu_work")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to OUT/table.md")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU with tiny data")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no GPU present (torch.cuda.is_available() is False); nothing to measure here. "
              "Run it on a machine with CUDA, or with --cpu-dry-run to test the script.")
        return 0
    device = "cpu" if args.cpu_dry_run else "cuda:0"
    name = torch.cuda.get_device_name(0) if device != "cpu" else "CPU dry run (not a GPU measurement)"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").unlink(missing_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = Context(device=device, work=args.work, dry_run=args.cpu_dry_run)
    table = Table(args.out)
    table.line(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {name}; "
               f"torch {torch.__version__}; python {sys.version.split()[0]}\n")
    table.line("| check | result | goal |")
    table.line("|---|---|---|")
    began = time.perf_counter()
    for section in args.sections or [name for name in SECTIONS if name not in OPT_IN]:
        run_section(section, ctx, table)
    table.row("total", f"{time.perf_counter() - began:.0f} s", f"<= {sum(SECTIONS[n][0] for n in args.sections or SECTIONS if n not in OPT_IN or args.sections)} s")
    shutil.rmtree(args.work, ignore_errors=True)
    if table.failures:
        print(f"gpu_check: {len(table.failures)} row(s) failed: {', '.join(table.failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
