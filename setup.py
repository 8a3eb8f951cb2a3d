"""Build hook for the optional native extension (csrc/); all metadata lives in pyproject.toml.

`pip install -e .` never compiles anything by default in an isolated build (torch is not importable there);
the engine then JIT-builds csrc/ on first use (cached) or falls back to the pure-torch store. To build ahead
of time: HIFT_BUILD_NATIVE=1 pip install --no-build-isolation -e .  (CUDAExtension when torch has CUDA and a
toolkit is found, CppExtension otherwise). HIFT_BUILD_NATIVE=0 skips the build even when possible.
"""

import os
import sys

from setuptools import setup


def native_extensions():
    if os.environ.get("HIFT_BUILD_NATIVE", "auto") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("HIFT_BUILD_NATIVE", "auto") == "auto" and not cuda:
        return [], {}  # CPU machines JIT-build on demand; nothing to do at install time
    sources = ["csrc/pinned_store.cpp", "csrc/paced_copier.cpp", "csrc/bindings.cpp"]
    # No -std flag: torch chooses the standard its headers need (C++20 for torch 2.13; forcing C++17 made
    # inline c10 types differ from libc10 and crashed on the first exception, seen with torch 2.11).
    args = {"cxx": ["-O3"] + (["-DHIFT_WITH_CUDA"] if cuda else [])}
    # The C++ runtime linked dynamically, as in hift_engine/_native.py (LINK_FLAGS): a static libstdc++ beside
    # torch's shared one crashed the first error message on the GPU machine.
    link = ["-Wl,--no-as-needed", "-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = kind("hift_engine._C", sources, extra_compile_args=args, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
