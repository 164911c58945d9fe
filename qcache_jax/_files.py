"""Writing files the way users expect: atomically (a reader sees the old file or the new one,
never half of one) and with the permissions the user's umask gives, not ``mkstemp``'s 0600."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import QCacheError


def current_umask() -> int:
    """The process umask (reading it requires setting it; it is restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, give it mode ``0666 & ~umask`` and
    rename it over ``path``. Raises QCacheError naming the path when it cannot be written."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise QCacheError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def atomic_output_dir(out, *, force: bool = False):
    """Yield a temporary directory beside ``out``; rename it to ``out`` only if the block succeeds.

    Any exception, KeyboardInterrupt included, removes the temporary directory, so nothing is
    left at ``out``. With ``force`` an existing ``out`` is replaced only after success.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result is an ordinary directory
    try:
        yield tmp
        if out.exists():
            if not force:
                raise QCacheError(f"{out} already exists (use --force to overwrite)")
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
