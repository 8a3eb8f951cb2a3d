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

__all__ = [
    "GroupOrder", "CycleLR", "DelayedScheduler", "SCHEDULES", "lr_multiplier", "cycle_scheduler", "transformers_scheduler",
]

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

    def check_state_dict(self, state: Any) -> None:
        """Raise ConfigError unless ``state`` (from state_dict()) fits this order. Changes nothing."""
        if not isinstance(state, dict):
            raise ConfigError(f"invalid saved group order {state!r}")
        for key in ("num_groups", "strategy", "seed"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"group order mismatch: saved {key}={state.get(key)!r}, this optimizer has "
                    f"{getattr(self, key)!r}; resume with the same grouping, strategy and seed"
                )
        cycle, position = state.get("cycle"), state.get("position")
        if not (isinstance(cycle, int) and cycle >= 0 and isinstance(position, int) and 0 <= position < self.num_groups):
            raise ConfigError(f"invalid saved group order position cycle={cycle!r} position={position!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.cycle, self.position = state["cycle"], state["position"]


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

    # The schedule's shape comes from this run's options, not from the saved state: extending a finished run
    # (more total steps on resume) continues along the new, longer schedule instead of staying at its end.
    _SHAPE = ("name", "total_cycles", "warmup_cycles", "min_lr_ratio", "power")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("steps_per_cycle", self.steps_per_cycle) != self.steps_per_cycle:
            raise ConfigError(
                f"scheduler saved for {state_dict.get('steps_per_cycle')} steps per cycle, this one has "
                f"{self.steps_per_cycle} (the number of groups changed)"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._SHAPE})
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


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
        # A LambdaLR built for a new length (extending a run) implies another LR at the loaded position than
        # the one saved with the optimizer: set it now, not at the next cycle boundary.
        lambdas = getattr(self.inner, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * f(self.inner.last_epoch) for f, base in zip(lambdas, self.inner.base_lrs)]
            self.inner._last_lr = lrs
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr


# ---------------------------------------------------------------------------------------------- builders
def cycle_scheduler(
    optimizer, name: str = "cosine", total_steps: int = 1, warmup_steps: int = 0, per_step: bool = False, **kwargs: Any
) -> CycleLR:
    """An LR schedule for ``total_steps`` optimizer steps of a HiFTOptimizer that advances once per cycle of k
    steps (HiFT's delayed LR; it spans ceil(total_steps / k) cycles). ``per_step=True`` advances every step."""
    return CycleLR(optimizer, name, total_steps, warmup_steps, 1 if per_step else optimizer.num_groups, **kwargs)


def transformers_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int = 0, **scheduler_kwargs: Any):
    """Any ``transformers.get_scheduler`` schedule, built for ceil(total/k) cycles and stepped once per cycle."""
    kind = getattr(name, "value", name)
    if kind == "reduce_lr_on_plateau":
        raise ConfigError(
            "reduce_lr_on_plateau needs a metric at every step and cannot follow HiFT's per-cycle LR; use a fixed "
            "schedule (cosine, linear, constant_with_warmup, ...)"
        )
    from transformers import get_scheduler

    k = optimizer.num_groups
    inner = get_scheduler(
        name, optimizer, num_warmup_steps=-(-warmup_steps // k), num_training_steps=-(-total_steps // k),
        scheduler_specific_kwargs=scheduler_kwargs or None,
    )
    return DelayedScheduler(inner, k)
