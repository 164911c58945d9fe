"""Small Flax NNX building blocks whose parameter names map one-to-one onto Hugging Face's.

HF ``nn.Linear.weight`` [out, in] becomes ``kernel`` [in, out]; norm ``weight`` becomes
``scale``; ``nn.Embedding.weight`` becomes ``embedding``. The converter relies on these names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_INIT_STD = 0.02


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# Module-level functions (not lambdas made per call): modules hold them, so two models built
# from the same config must get the same objects for their graphdefs to compare equal.
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function HF calls ``name`` (``ACT2FN``), exactly, not an approximation."""
    return _ACTIVATIONS[name]


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (d_in, d_out))).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class Embed(nnx.Module):
    def __init__(self, n: int, d: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (n, d))).astype(dtype))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):
        """Tied output head: logits against the embedding table."""
        return x @ self.embedding[...].T


class LayerNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((d,), dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Statistics in float32 as torch does for its LayerNorm on half types.
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((d,), dtype))
        self.eps = eps

    def __call__(self, x):
        # HF LlamaRMSNorm: normalise in float32, cast back, then multiply by the weight.
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def stacked(n: int, make, rngs: nnx.Rngs):
    """``n`` copies of the module built by ``make(rngs)``, parameters stacked on a leading axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


def scan_layers(stack: nnx.Module, body, carry, xs=None, *, unroll: bool = False):
    """Run ``body(layer, carry, x) -> (carry, y)`` over a stacked module, scanned or unrolled.

    ``unroll=True`` runs a Python loop over static layer slices (same layer code, one XLA
    computation per layer); ``False`` traces the layer once inside ``lax.scan``.
    """
    graphdef, state = nnx.split(stack)

    def step(c, inp):
        layer_state, x = inp
        return body(nnx.merge(graphdef, layer_state), c, x)

    if not unroll:
        return jax.lax.scan(step, carry, (state, xs))
    ys = []
    for i, layer in enumerate(unstack(stack)):
        carry, y = body(layer, carry, jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    ys = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None
    return carry, ys


def unstack(stack: nnx.Module) -> list[nnx.Module]:
    """The layers of a stacked module as separate modules (static slices), for unrolled loops."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]
