"""Pure schedule functions: tensor name -> layer index; layer -> blend weight ``t`` (share of model 2).

No torch, no I/O. ``None`` as a weight means "copy model 1".
"""

from __future__ import annotations

import math
import re

from gpumerge.errors import SpecError

# Numbered decoder-block containers of the usual causal-LM families, anchored at the start of the name:
# Llama/Mistral/Qwen (model.layers), GPT-2/Falcon/Bloom (transformer.h, h), GPT-NeoX/Pythia (gpt_neox.layers),
# OPT (model.decoder.layers), and bare `layers.` for checkpoints saved without the `model.` prefix.
_BLOCK_RE = re.compile(
    r"^(?:model\.layers|transformer\.h|transformer\.layers|gpt_neox\.layers|model\.decoder\.layers"
    r"|decoder\.layers|layers|h)\.(\d+)\."
)

# Rotary caches some old checkpoints store inside blocks; they were buffers, not parameters, in the original
# (which blends `layer.parameters()` only), so they are model 1's.
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def layer_index(name: str) -> int | None:
    """The decoder block a tensor belongs to, or None for embeddings, final norm, lm_head, ..."""
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def is_block_buffer(name: str) -> bool:
    return name.endswith(_BUFFER_SUFFIXES)


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``numpy.linspace(start, stop, num)`` with numpy's exact float64 arithmetic (endpoint included)."""
    if num <= 0:
        return []
    if num == 1:
        return [float(start)]
    div = num - 1
    delta = stop - start
    step = delta / div
    if step == 0:  # numpy's branch for a zero step: scale by delta after dividing
        values = [(i / div) * delta + start for i in range(num)]
    else:
        values = [i * step + start for i in range(num)]
    values[-1] = float(stop)
    return values


def resolve_window(layer_start: int, layer_end: int, num_layers: int) -> range:
    """Blocks blended: layer_start <= i < min(layer_end, L). An empty or negative window is an error naming L."""
    end = min(layer_end, num_layers)
    if layer_start < 0:
        raise SpecError(
            f"--layer_start {layer_start} is negative; blocks are numbered 0..{num_layers - 1} "
            f"(model 1 has {num_layers} decoder blocks)"
        )
    if layer_start >= end:
        raise SpecError(
            f"the layer window --layer_start {layer_start} --layer_end {layer_end} selects no block: model 1 has "
            f"{num_layers} decoder blocks (0..{num_layers - 1}) and the window is layer_start <= i < "
            f"min(layer_end, {num_layers}); pick layer_start < {end}" if end > 0 else
            f"the layer window --layer_start {layer_start} --layer_end {layer_end} selects no block: model 1 has "
            f"{num_layers} decoder blocks (0..{num_layers - 1}); --layer_end must be more than --layer_start"
        )
    return range(layer_start, end)


def gradient_weights(gradient_start: float, gradient_end: float, window: range) -> dict[int, float]:
    """BlockMerge_Gradient: block i gets linspace(start, end, n)[i - layer_start], n = len(window)."""
    values = linspace(gradient_start, gradient_end, len(window))
    return dict(zip(window, values))


def tensor_weight(name: str, layer_t: dict[int, float]) -> float | None:
    """Blend weight of one tensor under a per-layer schedule, or None to copy model 1's."""
    layer = layer_index(name)
    if layer is None or layer not in layer_t or is_block_buffer(name):
        return None
    return layer_t[layer]


# ---- BlockMerge_Gradient "Tensors" and YAML editions: t over tensor positions -------------------------------------

def tensors_edition(values: tuple[float, ...] | list[float], count: int) -> list[float]:
    """The original's arithmetic: sections = len(values) - 1; per_section = count // sections; each section is
    numpy.linspace(v[i], v[i+1], per_section) with both ends; the remainder is filled with the last value. A single
    value is constant over all tensors."""
    if count <= 0:
        return []
    if len(values) == 1:
        return [float(values[0])] * count
    sections = len(values) - 1
    per_section = count // sections
    out: list[float] = []
    for i in range(sections):
        out += linspace(values[i], values[i + 1], per_section)
    out += [float(values[-1])] * (count - len(out))
    return out


def select(names: list[str], *, layer_only: bool = False, no_layers: bool = False,
           substring: str | None = None) -> list[str]:
    """The original's filters, in its order: names containing "layer"; or without it; then containing SUBSTRING."""
    if layer_only and no_layers:
        raise SpecError("layer_only and no_layers together select nothing; use one of them")
    if layer_only:
        names = [n for n in names if "layer" in n]
    if no_layers:
        names = [n for n in names if "layer" not in n]
    if substring is not None:
        names = [n for n in names if substring in n]
    return names


def compose(weights: list[float]) -> float:
    """Blending again and again: lerp(lerp(A, B, t1), B, t2) = lerp(A, B, 1 - (1 - t1)(1 - t2))."""
    if len(weights) == 1:
        return weights[0]
    keep = 1.0
    for t in weights:
        keep *= 1.0 - t
    return 1.0 - keep


def operations_weights(order: list[str], operations, *, tied: dict[str, str] | None = None) -> dict[str, float]:
    """t per name after every operation (each one counts positions over its own selection), composed.

    ``tied`` maps a name the architecture lists but the file does not store (a tied lm_head.weight) to the stored
    name it shares. The original blends the state_dict entries and loads them in order into the one shared
    tensor: lm_head's blend is loaded last and wins when lm_head is selected; otherwise the embedding's blend
    stays (lm_head's entry is a view of the same, already updated, storage). So per operation the stored tensor
    takes lm_head's t, else its own, and the operations compose as usual."""
    applied: dict[str, list[float]] = {}
    for op in operations:
        chosen = select(order, layer_only=op.layer_only, no_layers=op.no_layers, substring=op.filter)
        if not chosen:
            what = f"operation {op.label!r}" if op.label else "gradient_values"
            raise SpecError(f"{what}: the selection (layer_only={op.layer_only}, no_layers={op.no_layers}, "
                            f"filter={op.filter!r}) matches no tensor of model 1")
        assigned = dict(zip(chosen, tensors_edition(op.gradient_values, len(chosen))))
        for absent, stored in (tied or {}).items():
            if absent in assigned:
                assigned[stored] = assigned.pop(absent)
        for name, t in assigned.items():
            applied.setdefault(name, []).append(t)
    return {name: compose(ts) for name, ts in applied.items()}


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: layers.2 < layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- mergekit-style gradients: anchors over a layer position in [0, 1] -----------------------------------------

def interpolate(anchors: tuple[float, ...] | list[float], x: float) -> float:
    """mergekit 0.1.5's evaluate_setting for a list of numbers: piecewise-linear anchors at x in [0, 1]."""
    if len(anchors) == 1:
        return float(anchors[0])
    scaled = x * (len(anchors) - 1)
    i0 = int(math.floor(scaled))
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def layer_gradient_weights(names: list[str], modules, num_layers: int) -> dict[str, float]:
    """Per-module layer gradients: the first module key (other than "default") contained in a block tensor's name
    picks its anchors, else "default"; t at layer i = anchors at i / (L - 1) (0 when L = 1). Tensors outside the
    blocks (embeddings, final norm, lm_head) are model 1's."""
    default = dict(modules).get("default")
    out: dict[str, float] = {}
    for name in names:
        layer = layer_index(name)
        if layer is None or is_block_buffer(name):
            continue
        anchors = next((a for key, a in modules if key != "default" and key in name), default)
        if anchors is None:
            continue
        out[name] = interpolate(anchors, layer / (num_layers - 1) if num_layers > 1 else 0.0)
    return out
