"""AdaGrad: torch.optim.Adagrad semantics (lr_decay, initial_accumulator_value, eps, L2 weight decay)."""

from __future__ import annotations

from ..kernels.reference import state_names
from .base import FusedSpec, check_bool, check_number

__all__ = ["AdagradSpec"]


class AdagradSpec(FusedSpec):
    name = "adagrad"
    defaults = {"lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False}
    default_weight_decay = 0.0
    structural = ("maximize",)

    def validate(self, hyper) -> None:
        check_number("lr_decay", hyper["lr_decay"], 0.0)
        check_number("initial_accumulator_value", hyper["initial_accumulator_value"], 0.0)
        check_number("eps", hyper["eps"], 0.0)
        check_bool("maximize", hyper["maximize"])

    def state_names(self, hyper):
        return state_names("adagrad")

    def init_fresh(self, state_vectors, hyper) -> None:
        value = hyper["initial_accumulator_value"]
        if value != 0:
            for v in state_vectors[0]:
                v.fill_(value)

    def reference(self, params, grads, states, steps, hyper) -> None:
        from ..kernels.reference import adagrad_reference

        adagrad_reference(
            params, grads, states[0], steps, lr=hyper["lr"], lr_decay=hyper["lr_decay"], eps=hyper["eps"],
            weight_decay=hyper["weight_decay"], maximize=hyper["maximize"],
        )

    def kernel(self, table, steps, grads, state, stride, flags, hyper, master=False) -> None:
        from ..kernels.adagrad import adagrad_update

        adagrad_update(
            table, steps, grads, state, stride, flags, master=master, lr=hyper["lr"], lr_decay=hyper["lr_decay"],
            eps=hyper["eps"], weight_decay=hyper["weight_decay"], maximize=hyper["maximize"],
        )
