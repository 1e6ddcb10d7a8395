"""make_plan with made-up checkpoint indexes: no files, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpumerge.checkpoint import ITEMSIZE, TensorInfo
from gpumerge.errors import IncompatibleCheckpointsError, SpecError
from gpumerge.plan import make_plan
from gpumerge.spec import MergeSpec


@dataclass
class FakeIndex:
    label: str
    tensors: dict
    config: dict = field(default_factory=dict)
    root: Path = Path("/fake")

    def num_layers(self):
        return self.config.get("num_hidden_layers")


def llama_index(label, *, layers=4, hidden=8, inter=12, vocab=10, dtype="F16", tie=False, **config):
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "input_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors[name] = TensorInfo(name, dtype, shape, nbytes, Path("/fake/model.safetensors"), offset)
        offset += nbytes
    return FakeIndex(label, tensors, {"num_hidden_layers": layers, "model_type": "llama", **config},
                     Path(f"/fake/{label}"))


def spec(**kw):
    return MergeSpec(model_path1="a", model_path2="b", output_model_path=None, **kw)


def test_plan_blends_the_window_and_copies_the_rest():
    plan = make_plan(llama_index("a"), llama_index("b"), spec(gradient_start=0.9, gradient_end=0.0, layer_end=3))
    blended = {job.name: job.t for job in plan.jobs if job.blended}
    assert blended["model.layers.0.mlp.up_proj.weight"] == 0.9
    assert blended["model.layers.2.mlp.up_proj.weight"] == 0.0
    assert not any(name.startswith("model.layers.3") for name in blended)
    assert len(blended) == 9
    assert plan.bytes_written == sum(t.nbytes for t in llama_index("a").tensors.values())
    assert plan.bytes_read == plan.bytes_written + sum(j.nbytes for j in plan.jobs if j.blended)


def test_shards_are_greedy_and_offsets_contiguous():
    a = llama_index("a", layers=6, hidden=16, inter=40)
    plan = make_plan(a, llama_index("b", layers=6, hidden=16, inter=40), spec(max_shard_bytes=3000))
    assert len(plan.shards) > 2
    for k, shard in enumerate(plan.shards):
        assert shard.filename == f"model-{k + 1:05d}-of-{len(plan.shards):05d}.safetensors"
        offset = 0
        for job in shard.jobs:
            assert job.offset == offset
            offset += job.nbytes
        assert shard.data_bytes == offset
        assert offset <= 3000 or len(shard.jobs) == 1
        if k + 1 < len(plan.shards):  # it closed because the next tensor would not fit
            assert offset + plan.shards[k + 1].jobs[0].nbytes > 3000
    assert [j.name for j in plan.jobs] == list(a.tensors)


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard():
    plan = make_plan(llama_index("a", vocab=1000), llama_index("b", vocab=1000), spec(max_shard_bytes=1000))
    embed = [s for s in plan.shards if any(j.name == "model.embed_tokens.weight" for j in s.jobs)]
    assert len(embed) == 1 and len(embed[0].jobs) == 1


def test_all_shape_problems_in_one_error():
    with pytest.raises(IncompatibleCheckpointsError) as info:
        make_plan(llama_index("a"), llama_index("b", hidden=16, inter=24), spec())
    message = str(info.value)
    assert message.startswith("12 tensor(s)")
    assert "model.layers.0.mlp.up_proj.weight A=(12, 8) B=(24, 16)" in message


def test_tensors_outside_the_window_need_not_match():
    # model 2 with a different vocab: embeddings and lm_head are model 1's, so the merge is fine
    plan = make_plan(llama_index("a"), llama_index("b", vocab=11), spec())
    assert not any(j.blended for j in plan.jobs if j.layer is None)


def test_missing_blocks_in_model2_are_listed():
    with pytest.raises(IncompatibleCheckpointsError, match=r"model.layers.3.* B=\(missing\)"):
        make_plan(llama_index("a"), llama_index("b", layers=3), spec())


def test_layer_count_must_be_known():
    a = llama_index("a")
    a.config.pop("num_hidden_layers")
    with pytest.raises(IncompatibleCheckpointsError, match="layer count"):
        make_plan(a, llama_index("b"), spec())


def test_unknown_layout_is_an_error():
    a = llama_index("a")
    a.tensors = {n.replace("model.layers", "model.blocks"): t for n, t in a.tensors.items()}
    with pytest.raises(IncompatibleCheckpointsError, match="known block container"):
        make_plan(a, llama_index("b"), spec())


def test_output_dtype_and_overflow_checks():
    a, b = llama_index("a", dtype="BF16"), llama_index("b", dtype="BF16")
    plan = make_plan(a, b, spec())
    assert plan.out_dtype == "F16" and any("bfloat16" in n for n in plan.notices)
    assert all(j.check_overflow for j in plan.jobs)  # bf16 -> fp16 can overflow
    plan = make_plan(a, b, spec(dtype="auto", dtype_was_default=False))
    assert plan.out_dtype == "BF16" and not plan.notices
    assert not any(j.check_overflow for j in plan.jobs)
    plan = make_plan(llama_index("a"), llama_index("b"), spec(gradient_start=-0.5, gradient_end=0.5))
    assert {j.check_overflow for j in plan.jobs if j.blended} == {True, False}  # only where t leaves [0, 1]


def test_auto_dtype_refuses_mixed_models():
    a = llama_index("a")
    norm = a.tensors["model.norm.weight"]
    a.tensors["model.norm.weight"] = TensorInfo(norm.name, "F32", norm.shape, norm.nbytes * 2, norm.path, 0)
    with pytest.raises(SpecError, match="mixes float dtypes"):
        make_plan(a, llama_index("b"), spec(dtype="auto"))


def test_config_differences_warn():
    plan = make_plan(llama_index("a", vocab_size=32000, max_position_embeddings=2048),
                     llama_index("b", vocab_size=32000, max_position_embeddings=4096), spec())
    assert any("max_position_embeddings" in n for n in plan.notices)


def test_tied_embeddings_plan():
    plan = make_plan(llama_index("a", tie=True), llama_index("b", tie=True), spec())
    assert "lm_head.weight" not in {j.name for j in plan.jobs}
