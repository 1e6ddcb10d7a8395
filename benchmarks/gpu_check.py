"""One script for a GPU machine: prints one markdown table for benchmarks/RESULTS.md.

    (1) GPU output == CPU output, byte for byte, on a generated pair (fp16 -> fp16, and mixed -> bf16 via fp32)
    (2) blend kernel GB/s (torch.lerp, fp16, into a preallocated buffer) vs a device-to-device copy's GB/s
        (goal >= 80 %); also many small tensors (norm-sized) per-tensor lerp vs torch._foreach_lerp_
    (3) end-to-end merge of a generated 2 x ~4 GB pair vs this machine's I/O floor (goal <= 1.15x)
    (4) the same with --max_memory forcing many small batches
GB/s counts bytes read plus bytes written. Data generation included, it should finish within 5 minutes.

    python benchmarks/gpu_check.py                 # on a GPU machine
    python benchmarks/gpu_check.py --cpu-dry-run   # the same steps on the CPU with a tiny pair (tests the script)
On a machine without CUDA (and without --cpu-dry-run) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the source tree imports as it is (no install)
from make_pair import PairShape, ensure_pair  # noqa: E402

from gpumerge.merge import run_merge  # noqa: E402
from gpumerge.spec import MergeSpec  # noqa: E402

BIG = PairShape(layers=16, hidden=3072, intermediate=8192, vocab=32000, heads=24)  # ~4.0 GB per model
SMALL = PairShape(layers=4, hidden=512, intermediate=1376, vocab=1000, heads=8)
TINY = PairShape(layers=2, hidden=256, intermediate=512, vocab=500, heads=4)
MERGE = dict(gradient_start=0.9, gradient_end=0.0, layer_start=0, layer_end=12)


def merge(a: Path, b: Path, out: Path, *, device: str, dtype: str = "float16", budget=None):
    shutil.rmtree(out, ignore_errors=True)
    spec = MergeSpec(model_path1=str(a), model_path2=str(b), output_model_path=out, device=device, dtype=dtype,
                     quiet=True, **MERGE)
    return run_merge(spec, notice=lambda line: None, budget=budget)


def same_output(dir1: Path, dir2: Path) -> bool:
    from safetensors.torch import load_file

    def state(d):
        merged = {}
        for path in sorted(d.glob("*.safetensors")):
            merged.update(load_file(path))
        return merged

    s1, s2 = state(dir1), state(dir2)
    return s1.keys() == s2.keys() and all(
        s1[k].dtype == s2[k].dtype and torch.equal(s1[k].view(torch.uint8), s2[k].view(torch.uint8)) for k in s1)


def check_equal(work: Path, device: str) -> list[tuple[str, str, str]]:
    a, b = ensure_pair(work / "small", SMALL)
    rows = []
    for dtype in ("float16", "bfloat16"):
        cpu = merge(a, b, work / "eq_cpu", device="cpu", dtype=dtype).output
        dev = merge(a, b, work / "eq_dev", device=device, dtype=dtype).output
        ok = same_output(cpu, dev)
        small = merge(a, b, work / "eq_small", device=device, dtype=dtype,
                      budget={device: 3 * 256 * 1024, "cpu": 2**30}).output
        ok_small = same_output(cpu, small)
        rows.append((f"(1) {device} output == CPU output, fp16 pair -> {dtype}",
                     f"{'equal' if ok else 'DIFFERENT'}; with 256 KiB batches: {'equal' if ok_small else 'DIFFERENT'}",
                     "equal"))
    return rows


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


def kernel_rows(device: str, elements: int) -> list[tuple[str, str, str]]:
    a = torch.randn(elements, device=device).half()
    b = torch.randn(elements, device=device).half()
    out = torch.empty_like(a)
    copy_s = timed_device(lambda: out.copy_(a), device)
    lerp_s = timed_device(lambda: torch.lerp(a, b, 0.3, out=out), device)
    copy_gbps = 2 * a.nbytes / copy_s / 1e9
    lerp_gbps = 3 * a.nbytes / lerp_s / 1e9
    rows = [(f"(2) blend kernel: torch.lerp fp16 into a buffer, {a.nbytes / 2**20:.0f} MiB per operand",
             f"{lerp_gbps:.0f} GB/s = {100 * lerp_gbps / copy_gbps:.0f} % of a d2d copy ({copy_gbps:.0f} GB/s)",
             ">= 80 %")]
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
    rows.append(("(2b) 512 norm-sized tensors (4096 fp16): per-tensor lerp vs _foreach_copy_+_foreach_lerp_",
                 f"{nbytes / loop_s / 1e9:.1f} GB/s vs {nbytes / foreach_s / 1e9:.1f} GB/s", "information"))
    return rows


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


def end_to_end_rows(work: Path, device: str, shape: PairShape) -> list[tuple[str, str, str]]:
    began = time.perf_counter()
    a, b = ensure_pair(work / "big", shape)
    generated_s = time.perf_counter() - began
    floor = io_floor_s(a, b, work / "floor")
    rows = []
    for label, budget in (("(3) end-to-end merge", None),
                          ("(4) same, --max_memory forcing small batches",
                           {device: 3 * 8 * 2**20, "cpu": 3 * 8 * 2**20})):
        result = min((merge(a, b, work / "e2e", device=device, budget=budget) for _ in range(2)),
                     key=lambda r: r.report["wall_s"])
        report = result.report
        moved = report["bytes_read"] + report["bytes_written"]
        stages = ", ".join(f"{name} {s['gbps']}" for name, s in report["stages"].items() if s["bytes"])
        rows.append((f"{label}: wall_s / I/O floor ({moved / 1e9:.1f} GB read+written, {report['batches']} batches)",
                     f"{report['wall_s']:.2f} s / {floor:.2f} s = {report['wall_s'] / floor:.2f}x; "
                     f"{moved / report['wall_s'] / 1e9:.1f} GB/s; stages GB/s: {stages}; peak pinned "
                     f"{report['peak_pinned_bytes'] / 2**20:.0f} MiB, device {report['peak_device_bytes'] / 2**20:.0f} MiB",
                     "<= 1.15x"))
        shutil.rmtree(result.output, ignore_errors=True)
    rows.append(("pair generation (not part of any ratio)", f"{generated_s:.0f} s, "
                 f"{sum(p.stat().st_size for p in a.glob('*.safetensors')) / 1e9:.2f} GB per model", ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "gpu_work")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU with a tiny pair")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no GPU present (torch.cuda.is_available() is False); nothing to measure here. "
              "Run it on a machine with CUDA, or with --cpu-dry-run to test the script.")
        return 0
    device = "cpu" if args.cpu_dry_run else "cuda:0"
    name = torch.cuda.get_device_name(0) if device != "cpu" else "CPU dry run (not a GPU measurement)"
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = check_equal(args.work, device)
    rows += kernel_rows(device, 2**27 if device != "cpu" else 2**20)
    rows += end_to_end_rows(args.work, device, BIG if device != "cpu" else TINY)
    print(f"- date: {datetime.date.today().isoformat()}; device: {name}; torch {torch.__version__}; "
          f"total {time.perf_counter() - began:.0f} s\n")
    print("| check | result | goal |")
    print("|---|---|---|")
    for check, result, goal in rows:
        print(f"| {check} | {result} | {goal} |")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
