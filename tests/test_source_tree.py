"""The source tree imports as it is: `PYTHONPATH=.` (or running from the repository root) is enough for the package,
its kernels (kept in the top-level kernels/ folder) and the benchmark scripts, with or without an install."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """The prepared GPU command, proved on the CPU: every section runs, every row is there, every blend path gives
    the same bytes through the (simulated) device path and the CPU path."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--cpu-dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=source_env(PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert "FAILED" not in table and "DIFFERENT" not in table, table
    for section in ("bytes", "kernel", "e2e", "pinned", "sweep", "eval"):
        assert f"| section {section} time |" in table
    assert table.count("| equal |") == 9  # one row per blend path
    assert "skipped" in (tmp_path / "out" / "pytest_cuda.log").read_text()


# A stand-in for the PyPI package `kernels` (Hugging Face's hub kernels, which transformers 5 imports while loading
# any model configuration): any name transformers asks it for is a do-nothing class, and FAKE marks it as ours.
_FAKE_KERNELS = '''
FAKE = True


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) else self


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything
'''


def _fake_kernels_site(root) -> str:
    """A site directory holding a distribution named `kernels` at the version transformers asks for."""
    from transformers.utils import import_utils

    version = getattr(import_utils, "KERNELS_MIN_VERSION", "0.19.1")
    site = root / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(_FAKE_KERNELS)
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return str(site)


@pytest.mark.parametrize("root_on_path", [False, True], ids=["cwd-only", "PYTHONPATH=."])
def test_an_installed_kernels_package_wins_over_the_checkouts_folder(tmp_path, root_on_path):
    """From the repository root (its folder kernels/ right there on sys.path), `import kernels` is the installed
    distribution, and transformers' model configuration imports (it imports kernels on the way)."""
    site = _fake_kernels_site(tmp_path)
    path = [".", site] if root_on_path else [site]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    code = ("import kernels, transformers.integrations.hub_kernels as hub; "
            "from transformers.models.llama.configuration_llama import LlamaConfig; LlamaConfig(); "
            "import gpumerge.kernels.lerp as lerp; "
            "print(kernels.__file__); print(getattr(kernels, 'FAKE', False)); print(lerp.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    kernels_file, fake, lerp_file = proc.stdout.split()
    assert kernels_file == str(tmp_path / "site" / "kernels" / "__init__.py")
    assert fake == "True"
    assert lerp_file == str(REPO / "kernels" / "lerp.py")


def test_the_top_level_kernels_folder_is_no_regular_package():
    """A regular package named kernels at the root would shadow the installed one wherever the root is on the path
    (python -m from the root, PYTHONPATH=.): the folder holds modules only, reached as gpumerge.kernels."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert sorted(p.name for p in (REPO / "kernels").glob("*.py"))


@pytest.mark.slow
def test_a_failing_section_makes_the_gpu_check_fail(tmp_path, monkeypatch):
    """A section that raises is a FAILED row and exit 1 (the rows of the others still there), and gpu_check.sh
    passes a failure on, so a caller never reads a broken run as a good one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)

    def boom(ctx):
        yield ("a row before the failure", "fine", "")
        raise RuntimeError("this section broke")

    monkeypatch.setitem(module.SECTIONS, "boom", (1, boom))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu-dry-run", "--work", str(tmp_path / "work"), "--out",
                                      str(tmp_path / "out"), "pinned", "boom"])
    assert module.main() == 1
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| a row before the failure | fine |" in table and "FAILED" in table and "this section broke" in table
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "sh"), "--cpu-dry-run",
                           "nosuch"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=source_env(PYTHON=sys.executable))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gpu_check.sh: FAILED" in proc.stderr
