"""Model 1's tensor order for the recipes that count positions (--gradient_values, YAML operations), and its tied
names, without weights.

The original counted positions over ``model.state_dict()``: "architecture" rebuilds that order on the meta device
with transformers (imported here and nowhere on the plain merge path). "names" is a natural sort of the stored
names, for architectures transformers does not know; it is used only when asked for (``--tensor_order names``),
never as a silent fallback, because another order moves every ``t`` and gives other bytes.
"""

from __future__ import annotations

from pathlib import Path

from gpumerge.errors import SpecError, brief
from gpumerge.schedule import is_block_buffer, natural_key

Order = tuple[list[str], dict[str, str]]  # (names in order, {absent tied name: stored name})


def tensor_order(a, how: str) -> Order:
    """Model 1's (``a``, a Checkpoint) order ``how`` ("architecture" or "names"), or a SpecError that says why it
    cannot be had."""
    if how == "names":
        return names_order(list(a.tensors), a.config)
    return canonical_order(a.root, list(a.tensors))


def canonical_order(model_dir: Path, stored: list[str]) -> Order:
    """Names in the architecture's state_dict order (built on the meta device with accelerate.init_empty_weights:
    no memory used) and {absent tied name: stored name}; a SpecError when transformers cannot build the
    architecture or its names are not the stored ones."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # transformers 5 ties only when asked, and not inside init_empty_weights
        order = list(model.state_dict().keys())
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
    except Exception as exc:  # unknown architecture, a broken transformers install, remote code: the user decides
        raise _unavailable(f"transformers cannot build its architecture ({type(exc).__name__}: "
                           f"{brief(exc, limit=160)})") from None
    # Rotary caches old checkpoints store (rotary_emb.inv_freq) are non-persistent buffers today: not positions,
    # and copied from model 1; any other stored name the architecture lacks means it is not this architecture.
    missing = [name for name in stored if name not in order and not is_block_buffer(name)]
    if missing:
        raise _unavailable(f"{len(missing)} stored tensor(s) are not in the architecture's state_dict (e.g. "
                           f"{missing[0]})")
    tied = {}
    for names in groups.values():
        kept = [n for n in names if n in stored]
        for name in names:
            if name not in stored and kept:
                tied[name] = kept[0]
    return order, tied


def _unavailable(why: str) -> SpecError:
    return SpecError(f"the recipe counts tensor positions in model 1's architecture order, which cannot be had "
                     f"here: {why}. Fix that, or pass --tensor_order names (tensor_order: names in a recipe) to "
                     "count over a natural sort of the tensor names instead, which gives other bytes")


def names_order(stored: list[str], config: dict) -> Order:
    """A natural sort of the stored names (layer numbers numeric), with a tied lm_head inferred from the config."""
    order = sorted(stored, key=natural_key)
    tied = {}
    if config.get("tie_word_embeddings", True) and "lm_head.weight" not in stored:
        embed = next((n for n in order if n.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))),
                     None)
        if embed is not None:
            order.append("lm_head.weight")
            tied["lm_head.weight"] = embed
    return order, tied
