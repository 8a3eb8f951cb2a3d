"""Build hook for the optional native extension (csrc/); all metadata lives in pyproject.toml.

`pip install -e .` never compiles anything by default in an isolated build (torch is not importable there);
the engine then JIT-builds csrc/ on first use (cached) or falls back to the pure-torch store. To build ahead
of time: HIFT_BUILD_NATIVE=1 pip install --no-build-isolation -e .  (CUDAExtension when torch has CUDA and a
toolkit is found, CppExtension otherwise). HIFT_BUILD_NATIVE=0 skips the build even when possible.
Sources and flags come from hift_engine/_build_config.py, which the JIT build reads too.
"""

import os
import runpy
from pathlib import Path

from setuptools import setup

BUILD = runpy.run_path(str(Path(__file__).resolve().parent / "hift_engine" / "_build_config.py"))


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
    sources = [f"{BUILD['CSRC_DIR']}/{s}" for s in BUILD["SOURCES"]]
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = kind("hift_engine._C", sources, extra_compile_args={"cxx": BUILD["compile_flags"](cuda)},
               extra_link_args=BUILD["LINK_FLAGS"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
