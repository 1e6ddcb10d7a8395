"""gpumerge: fast, exact, streaming gradient merges of two language-model checkpoints.

The Python API the command line wraps (see the README's "Python API")::

    from gpumerge import MergeSpec, SweepSpec, run_merge, run_sweep, run_search, verify

Names are imported on first use, so that `import gpumerge` (and the command line's start) stays cheap.
"""

__all__ = ["MergeSpec", "SweepSpec", "run_merge", "run_sweep", "run_search", "verify", "version"]

_WHERE = {"MergeSpec": "gpumerge.spec", "SweepSpec": "gpumerge.spec", "run_merge": "gpumerge.merge",
          "run_sweep": "gpumerge.sweep", "run_search": "gpumerge.search", "verify": "gpumerge.verify",
          "version": "gpumerge.about"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpumerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
