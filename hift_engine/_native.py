"""Loading the C++/CUDA extension (csrc/): an ahead-of-time build (hift_engine._C, from setup.py) if present,
else a cached JIT build with torch.utils.cpp_extension + ninja.

If neither works, the engine falls back to the pure-torch store with one warning; the original error is kept
and raised (as NativeUnavailableError) only when a native-only feature is asked for. HIFT_DISABLE_NATIVE=1
turns loading off. Without a usable CUDA toolchain the same sources build CPU-only (plain memory, synchronous
copies), which is what CPU CI tests.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from pathlib import Path

from ._build_config import CSRC_DIR, LINK_FLAGS, SOURCES, compile_flags
from .errors import NativeUnavailableError

__all__ = ["CSRC", "available", "load", "status"]

DISABLE_ENV = "HIFT_DISABLE_NATIVE"
CSRC = Path(__file__).resolve().parent.parent / CSRC_DIR

_lock = threading.Lock()
_module = None
_error: BaseException | None = None
_warned = False


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    return torch.cuda.is_available() and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise FileNotFoundError(f"extension sources {missing} not found under {CSRC} (installed without csrc/?)")
    cuda = _want_cuda()
    name = f"hift_native_{'cuda' if cuda else 'cpu'}_{torch.__version__.replace('.', '_').replace('+', '_')}"
    build_dir = Path(os.environ.get("HIFT_BUILD_DIR", Path.home() / ".cache" / "hift_engine" / name))
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=compile_flags(cuda),
        extra_ldflags=LINK_FLAGS,
        with_cuda=cuda,
        build_directory=str(build_dir),
        verbose=os.environ.get("HIFT_VERBOSE_BUILD") == "1",
    )


def load():
    """The extension module; raises NativeUnavailableError (with the original error) if it cannot load."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is None:
            try:
                if os.environ.get(DISABLE_ENV) == "1":
                    raise RuntimeError(f"disabled by {DISABLE_ENV}=1")
                try:
                    _module = importlib.import_module("hift_engine._C")
                except ImportError:
                    _module = _jit_build()
                return _module
            except Exception as e:  # noqa: BLE001 - any build/load failure degrades to the torch store
                _error = e
        raise NativeUnavailableError(
            f"the hift_engine native extension is unavailable: {type(_error).__name__}: {_error}"
        ) from _error


def available(warn: bool = False) -> bool:
    """Whether the extension loads; with ``warn``, say once why the pure-torch store is used instead."""
    global _warned
    try:
        load()
        return True
    except NativeUnavailableError as e:
        if warn and not _warned and os.environ.get(DISABLE_ENV) != "1":
            _warned = True
            warnings.warn(f"{e}; using the pure-torch state store instead", stacklevel=3)
        return False


def status() -> str:
    try:
        mod = load()
        return f"loaded ({'cuda' if mod.with_cuda else 'cpu-only'} build, {getattr(mod, '__file__', '?')})"
    except NativeUnavailableError as e:
        return f"unavailable: {e}"
