"""A search's space (`gpumerge sweep --search optuna --space SPEC ...`): each SPEC one searched setting and its range.

    KEY=LOW:HIGH        a float in [LOW, HIGH]
    KEY=LOW:HIGH:int    an integer in [LOW, HIGH]
    KEY=LOW:HIGH:log    a float in [LOW, HIGH], sampled on a log scale (LOW > 0)
    KEY=A|B|C           one of the listed values

KEY is a setting a sweep can vary (gradient_start, gradient_end: floats; layer_start, layer_end: integers; method:
lerp|slerp) or an anchor of a per-module layer gradient, ``layer_gradients.MODULE.K``: anchor K of MODULE's gradient
over the blocks (as a recipe's ``layer_gradients: {MODULE: [a0, a1, ...]}``; anchors 0..K-1 must all be searched).
Pure parsing: what is ambiguous or out of range is one SpecError, before any work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gpumerge.errors import SpecError
from gpumerge.spec import shown

# key -> (kind, what its values may be)
SEARCH_KEYS = {"gradient_start": "float", "gradient_end": "float", "layer_start": "int", "layer_end": "int",
               "method": "choice"}
CHOICES = {"method": ("lerp", "slerp")}
_ANCHOR_RE = re.compile(r"^layer_gradients\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*?)\.(\d+)$")
MAX_ANCHORS = 64
MAX_DIMENSIONS = 256
_SEARCH_FLAGS = ("trials", "space", "sampler", "seed", "scorers")


@dataclass(frozen=True, slots=True)
class Dimension:
    """One searched setting: a float or integer range (``log``: sampled on a log scale) or a list of choices."""

    key: str
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def anchor(self) -> tuple[str, int] | None:
        """(module, index) for a per-module layer-gradient anchor, else None."""
        found = _ANCHOR_RE.match(self.key)
        return (found.group(1), int(found.group(2))) if found else None

    def describe(self) -> dict:
        """The dimension as the sweep's record keeps it (its identity: a changed range is another search)."""
        if self.kind == "choice":
            return {"key": self.key, "choices": list(self.choices)}
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high, "log": self.log}


def check_search_flags(spec) -> None:
    """The search's own flags mean nothing without --search: refused, never silently ignored."""
    if spec.search is None:
        given = [flag for flag in _SEARCH_FLAGS if getattr(spec, flag) not in (None, ())]
        if given:
            raise SpecError(f"--{given[0]} sets a search; give --search optuna too (a grid sweep takes --grid)")


def parse_space(texts) -> tuple[Dimension, ...]:
    """Every --space SPEC parsed and the whole checked: each key once, anchors 0..K-1 of each module all given,
    no gradient key beside layer_gradients anchors (they set the same thing)."""
    if not texts:
        raise SpecError("--search needs at least one --space KEY=LOW:HIGH (e.g. --space gradient_end=0:1)")
    if len(texts) > MAX_DIMENSIONS:
        raise SpecError(f"--space is given {len(texts)} times; at most {MAX_DIMENSIONS} settings can be searched")
    dims = [parse_dimension(text) for text in texts]
    seen: set[str] = set()
    for dim in dims:
        if dim.key in seen:
            raise SpecError(f"--space {dim.key} is given twice; give each searched setting once")
        seen.add(dim.key)
    anchors: dict[str, list[int]] = {}
    for dim in dims:
        if dim.anchor:
            anchors.setdefault(dim.anchor[0], []).append(dim.anchor[1])
    for module, found in anchors.items():
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:
            raise SpecError(f"--space layer_gradients.{module}: anchors {', '.join(map(str, sorted(found)))} are "
                            f"searched but not {', '.join(map(str, missing))}; a gradient's anchors are 0..K-1, "
                            f"all of them (e.g. --space layer_gradients.{module}.{missing[0]}=0:1)")
    if anchors:
        both = [key for key in ("gradient_start", "gradient_end") if key in seen]
        if both:
            raise SpecError(f"--space {both[0]} and --space layer_gradients.* both set the blocks' gradient; search "
                            "one or the other")
    return tuple(dims)


