"""Dynamic loss scaling for fp16-mixed, on the device (no host sync in a step), with torch.amp.GradScaler's rule.

The loss is multiplied by ``scale`` before backward (``HiFTOptimizer.scale_loss``); the fused update multiplies
the fp16 gradients by ``1 / scale`` (and the clipping coefficient) in fp32 inside the kernel, so gradients are
never unscaled in fp16. An overflow (a non-finite gradient norm) skips the step through the ordinary non-finite
path — masters, state and weights untouched, the skip counted — and backs the scale off; ``growth_interval``
good steps in a row grow it (``torch._amp_update_scale_``, the op GradScaler itself uses).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["LossScaler"]


class LossScaler:
    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.scaled = False  # scale_loss() called since the last step: fp16 gradients of an unscaled loss underflow

    def scale_loss(self, loss: Tensor) -> Tensor:
        self.scaled = True
        return loss.float() * self.scale  # in fp32, as GradScaler: 2^16 is inf in fp16

    def inv_scale(self) -> Tensor:
        return self.scale.double().reciprocal().float()  # as GradScaler computes it

    def update(self, skipped: Tensor) -> None:
        """After a step: back off on an overflow (``skipped`` = 1), grow after ``growth_interval`` good steps."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, skipped.reshape(1).float(), self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self.scaled = False

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.item(), "growth_tracker": int(self.growth_tracker.item())}

    @staticmethod
    def check_state_dict(state: Any) -> None:
        if not (isinstance(state, Mapping) and isinstance(state.get("scale"), float) and state["scale"] > 0
                and isinstance(state.get("growth_tracker"), int) and state["growth_tracker"] >= 0):
            raise ConfigError(f"invalid saved loss scale {state!r}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])
