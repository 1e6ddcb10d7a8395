"""Model 1's canonical tensor order (its architecture's state_dict order) and its tied names, without weights.

Only position-based recipes (--gradient_values, YAML operations) need this, as the original counted positions
over ``model.state_dict()``. transformers is imported here and nowhere on the plain merge path.
"""

from __future__ import annotations

from pathlib import Path

from gpumerge.schedule import is_block_buffer, natural_key


def canonical_order(model_dir: Path, stored: list[str]) -> tuple[list[str], dict[str, str], str | None]:
    """(names in state_dict order, {absent tied name: stored name}, a notice when falling back to a natural sort).

    The architecture is built on the meta device (accelerate.init_empty_weights), so no memory is used. When
    transformers does not know the architecture, or its names are not the stored ones, the stored names are
    sorted naturally (layer numbers numeric) and a tied lm_head is inferred from the config.
    """
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
    except Exception as exc:  # unknown architecture, missing transformers, remote code: fall back, say so
        return _fallback(model_dir, stored, f"transformers cannot build this architecture ({type(exc).__name__})")
    # Rotary caches old checkpoints store (rotary_emb.inv_freq) are non-persistent buffers today: not positions,
    # and copied from model 1; any other stored name the architecture lacks means it is not this architecture.
    missing = [name for name in stored if name not in order and not is_block_buffer(name)]
    if missing:
        return _fallback(model_dir, stored, f"{len(missing)} stored tensor(s) are not in the architecture's "
                                            f"state_dict (e.g. {missing[0]})")
    tied = {}
    for names in groups.values():
        kept = [n for n in names if n in stored]
        for name in names:
            if name not in stored and kept:
                tied[name] = kept[0]
    return order, tied, None


def _fallback(model_dir: Path, stored: list[str], why: str) -> tuple[list[str], dict[str, str], str]:
    import json

    order = sorted(stored, key=natural_key)
    tied = {}
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("tie_word_embeddings", True) and "lm_head.weight" not in stored:
        embed = next((n for n in order if n.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))),
                     None)
        if embed is not None:
            order.append("lm_head.weight")
            tied["lm_head.weight"] = embed
    return order, tied, f"{why}; counting positions over a natural sort of the names instead"
