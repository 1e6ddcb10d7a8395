"""CPU merge benchmark: the gpumerge CLI and engine against the machine's I/O floor, in one run.

Measured side by side, page cache warm, outputs removed (and synced away) between runs:
  I/O floor     cat of both inputs' shards to /dev/null + dd bs=16M of model 1's shards to a new directory
  import torch  python -c "import torch"
  CLI           /usr/bin/time -v gpumerge ... (wall time and peak RSS)
  engine        gpumerge.merge.run_merge in this process, after imports (result.elapsed_s and wall time)
Times are the minimum over --runs runs; peak RSS the maximum.

    python benchmarks/bench_cpu.py [--data benchmarks/data] [--out benchmarks/out] [--runs 2]
    python benchmarks/bench_cpu.py --data /tmp/tinypair --out /tmp/tinyout --layers 2 --hidden 256 \
        --intermediate 512 --vocab 1000                                                # quick check
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from make_pair import DEFAULT_DATA, add_shape_args, ensure_pair, shape_from_args

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
TIME_BIN = Path("/usr/bin/time")
MERGE_ARGS = dict(gradient_start=0.9, gradient_end=0.0, layer_start=0, layer_end=12)
TARGET_CLI_RATIO = 1.25  # issue 3 (issue 2 asked for 1.5)
TARGET_ENGINE_RATIO = 1.1  # issue 3, on the report's wall_s (issue 2 asked for 1.3 on the engine alone)
TARGET_RSS_BYTES = 10**9


@dataclass
class Timings:
    io_floor_s: float
    torch_import_s: float
    cli_s: float
    cli_rss_bytes: int
    rss_source: str
    engine_s: float
    run_merge_s: float
    engine_bytes: int
    sequential_s: float


# --- helpers -----------------------------------------------------------------------------------------------------

def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def remove(path: Path) -> None:
    """Drop an output directory and let writeback settle, so the next timed run starts from the same state."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def best_of(runs: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(runs))


def run_quiet(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# --- measurements ------------------------------------------------------------------------------------------------

def warm_cache(a: Path, b: Path) -> None:
    run_quiet(["cat", *map(str, shards(a) + shards(b))])


def io_floor_once(a: Path, b: Path, out: Path) -> float:
    copy_dir = out / "dd_copy"
    remove(copy_dir)
    copy_dir.mkdir(parents=True)

    def read_and_copy() -> None:
        run_quiet(["cat", *map(str, shards(a) + shards(b))])
        for shard in shards(a):
            run_quiet(["dd", f"if={shard}", f"of={copy_dir / shard.name}", "bs=16M", "status=none"])

    elapsed = timed(read_and_copy)
    remove(copy_dir)
    return elapsed


def torch_import_once() -> float:
    return timed(lambda: run_quiet([sys.executable, "-c", "import torch"]))


def gpumerge_exe() -> str:
    beside_python = Path(sys.executable).parent / "gpumerge"
    return str(beside_python) if beside_python.exists() else (shutil.which("gpumerge") or "gpumerge")


def cli_argv(a: Path, b: Path, out: Path) -> list[str]:
    return [gpumerge_exe(), "--model_path1", str(a), "--model_path2", str(b), "--output_model_path", str(out),
            *(token for key, value in MERGE_ARGS.items() for token in (f"--{key}", str(value))),
            "--overwrite", "--quiet"]


def parse_max_rss(time_v_output: str) -> int:
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_v_output)
    if not match:
        raise RuntimeError(f"no peak RSS in /usr/bin/time -v output:\n{time_v_output}")
    return int(match.group(1)) * 1024


