"""Sweep benchmark (write mode): N variants from one read of the inputs, against N single merges and the I/O floor.

Measured side by side in one run, page cache warm (the inputs'), outputs removed (and synced away) between runs.
Every time runs until the outputs are on disk (a `sync` at the end of each run is timed): several GB of outputs do
not fit in the kernel's dirty-page allowance, so a run that writes more is throttled to the disk's speed while one
that writes less leaves its writeback to whatever comes next; timing to durability compares like with like.
  floor N       cat of both inputs' shards to /dev/null + dd bs=16M of model 1's shards into N new directories
                (the least any tool must do to write N merges of the pair: read both once, write N models)
  4 singles     4 `gpumerge` CLI runs, one per variant (each reads both inputs and writes one model)
  sweep N       `gpumerge sweep --grid gradient_end=0:1:N` (CLI, wall time and peak RSS)
Goals (issue 9): sweep 4 <= 0.5x the 4 singles; sweep 8 <= 1.1x floor 8. Times are the minimum over --runs.

    python benchmarks/bench_sweep.py [--data benchmarks/data] [--out benchmarks/out] [--runs 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_cpu import (DEFAULT_OUT, TIME_BIN, gpumerge_exe, machine_lines, parse_max_rss, remove, run_quiet, shards,
                       timed, verdict, warm_cache)
from make_pair import DEFAULT_DATA, add_shape_args, ensure_pair, shape_from_args

BASE = ["--gradient_start", "0.9", "--layer_start", "0", "--layer_end", "12", "--quiet"]
TARGET_VS_SINGLES = 0.5
TARGET_VS_FLOOR = 1.1


def floor_once(a: Path, b: Path, out: Path, copies: int) -> float:
    scratch = out / "floor"
    remove(scratch)
    targets = [scratch / f"copy{k}" for k in range(copies)]
    for target in targets:
        target.mkdir(parents=True)

    def read_once_write_n() -> None:
        run_quiet(["cat", *map(str, shards(a) + shards(b))])
        for target in targets:
            for shard in shards(a):
                run_quiet(["dd", f"if={shard}", f"of={target / shard.name}", "bs=16M", "status=none"])

    elapsed = timed(lambda: (read_once_write_n(), sync()))
    remove(scratch)
    return elapsed


def sync() -> None:
    run_quiet(["sync"])


def grid_values(count: int) -> list[str]:
    return [repr(k / (count - 1)) for k in range(count)]


def singles_once(a: Path, b: Path, out: Path, count: int) -> float:
    total = 0.0
    for k, value in enumerate(grid_values(count)):
        merged = out / f"single{k}"
        remove(merged)
        total += timed(lambda: (run_quiet([gpumerge_exe(), "--model_path1", str(a), "--model_path2", str(b),
                                           "--output_model_path", str(merged), "--gradient_end", value, *BASE]),
                                sync()))
        remove(merged)
    return total


def sweep_once(a: Path, b: Path, out: Path, count: int) -> tuple[float, int]:
    runs = out / "sweep"
    remove(runs)
    argv = [gpumerge_exe(), "sweep", "--model_path1", str(a), "--model_path2", str(b), "--output_dir", str(runs),
            "--grid", f"gradient_end=0:1:{count}", *BASE]
    began = time.perf_counter()
    done = run_quiet([str(TIME_BIN), "-v", *argv] if TIME_BIN.exists() else argv)
    sync()
    elapsed = time.perf_counter() - began
    written = sorted(p.name for p in runs.iterdir() if p.is_dir())
    if len(written) != count:
        raise RuntimeError(f"the sweep wrote {written}, expected {count} variants")
    remove(runs)
    return elapsed, parse_max_rss(done.stderr) if TIME_BIN.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--runs", type=int, default=1)
    add_shape_args(parser)
    args = parser.parse_args()
    a, b = ensure_pair(args.data, shape_from_args(args))
    args.out.mkdir(parents=True, exist_ok=True)
    warm_cache(a, b)
    rows = {"floor4": [], "floor8": [], "singles4": [], "sweep4": [], "sweep8": []}
    rss = []
    for _ in range(args.runs):  # interleaved: each ratio's two sides measured close together
        rows["floor4"].append(floor_once(a, b, args.out, 4))
        rows["singles4"].append(singles_once(a, b, args.out, 4))
        wall, peak = sweep_once(a, b, args.out, 4)
        rows["sweep4"].append(wall)
        rss.append(peak)
        rows["floor8"].append(floor_once(a, b, args.out, 8))
        wall, peak = sweep_once(a, b, args.out, 8)
        rows["sweep8"].append(wall)
        rss.append(peak)
    best = {key: min(values) for key, values in rows.items()}
    vs_singles = best["sweep4"] / best["singles4"]
    vs_floor = best["sweep8"] / best["floor8"]
    print("\n".join(machine_lines(a, args.out)))
    print(f"- runs: {args.runs} (the table: min of each); every run, in order:")
    for key, values in rows.items():
        print(f"  - {key}: " + ", ".join(f"{v:.2f}" for v in values))
    ratios = [(s4 / n4, s8 / f8) for s4, n4, s8, f8 in zip(rows["sweep4"], rows["singles4"], rows["sweep8"],
                                                            rows["floor8"])]
    print("- per run: sweep 4 / 4 singles, sweep 8 / floor 8: "
          + "; ".join(f"{r1:.2f}, {r2:.2f}" for r1, r2 in ratios) + "\n")
    print("| measurement | seconds | ratio | goal |")
    print("|---|---|---|---|")
    print(f"| I/O floor, 4 outputs (cat both + dd model 1 x4) | {best['floor4']:.2f} | | |")
    print(f"| 4 single `gpumerge` runs (CLI) | {best['singles4']:.2f} | {best['singles4'] / best['floor4']:.2f}x "
          "floor 4 | |")
    print(f"| `gpumerge sweep`, 4 variants (CLI) | {best['sweep4']:.2f} | {vs_singles:.2f}x the 4 singles, "
          f"{best['sweep4'] / best['floor4']:.2f}x floor 4 | <= {TARGET_VS_SINGLES}x singles "
          f"({verdict(vs_singles, TARGET_VS_SINGLES)}) |")
    print(f"| I/O floor, 8 outputs (cat both + dd model 1 x8) | {best['floor8']:.2f} | | |")
    print(f"| `gpumerge sweep`, 8 variants (CLI) | {best['sweep8']:.2f} | {vs_floor:.2f}x floor 8 | "
          f"<= {TARGET_VS_FLOOR}x ({verdict(vs_floor, TARGET_VS_FLOOR)}) |")
    if any(rss):
        print(f"| peak RSS of the sweeps (/usr/bin/time -v) | {max(rss) / 2**20:.0f} MiB | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
