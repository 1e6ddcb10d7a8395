"""The package's version, where every layer can reach it (records and sweep records carry it)."""

from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path


def version() -> str:
    """The installed version; from a plain source tree, pyproject's version marked ``+source``."""
    try:
        return importlib_metadata.version("gpumerge")
    except importlib_metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"] + "+source"
    except Exception:  # Python 3.10 (no tomllib), or no pyproject beside the package
        return "0+unknown"
