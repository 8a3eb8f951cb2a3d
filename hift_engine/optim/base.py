"""What the engine needs to know about a fused optimizer: hyper-parameters, state layout, and its update."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

from torch import Tensor

from ..errors import ConfigError

__all__ = ["FusedSpec"]


class FusedSpec(ABC):
    """One fused optimizer (AdamW, AdaGrad, SGD). Stateless: hyper-parameters come from the param_group."""

    name: str = ""
    # Optimizer-specific hyper-parameters and their torch.optim defaults (lr and weight_decay are common).
    defaults: Mapping[str, Any] = {}
    default_weight_decay: float = 0.0
    # Hyper-parameters that change the state layout or the compiled kernel: fixed once the optimizer exists.
    structural: tuple[str, ...] = ()

    def normalize(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown keys, validate values (messages name the option)."""
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"{self.name} does not take option(s) {unknown}; its options are lr, weight_decay, "
                f"{', '.join(self.defaults)}"
            )
        hyper = {**self.defaults, **kwargs}
        self.validate(hyper)
        return hyper

    @abstractmethod
    def validate(self, hyper: Mapping[str, Any]) -> None: ...

    def structure(self, hyper: Mapping[str, Any]) -> tuple:
        """Values that fix the state layout or the compiled variant; they may not change after construction."""
        return tuple(hyper[k] for k in self.structural)

    @abstractmethod
    def state_names(self, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        """Names of the fp32 state vectors (torch.optim's state keys), in layout order (from
        ``kernels.reference.state_names``, which the kernels' argument checks read too)."""

    def bytes_per_param(self, hyper: Mapping[str, Any], element_size: int = 4, master: bool = False,
                        state_size: int = 4) -> int:
        """Bytes one update moves per parameter: read+write the parameter, read its gradient, read+write each
        state vector of ``state_size`` bytes (AdamW in fp32: 28); with fp32 ``master`` weights also read+write the
        master (AdamW in bf16-mixed: 30; with bf16 moments, ``state_size=2``: 22)."""
        return 3 * element_size + 8 * master + 2 * state_size * len(self.state_names(hyper))

    def init_fresh(self, state_vectors: Sequence[Tensor], hyper: Mapping[str, Any]) -> None:
        """Initialise zero-filled state of a bucket's parameters on their first activation (default: zeros)."""

    @abstractmethod
    def reference(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[Sequence[Tensor]],
        steps: Sequence[float],
        hyper: Mapping[str, Any],
    ) -> None:
        """The pure-torch update (CPU path and CUDA fallback)."""

    @abstractmethod
    def kernel(self, table, steps: Tensor, grads: Tensor, state: Tensor, stride: int, flags, hyper, master=False) -> None:
        """The fused Triton update of one bucket; ``master``: vector 0 of ``state`` holds fp32 master weights."""


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *, open_high=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and (value >= high if open_high else value > high):
        raise ConfigError(f"{name} must be {'<' if open_high else '<='} {high}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
