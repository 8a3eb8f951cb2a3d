"""What ``HiFTConfig.precision`` asks of the model and the device, checked before anything changes.

fp32        weights as given (bf16/fp16 weights get fp32 state and are rounded back each step, as before)
tf32        fp32 weights; matmuls and convolutions in TF32 (torch's process-wide switches)
bf16-mixed  bf16 weights on the device; each group's fp32 master weights live with its optimizer state (vector
            0 of the flat state), stream with it, and the fused update writes master, state and the rounded
            bf16 weights in one pass. Masters come from the most precise copy there is: fp32 weights on the
            device (cast to bf16 by the optimizer), fp32 weights given as ``initial_masters`` (e.g. kept on the
            host by ``to_device_bf16`` while the model moves to the GPU in bf16), or the bf16 weights themselves
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["prepare_precision", "enable_tf32", "to_device_bf16", "compute_dtype", "take_fp32_masters"]


def compute_dtype(precision: str) -> torch.dtype:
    """The weights' dtype on the device under ``precision`` (fp32 and tf32: float32)."""
    return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision, torch.float32)

def prepare_precision(
    precision: str, named: Sequence[tuple[str, nn.Parameter]], device: torch.device,
    initial_masters: Mapping[str, torch.Tensor] | None = None,
) -> bool:
    """Check ``named`` (the trained parameters) against ``precision``; returns whether fp32 masters are kept.
    Changes nothing (``enable_tf32`` is called once the optimizer exists)."""
    if initial_masters and not precision.endswith("-mixed"):
        raise ConfigError("initial_masters= applies to the mixed precisions (bf16-mixed, fp16-mixed) only")
    dtypes = {p.dtype for _, p in named}
    if precision.endswith("-mixed"):
        low = compute_dtype(precision)
        if low == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision='bf16-mixed' but {torch.cuda.get_device_name(device)} has no bf16; use 'fp16-mixed' or 'tf32'")
        other = [n for n, p in named if p.dtype not in (low, torch.float32)]
        if other:
            raise ConfigError(
                f"precision={precision!r} takes a {str(low)[6:]} model (masters start exact; parameters kept in fp32 "
                f"stay fp32) or an fp32 one (fp32 masters, the model is cast to {str(low)[6:]}), but {other[0]!r} is "
                f"{dict(named)[other[0]].dtype}"
            )
        shapes = {n: p.shape for n, p in named}
        for name, t in (initial_masters or {}).items():
            if name not in shapes:
                raise ConfigError(f"initial_masters: {name!r} is not a trained parameter of this model")
            if not torch.is_tensor(t) or t.dtype != torch.float32 or t.shape != shapes[name]:
                raise ConfigError(f"initial_masters[{name!r}] must be a float32 tensor of shape {tuple(shapes[name])}")
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


def to_device_bf16(model: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Move an fp32 model (e.g. loaded on the CPU) to ``device`` in ``dtype`` (bf16, or fp16 for fp16-mixed),
    one parameter at a time, and return its fp32 weights by name (still where they were) for
    ``HiFTOptimizer(..., initial_masters=...)``: a 7B fp32 checkpoint starts a mixed run on a 24 GB card
    without the fp32 weights ever being on the GPU."""
    masters = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.float32:
                masters[name] = p.data
                p.data = p.data.to(device=device, dtype=dtype)
    model.to(device)  # buffers (and parameters of other dtypes)
    return masters


def take_fp32_masters(
    precision: str, named: Sequence[tuple[str, nn.Parameter]], masters: bool,
    initial_masters: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """(seeds, undo): under a mixed precision an all-fp32 model is cast to the compute dtype and its fp32
    tensors become the masters' seeds (with ``initial_masters``); ``undo`` casts back. A model that is already
    partly bf16/fp16 keeps its fp32 parameters (modules kept in fp32 on purpose)."""
    whole = masters and all(p.dtype == torch.float32 for _, p in named)
    seeds = {n: p.data for n, p in named if whole} | dict(initial_masters or {})
    cast = [(p, p.data) for _, p in named if whole]
    with torch.no_grad():
        for p, data in cast:
            p.data = data.to(compute_dtype(precision))

    def undo() -> None:
        for p, data in cast:
            p.data = data

    return seeds, undo
