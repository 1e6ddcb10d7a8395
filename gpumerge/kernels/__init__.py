"""gpumerge.kernels from a plain source tree: the blend math lives in the repository's top-level ``kernels/`` folder
(the design card's layout). An installed gpumerge maps that folder to this package (pyproject's package-dir), so this
file is not installed; run from a checkout (``PYTHONPATH=.``, ``python -m pytest``, ``python -m gpumerge``, a
benchmark script) it adds the folder to the package's path, and ``import gpumerge.kernels.lerp`` finds it there.
"""

from pathlib import Path as _Path

_TOP = _Path(__file__).resolve().parents[2] / "kernels"
if _TOP.is_dir() and str(_TOP) not in __path__:
    __path__.append(str(_TOP))
