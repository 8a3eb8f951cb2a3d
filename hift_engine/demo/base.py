"""What every demo task provides to ``run_demo``, and its default training settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskDefaults:
    """A task's training settings: steps, batch_size and lr are used where run_demo is not given them; warm-up and
    clipping are the task's own."""

    steps: int
    batch_size: int
    lr: float
    warmup_fraction: float  # of the steps, rounded
    max_grad_norm: float | None


class DemoTask(Protocol):
    name: str
    vocab_size: int
    defaults: TaskDefaults

    def make_rng(self, seed: int) -> Any:
        """The random source batch() draws from (the same seed gives the same batches)."""

    def batch(self, rng: Any, size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """A training batch: model keyword arguments, labels included."""

    def evaluate(self, model, device: torch.device | str = "cpu") -> tuple[float | None, float]:
        """(held-out loss or None, accuracy), on the same data every call; the model is in eval mode."""

    def summary(self, before: tuple[float | None, float], after: tuple[float | None, float]) -> str:
        """evaluate()'s results before and after training, as words."""
