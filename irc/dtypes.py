"""Names of the floating-point types users may ask for."""

from __future__ import annotations

import torch

from irc.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise UserError(f"unsupported dtype {value}; expected one of {', '.join(DTYPES)}")
        return value
    key = _ALIASES.get(str(value).lower(), str(value).lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)
