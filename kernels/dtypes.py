"""safetensors dtype codes <-> torch dtypes, and what a dtype can hold."""

from __future__ import annotations

import torch

TORCH_OF = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _name):
        TORCH_OF[_code] = getattr(torch, _name)
_CODE_OF = {dtype: code for code, dtype in TORCH_OF.items()}


def torch_dtype(code: str) -> torch.dtype:
    return TORCH_OF[code]


def code_of(dtype: torch.dtype) -> str | None:
    return _CODE_OF.get(dtype)
