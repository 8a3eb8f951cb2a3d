"""Group order (bottom2up / top2down / random) and the delayed learning rate of HiFT.

A *cycle* is k optimizer steps in which every group is trained once. The next group is always known one
step ahead, which is what lets the state store prefetch it. The random order draws a fresh permutation per
cycle from a generator seeded by (seed, cycle): the order is a pure function of those two numbers, so a
resume needs only the seed and the position, never a saved generator.

Delayed LR: the paper advances the LR schedule once per cycle, so all groups of a cycle see the same LR. A
schedule for ``total_steps`` optimizer steps therefore spans ceil(total_steps / k) cycles (the official code
builds it for total_steps and a cosine ends after 1/k of training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from .config import STRATEGIES
from .errors import ConfigError

__all__ = ["GroupOrder", "CycleLR", "DelayedScheduler", "SCHEDULES", "lr_multiplier"]

_MASK64 = (1 << 64) - 1


def _mix(seed: int, cycle: int) -> int:
    """splitmix64 of (seed, cycle): well-spread generator seeds for consecutive cycles."""
    z = (seed * 0x9E3779B97F4A7C15 + (cycle + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class GroupOrder:
    """Which group trains at each optimizer step."""

    def __init__(self, num_groups: int, strategy: str = "bottom2up", seed: int = 0) -> None:
        if num_groups < 1:
            raise ConfigError(f"num_groups must be >= 1, got {num_groups}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy={strategy!r} is unknown; use one of {STRATEGIES}")
        self.num_groups, self.strategy, self.seed = num_groups, strategy, seed
        self.cycle = 0
        self.position = 0
        self._cache: dict[int, list[int]] = {}

    def cycle_order(self, cycle: int) -> list[int]:
        """The order of groups in ``cycle`` (a permutation of range(k))."""
        if self.strategy == "bottom2up":
            return list(range(self.num_groups))
        if self.strategy == "top2down":
            return list(range(self.num_groups - 1, -1, -1))
        if cycle not in self._cache:
            gen = torch.Generator().manual_seed(_mix(self.seed, cycle))
            self._cache = {c: o for c, o in self._cache.items() if c >= cycle - 1}  # keep it small
            self._cache[cycle] = torch.randperm(self.num_groups, generator=gen).tolist()
        return self._cache[cycle]

    @property
    def current(self) -> int:
        return self.cycle_order(self.cycle)[self.position]

    def peek(self) -> int:
        """The group of the next step."""
        if self.position + 1 < self.num_groups:
            return self.cycle_order(self.cycle)[self.position + 1]
        return self.cycle_order(self.cycle + 1)[0]

    def advance(self) -> int:
        """Move to the next step; returns the new current group."""
        self.position += 1
        if self.position == self.num_groups:
            self.position = 0
            self.cycle += 1
        return self.current

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "strategy": self.strategy,
            "seed": self.seed,
            "cycle": self.cycle,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_groups", "strategy", "seed"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"group order mismatch: saved {key}={state.get(key)!r}, this optimizer has "
                    f"{getattr(self, key)!r}; resume with the same grouping, strategy and seed"
                )
        cycle, position = state.get("cycle"), state.get("position")
        if not (isinstance(cycle, int) and cycle >= 0 and isinstance(position, int) and 0 <= position < self.num_groups):
            raise ConfigError(f"invalid saved group order position cycle={cycle!r} position={position!r}")
        self.cycle, self.position = cycle, position


# ---------------------------------------------------------------------------------------------- LR schedules
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")


def lr_multiplier(
    name: str, t: int, warmup: int, total: int, min_lr_ratio: float = 0.0, power: float = 1.0
) -> float:
    """Multiplier of the base LR at schedule position ``t`` (same formulas as transformers' schedules)."""
    if name == "constant":
        return 1.0
    if t < warmup:
        return t / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    if name == "linear":
        f = 1.0 - progress
    elif name == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "polynomial":
        f = (1.0 - progress) ** power
    else:
        raise ConfigError(f"unknown LR schedule {name!r}; use one of {SCHEDULES}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * f


class CycleLR(LRScheduler):
    """An LR schedule that advances once per cycle of ``steps_per_cycle`` optimizer steps.

    Call ``step()`` after every optimizer step, as with any scheduler (transformers.Trainer does). The LR is
    constant within a cycle; ``total_steps``/``warmup_steps`` are in optimizer steps and are converted to
    ceil(steps / k) cycles. With ``steps_per_cycle=1`` it is an ordinary per-step schedule.
    Its state_dict holds only numbers and strings (loads with ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        total_steps: int,
        warmup_steps: int = 0,
        steps_per_cycle: int = 1,
        min_lr_ratio: float = 0.0,
        power: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if name not in SCHEDULES:
            raise ConfigError(f"unknown LR schedule {name!r}; use one of {SCHEDULES}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ConfigError(f"warmup_steps must be an integer in [0, total_steps], got {warmup_steps!r}")
        if not isinstance(steps_per_cycle, int) or steps_per_cycle < 1:
            raise ConfigError(f"steps_per_cycle must be an integer >= 1, got {steps_per_cycle!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.name = name
        self.steps_per_cycle = steps_per_cycle
        self.total_cycles = -(-total_steps // steps_per_cycle)
        self.warmup_cycles = -(-warmup_steps // steps_per_cycle)
        self.min_lr_ratio, self.power = float(min_lr_ratio), float(power)
        super().__init__(optimizer, last_epoch)

    @property
    def cycle(self) -> int:
        return max(0, self.last_epoch) // self.steps_per_cycle

    def multiplier(self) -> float:
        return lr_multiplier(self.name, self.cycle, self.warmup_cycles, self.total_cycles, self.min_lr_ratio, self.power)

    def get_lr(self) -> list[float]:
        f = self.multiplier()
        return [base * f for base in self.base_lrs]


class DelayedScheduler:
    """Wraps any per-step LR scheduler (e.g. one from ``transformers.get_scheduler``) built for a length in
    cycles, and steps it once per cycle. Exposes the scheduler interface Trainer and loops use."""

    def __init__(self, inner: LRScheduler, steps_per_cycle: int) -> None:
        self.inner, self.steps_per_cycle = inner, steps_per_cycle
        self.optimizer = inner.optimizer
        self.calls = 0

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.steps_per_cycle == 0:
            self.inner.step()

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "steps_per_cycle": self.steps_per_cycle, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("steps_per_cycle") != self.steps_per_cycle:
            raise ConfigError(
                f"scheduler built for {state.get('steps_per_cycle')} steps per cycle, this one has {self.steps_per_cycle}"
            )
        self.calls = int(state["calls"])
        self.inner.load_state_dict(state["inner"])
