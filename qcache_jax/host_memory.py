"""Host memory: handing freed heap back to the operating system, and the XLA CPU flag that
keeps a prefill's temporary buffers small.

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
import os

# XLA CPU's concurrency-optimized scheduler orders a prefill so that every layer's attention
# output buffer is live at once: 343 MiB of temporaries for SmolLM2-135M at batch 8 and 512
# tokens, 97 MiB without it, at the same prefill and decode speed (measured interleaved here,
# 2026-12-08). It is read when the CPU backend starts, so only an environment flag sets it.
LEAN_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


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


def use_lean_xla_flags(environ=os.environ) -> None:
    """Add :data:`LEAN_XLA_FLAGS` to ``XLA_FLAGS`` (entry points call this before JAX starts its
    backend; later it has no effect). A flag the user set already, either way, is left alone."""
    flags = environ.get("XLA_FLAGS", "")
    extra = [f for f in LEAN_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()
