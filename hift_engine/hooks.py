"""Post-accumulate-grad hooks: frozen parameters never hold a gradient; the active group's gradients stay in
the flat gradient arena even when someone replaces ``.grad`` (``model.zero_grad()`` sets it to None, and
autograd then hands over a fresh tensor)."""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["GradRouter"]


class GradRouter:
    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._views: dict[nn.Parameter, tuple[int, Tensor]] = {}
        self.received: set[int] = set()  # indices (in the active layout) that got a gradient since the last zero
        self.dirty = False  # the arena holds gradients
        self.dropped = 0  # gradients dropped from frozen parameters (for tests/diagnostics)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def set_active(self, params: Sequence[nn.Parameter], views: Sequence[Tensor]) -> None:
        self._views = {p: (i, v) for i, (p, v) in enumerate(zip(params, views))}
        for p, v in zip(params, views):
            p.grad = v
        self.received.clear()
        self.dirty = False

    def reinstall(self) -> None:
        """Point every active parameter's .grad back at its arena view (after someone set it to None)."""
        for p, (_, v) in self._views.items():
            if p.grad is None or p.grad.data_ptr() != v.data_ptr():
                p.grad = v

    def cleared(self) -> None:
        self.received.clear()
        self.dirty = False

    def _hook(self, p: nn.Parameter) -> None:
        entry = self._views.get(p)
        if entry is None:  # not in the active group: drop at once, never keep frozen gradients
            p.grad = None
            self.dropped += 1
            return
        i, view = entry
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)  # .grad was replaced; it holds the full accumulated gradient
            p.grad = view
        self.received.add(i)
        self.dirty = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._views.clear()
