"""Handing freed host memory back to the operating system.

XLA's compiler allocates a few hundred MiB of host heap while it compiles a program (LLVM's
passes over the unrolled layers) and frees it afterwards, but glibc's allocator keeps freed
pages mapped, so they stay in the process's resident set for its whole life: about 110 MiB
after compiling SmolLM2-135M's prefill + decode (BENCHMARKS.md, "Peak resident memory").
``malloc_trim(0)`` returns them. It only releases pages nothing uses, so it cannot change a
result; on a C library without it (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); False where unsupported."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(ctypes.c_size_t(0))
    return True
