"""The pipeline's parts on their own: rings sized to the work (gpumerge.lanes) and safetensors headers parsed apart
from reading a checkpoint (gpumerge.headers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import load_state
from safetensors.torch import save_file

from gpumerge.errors import CheckpointError
from gpumerge.headers import ITEMSIZE, read_safetensors_header
from gpumerge.lanes import DeviceLane, ring_shape
from gpumerge.merge import run_merge
from gpumerge.spec import MergeSpec

KiB, MiB = 2**10, 2**20


@pytest.mark.parametrize("sizes, expected", [
    ([], (0, 0)),  # a device the plan gave nothing: no ring at all
    ([100], (100, 1)),  # one small batch: one slot of its size, not a ring of full-capacity slots
    ([100, 300, 200], (300, 3)),
    ([10] * 9, (10, 4)),  # never deeper than the depth asked for
    ([4096, 1], (4096, 2)),  # a batch at the capacity exactly
])
def test_ring_shape_is_the_largest_batch_times_at_most_the_depth(sizes, expected):
    assert ring_shape(iter(sizes), capacity=4096, depth=4) == expected


def test_ring_shape_refuses_a_batch_beyond_the_capacity():
    with pytest.raises(ValueError, match="4097 bytes exceeds the batch capacity of 4096"):
        ring_shape([4097], capacity=4096, depth=4)


@pytest.mark.parametrize("simulate_staging", [False, True])
def test_an_empty_lane_allocates_nothing(simulate_staging):
    lane = DeviceLane("cpu", 0, 0, simulate_staging=simulate_staging)
    assert lane.host_block.numel() == 0 and lane.slots == [] and lane.ring.empty()


@pytest.mark.parametrize("staged", [False, True])
def test_a_small_merge_takes_buffers_its_size_not_the_budgets(models, tmp_path, staged):
    """The 1 GiB pinned ring of the first H200 run, on the CPU: a merge of a tiny pair (default capacity 16 MiB on a
    CPU, 256 MiB for a GPU) allocates no more than its own batches, never a full ring of full slots."""
    state = load_state(models["fp16_a"])
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    spec = MergeSpec(model_path1=str(models["fp16_a"]), model_path2=str(models["fp16_b"]),
                     output_model_path=str(tmp_path / "out"), device="cpu")
    result = run_merge(spec, notice=lambda _: None, simulate_staging=staged)
    ring = result.report["rings"]["cpu"]
    assert result.report["batch_capacity_bytes"] >= 16 * MiB
    assert 0 < ring["slot_bytes"] <= 3 * model_bytes and ring["slots"] <= result.report["batches"]
    assert result.report["peak_host_buffer_bytes"] == ring["slots"] * ring["slot_bytes"] < 16 * MiB


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {"b.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a.bias": torch.ones(5),
               "c.ids": torch.arange(4, dtype=torch.int64), "empty": torch.zeros(0, 3, dtype=torch.bfloat16)}
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def test_a_header_gives_each_tensors_bytes_at_its_offset(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _safetensors(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        raw, infos = read_safetensors_header(fd, path, label="model 1")
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert raw == data[8:8 + int.from_bytes(data[:8], "little")] and "__metadata__" in json.loads(raw)
    assert {i.name for i in infos} == set(tensors)
    for info in infos:
        want = tensors[info.name]
        assert info.shape == tuple(want.shape) and info.nbytes == want.numel() * ITEMSIZE[info.dtype]
        assert data[info.offset:info.offset + info.nbytes] == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_a_header_with_a_gap_is_refused_naming_the_model_and_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    _safetensors(path)
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    begin, end = header["a.bias"]["data_offsets"]
    header["a.bias"]["data_offsets"] = [begin + 4, end + 4]  # moved 4 bytes on: a gap before, an overlap after
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match=r"^model 2 .*(gap|overlapping|after the last)"):
            read_safetensors_header(fd, path, label="model 2")
    finally:
        os.close(fd)
