"""Pure schedule functions: tensor name -> layer index; layer -> blend weight ``t`` (share of model 2).

No torch, no I/O. ``None`` as a weight means "copy model 1".
"""

from __future__ import annotations

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
