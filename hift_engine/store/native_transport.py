"""The C++/CUDA pinned store (csrc/) as an OffloadStore transport: exactly sized, fast-pinned host memory and
paced copies on two side streams ordered by CUDA events, with the GIL released in blocking calls. The pybind
object has TorchTransport's methods, so OffloadStore calls it directly."""

from __future__ import annotations

import atexit
import weakref

import torch
from torch import Tensor

from .. import _native
from ..errors import NativeUnavailableError

__all__ = ["native_transport", "hold_pin_context"]

_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # free pinned memory before CUDA tears down
    for store in list(_live):
        store.close()


def native_transport(slots: list[Tensor], numels: list[int], chunk_bytes: int = 0, alloc_order: list[int] | None = None,
                     pin_context: bool = True):
    """A ``PinnedStore`` over ``slots``; ``chunk_bytes`` > 0 paces each transfer in pieces of that size; host
    buffers are allocated in the background in ``alloc_order`` (the first cycle's group order) and pinned from a
    second context of the device when ``pin_context`` (and the driver allows one).
    Raises NativeUnavailableError (with the original build/load error) if the extension cannot serve them."""
    module = _native.load()
    if slots[0].is_cuda and not module.with_cuda:
        raise NativeUnavailableError("the native extension was built without CUDA; it cannot serve a CUDA device")
    store = module.PinnedStore(list(numels), list(slots), chunk_bytes, list(alloc_order or []), pin_context)
    _live.add(store)
    return store


def hold_pin_context(device: torch.device):
    """The device's pinning context, made now if no store holds it yet, and kept while the returned object lives;
    None where the extension, its CUDA build or the driver cannot give one (the store then says why). A plan that
    reads the device's free memory before the store exists takes it first, so that the context's device memory
    (about 260 MiB on an H200, outside torch's accounting) is not counted as room for training."""
    device = torch.device(device)
    if device.type != "cuda" or not _native.available():
        return None
    module = _native.load()
    if not module.with_cuda:
        return None
    ctx, _why = module.hold_pin_context(device.index if device.index is not None else torch.cuda.current_device())
    return ctx
