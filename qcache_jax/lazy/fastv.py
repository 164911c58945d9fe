"""FastV (Chen et al., 2024) on top of Lazy Attention: visual tokens pruned after layer K.

After decoder layer ``K`` (0-based) the visual tokens are ranked by the attention they receive
from the *selector* token (the last prompt token), in layer K's attention probabilities
averaged over the query heads; the best ``kept(n)`` of a row's ``n`` visual tokens are kept
and the rest are dropped for layers K+1 ... L-1: those layers neither attend to them nor
store them, so their visual cache segment is really shorter (``kept(S_img)`` entries).

How it composes with the lazy schedule (docs/method.md, "FastV"):

* the kept tokens keep their RoPE positions; the causal mask is by position, so dropping keys
  is masking them (a full-sequence pass) or not storing them (the cache);
* a lazy block that straddles K is cut there: layer K+1 becomes an anchor (:meth:`FastV.cut`),
  so every Q Cache, and every key set a lazy layer inherits, covers one token set;
* ``keep == 1`` prunes nothing and is no FastV at all (no cut either): :func:`make` returns None.

The full-sequence pass still computes the dropped tokens' own rows (they are only masked as
keys): their logits are not FastV's (FastV removes those tokens), the others are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from ..errors import QCacheError
from .schedule import Schedule


@dataclasses.dataclass(frozen=True)
class FastV:
    """Prune visual tokens after decoder layer ``layer`` (K), keeping the fraction ``keep`` (R).

    Hashable: part of a compiled plan's cache layout. Build it with :func:`make` (range checks).
    """

    layer: int
    keep: float

    def kept(self, n: int) -> int:
        """Visual tokens kept of ``n``: ceil(R * n), at least 1 when n >= 1. The product is taken
        with a 1e-9 tolerance, so that R = 0.07 keeps 7 of 100 (0.07 * 100 is 7.000000000000001)."""
        n = int(n)
        return min(n, max(1 if n else 0, math.ceil(self.keep * n - 1e-9)))

    def kept_counts(self, n, capacity: int):
        """:meth:`kept` of per-row counts ``n`` [B] (traced, each <= ``capacity``), exactly the
        Python function: a lookup table, so no float rounding can differ between the two."""
        return jnp.asarray(_table(self, int(capacity)))[n]

    def cut(self, lazy):
        """The schedule (or traced lazy mask [L]) with layer K+1 an anchor: no lazy block
        straddles K (idempotent)."""
        k = self.layer + 1
        if isinstance(lazy, Schedule):
            if k >= lazy.num_layers or not lazy.lazy[k]:
                return lazy
            return dataclasses.replace(lazy, lazy=lazy.lazy[:k] + (False,) + lazy.lazy[k + 1 :])
        return jnp.asarray(lazy, bool).at[k].set(False)

    def select(self, probe, vis):
        """The kept visual tokens [B, T] bool from layer K's probabilities of the selector row
        ``probe`` [B, Hq, 1, T] and the visual positions ``vis`` [B, T]: per row the
        ``kept(n)`` visual tokens with the largest head-averaged probability (ties: the earlier
        position)."""
        score = jnp.where(vis, probe[:, :, 0].astype(jnp.float32).mean(1), -1.0)  # probabilities are >= 0
        order = jnp.argsort(-score, axis=1, stable=True)
        rank = jnp.argsort(order, axis=1)  # each position's place in the ranking
        want = self.kept_counts(vis.sum(1).astype(jnp.int32), vis.shape[1])
        return vis & (rank < want[:, None])

    def describe(self) -> str:
        """``K:R``, the form ``--fastv`` takes."""
        return f"{self.layer}:{self.keep:g}"


@functools.lru_cache(maxsize=64)
def _table(fastv: FastV, capacity: int) -> np.ndarray:
    return np.asarray([fastv.kept(n) for n in range(capacity + 1)], np.int32)


def make(layer, keep, num_layers: int) -> FastV | None:
    """The :class:`FastV` for ``fastv_layer`` / ``fastv_keep`` on a model of ``num_layers``
    layers, or None (``layer`` None, or ``keep`` 1: nothing pruned). Bad values are one
    QCacheError line."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise QCacheError(f"fastv_layer must be an integer layer index, got {layer!r}")
    if not 0 <= int(layer) <= num_layers - 2:
        raise QCacheError(
            f"fastv_layer {layer} is out of range: FastV prunes after layer K for the layers above it, "
            f"so K must be in 0-{num_layers - 2} (the model has {num_layers} layers)"
        )
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise QCacheError(f"fastv_keep must be a fraction in (0, 1], got {keep!r}") from None
    if not 0 < keep <= 1:
        raise QCacheError(f"fastv_keep must be a fraction in (0, 1], got {keep!r}")
    return None if keep == 1 else FastV(int(layer), keep)


def parse(spec: str, num_layers: int) -> FastV | None:
    """``--fastv K:R`` (e.g. ``2:0.5``) -> :func:`make`."""
    layer, sep, keep = str(spec).partition(":")
    if not sep or not layer.strip().isdigit():
        raise QCacheError(f"bad --fastv {spec!r}: expected K:R, a layer index and a kept fraction, e.g. 2:0.5")
    return make(int(layer), keep.strip(), num_layers)
