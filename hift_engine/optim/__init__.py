"""Optimizer specs and update paths: the fused optimizers by name (the one registry), and the generic path for
any torch.optim.Optimizer."""

from .adagrad import AdagradSpec
from .adamw import AdamWSpec
from .base import FusedSpec
from .sgd import SGDSpec

__all__ = ["FusedSpec", "AdamWSpec", "AdagradSpec", "SGDSpec", "FUSED_SPECS"]

FUSED_SPECS: dict[str, type[FusedSpec]] = {"adamw": AdamWSpec, "adagrad": AdagradSpec, "sgd": SGDSpec}

