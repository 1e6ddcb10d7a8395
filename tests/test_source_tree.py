"""The source tree imports as it is: `PYTHONPATH=.` (or running from the repository root) is enough for the package,
its kernels (kept in the top-level kernels/ folder) and the benchmark scripts, with or without an install."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, source_env

# Drop an editable install's import hook, so that only the source tree can satisfy the imports.
_NO_INSTALL = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if 'editable' not in (getattr(f, '__module__', '') or type(f).__module__)]; ")


def _python(code: str, *, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_INSTALL + code], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=source_env())


def test_kernels_import_from_the_top_level_folder(tmp_path):
    proc = _python("import gpumerge.kernels.lerp as k, gpumerge.kernels.slerp; print(k.__file__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(REPO / "kernels" / "lerp.py")


def test_version_from_the_source_tree(tmp_path):
    proc = _python("from gpumerge.merge import version; print(version())", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split("+")[0].count(".") == 2


def test_benchmark_script_runs_from_the_tree(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--cpu-dry-run" in proc.stdout


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """The prepared GPU command, proved on the CPU: every section runs, every row is there, every blend path gives
    the same bytes through the (simulated) device path and the CPU path."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--cpu-dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=source_env(PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert "FAILED" not in table and "DIFFERENT" not in table, table
    for section in ("bytes", "kernel", "e2e", "pinned"):
        assert f"| section {section} time |" in table
    assert table.count("| equal |") == 9  # one row per blend path
    assert "skipped" in (tmp_path / "out" / "pytest_cuda.log").read_text()
