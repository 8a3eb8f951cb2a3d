"""Transport over the C++/CUDA pinned store (csrc/): exactly sized, fast-pinned host memory and copies on two
side streams ordered by CUDA events, with the GIL released in blocking calls. Same contract as TorchTransport."""

from __future__ import annotations

import atexit
import os
import weakref

import torch
from torch import Tensor

from .. import _native

__all__ = ["NativeTransport"]

_live: "weakref.WeakSet[NativeTransport]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # free pinned memory before CUDA tears down
    for t in list(_live):
        t.close()


class NativeTransport:
    kind = "native"

    def __init__(
        self, device: torch.device, alloc_mode: str = "register", touch_threads: int = 0, chunk_bytes: int = 0,
        pace_depth: int | None = None,
    ) -> None:
        self.module = _native.load()  # raises NativeUnavailableError with the original build/load error
        self.device = torch.device(device)
        if self.device.type == "cuda" and not self.module.with_cuda:
            from ..errors import NativeUnavailableError

            raise NativeUnavailableError("the native extension was built without CUDA; it cannot serve a CUDA device")
        self.alloc_mode, self.touch_threads, self.chunk_bytes = alloc_mode, touch_threads, chunk_bytes
        # Pieces queued at a time when pacing (csrc/paced_copier.h); HIFT_PACE_DEPTH is a diagnostic knob.
        self.pace_depth = pace_depth if pace_depth is not None else int(os.environ.get("HIFT_PACE_DEPTH", "1"))
        self._store = None

    def attach(self, slots: list[Tensor], numels: list[int]) -> None:
        self._store = self.module.PinnedStore(
            list(numels), list(slots), self.alloc_mode, self.touch_threads, self.chunk_bytes, self.pace_depth
        )
        _live.add(self)

    @property
    def host_bytes(self) -> int:
        return self._store.host_bytes if self._store is not None else 0

    @property
    def alloc_seconds(self) -> float:
        return self._store.alloc_seconds if self._store is not None else 0.0

    def host(self, gid: int) -> Tensor:
        return self._store.host(gid)

    def fetch(self, gid: int, s: int) -> None:
        self._store.fetch(gid, s)

    def zero(self, s: int, n: int) -> None:
        self._store.zero(s, n)

    def writeback(self, gid: int, s: int) -> None:
        self._store.writeback(gid, s)

    def mark_compute_done(self, s: int) -> None:
        self._store.mark_compute_done(s)

    def wait_arrival(self, s: int) -> None:
        self._store.wait_arrival(s)

    def wait_host(self, gid: int) -> None:
        self._store.wait_host(gid)

    def synchronize(self) -> None:
        if self._store is not None:
            self._store.synchronize()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
