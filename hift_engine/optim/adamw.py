"""AdamW: torch.optim.AdamW semantics (decoupled weight decay, per-parameter bias correction, amsgrad)."""

from __future__ import annotations

from ..errors import ConfigError
from ..kernels.reference import state_names
from .base import FusedSpec, check_bool, check_number

__all__ = ["AdamWSpec"]


class AdamWSpec(FusedSpec):
    name = "adamw"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False}
    default_weight_decay = 1e-2  # torch.optim.AdamW's default
    structural = ("amsgrad", "maximize")

    def validate(self, hyper) -> None:
        betas = hyper["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        hyper["betas"] = tuple(betas)
        check_number("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        check_number("eps", hyper["eps"], 0.0)
        check_bool("amsgrad", hyper["amsgrad"])
        check_bool("maximize", hyper["maximize"])

    def state_names(self, hyper):
        return state_names("adamw", amsgrad=hyper["amsgrad"])

    def reference(self, params, grads, states, steps, hyper) -> None:
        from ..kernels.reference import adamw_reference

        adamw_reference(
            params, grads, states[0], states[1], states[2] if hyper["amsgrad"] else None, steps,
            lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
            weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"],
        )

    def kernel(self, table, steps, grads, state, stride, flags, hyper, master=False, moment_bf16=False, seed=0) -> None:
        from ..kernels.adamw import adamw_update

        adamw_update(
            table, steps, grads, state, stride, flags, master=master, moment_bf16=moment_bf16, seed=seed,
            lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
            weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"],
        )
