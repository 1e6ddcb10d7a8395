"""Search benchmark on the trained pair (benchmarks/trained_pair.py): does a search find what a grid finds, and what
does optuna cost per trial?

    grid   30 points over gradient_start x gradient_end (6 x 5), an evaluated sweep
    tpe    30 TPE trials over 4 per-module anchors (self_attn and mlp, 2 anchors each), seed 0
    cmaes  the same 30 trials with CMA-ES

For each: the best perplexity, the whole run, and the search's overhead per trial beyond blend + score: (the loop's
time - the rows' blend_s + eval_s) / (blend_s + eval_s), which holds optuna's sampler, its SQLite writes and the
planning of each trial. Goals (issue #19): TPE's best <= the grid's best; overhead <= 5 %.

    python benchmarks/bench_search.py [--trials 30] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(argv: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpumerge", *argv, "--quiet"], capture_output=True, text=True,
                          cwd=HERE.parent, env={**__import__("os").environ, "PYTHONPATH": str(HERE.parent)})
    if done.returncode != 0:
        raise SystemExit(f"gpumerge {' '.join(argv)}: {done.stderr[-800:]}")
    return time.perf_counter() - began


def summary(runs: Path) -> dict:
    with open(runs / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    variants = [r for r in rows if r["name"] not in ("model_1", "model_2")]
    timings = json.loads((runs / "results.json").read_text())["timings"]
    inner = sum(float(r["blend_s"]) + float(r["eval_s"]) for r in variants)
    return {"best": min(float(r["perplexity"]) for r in variants), "rows": len(variants),
            "model_1": next((float(r["perplexity"]) for r in rows if r["name"] == "model_1"), None),
            "loop_s": timings["scoring_s"], "inner_s": inner,
            "overhead": (timings["scoring_s"] - inner) / inner if inner else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    from trained_pair import build

    pair = build(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="gpumerge-bench-search-"))
    common = ["--model_path1", str(pair / "model_1"), "--model_path2", str(pair / "model_2"), "--eval-text",
              str(pair / "texts" / "eval_code.txt"), "--eval-text", str(pair / "texts" / "eval_prose.txt"),
              "--eval-tokens", str(args.tokens), "--seq-len", "256",
              "--keep", "0", "--device", "cpu"]
    anchors = [f"--space=layer_gradients.{m}.{k}=0:1" for m in ("self_attn", "mlp") for k in (0, 1)]
    results = {}
    try:
        wall = run(["sweep", "--output_dir", str(work / "grid"), *common, "--grid", "gradient_start=0:1:6",
                    "--grid", "gradient_end=0:1:5"])
        results["grid 6x5 over gradient_start, gradient_end"] = (wall, summary(work / "grid"))
        for sampler in ("tpe", "cmaes"):
            wall = run(["sweep", "--output_dir", str(work / sampler), *common, "--search", "optuna", "--trials",
                        str(args.trials), "--sampler", sampler, "--seed", "0", *anchors])
            results[f"{sampler} {args.trials} trials over 4 anchors (self_attn, mlp)"] = (wall, summary(work / sampler))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; trained pair; {args.tokens} tokens of "
          "eval_code.txt and of eval_prose.txt per row, seq 256, CPU (fp32 forward)\n")
    print("| run | rows | best perplexity | model_1 | whole run (s) | loop (s) | blend+score (s) | overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (wall, s) in results.items():
        extra = (s["loop_s"] - s["inner_s"]) / s["rows"] * 1e3
        overhead = f"{100 * s['overhead']:.1f} % ({extra:.0f} ms a row)" if s["overhead"] is not None else "n/a"
        print(f"| {name} | {s['rows']} | {s['best']:.4f} | {s['model_1']:.4f} | {wall:.1f} | {s['loop_s']:.1f} | "
              f"{s['inner_s']:.1f} | {overhead} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
