"""place_by_layer with made-up budgets for 1, 2 and 8 GPUs (no GPU needed), the units of a checkpoint's tensors, the
GPUs each process owns, and a device map accelerate accepts for a real (empty) Llama."""

from __future__ import annotations

import pytest

from gpumerge.errors import SpecError
from gpumerge.placement import ADVICE, place_by_layer, process_gpu_groups, unit_of, units_of

GiB = 2**30


def llama_tensors(layers: int, hidden: int, inner: int, vocab: int, kv: int, itemsize: int = 2) -> dict[str, int]:
    """Bytes of each tensor of a Llama checkpoint, in safetensors' sorted order (lm_head before model.*)."""
    block = {"self_attn.q_proj.weight": hidden * hidden, "self_attn.k_proj.weight": kv * hidden,
             "self_attn.v_proj.weight": kv * hidden, "self_attn.o_proj.weight": hidden * hidden,
             "mlp.gate_proj.weight": inner * hidden, "mlp.up_proj.weight": inner * hidden,
             "mlp.down_proj.weight": hidden * inner, "input_layernorm.weight": hidden,
             "post_attention_layernorm.weight": hidden}
    tensors = {"lm_head.weight": vocab * hidden, "model.embed_tokens.weight": vocab * hidden}
    for i in range(layers):
        tensors.update({f"model.layers.{i}.{name}": n for name, n in block.items()})
    tensors["model.norm.weight"] = hidden
    return dict(sorted((name, n * itemsize) for name, n in tensors.items()))


# A Llama-3-70B-shaped pair in bf16: a block is 1,711,308,800 bytes live, 3x resident with its A and B inputs.
BIG = llama_tensors(80, 8192, 28672, 128256, 1024)
BLOCK, EMBED = 3 * 1_711_308_800, 3 * 128256 * 8192 * 2


def blocks(n: int, nbytes: int) -> list[tuple[str, int]]:
    return [(f"model.layers.{i}", nbytes) for i in range(n)]


def toy(n: int, *, block: int = 10 * GiB, embed: int = 3 * GiB) -> list[tuple[str, int]]:
    return [("model.embed_tokens", embed), ("model.rotary_emb", 0), *blocks(n, block), ("model.norm", 1024),
            ("lm_head", embed)]


def test_unit_of_names_the_block_or_the_module():
    assert unit_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert unit_of("model.layers.3.self_attn.rotary_emb.inv_freq") == "model.layers.3"
    assert unit_of("transformer.h.7.attn.c_attn.weight") == "transformer.h.7"
    assert unit_of("h.2.ln_1.weight") == "h.2"
    assert unit_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert unit_of("lm_head.weight") == "lm_head"
    assert unit_of("model.norm.weight") == "model.norm"
    assert unit_of("bias") == "bias"


def test_units_in_model_order_with_three_copies_of_what_is_blended():
    tensors = llama_tensors(12, 8, 16, 32, 8, itemsize=4)  # 12 blocks: sorted order puts layers.10 before layers.2
    block = (4 * 64 + 3 * 128 + 2 * 8) * 4
    units = units_of(tensors)
    assert [name for name, _ in units] == (["model.embed_tokens"] + [f"model.layers.{i}" for i in range(12)]
                                           + ["model.norm", "lm_head"])
    assert units == [("model.embed_tokens", 3 * 32 * 8 * 4), *blocks(12, 3 * block), ("model.norm", 3 * 32),
                     ("lm_head", 3 * 32 * 8 * 4)]
    only = {name for name in tensors if name.startswith("model.layers.")}  # embeddings, norm and head never blended
    assert units_of(tensors, only) == [("model.embed_tokens", 32 * 8 * 4), *blocks(12, 3 * block),
                                       ("model.norm", 32), ("lm_head", 32 * 8 * 4)]
    assert units_of(tensors, set())[1] == ("model.layers.0", block)


