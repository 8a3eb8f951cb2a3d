"""Does an error raised inside the native extension reach Python as an exception (not a crash)?

    python benchmarks/native_error_probe.py

Each case calls the C++ store with a bad argument and expects ValueError. On the GPU machine's toolchain an
error leaving the module once crashed the process; run_on_gpu.sh runs this under cuda-gdb when the native
store's tests crash, to get a backtrace.
"""

import os

import torch

from hift_engine import _native

mod = _native.load()
print("module:", mod.__file__, "cuda build:", mod.with_cuda, flush=True)
store = mod.PinnedStore([10, 4], [torch.empty(10), torch.empty(10)])
cases = {
    "fetch before any write-back": lambda: store.fetch(0, 0),
    "gid out of range": lambda: store.fetch(5, 0),
    "bad HIFT_ALLOC_MODE": lambda: (os.environ.__setitem__("HIFT_ALLOC_MODE", "mmap"), mod.PinnedStore([10], [torch.empty(10)])),
}
for name, call in cases.items():
    print(f"{name}: ", end="", flush=True)
    try:
        call()
        print("no error raised")
    except ValueError as e:
        print(f"ValueError: {e}", flush=True)
os.environ.pop("HIFT_ALLOC_MODE", None)
store.close()
print("probe finished", flush=True)
