"""What ``HiFTConfig.precision`` asks of the model and the device, checked before anything changes.

fp32        weights as given (bf16/fp16 weights get fp32 state and are rounded back each step, as before)
tf32        fp32 weights; matmuls and convolutions in TF32 (torch's process-wide switches)
bf16-mixed  bf16 weights on the device; each group's fp32 master weights live with its optimizer state (vector
            0 of the flat state), stream with it, and the fused update writes master, state and the rounded
            bf16 weights in one pass
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["prepare_precision", "enable_tf32"]

def prepare_precision(precision: str, named: Sequence[tuple[str, nn.Parameter]], device: torch.device) -> bool:
    """Check ``named`` (the trained parameters) against ``precision``; returns whether fp32 masters are kept.
    Changes nothing (``enable_tf32`` is called once the optimizer exists)."""
    dtypes = {p.dtype for _, p in named}
    if precision == "bf16-mixed":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision='bf16-mixed' but {torch.cuda.get_device_name(device)} has no bf16; use 'fp32' or 'tf32'")
        other = [n for n, p in named if p.dtype != torch.bfloat16]
        if other:
            raise ConfigError(
                f"precision='bf16-mixed' trains a bf16 model, but {other[0]!r} is {dict(named)[other[0]].dtype}. Load "
                "or cast the model in bf16 first (from_pretrained(..., dtype=torch.bfloat16) or model.to(torch.bfloat16)): "
                "its masters start bf16-exact"
            )
        return True
    if precision == "tf32":
        if dtypes != {torch.float32}:
            raise ConfigError(f"precision='tf32' trains fp32 weights, this model has {sorted(map(str, dtypes))}; use 'bf16-mixed' for bf16")
        return False
    if dtypes & {torch.bfloat16, torch.float16}:  # Python's warning filter shows it once per call site
        warnings.warn(
            "hift_engine: precision='fp32' with bf16/fp16 weights updates them in place (fp32 state, no master "
            "weights): updates smaller than half a bf16 step of a weight are lost. precision='bf16-mixed' keeps "
            "exact fp32 masters",
            stacklevel=4,
        )
    return False


def enable_tf32() -> None:
    """torch's process-wide switches: fp32 matmuls and convolutions run on tensor cores in TF32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
