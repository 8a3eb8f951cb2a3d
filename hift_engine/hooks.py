"""A HiFTOptimizer's hold on its model's parameters.

``GradRouter``: post-accumulate-grad hooks. Frozen parameters never hold a gradient; the active group's
gradients land in the flat gradient arena. ``.grad`` follows torch.optim exactly: None until a gradient
arrives and after ``zero_grad()``; at ``step()`` a parameter whose ``.grad`` is None is skipped and whatever
``.grad`` holds (from backward, written in place, or set by hand) is what is applied.

``ParamClaim``: the requires_grad flags an optimizer switched and its hooks. A new HiFTOptimizer on the same
parameters releases the previous claim first (restoring the user's flags), so re-running a notebook cell
trains the same groups as the first time; ``close()`` or the optimizer being collected releases it too.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Sequence

from torch import Tensor, nn

from .errors import LayoutError

__all__ = ["GradRouter", "ParamClaim", "user_requires_grad"]

# id(param) -> (weak reference to it, the claim holding it). Not a WeakKeyDictionary: that compares tensor keys
# with ==, which is elementwise.
_CLAIMS: dict[int, tuple[weakref.ref, "ParamClaim"]] = {}


def _claim_of(p: nn.Parameter) -> "ParamClaim | None":
    entry = _CLAIMS.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def user_requires_grad(p: nn.Parameter) -> bool:
    """``requires_grad`` as the user left it, before a HiFTOptimizer that still holds ``p`` switched it."""
    claim = _claim_of(p)
    return claim.original[id(p)] if claim is not None else p.requires_grad


class GradRouter:
    """``.grad`` behaves exactly as with torch.optim (None until a gradient arrives, None again after
    ``zero_grad()``); where a gradient lives is the engine's business: autograd's fresh tensor, or one set by
    hand, is copied into the parameter's view of the flat gradient arena and ``.grad`` then *is* that view, so
    further micro-batches accumulate in place and the fused update reads one flat buffer."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._views: dict[nn.Parameter, tuple[int, Tensor]] = {}
        self.dropped = 0  # gradients dropped from frozen parameters (for tests/diagnostics)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def set_active(self, params: Sequence[nn.Parameter], views: Sequence[Tensor]) -> None:
        self._views = {p: (i, v) for i, (p, v) in enumerate(zip(params, views))}
        self.zero(set_to_none=True)

    def zero(self, set_to_none: bool) -> None:
        """torch.optim's zero_grad for the active parameters."""
        for p in self._views:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()  # a zero gradient is still a gradient: the next step applies it, as torch does

    def collect(self, names: Sequence[str]) -> list[int]:
        """Indices of the active parameters whose ``.grad`` is not None (``names`` for error messages); every
        such gradient is in the arena afterwards."""
        members = []
        for p, (i, view) in self._views.items():
            g = p.grad
            if g is None:
                continue  # as torch.optim: no gradient, no update
            if g.data_ptr() != view.data_ptr():  # set by hand (or replaced) since backward
                if g.shape != view.shape:
                    raise LayoutError(f"{names[i]}.grad has shape {tuple(g.shape)}, the parameter {tuple(view.shape)}")
                view.copy_(g)
                p.grad = view
            members.append(i)
        return members

    def _hook(self, p: nn.Parameter) -> None:
        entry = self._views.get(p)
        if entry is None:  # not in the active group: drop at once, never keep frozen gradients
            p.grad = None
            self.dropped += 1
            return
        view = entry[1]
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)  # autograd's fresh tensor (or one set by hand): it holds the whole gradient
            p.grad = view

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._views.clear()


class ParamClaim:
    """Switch ``trained`` and ``frozen`` parameters off (each group is switched on when active) and route their
    gradients; remember the user's flags so ``release()`` restores them."""

    def __init__(self, trained: Sequence[nn.Parameter], frozen: Sequence[nn.Parameter]) -> None:
        params = list(trained) + list(frozen)
        previous = {id(c): c for p in params if (c := _claim_of(p)) is not None}
        for claim in previous.values():
            claim.release()
        if previous:
            warnings.warn(
                "hift_engine: another HiFTOptimizer was still attached to these parameters; it has been detached "
                "(hooks removed, requires_grad restored) and can no longer step. Call close() on an optimizer you "
                "replace",
                stacklevel=4,
            )
        self.original = {id(p): p.requires_grad for p in params}
        self.on_release: list = []  # more undo steps of the same optimizer (e.g. wrapped block forwards)
        self._params = [(id(p), weakref.ref(p)) for p in params]
        self.released = False
        # Hooks first: torch only registers them on tensors that require grad.
        self.router = GradRouter([p for p in params if p.requires_grad])
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            _CLAIMS[id(p)] = (weakref.ref(p), self)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.router.remove()
        for undo in self.on_release:
            undo()
        for key, ref in self._params:
            if _CLAIMS.get(key, (None, None))[1] is self:
                del _CLAIMS[key]
            p = ref()
            if p is not None:
                p.requires_grad_(self.original[key])
                p.grad = None
