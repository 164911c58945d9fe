"""Flash-attention kernels for Lazy Attention with Q Cache (the code lives in ``kernels/``).

Head-major layout: q [B, Hq, T, D], k/v [B, Hkv, T, D]; decode q [B, Hq, D],
cache [B, Hkv, S, D].

Public API (see kernels/README.md):
  reference_attention  plain-jnp direct formula (the test oracle's twin)
  flash_attention      prefill, position-masked, GQA, returns (out, lse)
  decode_attention     one token per row vs a head-major KV cache
  lazy_decode_pv       lazy-layer decode: anchor probs @ own V
  merge_attention      exact log-sum-exp merge of key segments

Why a module and not ``kernels/__init__.py`` (docs/architecture.md, "Why kernels/ is not a
package"): the checkout's root is on ``sys.path`` whenever something runs from it, and a
top-level ``kernels/`` holding an ``__init__.py`` would be a regular package named ``kernels``
that shadows Hugging Face's ``kernels`` distribution, which transformers imports. So
``kernels/`` has no ``__init__.py`` and is never a package by itself; this module *is* the
package ``qcache_jax.kernels``: its ``__path__`` (a module with a ``__path__`` is a package)
points at the folder ``kernels`` beside it - in the checkout the symlink ``qcache_jax/kernels
-> ../kernels``, in a wheel the copy setuptools puts there (pyproject.toml's package-dir).
"""

import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels")]

from .kernels.dispatch import IMPLS, decode_attention, flash_attention, lazy_decode_pv, resolve_impl  # noqa: E402
from .kernels.reference import merge_attention, reference_attention  # noqa: E402

__all__ = [
    "IMPLS",
    "decode_attention",
    "flash_attention",
    "lazy_decode_pv",
    "merge_attention",
    "reference_attention",
    "resolve_impl",
]