def cli_once(a: Path, b: Path, out: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one CLI merge (RSS from /usr/bin/time -v, else getrusage)."""
    merged = out / "cli_merge"
    remove(merged)
    if TIME_BIN.exists():
        began = time.perf_counter()
        done = run_quiet([str(TIME_BIN), "-v", *cli_argv(a, b, merged)])
        elapsed = time.perf_counter() - began
        rss = parse_max_rss(done.stderr)
    else:  # max over every child so far (the gpumerge run dominates: it is the biggest child)
        elapsed = timed(lambda: run_quiet(cli_argv(a, b, merged)))
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    remove(merged)
    return elapsed, rss


def engine_once(a: Path, b: Path, out: Path, engine: str = "pipelined") -> tuple[float, float, int]:
    """(result.elapsed_s, the report's wall_s: opening the inputs to the output complete, bytes read + written) of one
    in-process merge."""
    from gpumerge.merge import run_merge
    from gpumerge.spec import MergeSpec

    merged = out / "engine_merge"
    remove(merged)
    spec = MergeSpec(model_path1=str(a), model_path2=str(b), output_model_path=merged, overwrite=True, quiet=True,
                     **MERGE_ARGS)
    result = run_merge(spec, notice=lambda line: None, engine=engine)
    remove(merged)
    return result.elapsed_s, result.report["wall_s"], result.bytes_read + result.bytes_written


def measure(a: Path, b: Path, out: Path, runs: int) -> Timings:
    # Import everything run_merge imports lazily (torch included) now: imports are not part of the engine's
    # time, and the in-process engine then runs one consistent snapshot of the package.
    import gpumerge.devices, gpumerge.merge, gpumerge.pipeline, gpumerge.writer  # noqa: E401, F401

    warm_cache(a, b)
    io_floor = best_of(runs, lambda: io_floor_once(a, b, out))
    torch_import = best_of(runs, torch_import_once)
    cli = [cli_once(a, b, out) for _ in range(runs)]
    engine = [engine_once(a, b, out) for _ in range(runs)]
    sequential = [engine_once(a, b, out, "sequential") for _ in range(runs)]
    return Timings(
        io_floor_s=io_floor,
        torch_import_s=torch_import,
        cli_s=min(wall for wall, _ in cli),
        cli_rss_bytes=max(rss for _, rss in cli),
        rss_source="/usr/bin/time -v" if TIME_BIN.exists() else "getrusage(RUSAGE_CHILDREN), /usr/bin/time missing",
        engine_s=min(e[0] for e in engine),
        run_merge_s=min(e[1] for e in engine),
        engine_bytes=engine[0][2],
        sequential_s=min(e[1] for e in sequential),
    )


# --- report ------------------------------------------------------------------------------------------------------

def machine_lines(a: Path, out: Path) -> list[str]:
    import torch

    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s*(\d+)", meminfo).group(1))
    df = subprocess.run(["df", "-T", str(out)], capture_output=True, text=True, check=True).stdout.splitlines()
    fs_type = df[-1].split()[1]
    input_bytes = sum(p.stat().st_size for p in shards(a))
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- cpus (nproc): {len(os.sched_getaffinity(0))}",
        f"- RAM: {mem_kb / 2**20:.1f} GiB",
        f"- output filesystem: {fs_type} ({out})",
        f"- torch {torch.__version__}, python {sys.version.split()[0]}",
        f"- model size: {input_bytes / 1e9:.2f} GB per model, {len(shards(a))} shards",
    ]


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def table(t: Timings) -> list[str]:
    cli_ratio = t.cli_s / (t.torch_import_s + t.io_floor_s)
    engine_ratio = t.run_merge_s / t.io_floor_s
    rss_gb = t.cli_rss_bytes / 1e9
    rows = [
        ("I/O floor: cat A+B, dd A (s)", f"{t.io_floor_s:.2f}", "", ""),
        ("python -c 'import torch' (s)", f"{t.torch_import_s:.2f}", "", ""),
        ("CLI wall (s)", f"{t.cli_s:.2f}", "", ""),
        ("engine stages only, result.elapsed_s (s)", f"{t.engine_s:.2f}", "", ""),
        ("engine, report wall_s: opening the inputs to the output complete (s)", f"{t.run_merge_s:.2f}", "", ""),
        ("sequential reference engine, wall_s (s)", f"{t.sequential_s:.2f}", "", ""),
        ("CLI / (import torch + I/O floor)", f"{cli_ratio:.2f}", f"≤ {TARGET_CLI_RATIO}",
         verdict(cli_ratio, TARGET_CLI_RATIO)),
        ("engine wall_s / I/O floor", f"{engine_ratio:.2f}", f"≤ {TARGET_ENGINE_RATIO}",
         verdict(engine_ratio, TARGET_ENGINE_RATIO)),
        ("CLI peak RSS", f"{rss_gb:.3f} GB ({t.cli_rss_bytes / 2**20:.0f} MiB)", "≤ 1 GB",
         verdict(t.cli_rss_bytes, TARGET_RSS_BYTES)),
        ("sequential wall_s / I/O floor", f"{t.sequential_s / t.io_floor_s:.2f}", "", ""),
        ("engine throughput, read+written", f"{t.engine_bytes / t.run_merge_s / 1e9:.2f} GB/s "
         f"({t.engine_bytes / 1e9:.2f} GB)", "", ""),
    ]
    lines = ["| measure | value | target | |", "|---|---:|---|---|"]
    return lines + [f"| {name} | {value} | {target} | {status} |" for name, value, target, status in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the pair (generated if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="scratch space for outputs")
    parser.add_argument("--runs", type=int, default=2)
    add_shape_args(parser)  # the pair's shape, for a quick run on a tiny pair (default: the ~1B Llama)
    args = parser.parse_args()

    a, b = ensure_pair(args.data, shape_from_args(args))
    args.out.mkdir(parents=True, exist_ok=True)
    timings = measure(a, b, args.out, args.runs)
    print("\n".join(machine_lines(a, args.out)))
    print(f"- peak RSS from {timings.rss_source}; times: min of {args.runs} runs, page cache warm\n")
    print("\n".join(table(timings)))


if __name__ == "__main__":
    main()
