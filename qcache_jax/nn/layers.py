"""Small Flax NNX building blocks whose parameter names map one-to-one onto Hugging Face's, and
the one loop over a list of identical layers (scanned or unrolled).

HF ``nn.Linear.weight`` [out, in] becomes ``kernel`` [in, out]; norm ``weight`` becomes
``scale``; ``nn.Embedding.weight`` becomes ``embedding``. The converter relies on these names.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_INIT_STD = 0.02
LOOPS = ("scan", "unroll")


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


def _matmul_impl(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def matmul(x, w):
    """``x [..., in] @ w [in, out]`` in ``x``'s dtype with float32 accumulation.

    For float32 this is ``x @ w``. For bfloat16 the forward and the backward pass both run
    bf16 x bf16 -> f32 dots (XLA CPU's fast path with AVX512-BF16); plain autodiff of a
    mixed-precision dot would fall back to f32 x f32 products in the backward pass.
    """
    return _matmul_impl(x, w)


def _matmul_fwd(x, w):
    return _matmul_impl(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    # When w is not being trained, XLA removes this product (its result is unused).
    dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (d_in, d_out))).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = matmul(x, self.kernel[...])
        return y + self.bias[...].astype(y.dtype) if self.bias is not None else y


class FcMlp(nnx.Module):
    """``fc2(act(fc1(x)))`` with biases: CLIP's and Qwen2-VL's vision MLP."""

    def __init__(self, d: int, f: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(d, f, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(f, d, bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nnx.Module):
    """``down(act(gate(x)) * up(x))``: the decoder's SwiGLU MLP and Qwen2.5-VL's vision MLP."""

    def __init__(self, d: int, f: int, act: str, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
    def __init__(self, n: int, d: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (n, d))).astype(dtype))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):
        """Tied output head: float32 logits against the embedding table, contracting its last
        axis directly (``x @ E.T`` would ask XLA for a transposed copy of the whole table)."""
        e = self.embedding[...]
        return jax.lax.dot_general(x, e.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)


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


def layer_list(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.List:
    """``n`` layers built by ``make(rngs)``, each with its own parameter arrays.

    Layers are kept as separate arrays (not stacked on a leading axis) because the decode loop
    reads every layer's weights every step: slicing a layer out of a stacked array inside a
    jitted loop makes XLA copy the slice each time. A scanned loop stacks them on the fly.
    """
    return nnx.List([make(rngs) for _ in range(n)])


def check_loop(loop: str) -> str:
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    return loop


def stack_trees(trees: Sequence):
    """Stack identically-structured pytrees leaf by leaf on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, n: int) -> list:
    """The inverse of :func:`stack_trees`: ``n`` pytrees (static slices of the leading axis)."""
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def layer_loop(layers: Sequence[nnx.Module], body, carry, xs: Sequence | None = None, *, loop: str = "scan"):
    """Run ``body(layer, carry, x) -> (carry, y)`` over ``layers`` (identical structure).

    ``loop="scan"`` stacks the layers' parameters (and the per-layer inputs ``xs``) and traces
    the body once inside ``lax.scan``: one compiled layer, fast to compile, the layer weights
    copied into a stack per call. ``loop="unroll"`` runs a Python loop over the layers: one
    computation per layer reading each layer's own arrays in place. ``xs`` is a sequence with one
    pytree (or None) per layer. Returns ``(carry, ys)`` with ``ys`` a list, one entry per layer.
    """
    n = len(layers)
    xs = [None] * n if xs is None else list(xs)
    if check_loop(loop) == "unroll":
        ys = []
        for layer, x in zip(layers, xs):
            carry, y = body(layer, carry, x)
            ys.append(y)
        return carry, ys
    graphdef, _ = nnx.split(layers[0])
    states = stack_trees([nnx.split(layer)[1] for layer in layers])

    def step(c, inp):
        state, x = inp
        return body(nnx.merge(graphdef, state), c, x)

    carry, ys = jax.lax.scan(step, carry, (states, stack_trees(xs) if xs[0] is not None else None))
    return carry, (unstack_tree(ys, n) if ys is not None else [None] * n)
