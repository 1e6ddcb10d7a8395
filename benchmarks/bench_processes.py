"""Many processes on the CPU (issue #20): the trained pair's evaluated sweep in one process and under
`accelerate launch --multi_gpu --num_processes 2` (MULTI_CPU, gloo), run one after another in one go.

    one process, torch's threads     what a user gets without accelerate (2 threads on this 2-core machine)
    one process, 1 thread            OMP_NUM_THREADS=1: what each launched process gets
    two processes, 1 thread each     accelerate launch --multi_gpu --num_processes 2

Each: a grid of --variants settings of gradient_end, every row scored on --tokens tokens of eval_code.txt (seq 256,
fp32 forward), --keep 0, baselines included. Reported: variants a minute in the scoring loop (rows scored / the
main process's scoring time), the whole command's wall time, and whether the perplexities equal the 1-thread
single process's to the bit.

    python benchmarks/bench_processes.py [--variants 12] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def sweep(argv: list[str], *, processes: int, threads: int | None) -> tuple[float, dict, dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    from gpu_check import gpumerge_command

    command = gpumerge_command(argv, processes=processes)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=env)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])}: exit {done.returncode}: {done.stderr[-800:]}")
    runs = Path(argv[argv.index("--output_dir") + 1])
    timings = json.loads((runs / "results.json").read_text())["timings"]
    with open(runs / "results.csv", newline="") as handle:
        figures = {row["name"]: row["perplexity"] for row in csv.DictReader(handle)}
    shutil.rmtree(runs)
    return wall, timings, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    from trained_pair import build

    pair = build(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="gpumerge-bench-processes-"))
    common = ["sweep", "--model_path1", str(pair / "model_1"), "--model_path2", str(pair / "model_2"),
              "--eval-text", str(pair / "texts" / "eval_code.txt"), "--eval-tokens", str(args.tokens),
              "--seq-len", "256", "--grid", f"gradient_end=0:1:{args.variants}", "--keep", "0", "--device", "cpu",
              "--quiet"]
    runs = [("one process, torch's threads", 1, None), ("one process, 1 thread", 1, 1),
            ("two processes, 1 thread each", 2, 1)]
    found = {}
    try:
        for label, processes, threads in runs:
            found[label] = sweep([*common, "--output_dir", str(work / "runs")], processes=processes, threads=threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = found["one process, 1 thread"][2]
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; trained pair; {args.variants} variants + "
          f"2 parents, {args.tokens} tokens of eval_code.txt a row, seq 256, CPU fp32 forward; {os.cpu_count()} "
          "cores\n")
    print("| run | rows | rows a minute (loop) | x one process, 1 thread | whole command (s) | "
          "perplexities vs 1 thread, 1 process |")
    print("|---|---:|---:|---:|---:|---|")
    base = None
    for label, (wall, timings, figures) in found.items():
        rows = timings["variants"] + timings["baselines"]
        per_minute = 60 * rows / timings["loop_s"]  # the loop's wall time (its rows' own times overlap)
        if label == "one process, 1 thread":
            base = per_minute
        same = "the same to the bit" if figures == reference else "differ (float rounding: another thread count)"
        found[label] = (wall, rows, per_minute, same)
    for label, (wall, rows, per_minute, same) in found.items():
        print(f"| {label} | {rows} | {per_minute:.0f} | {per_minute / base:.2f} | {wall:.1f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
