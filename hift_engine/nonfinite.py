"""The active group's gradient norm and non-finite flag, and counting skipped steps, without a host sync.

The skip flag is decided on the device; each step copies it into a small pinned host buffer behind an event.
The flags are read a step or two later, when their events have completed, so the host never waits for
the GPU inside a step. After ``max_consecutive`` skips in a row, training stops with NonFiniteError.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Sequence

import torch
from torch import Tensor

from .errors import NonFiniteError

__all__ = ["SkipMonitor", "grad_flags"]

log = logging.getLogger("hift_engine")


def grad_flags(
    grads: Sequence[Tensor], clip: float | None, check: bool, inv_scale: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """(flags, norm): flags = [coefficient, skip] on the device (None when neither clipping, the check nor loss
    scaling is on), computed in one pass over ``grads`` (the gradients about to be applied). With loss scaling
    (``inv_scale`` = 1 / scale) the norm is the unscaled one and the coefficient includes the unscaling.

    Same reduction order as torch.nn.utils.clip_grad_norm_ (per-tensor norms grouped by dtype in order of first
    appearance, then the norm of those), so one group holding everything clips exactly like torch."""
    if clip is None and not check and inv_scale is None:
        return None, None
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms: list[Tensor] = []
    for dtype, same in by_dtype.items():
        if dtype in (torch.float32, torch.float64):
            norms.extend(torch._foreach_norm(same))
        else:  # half precision: accumulate in fp32 as torch does for the total
            norms.extend(torch.linalg.vector_norm(v, dtype=torch.float32) for v in same)
    wide = torch.float64 if torch.float64 in by_dtype else torch.float32
    norm = torch.linalg.vector_norm(torch.stack([n.to(wide) for n in norms]))
    if inv_scale is not None:  # a power of two: the unscaled norm exactly
        norm = norm * inv_scale
    coef = (clip / (norm + 1e-6)).clamp(max=1.0) if clip is not None else torch.ones_like(norm)
    if inv_scale is not None:
        coef = coef * inv_scale
    skip = (~torch.isfinite(norm)).to(wide) if check else torch.zeros_like(norm)
    return torch.stack([coef, skip]), norm


class SkipMonitor:
    MAX_PENDING = 4

    def __init__(self, device: torch.device, max_consecutive: int) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._pending: deque = deque()

    def record(self, skip_flag: Tensor, step: int, group: int, abortable: Tensor | None = None) -> None:
        """Queue this step's flag. Never raises: poll() does, between steps, so a step is never left half done.
        ``abortable`` (default: the flag itself) says whether a skip counts toward ``max_consecutive``: a loss-scale
        overflow at a high scale is routine (the scale backs off) and does not."""
        flags = torch.stack([skip_flag.reshape(()), (skip_flag if abortable is None else abortable).reshape(())]).float()
        if not self.cuda:
            self._pending.append((None, flags.detach().clone(), step, group))
            return
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, step, group))

    def poll(self, block: bool = False) -> None:
        """Account for the flags whose copies finished (all of them with ``block``); may raise NonFiniteError."""
        while self._pending:
            event, host, step, group = self._pending[0]
            must_wait = block or len(self._pending) > self.MAX_PENDING
            if event is not None and not must_wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._pending.popleft()
            self._account(bool(host[0].item()), bool(host[1].item()), step, group)

    def _account(self, skipped: bool, abortable: bool, step: int, group: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        if not abortable:
            log.info("step %d: gradient overflow at the current loss scale, update skipped, scale backed off", step)
            return
        self.consecutive += 1
        log.warning("step %d: non-finite gradients in group %d, update skipped (%d in a row)", step, group, self.consecutive)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive optimizer steps had non-finite gradients (last: step {step}, group "
                f"{group}); training stopped instead of drifting. Lower the learning rate, enable max_grad_norm, "
                "check the data for bad samples, or raise max_consecutive_skips"
            )

    def state_dict(self) -> dict:
        self.poll(block=True)
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self._pending.clear()
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))
