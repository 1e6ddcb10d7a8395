"""The README's Python API example runs as printed (with the trained pair as its `pair/`), and gives what the command
line gives."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- python-api-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "the README's Python API example is missing"
    return found.group(1)


def test_the_readme_example_runs(trained, tmp_path, monkeypatch):
    (tmp_path / "pair").symlink_to(trained)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(str(tmp_path / "merged")), lines
    ranks = [line.split()[0] for line in lines[1:4]]
    assert ranks == ["1", "2", "3"] and lines[1].endswith("kept"), lines
    assert sum(line.endswith(" ok") for line in lines) == 2, lines
    kept = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(kept) == 1 and kept[0].name == lines[1].split()[1]


def test_a_sweep_spec_is_what_the_command_line_builds(tmp_path):
    from gpumerge.cli import build_parser
    from gpumerge.spec import SweepSpec

    argv = ["--model_path1", "a", "--model_path2", "b", "--output_dir", str(tmp_path), "--grid", "gradient_end=0:1:3",
            "--dtype", "bfloat16", "--eval-text", "t.txt", "--keep", "2", "--no-baselines"]
    from_cli = SweepSpec.from_flags(vars(build_parser("sweep").parse_args(argv)))
    by_hand = SweepSpec(model_path1="a", model_path2="b", output_dir=str(tmp_path), grid=["gradient_end=0:1:3"],
                        shared={"dtype": "bfloat16"}, eval_text=["t.txt"], keep="2", baselines=False, quiet=False)
    assert from_cli == by_hand


def test_a_sweep_spec_refuses_what_is_no_shared_setting():
    from gpumerge.errors import SpecError
    from gpumerge.spec import SweepSpec

    with pytest.raises(SpecError, match="output_model_path is not a merge setting a sweep's variants share"):
        SweepSpec(model_path1="a", model_path2="b", output_dir="r", shared={"output_model_path": "x"})


def test_import_gpumerge_is_cheap():
    import subprocess
    import sys

    code = "import sys, gpumerge; print(sorted(m for m in sys.modules if m.startswith(('gpumerge', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "['gpumerge']"


def test_verify_is_the_function_whatever_was_imported_before(tmp_path):
    """Importing the submodule gpumerge.verify (the command line does) sets the package's attribute of that name to
    the module; the exported name still verifies."""
    import subprocess
    import sys

    from conftest import source_env

    code = ("import gpumerge.verify, gpumerge.cli\n"
            "from gpumerge import verify\n"
            "import sys\n"
            "reports = verify(sys.argv[1])\n"
            "print(type(reports).__name__, len(reports), reports[0].problems)\n")
    out = tmp_path / "demo" / "merged"
    done = subprocess.run([sys.executable, "-m", "gpumerge", "demo", "--workdir", str(tmp_path / "demo"), "--quiet"],
                          capture_output=True, text=True, env=source_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=source_env(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["list", "1", "[]"], done.stdout
    (out / "model-00001-of-00002.safetensors").open("r+b").write(b"\xff" * 8)  # the header's length: corrupt
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=source_env(),
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split()[:2] == ["list", "1"] and "[]" not in done.stdout
