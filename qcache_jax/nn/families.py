"""The model-family seam: which module class a config builds.

A family is a config dataclass (:mod:`qcache_jax.config`, named by its ``family``) and a
:class:`~qcache_jax.nn.decoder.MultimodalDecoder` subclass: its own embedding of images and its
own RoPE positions, the shared decoder layers, lazy attention, engine and head. The passes, the
converter and the API build models only through :func:`build_model` / :func:`abstract_model`.
"""

from __future__ import annotations

from flax import nnx

from .llava import Llava
from .qwen2_vl import Qwen2VL

MODEL_CLASSES = {"llava": Llava, "qwen2_vl": Qwen2VL, "qwen2_5_vl": Qwen2VL}


def model_class(cfg):
    """The NNX module class of ``cfg``'s family."""
    try:
        return MODEL_CLASSES[cfg.family]
    except KeyError:
        raise ValueError(f"unknown model family {cfg.family!r}") from None


def build_model(cfg, rngs: nnx.Rngs):
    """A model of ``cfg`` with random parameters from ``rngs``."""
    return model_class(cfg)(cfg, rngs=rngs)


def abstract_model(cfg):
    """(graphdef, pure dict of ShapeDtypeStruct) of the model, without allocating anything."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)
