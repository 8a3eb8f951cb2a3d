"""How the C++/CUDA extension is built: the one list of sources and flags, read by setup.py (by file path:
it cannot import the package, which needs torch) and by _native.py (the JIT build). No imports beyond sys."""

import sys

__all__ = ["CSRC_DIR", "SOURCES", "compile_flags", "LINK_FLAGS"]

CSRC_DIR = "csrc"  # relative to the repository root
SOURCES = ("pinned_store.cpp", "paced_copier.cpp", "pin_context.cpp", "bindings.cpp")
# libstdc++ linked dynamically whatever the toolchain's default: a static copy beside torch's shared one
# crashed the first error message (docs/design.md, "Building the extension").
LINK_FLAGS = ["-Wl,--no-as-needed", "-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def compile_flags(cuda: bool) -> list[str]:
    """C++ flags; no -std: torch picks the standard its headers need (docs/design.md)."""
    return ["-O3"] + (["-DHIFT_WITH_CUDA"] if cuda else [])