def test_units_of_gpt_neox_keep_its_head_last():
    tensors = {"embed_out.weight": 8, "gpt_neox.embed_in.weight": 8, "gpt_neox.final_layer_norm.weight": 2,
               "gpt_neox.layers.1.mlp.dense_h_to_4h.weight": 4, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": 4}
    assert units_of(tensors, set()) == [("gpt_neox.embed_in", 8), ("gpt_neox.layers.0", 4), ("gpt_neox.layers.1", 4),
                                        ("gpt_neox.final_layer_norm", 2), ("embed_out", 8)]


def test_a_small_pair_goes_all_to_the_first_gpu():
    units = toy(4)
    placement = place_by_layer(units, {"cuda:0": 80 * GiB}, forward_bytes=2 * GiB)
    assert placement.device_map == {name: "cuda:0" for name, _ in units}
    assert placement.used == {"cuda:0": 46 * GiB + 1024}
    assert placement.reserved_bytes == 2 * GiB
    assert placement.describe() == "cuda:0 embed_tokens, rotary_emb, layers 0-3, norm, lm_head (46.0 GiB)"


def test_a_pair_for_two_gpus_splits_by_layer_in_order():
    units = toy(12)  # 126 GiB: cuda:0 takes the embedding and 7 blocks (73 GiB of 76), cuda:1 the rest
    budgets = {"cuda:0": 80 * GiB, "cuda:1": 80 * GiB}
    placement = place_by_layer(units, budgets, forward_bytes=3 * GiB, reserve_bytes=GiB)
    first = ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(7)]
    assert placement.device_map == {**{name: "cuda:0" for name in first},
                                    **{f"model.layers.{i}": "cuda:1" for i in range(7, 12)},
                                    "model.norm": "cuda:1", "lm_head": "cuda:1"}
    assert placement.used == {"cuda:0": 73 * GiB, "cuda:1": 53 * GiB + 1024}
    assert all(placement.used[d] + placement.reserved_bytes <= budgets[d] for d in placement.used)
    # every tensor of a block, and so its A and B inputs, lives where its block lives
    assert placement.device_of("model.layers.6.mlp.up_proj.weight") == "cuda:0"
    assert placement.device_of("model.layers.7.self_attn.q_proj.weight") == "cuda:1"
    assert placement.describe() == ("cuda:0 embed_tokens, rotary_emb, layers 0-6 (73.0 GiB); "
                                    "cuda:1 layers 7-11, norm, lm_head (53.0 GiB)")


def test_budgets_keyed_as_accelerate_max_memory_are_sorted_by_index():
    units = toy(12)
    by_int = place_by_layer(units, {1: 80 * GiB, 0: 80 * GiB}, forward_bytes=4 * GiB)
    by_name = place_by_layer(units, {"cuda:0": 80 * GiB, "cuda:1": 80 * GiB}, forward_bytes=4 * GiB)
    assert by_int == by_name
    assert by_int.devices == ["cuda:0", "cuda:1"]


def test_a_70b_pair_fits_eight_gpus_of_80_gib():
    units = units_of(BIG)
    assert units[:2] == [("model.embed_tokens", EMBED), ("model.layers.0", BLOCK)]
    budgets = {f"cuda:{k}": 80 * GiB for k in range(8)}
    placement = place_by_layer(units, budgets, forward_bytes=4 * GiB)
    # 76 GiB per GPU holds the embedding and 14 blocks on cuda:0, then 15 blocks a GPU; cuda:5 ends with 74-79
    spans = [(0, 0, 14), (1, 14, 29), (2, 29, 44), (3, 44, 59), (4, 59, 74), (5, 74, 80)]
    expected = {"model.embed_tokens": "cuda:0"}
    for k, start, stop in spans:
        expected.update({f"model.layers.{i}": f"cuda:{k}" for i in range(start, stop)})
    expected.update({"model.norm": "cuda:5", "lm_head": "cuda:5"})
    assert placement.device_map == expected
    assert placement.used == {"cuda:0": EMBED + 14 * BLOCK, **{f"cuda:{k}": 15 * BLOCK for k in range(1, 5)},
                              "cuda:5": 6 * BLOCK + 3 * 8192 * 2 + EMBED}
    assert all(used + 4 * GiB <= 80 * GiB for used in placement.used.values())
    assert placement.describe() == ("cuda:0 embed_tokens, layers 0-13 (72.8 GiB); cuda:1 layers 14-28 (71.7 GiB); "
                                    "cuda:2 layers 29-43 (71.7 GiB); cuda:3 layers 44-58 (71.7 GiB); "
                                    "cuda:4 layers 59-73 (71.7 GiB); cuda:5 layers 74-79, norm, lm_head (34.6 GiB)")


