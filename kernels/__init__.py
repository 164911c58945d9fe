"""Flash-attention kernels for Lazy Attention with Q Cache.

Head-major layout: q [B, Hq, T, D], k/v [B, Hkv, T, D]; decode q [B, Hq, D],
cache [B, Hkv, S, D].

Public API (see kernels/README.md):
  reference_attention  plain-jnp direct formula (the test oracle's twin)
  flash_attention      prefill, position-masked, GQA, returns (out, lse)
  decode_attention     one token per row vs a head-major KV cache
  lazy_decode_pv       GLA lazy-layer decode: anchor probs @ own V
  merge_attention      exact log-sum-exp merge of key segments
"""

from .dispatch import IMPLS, decode_attention, flash_attention, lazy_decode_pv, resolve_impl
from .reference import merge_attention, reference_attention

__all__ = [
    "IMPLS",
    "decode_attention",
    "flash_attention",
    "lazy_decode_pv",
    "merge_attention",
    "reference_attention",
    "resolve_impl",
]
