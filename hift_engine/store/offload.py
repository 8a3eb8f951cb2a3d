"""Offloaded state: host memory for every group, a few device slots, and the policy that moves state.

The policy (which group sits in which slot, when to write back, what to prefetch) is shared by every
transport; a transport is built over the slots and only moves bytes and orders work with streams and events:

    transport.host(gid)          group gid's host buffer (a CPU float32 tensor), allocated on first use
    transport.fetch(gid, s)      host[gid] -> slot s on the "in" stream, after the slot's previous users
    transport.zero(s, n)         zero-fill slot s on the "in" stream (a group's first activation: no copy)
    transport.writeback(gid, s)  slot s -> host[gid] on the "out" stream, after the update that wrote it
    transport.mark_compute_done(s)  record that the current stream's work on slot s is queued
    transport.wait_arrival(s)    the current stream waits until slot s's fetch/zero finished
    transport.wait_host(gid)     the host waits until host[gid] holds the latest write-back
    transport.synchronize(), transport.close(), transport.host_bytes

Two transports: TorchTransport (pure torch) and the C++ PinnedStore (native_transport.py). The rules this
enforces are listed in docs/design.md ("One step"): an update never reads a slot before its copy finished; a
write-back starts only after the update that wrote the slot; a copy into a slot waits for the previous
write-back out of it; a host read waits for the write-back. A group twice in a row moves nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StateStore
from .torch_transport import TorchTransport

__all__ = ["OffloadStore", "TRANSPORTS"]

TRANSPORTS = ("torch", "native")
_SLICE = 16 << 20  # elements per slice of a device-to-host load_state (64 MiB)


def _open_transport(kind: str, slots: list[Tensor], numels: list[int], chunk_bytes: int, alloc_order=None,
                    pin_context: bool = True):
    if kind == "native":
        from .native_transport import native_transport  # loads (or JIT-builds) the extension

        return native_transport(slots, numels, chunk_bytes, alloc_order, pin_context)
    return TorchTransport(slots, numels)  # issues each transfer whole: it cannot pace


class OffloadStore(StateStore):
    def __init__(
        self, numels: list[int], device: torch.device, transport: str = "torch", num_slots: int = 2,
        chunk_bytes: int = 0, alloc_order: list[int] | None = None, pin_context: bool = True,
    ) -> None:
        """``transport``: "torch" or "native" (``chunk_bytes`` > 0: the native store paces each transfer in
        pieces of that size). ``num_slots`` device buffers, each the size of the largest group, are allocated
        here once and handed to the transport. ``alloc_order``: the first cycle's group order (the native
        store allocates host buffers in the background in that order). ``pin_context``: the native store pins
        them from a second CUDA context of the device (HiFTConfig.pin_context)."""
        super().__init__(numels)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (one for the active group, one to prefetch), got {num_slots}")
        self.device = torch.device(device)
        self.kind = f"offload-{transport}"
        slot_numel = max(self.numels) if self.numels else 0
        self.slots = [torch.empty(slot_numel, dtype=torch.float32, device=self.device) for _ in range(num_slots)]
        self.transport = _open_transport(transport, self.slots, self.numels, chunk_bytes, alloc_order, pin_context)
        # The native store pins the first write-back's buffer now and holds the rest until the first update (its
        # pinning would slow the first forward's cudaMalloc calls: PinnedStore::may_pin in csrc/pinned_store.cpp).
        first = getattr(self.transport, "pin_first", 0)
        if first > 0:
            self.transport.wait_allocated(first)
        self._start_pinning = getattr(self.transport, "start_pinning", None)  # called once, at the first activate
        self.stats.device_bytes = slot_numel * 4 * num_slots
        self._slot_gid: list[int | None] = [None] * num_slots
        self._dirty = [False] * num_slots  # device copy newer than host copy
        self._fresh = [False] * num_slots  # zero-filled, not yet activated
        self._last_use = [0] * num_slots
        self._clock = 0
        self._initialized: set[int] = set()
        self._active: int | None = None  # slot of the group being updated

    # ------------------------------------------------------------------ policy
    def _slot_of(self, gid: int) -> int | None:
        for s, g in enumerate(self._slot_gid):
            if g == gid:
                return s
        return None

    def _victim(self) -> int:
        candidates = [s for s in range(len(self.slots)) if s != self._active]
        return min(candidates, key=lambda s: (self._slot_gid[s] is not None, self._last_use[s]))

    def _evict(self, s: int) -> None:
        gid = self._slot_gid[s]
        if gid is not None and self._dirty[s]:
            self._writeback(gid, s)
        self._slot_gid[s] = None
        self._fresh[s] = False

    def _writeback(self, gid: int, s: int) -> None:
        self.transport.writeback(gid, s)
        self._dirty[s] = False
        self.stats.writebacks += 1
        self.stats.bytes_d2h += self.numels[gid] * 4
        self.stats.host_bytes = self.transport.host_bytes

    def prefetch(self, gid: int) -> None:
        if self._slot_of(gid) is not None:
            return
        s = self._victim()
        self._evict(s)
        if gid in self._initialized:
            self.transport.fetch(gid, s)
            self.stats.fetches += 1
            self.stats.bytes_h2d += self.numels[gid] * 4
        else:
            self.transport.zero(s, self.numels[gid])
            self._fresh[s] = True
            self.stats.zero_fills += 1
        self._slot_gid[s] = gid

    def activate(self, gid: int) -> tuple[Tensor, bool]:
        if self._start_pinning is not None:  # the first update: the first forward's device allocations are done
            self._start_pinning()
            self._start_pinning = None
        s = self._slot_of(gid)
        if s is None:  # not prefetched (first step, or after load_state): bring it in now
            self.prefetch(gid)
            s = self._slot_of(gid)
        self.transport.wait_arrival(s)
        self._active = s
        self._clock += 1
        self._last_use[s] = self._clock
        fresh = self._fresh[s]
        self._fresh[s] = False
        self._initialized.add(gid)
        return self.slots[s][: self.numels[gid]], fresh

    def release(self, gid: int, keep: bool) -> None:
        s = self._slot_of(gid)
        if s is None:
            raise RuntimeError(f"release({gid}): group {gid} is not on the device; call activate() first")
        self.transport.mark_compute_done(s)
        self._dirty[s] = True
        self._active = None
        if not keep:
            # Write back at once: the copy overlaps the next forward/backward, and host memory is then
            # always current for checkpoints without extra waiting.
            self._writeback(gid, s)

    def host_state(self, gid: int) -> Tensor | None:
        if gid not in self._initialized:
            return None
        s = self._slot_of(gid)
        if s is not None and self._dirty[s]:
            self._writeback(gid, s)
        self.transport.wait_host(gid)
        return self.transport.host(gid)

    def load_state(self, gid: int, flat: Tensor) -> None:
        if flat.numel() != self.numels[gid]:
            raise ValueError(f"load_state: group {gid} holds {self.numels[gid]} state elements, got {flat.numel()}")
        self.synchronize()
        s = self._slot_of(gid)
        if s is not None:  # drop the device copy; the next activation fetches the loaded state
            self._slot_gid[s] = None
            self._dirty[s] = self._fresh[s] = False
        host, flat = self.transport.host(gid), flat.reshape(-1)
        if flat.is_cuda:  # through pageable memory in slices: a CUDA copy straight into host memory registered in
            for i in range(0, flat.numel(), _SLICE):  # pieces (HIFT_REGISTER_PIECE_MIB) could span two of them
                host[i : i + _SLICE].copy_(flat[i : i + _SLICE].cpu())
        else:
            host.copy_(flat)
        self._initialized.add(gid)
        self.stats.host_bytes = self.transport.host_bytes

    def reset(self, gid: int) -> None:
        self.synchronize()
        s = self._slot_of(gid)
        if s is not None:
            self._slot_gid[s] = None
            self._dirty[s] = self._fresh[s] = False
        self._initialized.discard(gid)

    def alloc_stats(self) -> dict | None:
        """The native store's allocation times (reserving address space, first touch, pinning, and how long
        write-backs waited for a buffer that was not ready: the first cycle's extra cost) and its pinning context
        (whether used, its device bytes, why not); None for the torch transport."""
        stats = getattr(self.transport, "alloc_stats", None)
        if stats is None:
            return None
        t = self.transport
        return {**stats(), "pin_context": t.pin_context_active, "pin_context_bytes": t.pin_context_bytes,
                "pin_context_error": t.pin_context_error}

    def wait_allocated(self) -> None:
        """Block until every group's host buffer is allocated and pinned. The native store pins them in the
        background (the first from construction, the rest from the first update or from this call); what it has
        not allocated (its background allocation off, or stopped by a failed allocation) and every buffer of the
        torch transport (which allocates on first use) is allocated here, on the caller, so that a failure (host
        memory, the locked-memory limit) raises now, with its reason, rather than at a write-back."""
        wait = getattr(self.transport, "wait_allocated", None)
        if wait is not None:
            wait()
        for gid in range(len(self.numels)):
            self.transport.host(gid)  # returns at once where the buffer exists

    def synchronize(self) -> None:
        self.transport.synchronize()

    def close(self) -> None:
        self.synchronize()
        self.transport.close()
        self.slots = []
