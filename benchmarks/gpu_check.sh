#!/usr/bin/env bash
# The one prepared command for a GPU machine (bare: no gpumerge installed, no network; results come back only as
# files under OUTDIR):
#
#   benchmarks/gpu_check.sh OUTDIR [--cpu-dry-run] [SECTION ...]
#
# 1. the CUDA tests, `pytest -m cuda` (budget 90 s)            -> OUTDIR/pytest_cuda.log
# 2. benchmarks/gpu_check.py [SECTION ...] (budgets in its doc: evalsweep 200, search 200, e2e 90, sweep 60, eval 60, bytes 60,
#    pinned 15, kernel 15 s)                                    -> OUTDIR/table.md, OUTDIR/gpu_check.log
# The default set is planned for under 8 minutes on one H200, data generation included (run single sections to rerun in
# the same 15 minutes). Each step has a hard timeout; a failing step does not stop the next, and the script exits 1 when any
# failed. --cpu-dry-run runs it all on the CPU with tiny data (the CUDA tests then skip): how the command is proved
# without a GPU.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--cpu-dry-run] [SECTION ...]" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree imports as it is
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{
  echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); $($python -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, devices {torch.cuda.device_count()}")' 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

began=$(date +%s)
timeout 90 "$python" -m pytest -q -m cuda -p no:cacheprovider tests > "$out/pytest_cuda.log" 2>&1
tests_rc=$?
echo "pytest -m cuda: exit $tests_rc in $(( $(date +%s) - began )) s (budget 90 s); tail of $out/pytest_cuda.log:"
tail -n 5 "$out/pytest_cuda.log"

timeout 540 "$python" benchmarks/gpu_check.py --out "$out" "$@" 2> "$out/gpu_check.log"
check_rc=$?
echo "gpu_check.py: exit $check_rc (table in $out/table.md, errors in $out/gpu_check.log)"
echo "total $(( $(date +%s) - began )) s"
# Non-zero when either step failed (a failed section, bytes that differ, a timeout), so a caller sees it.
if [ "$tests_rc" -ne 0 ] || [ "$check_rc" -ne 0 ]; then
  echo "gpu_check.sh: FAILED (pytest -m cuda exit $tests_rc, gpu_check.py exit $check_rc)" >&2
  exit 1
fi
