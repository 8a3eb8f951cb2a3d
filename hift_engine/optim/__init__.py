"""Optimizer specs: the fused ones by name, and the generic path for any torch.optim.Optimizer."""

from .adagrad import AdagradSpec
from .adamw import AdamWSpec
from .base import FusedSpec
from .sgd import SGDSpec

__all__ = ["FusedSpec", "AdamWSpec", "AdagradSpec", "SGDSpec", "FUSED_SPECS", "get_spec"]

FUSED_SPECS: dict[str, type[FusedSpec]] = {"adamw": AdamWSpec, "adagrad": AdagradSpec, "sgd": SGDSpec}


def get_spec(name: str) -> FusedSpec:
    return FUSED_SPECS[name]()
