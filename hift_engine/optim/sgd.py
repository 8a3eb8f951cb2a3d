"""SGD: torch.optim.SGD semantics (momentum, dampening, nesterov, L2 weight decay, first-step buffer init)."""

from __future__ import annotations

from ..errors import ConfigError
from ..kernels.reference import state_names
from .base import FusedSpec, check_bool, check_number

__all__ = ["SGDSpec"]


class SGDSpec(FusedSpec):
    name = "sgd"
    defaults = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False}
    default_weight_decay = 0.0
    structural = ("nesterov", "maximize")

    def validate(self, hyper) -> None:
        check_number("momentum", hyper["momentum"], 0.0)
        check_number("dampening", hyper["dampening"])
        check_bool("nesterov", hyper["nesterov"])
        check_bool("maximize", hyper["maximize"])
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ConfigError("nesterov=True requires momentum > 0 and dampening = 0 (as torch.optim.SGD)")

    def structure(self, hyper):
        return super().structure(hyper) + (hyper["momentum"] != 0,)

    def state_names(self, hyper):
        # Whether a buffer exists is fixed at construction; the momentum value may change at runtime.
        return state_names("sgd", momentum=hyper["momentum"])

    def reference(self, params, grads, states, steps, hyper) -> None:
        from ..kernels.reference import sgd_reference

        sgd_reference(
            params, grads, states[0] if states else None, steps, lr=hyper["lr"], momentum=hyper["momentum"],
            dampening=hyper["dampening"], weight_decay=hyper["weight_decay"], nesterov=hyper["nesterov"],
            maximize=hyper["maximize"],
        )

    def kernel(self, table, steps, grads, state, stride, flags, hyper, master=False) -> None:
        from ..kernels.sgd import sgd_update

        sgd_update(
            table, steps, grads, state, stride, flags, master=master, lr=hyper["lr"], momentum=hyper["momentum"],
            dampening=hyper["dampening"], weight_decay=hyper["weight_decay"], nesterov=hyper["nesterov"],
            maximize=hyper["maximize"],
        )
