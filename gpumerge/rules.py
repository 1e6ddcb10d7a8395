"""Rules: what a recipe does to each stored tensor of model 1 (t, method, coefficients), as pure data.

The data flows spec -> schedule/rules -> plan -> pipeline -> writer. A merge is one rule set over model 1's tensors;
a sweep is many rule sets over one layout (gpumerge.sweep). The schedules (gpumerge.schedule) give the weights; this
module turns a spec's recipe into rules, checks them, and says when two rule sets are the same merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from gpumerge import schedule
from gpumerge.errors import IncompatibleCheckpointsError, SpecError
from gpumerge.spec import LayerGradientsRecipe, MergeSpec, OperationsRecipe

# torch.finfo(torch.float32).max: the blend computes in float32 (or narrower), so every t and coefficient must fit.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True, slots=True)
class Rule:
    """How one selected tensor is blended: t = share of model 2; ``coef`` (a, b) makes it out = a*A + b*B;
    ``load_dtype`` rounds the inputs first and ``round_via`` the result before the output dtype (mergekit)."""

    t: float
    method: str = "lerp"  # lerp | slerp | linear
    coef: tuple[float, float] | None = None
    load_dtype: str | None = None
    round_via: str | None = None



def selection(a, spec: MergeSpec, num_layers: int | None, *, order: list[str] | None = None,
              tied: Mapping[str, str] | None = None, dtype_b: str = "F16",
              out_dtype: str = "F16") -> tuple[dict[str, Rule], dict[int, float], range | None]:
    """The recipe as rules per stored tensor of model 1 (absent = model 1's), with per-layer t and the window
    for the BlockMerge gradient."""
    recipe = spec.recipe
    names = list(a.tensors)
    layer_t: dict[int, float] = {}
    window = None
    if recipe is None or isinstance(recipe, LayerGradientsRecipe):
        if num_layers is None:
            raise IncompatibleCheckpointsError(
                f"{a.label} {a.root}: config.json has no layer count (num_hidden_layers or n_layer); "
                "cannot place the layer window")
    if recipe is None:
        window = schedule.resolve_window(spec.layer_start, spec.layer_end, num_layers)
        layer_t = schedule.gradient_weights(spec.gradient_start, spec.gradient_end, window)
        weights = {n: t for n in names if (t := schedule.tensor_weight(n, layer_t)) is not None}
    elif isinstance(recipe, LayerGradientsRecipe):
        weights = schedule.layer_gradient_weights(names, recipe.modules, num_layers)
    elif isinstance(recipe, OperationsRecipe):
        order = list(order) if order is not None else sorted(names, key=schedule.natural_key)
        tied = {k: v for k, v in (tied or {}).items() if k not in a.tensors and v in a.tensors}
        weights = schedule.operations_weights(order, recipe.operations, tied=tied)
        weights = {n: t for n, t in weights.items() if n in a.tensors}
    elif hasattr(recipe, "rules"):  # a mergekit config
        return recipe.rules(a, num_layers, dtype_b=dtype_b, out_dtype=out_dtype), {}, None
    else:
        raise SpecError(f"unknown recipe {recipe!r}")
    return {n: Rule(t, method=spec.method) for n, t in weights.items()}, layer_t, window


def check_blend_weights(rules: Mapping[str, Rule]) -> None:
    """Every t and coefficient is a finite float32: the blend hands them to torch as float32 (or narrower), where
    1e39 is inf and the merge would fail after its first byte (or write inf/NaN)."""
    problems = []
    for name, rule in rules.items():
        values = [("t", rule.t)] + [(f"coefficient of model {i + 1}", c) for i, c in enumerate(rule.coef or ())]
        problems += [f"{name} {what}={value!r}" for what, value in values if not abs(value) <= FLOAT32_MAX]
    if problems:
        raise SpecError(
            f"the recipe gives {len(problems)} blend weight(s) that are not finite float32 numbers: "
            + "; ".join(problems[:4]) + (f"; ... and {len(problems) - 4} more" if len(problems) > 4 else "")
            + f"; every t and coefficient must be finite with |value| <= {FLOAT32_MAX!r} (float32's largest), as "
            "the blend computes in float32: use smaller gradient values or weights")
