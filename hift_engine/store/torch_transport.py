"""Pure-torch transport: pinned host tensors, non-blocking copies on two side streams, torch CUDA events.

On a CPU device the same code runs with plain host tensors and synchronous copies (what CI exercises).
Host buffers come from torch's pinned allocator, which rounds large requests up to a power of two (a 9 GiB
request reserved 16 GiB on the H100 machine); the native transport allocates exactly. Transfers are issued
whole: pacing them (so small copies of other streams do not queue behind a whole group) needs the native
transport's worker thread, which a Python thread holding the GIL could not replace.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TorchTransport"]


class TorchTransport:
    def __init__(self, slots: list[Tensor], numels: list[int]) -> None:
        """``slots``: device (or CPU) float32 tensors, each large enough for the largest of ``numels``."""
        self.slots, self.numels = slots, numels
        self.device = slots[0].device
        self.cuda = self.device.type == "cuda"
        self._host: dict[int, Tensor] = {}
        self.host_bytes = 0
        if self.cuda:
            self.in_stream = torch.cuda.Stream(self.device)
            self.out_stream = torch.cuda.Stream(self.device)
            self._host_written: dict[int, torch.cuda.Event] = {}
            n = len(slots)
            self._arrived = [torch.cuda.Event() for _ in range(n)]
            self._compute_done = [torch.cuda.Event() for _ in range(n)]
            self._written = [torch.cuda.Event() for _ in range(n)]

    def host(self, gid: int) -> Tensor:
        buf = self._host.get(gid)
        if buf is None:  # lazily, the first time a group is put away: start-up touches no host memory
            buf = torch.empty(self.numels[gid], dtype=torch.float32, pin_memory=self.cuda)
            self._host[gid] = buf
            self.host_bytes += buf.numel() * 4
        return buf

    # ------------------------------------------------------------------ ordered copies
    def _slot_free(self, stream, s: int, gid: int | None = None) -> None:
        stream.wait_event(self._compute_done[s])  # last update that used the slot
        stream.wait_event(self._written[s])  # last write-back out of the slot
        if gid is not None and gid in self._host_written:
            stream.wait_event(self._host_written[gid])  # host copy of gid complete before reading it

    def fetch(self, gid: int, s: int) -> None:
        n, src = self.numels[gid], self.host(gid)
        if not self.cuda:
            self.slots[s][:n].copy_(src, non_blocking=True)
            return
        with torch.cuda.stream(self.in_stream):
            self._slot_free(self.in_stream, s, gid)
            self.slots[s][:n].copy_(src, non_blocking=True)
            self._arrived[s].record(self.in_stream)

    def zero(self, s: int, n: int) -> None:
        if not self.cuda:
            self.slots[s][:n].zero_()
            return
        with torch.cuda.stream(self.in_stream):
            self._slot_free(self.in_stream, s)
            self.slots[s][:n].zero_()
            self._arrived[s].record(self.in_stream)

    def writeback(self, gid: int, s: int) -> None:
        n, dst = self.numels[gid], self.host(gid)
        if not self.cuda:
            dst.copy_(self.slots[s][:n], non_blocking=True)
            return
        with torch.cuda.stream(self.out_stream):
            self.out_stream.wait_event(self._compute_done[s])
            dst.copy_(self.slots[s][:n], non_blocking=True)
            self._written[s].record(self.out_stream)
            ev = self._host_written.setdefault(gid, torch.cuda.Event())
            ev.record(self.out_stream)

    def mark_compute_done(self, s: int) -> None:
        if self.cuda:
            self._compute_done[s].record(torch.cuda.current_stream(self.device))

    def wait_arrival(self, s: int) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._arrived[s])

    def wait_host(self, gid: int) -> None:
        if self.cuda and gid in self._host_written:
            self._host_written[gid].synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            self.in_stream.synchronize()
            self.out_stream.synchronize()

    def close(self) -> None:
        self._host.clear()
        self.host_bytes = 0
