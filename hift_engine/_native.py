"""Loading the C++/CUDA extension (placeholder until csrc/ lands: reports unavailable)."""

from __future__ import annotations

__all__ = ["available", "load"]


def available(warn: bool = False) -> bool:
    return False


def load():
    from .errors import NativeUnavailableError

    raise NativeUnavailableError("the native extension is not built yet")