def parse_dimension(text: str) -> Dimension:
    key, sep, spec = str(text).partition("=")
    key = key.strip().lstrip("-").replace("-", "_") if not key.strip().startswith("layer_gradients.") else key.strip()
    what = f"--space {shown(text, limit=60)}"
    if not sep or not spec.strip():
        raise SpecError(f"{what}: give KEY=LOW:HIGH, KEY=LOW:HIGH:int, KEY=LOW:HIGH:log or KEY=A|B|C "
                        "(e.g. --space gradient_end=0:1)")
    spec = spec.strip()
    anchor = _ANCHOR_RE.match(key)
    if anchor:
        if int(anchor.group(2)) >= MAX_ANCHORS:
            raise SpecError(f"{what}: anchor {anchor.group(2)} is beyond the {MAX_ANCHORS} a gradient may have")
        kind = "float"
    elif key.startswith("layer_gradients"):
        raise SpecError(f"{what}: a per-module anchor is layer_gradients.MODULE.K (MODULE a part of the tensor "
                        "names such as self_attn or mlp, K the anchor's index from 0)")
    elif key not in SEARCH_KEYS:
        raise SpecError(f"{what}: {shown(key, limit=40)} cannot be searched; use {', '.join(SEARCH_KEYS)} or "
                        "layer_gradients.MODULE.K")
    else:
        kind = SEARCH_KEYS[key]
    if "|" in spec:
        choices = tuple(part.strip() for part in spec.split("|"))
        allowed = CHOICES.get(key)
        if allowed is None:
            raise SpecError(f"{what}: {key} takes a range LOW:HIGH, not a list of choices")
        bad = [c for c in choices if c not in allowed]
        if bad or len(set(choices)) != len(choices):
            raise SpecError(f"{what}: the choices must be distinct values of {', '.join(allowed)}"
                            + (f"; {shown(bad[0], limit=20)} is not one" if bad else ""))
        return Dimension(key, "choice", choices=choices)
    if kind == "choice":
        raise SpecError(f"{what}: {key} takes choices such as {'|'.join(CHOICES[key])}")
    parts = [part.strip() for part in spec.split(":")]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("int", "log")):
        raise SpecError(f"{what}: a range is LOW:HIGH, LOW:HIGH:int or LOW:HIGH:log")
    scale = parts[2] if len(parts) == 3 else None
    if scale == "int" or kind == "int":
        if scale == "log":
            raise SpecError(f"{what}: {key} is an integer; its range is LOW:HIGH or LOW:HIGH:int")
        if anchor or key in ("gradient_start", "gradient_end"):
            if scale == "int":
                raise SpecError(f"{what}: {key} is a share of model 2 (a float); give LOW:HIGH or LOW:HIGH:log")
        low, high = (_integer(part, what) for part in parts[:2])
        if low < 0:
            raise SpecError(f"{what}: a block index is 0 or more")
        kind = "int"
    else:
        low, high = (_number(part, what) for part in parts[:2])
    if not low < high:
        raise SpecError(f"{what}: LOW must be below HIGH")
    if scale == "log" and low <= 0:
        raise SpecError(f"{what}: a log scale needs LOW > 0")
    return Dimension(key, kind, low, high, log=scale == "log")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{what}: {shown(text, limit=20)} is not a number") from None
    if not math.isfinite(value):
        raise SpecError(f"{what}: {shown(text, limit=20)} is not a finite number")
    return value


def _integer(text: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?\d{1,9}", text):
        raise SpecError(f"{what}: {shown(text, limit=20)} is not an integer")
    return int(text)


def trial_settings(dims: tuple[Dimension, ...], params: dict) -> tuple[dict, dict | None]:
    """A trial's parameters as merge flags ({flag: value}) and, when anchors are searched, the recipe they make
    ({"layer_gradients": {MODULE: [a0, ...]}}), else None."""
    flags = {dim.key: params[dim.key] for dim in dims if not dim.anchor}
    modules: dict[str, dict[int, float]] = {}
    for dim in dims:
        if dim.anchor:
            modules.setdefault(dim.anchor[0], {})[dim.anchor[1]] = params[dim.key]
    recipe = ({"layer_gradients": {module: [values[k] for k in sorted(values)] for module, values in modules.items()}}
              if modules else None)
    return flags, recipe
