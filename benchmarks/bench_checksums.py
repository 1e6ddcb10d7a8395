"""What --checksums costs a merge: the CLI merge of the benchmark pair with and without it, interleaved, each run
timed until its output is on disk (`sync` included), outputs removed and synced away between runs.

    python benchmarks/bench_checksums.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_cpu import DEFAULT_OUT, cli_argv, remove, run_quiet, warm_cache
from make_pair import DEFAULT_DATA, ensure_pair


def once(a: Path, b: Path, out: Path, checksums: bool) -> float:
    merged = out / "checksums_merge"
    remove(merged)
    argv = cli_argv(a, b, merged) + (["--checksums"] if checksums else [])
    began = time.perf_counter()
    run_quiet(argv)
    run_quiet(["sync"])
    elapsed = time.perf_counter() - began
    if checksums and not (merged / "checksums.sha256").is_file():
        raise RuntimeError("no checksums.sha256 written")
    remove(merged)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    a, b = ensure_pair(DEFAULT_DATA)
    DEFAULT_OUT.mkdir(parents=True, exist_ok=True)
    warm_cache(a, b)
    plain, summed = [], []
    for _ in range(args.runs):
        plain.append(once(a, b, DEFAULT_OUT, False))
        summed.append(once(a, b, DEFAULT_OUT, True))
    ratios = [s / p for s, p in zip(summed, plain)]
    print(f"merge (s): {', '.join(f'{x:.2f}' for x in plain)}")
    print(f"merge --checksums (s): {', '.join(f'{x:.2f}' for x in summed)}")
    print(f"ratio per run: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}; "
          f"min-to-min {min(summed) / min(plain):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