def test_a_70b_pair_on_two_gpus_is_one_line_with_what_it_needs():
    with pytest.raises(SpecError) as caught:
        place_by_layer(units_of(BIG), {"cuda:0": 80 * GiB, "cuda:1": 80 * GiB}, forward_bytes=4 * GiB)
    assert str(caught.value) == (
        "the pair does not fit the GPUs of this process: the live model and the resident A and B inputs need "
        "394.2 GiB (+ 4.0 GiB per GPU for the forward pass and margin), and cuda:0..cuda:1 give 2 x 80.0 GiB; placed "
        f"whole and in order they need 6 GPUs of 80.0 GiB; {ADVICE}")
    assert "\n" not in str(caught.value)


def test_uneven_budgets_are_listed_each():
    with pytest.raises(SpecError, match=r"and cuda:2, cuda:5 give 40\.0 GiB \+ 20\.0 GiB; placed whole and in order "
                                        r"they need 3 GPUs of 40\.0 GiB;"):
        place_by_layer(toy(8), {5: 20 * GiB, 2: 40 * GiB})


def test_a_unit_bigger_than_any_gpu_is_named():
    units = [("model.embed_tokens", 2 * GiB), *blocks(3, 5 * GiB), ("model.layers.3", 9 * GiB), ("lm_head", 2 * GiB)]
    with pytest.raises(SpecError) as caught:
        place_by_layer(units, {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB}, forward_bytes=GiB)
    assert str(caught.value) == (
        "the pair does not fit the GPUs of this process: model.layers.3 (9.0 GiB) alone needs more than one GPU "
        "holds (cuda:0..cuda:1 give 2 x 8.0 GiB, less 1.0 GiB each for the forward pass and margin), and a unit (a "
        f"decoder block with its A and B inputs) is never split across GPUs; {ADVICE}")
    with pytest.raises(SpecError, match=r"^the pair does not fit the GPUs of this process: model\.layers\.0 \(5\.0 "
                                        r"GiB\), model\.layers\.1 \(5\.0 GiB\), model\.layers\.2 \(5\.0 GiB\), \.\.\. "
                                        r"\(4 in all\) alone each need more than one GPU holds \(cuda:0 gives 4\.0"):
        place_by_layer(units, {0: 4 * GiB})


def test_budgets_smaller_than_the_forward_pass_say_so():
    with pytest.raises(SpecError, match=r"cuda:0 gives 2\.0 GiB, no more than the 3\.0 GiB each GPU keeps for the "
                                        r"forward pass and margin;"):
        place_by_layer(toy(1), {0: 2 * GiB}, forward_bytes=2 * GiB, reserve_bytes=GiB)


def test_the_forward_pass_is_reserved_on_every_gpu_used():
    units = toy(6)  # 66 GiB: one 80 GiB GPU without a forward pass, two with 20 GiB for it
    assert place_by_layer(units, {0: 80 * GiB, 1: 80 * GiB}).devices == ["cuda:0"]
    placement = place_by_layer(units, {0: 80 * GiB, 1: 80 * GiB}, forward_bytes=16 * GiB, reserve_bytes=4 * GiB)
    assert placement.reserved_bytes == 20 * GiB
    assert placement.used == {"cuda:0": 53 * GiB, "cuda:1": 13 * GiB + 1024}  # the embedding and 5 blocks, 57 > 60
    assert placement.device_map["model.layers.4"] == "cuda:0" and placement.device_map["model.layers.5"] == "cuda:1"
    assert all(used + 20 * GiB <= 80 * GiB for used in placement.used.values())


