"""The import contract: gpumerge's modules stand in layers and import only from their own layer or those below it,
with no circle; nothing imports the command line; no module imports another module's private name. Read from the
code itself (every import statement, at module level and inside functions), so a new upward import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# Lowest first. The order is the README's (Layout); change both together, for a reason.
LAYERS = (
    ("errors", "fsutil", "signals", "about", "digests", "kernels"),
    ("spec", "schedule", "rules", "space"),
    ("headers", "checkpoint", "architecture", "mergekit", "recipes", "devices", "distributed"),
    ("plan", "outdir", "settings", "placement"),
    ("lanes", "pipeline", "copier", "writer"),
    ("merge", "evaluate", "scorers", "results", "sweep_eval", "runs", "sweep"),
    ("verify", "report", "demo", "search"),
    ("cli", "__main__"),
)
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def sources() -> dict[str, Path]:
    found = {p.stem: p for p in sorted((REPO / "gpumerge").glob("*.py")) if p.stem != "__init__"}
    found.update({f"kernels.{p.stem}": p for p in sorted((REPO / "kernels").glob("*.py"))})
    return found


def module_of(name: str) -> str:
    return "kernels" if name.startswith("kernels.") else name


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(gpumerge module imported, name taken from it or None, line) for every import statement in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpumerge":
            parts = node.module.split(".")
            if len(parts) == 1:  # from gpumerge import fsutil
                found += [(alias.name, None, node.lineno) for alias in node.names]
            else:
                found += [(parts[1], alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], None, node.lineno) for alias in node.names
                      if alias.name.startswith("gpumerge.")]
    return found


def violations(files: dict[str, Path]) -> list[str]:
    problems = []
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = module_of(name)
        if here not in LAYER:
            problems.append(f"{path.name} is in no layer: add it to LAYERS (and the README's Layout)")
            continue
        for target, taken, line in imports(path):
            if target == here:
                continue
            where = f"{path.parent.name}/{path.name}:{line}"
            if target not in LAYER:
                problems.append(f"{where} imports gpumerge.{target}, which is in no layer")
                continue
            if target == "cli" and here != "__main__":
                problems.append(f"{where} imports the command line (gpumerge.cli): only __main__ may")
            if LAYER[target] > LAYER[here]:
                problems.append(f"{where}: {here} (layer {LAYER[here] + 1}) imports {target} (layer "
                                f"{LAYER[target] + 1}), a higher layer")
            if taken is not None and taken.startswith("_") and not taken.startswith("__"):
                problems.append(f"{where} imports {target}.{taken}, a private name")
            graph.setdefault(here, set()).add(target)
    problems += [f"an import circle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_goes_down_the_layers():
    assert violations(sources()) == []


@pytest.mark.parametrize("line, needle", [
    ("from gpumerge.cli import build_parser", "imports the command line"),
    ("from gpumerge.verify import verify", "a higher layer"),
    ("from gpumerge.merge import _private", "a private name"),
    ("import gpumerge.sweep", "a higher layer"),
])
def test_the_contract_fails_on_an_upward_import(line, needle, tmp_path):
    """The check can fail: writer.py with one bad import added is reported."""
    bad = tmp_path / "writer.py"
    bad.write_text((REPO / "gpumerge" / "writer.py").read_text() + f"\n\ndef _added():\n    {line}\n")
    files = {**sources(), "writer": bad}
    problems = [p for p in violations(files) if needle in p]
    assert problems, violations(files)


def test_a_circle_within_a_layer_is_reported():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
