"""The one exception type for user errors (bad input, bad files, bad options), and the one
place that turns it into what a user sees.

Every entry point (the ``qcache`` commands, ``python -m qcache_jax.demo``, the benchmark
scripts) runs through :func:`run_entry_point`: a ``QCacheError`` or running out of memory
prints one line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class QCacheError(ValueError):
    """A problem with the user's input: a path, a file, a shape, an option."""


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def run_entry_point(where: str, fn: Callable[[], int | None], *,
                    oom_hint: str = "try a smaller batch, a shorter prompt or fewer new tokens") -> int:
    """``fn()``'s exit status; a user error becomes ``"{where}: error: ..."`` on stderr and 2."""
    try:
        return fn() or 0
    except QCacheError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only out-of-memory is turned into a user error
        if not _out_of_memory(e):
            raise
        print(f"{where}: error: out of memory ({type(e).__name__}); {oom_hint}", file=sys.stderr)
        return 2