def test_a_tied_head_lands_with_the_embedding_and_counts_once():
    units = toy(12)
    placement = place_by_layer(units, {0: 80 * GiB, 1: 80 * GiB}, forward_bytes=4 * GiB,
                               tied=[["model.embed_tokens", "lm_head"]])
    assert placement.device_map["lm_head"] == "cuda:0" == placement.device_map["model.embed_tokens"]
    assert placement.device_map["model.norm"] == "cuda:1"
    assert placement.used == {"cuda:0": 73 * GiB, "cuda:1": 50 * GiB + 1024}
    # a checkpoint that stores only the embedding: the head is no unit, and the map still names it
    placement = place_by_layer(units[:-1], {0: 80 * GiB, 1: 80 * GiB}, forward_bytes=4 * GiB,
                               tied=[["model.embed_tokens", "lm_head"]])
    assert placement.device_map["lm_head"] == "cuda:0"
    assert placement.describe() == ("cuda:0 embed_tokens, rotary_emb, layers 0-6, lm_head (73.0 GiB); "
                                    "cuda:1 layers 7-11, norm (50.0 GiB)")
    with pytest.raises(SpecError, match=r"^tied weights model\.wte, model\.head name no unit of the model to place$"):
        place_by_layer(units, {0: 80 * GiB}, tied=[["model.wte", "model.head"]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(budgets={}), "no GPU budget to place the pair on: this process owns no GPU"),
    (dict(budgets={"gpu0": GiB}), "a GPU budget's device must be cuda:K or K, got 'gpu0'"),
    (dict(budgets={"cpu": GiB}), "a GPU budget's device must be cuda:K or K, got 'cpu'"),
    (dict(budgets={0: -1}), "the budget of cuda:0 must be a whole number of bytes, got -1"),
    (dict(budgets={0: GiB, "cuda:0": GiB}), "the GPU budgets name cuda:0 twice"),
    (dict(budgets={0: GiB}, forward_bytes=1.5), "forward_bytes must be a whole number of bytes, got 1.5"),
    (dict(budgets={0: GiB}, units=[("lm_head", 1), ("lm_head", 1)]), "units named twice: lm_head"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    units = kwargs.pop("units", toy(1, block=1, embed=1))
    with pytest.raises(SpecError) as caught:
        place_by_layer(units, kwargs.pop("budgets"), **kwargs)
    assert str(caught.value) == message


def test_process_gpu_groups():
    assert [process_gpu_groups(8, 2, None, k) for k in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [process_gpu_groups(8, 4, 2, k) for k in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [process_gpu_groups(7, 2, None, k) for k in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert process_gpu_groups(2, 1, None, 0) == [0, 1]
    assert process_gpu_groups(8, 2, 1, 1) == [1]
    assert process_gpu_groups(0, 4, None, 3) == []


@pytest.mark.parametrize("args, message", [
    ((2, 4, None, 0), "4 processes on this machine need a GPU each, and 2 are visible (cuda:0..cuda:1); launch at "
                      "most 2 (accelerate launch --num_processes 2), or score on the CPU (--device cpu)"),
    ((8, 4, 4, 0), "--gpus-per-process 4 with 4 processes on this machine asks for 16 GPUs, and 8 are visible "
                   "(cuda:0..cuda:7); give --gpus-per-process 2, or launch at most 2 processes"),
    ((1, 1, 2, 0), "--gpus-per-process 2 asks for 2 GPUs per process, and 1 is visible (cuda:0); give 1 or fewer"),
    ((8, 2, 0, 0), "--gpus-per-process must be a whole number of 1 or more, got 0"),
    ((0, 1, 2, 0), "--gpus-per-process 2: no GPU is visible to this run; drop it to score on the CPU"),
    ((8, 2, None, 2), "process 2 of 2 on this machine: a local rank runs from 0 to the number of processes less one"),
])
def test_process_gpu_groups_refuses_in_one_line(args, message):
    with pytest.raises(SpecError) as caught:
        process_gpu_groups(*args)
    assert str(caught.value) == message


@pytest.mark.parametrize("tie", [False, True])
def test_accelerate_accepts_the_device_map(tie):
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from accelerate.utils import check_device_map

    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, vocab_size=128,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    with accelerate.init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    tensors = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    tensors.update({name: 0 for name, _ in model.named_buffers()})  # rotary caches: placed, not counted
    units = units_of(tensors)
    budget = units[0][1] + 2 * units[1][1]  # the embedding and 2 blocks on cuda:0, the rest on cuda:1
    placement = place_by_layer(units, {0: budget, 1: budget}, tied=[["model.embed_tokens", "lm_head"]] if tie else ())
    assert placement.devices == ["cuda:0", "cuda:1"]
    assert placement.device_map["model.layers.1"] == "cuda:0" and placement.device_map["model.layers.2"] == "cuda:1"
    assert placement.device_map["lm_head"] == ("cuda:0" if tie else "cuda:1")
    assert "lm_head" in placement.device_map
    check_device_map(model, placement.device_map)  # raises when a tensor of the model has no device
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers()]
    for name in names:
        keys = [key for key in placement.device_map if name.startswith(key + ".")]
        assert len(keys) == 1, (name, keys)
    modules = dict(model.named_modules())
    assert all(key in modules for key in placement.device_map)


def test_the_scoring_error_says_how_many_gpus_a_pair_would_take(monkeypatch):
    """The evaluated sweep's "does not fit" line on a GPU (sweep_eval.check_fits), with a made-up free memory: the
    placement counts the GPUs the model and its resident inputs would take, split by layer."""
    from gpumerge import sweep_eval
    from gpumerge.errors import OutputError

    gib = 2**30
    units = [("model.embed_tokens", 2 * gib)] + [(f"model.layers.{k}", 3 * gib) for k in range(10)] + [
        ("model.norm", 0), ("lm_head", 2 * gib)]  # 34 GiB resident in all, 3 GiB a block
    monkeypatch.setattr(sweep_eval, "_free_bytes", lambda device, free=None: 10 * gib if free is None else free)
    with pytest.raises(OutputError) as caught:
        sweep_eval.check_fits("cuda:0", 12 * gib, reserve=gib, units=units)
    message = str(caught.value)
    assert "\n" not in message and "on cuda:0, and 10.00 GiB are available" in message
    # 9 GiB usable a GPU (1 GiB kept for the forward pass): embed+2 blocks, then 3 blocks, 3 blocks, 2 blocks+head
    assert "split by layer, the model with its resident inputs would take 4 GPUs like this one" in message
    assert sweep_eval.gpus_needed(units, 10 * gib, gib) == 4
    assert sweep_eval.gpus_needed(units, 3 * gib, gib) is None  # a block (3 GiB) + 1 GiB beyond any one GPU
    with pytest.raises(OutputError) as caught:  # the CPU: no GPU count
        sweep_eval.check_fits("cpu", 12 * gib, reserve=gib, units=units)
    assert "split by layer" not in str(caught.value)


def test_processes_of_a_launched_run_find_their_device_and_who_shares_it():
    """gpumerge.distributed.device_of: the GPU of the local rank (wrapping round), and how many processes use it."""
    from gpumerge.distributed import device_of

    assert device_of(0, 2, 0) == ("cpu", 2)  # no GPU: every process on the CPU, all of them sharing its memory
    assert [device_of(k, 8, 8) for k in (0, 7)] == [("cuda:0", 1), ("cuda:7", 1)]
    assert [device_of(k, 2, 1) for k in (0, 1)] == [("cuda:0", 2), ("cuda:0", 2)]  # two processes on one GPU
    assert [device_of(k, 3, 2) for k in range(3)] == [("cuda:0", 2), ("cuda:1", 1), ("cuda:0", 2)]


def test_a_shared_device_gives_each_process_its_part(monkeypatch):
    """Each process of a launched run plans its scoring with its part of a shared device's free memory, measured
    when it started (before any process loaded a model): the inputs' budget, the batch, the does-it-fit check."""
    from gpumerge import devices, sweep_eval
    from gpumerge.distributed import Processes

    gib = 2**30
    monkeypatch.setattr(devices, "available_ram", lambda: 12 * gib)
    margin = sweep_eval._MARGIN_BYTES
    assert Processes(0, 2, 0, "cpu", sharing=2, free_bytes=12 * gib).part() == 6 * gib
    assert Processes(0, 2, 0, "cuda:0", sharing=1, free_bytes=12 * gib).part() is None  # a GPU of its own
    assert Processes().part() is None  # one process: the device's free memory, probed
    assert sweep_eval.budget_for_inputs("cpu", gib, None, reserve=0) == 12 * gib - gib - margin
    assert sweep_eval.budget_for_inputs("cpu", gib, None, reserve=0, free=6 * gib) == 6 * gib - gib - margin
    sweep_eval.check_fits("cpu", 5 * gib, reserve=0, free=6 * gib)  # 5 GiB + margin within 6 GiB
    with pytest.raises(sweep_eval.OutputError, match="and 4.00 GiB are available"):
        sweep_eval.check_fits("cpu", 5 * gib, reserve=0, free=4 * gib)
