"""Lazy Attention with Q Cache (method.md): a lazy layer inherits its anchor's attention pattern.

GLA: the lazy layer uses the anchor's post-RoPE queries (the Q Cache) and keys for every token
and computes only its own values. VLA: the same, but only at image-token positions; text
positions use the layer's own queries and keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .attention import attend
from .config import TextConfig

MODES = ("vla", "gla")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QCache:
    """The current anchor's post-RoPE queries ``q`` [B, T, Hq, D] and keys ``k`` [B, T, Hkv, D].

    Lives in the layer loop's carry; an anchor layer overwrites it, its lazy block reads it.
    """

    q: jax.Array
    k: jax.Array

    @classmethod
    def empty(cls, batch: int, length: int, cfg: TextConfig, dtype) -> "QCache":
        return cls(
            q=jnp.zeros((batch, length, cfg.num_heads, cfg.head_dim), dtype),
            k=jnp.zeros((batch, length, cfg.num_kv_heads, cfg.head_dim), dtype),
        )


@dataclasses.dataclass(frozen=True)
class LazyAttention:
    """Attention of one decoder layer under the lazy schedule, in ``mode`` ``vla`` or ``gla``."""

    mode: str = "vla"
    impl: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            from .errors import QCacheError

            raise QCacheError(f"unknown lazy mode {self.mode!r}; expected one of {', '.join(MODES)}")

    def full_sequence(self, layer, x, cos, sin, positions, valid, vis, qc, is_lazy, *, dense: bool):
        """Attention output [B, T, Hq, D] of ``layer`` for a whole sequence, and the new Q Cache.

        ``is_lazy`` is this layer's (scanned, traced) schedule bit: ``lax.cond`` runs either the
        anchor branch (own q/k, refreshes the Q Cache) or the lazy branch (GLA: no q/k projection
        at all; VLA: own q/k only where the token is text).
        """
        if dense:
            q, k = layer.queries(x, cos, sin), layer.keys(x, cos, sin)
        else:

            def anchor(qc):
                q, k = layer.queries(x, cos, sin), layer.keys(x, cos, sin)
                return q, k, QCache(q, k)

            def lazy(qc):
                if self.mode == "gla":
                    return qc.q, qc.k, qc
                sel = vis[:, :, None, None]
                q = jnp.where(sel, qc.q, layer.queries(x, cos, sin))
                k = jnp.where(sel, qc.k, layer.keys(x, cos, sin))
                return q, k, qc

            q, k, qc = jax.lax.cond(is_lazy, lazy, anchor, qc)
        v = layer.values(x)
        return attend(q, k, v, positions, positions, valid, impl=self.impl), qc
