"""What the output's hashes cost a merge: the CLI merge of the benchmark pair with and without --checksums (sha256),
interleaved, each run timed until its output is on disk (`sync` included), outputs removed and synced away between
runs; and the xxh3-128 digests every merge writes (gpumerge_digests.json), timed on each plain run's output right
after it is written (the page cache as the merge leaves it), against that run's time.

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


def once(a: Path, b: Path, out: Path, checksums: bool) -> tuple[float, float]:
    """(the merge's seconds, the seconds its digests take again on its fresh output)."""
    from gpumerge.digests import DIGESTS_FILE, write_digests
    from gpumerge.runs import variant_record

    merged = out / "checksums_merge"
    remove(merged)
    argv = cli_argv(a, b, merged) + (["--checksums"] if checksums else [])
    began = time.perf_counter()
    run_quiet(argv)
    run_quiet(["sync"])
    elapsed = time.perf_counter() - began
    if checksums and not (merged / "checksums.sha256").is_file():
        raise RuntimeError("no checksums.sha256 written")
    (merged / DIGESTS_FILE).unlink()
    began = time.perf_counter()
    write_digests(merged, variant_record(merged))
    digest_s = time.perf_counter() - began
    remove(merged)
    return elapsed, digest_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    a, b = ensure_pair(DEFAULT_DATA)
    DEFAULT_OUT.mkdir(parents=True, exist_ok=True)
    warm_cache(a, b)
    plain, summed, digests = [], [], []
    for _ in range(args.runs):
        merge_s, digest_s = once(a, b, DEFAULT_OUT, False)
        plain.append(merge_s)
        digests.append(digest_s)
        summed.append(once(a, b, DEFAULT_OUT, True)[0])
    ratios = [s / p for s, p in zip(summed, plain)]
    print(f"merge (s): {', '.join(f'{x:.2f}' for x in plain)}")
    print(f"merge --checksums (s): {', '.join(f'{x:.2f}' for x in summed)}")
    print(f"--checksums ratio per run: {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}; min-to-min {min(summed) / min(plain):.2f}")
    shares = [d / p for d, p in zip(digests, plain)]
    print(f"xxh3-128 digests of every file (part of every merge) (s): {', '.join(f'{x:.3f}' for x in digests)}; "
          f"share of the merge: {', '.join(f'{x:.1%}' for x in shares)}; median {statistics.median(shares):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
