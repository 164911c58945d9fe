"""Hugging Face tensor names <-> this project's parameter paths, in both directions, in one table.

Our parameter tree mirrors ``LlavaForConditionalGeneration`` (``language_model.layers.3.
self_attn.q_proj.kernel``). Checkpoints in the wild name the same tensors in several layouts;
:func:`canonical_name` maps any of them onto one canonical form, and :func:`export_name` maps
the canonical form onto what transformers 5 itself writes. A parameter's leaf says how its
tensor is stored: ``kernel`` is a transposed ``nn.Linear.weight``, ``patch_embedding`` a conv
kernel in HWIO (HF: OIHW), ``scale``/``embedding`` are ``weight``s, the rest keep their name.
"""

from __future__ import annotations

import numpy as np

# Prefix rewrites onto the canonical layout, applied until none matches (a name can need two:
# transformers' loaded-model name model.vision_tower.vision_model.* -> vision_tower.*).
_CANONICAL = (
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.visual.", "visual."),  # Qwen2-VL / Qwen2.5-VL (transformers 5; older saves: visual.*)
    ("model.image_newline", "image_newline"),  # LLaVA-NeXT (Hub llava-hf and saved files: image_newline)
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    # text-only *ForCausalLM checkpoints
    ("model.layers.", "language_model.layers."),
    ("model.embed_tokens.", "language_model.embed_tokens."),
    ("model.norm.", "language_model.norm."),
)
# Canonical prefix -> the name transformers 5 gives the tensor in LlavaForConditionalGeneration /
# LlavaNextForConditionalGeneration (and in a *ForCausalLM for text-only checkpoints).
_EXPORT = {
    "llava": (
        ("language_model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),  # LLaVA-NeXT
    ),
    "causal_lm": (("language_model.", "model."),),
    "qwen2_vl": (("language_model.", "model.language_model."), ("visual.", "model.visual.")),
}

# leaf -> (HF leaf, transform)
# ``patch_kernel``: Qwen2-VL's Conv3d patch embedding, OCTHW -> CTHWO (a flattened patch times
# its reshape to [C*T*P*P, O] is the convolution: the stride is the kernel).
_LEAVES = {"kernel": ("weight", "linear"), "scale": ("weight", "copy"), "embedding": ("weight", "copy"),
           "patch_kernel": ("weight", "conv3d")}
_TO_FLAX = {"linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0), "copy": lambda x: x,  # OIHW -> HWIO
            "conv3d": lambda x: x.transpose(1, 2, 3, 4, 0)}
_TO_HF = {"linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1), "copy": lambda x: x,  # HWIO -> OIHW
          "conv3d": lambda x: x.transpose(4, 0, 1, 2, 3)}


def canonical_name(key: str) -> str:
    """An HF tensor name from any supported layout, in the canonical layout."""
    changed = True
    while changed:
        changed = False
        for old, new in _CANONICAL:
            if key.startswith(old):
                key, changed = new + key[len(old) :], True
                break
    return key


def export_name(canonical: str, kind: str = "llava") -> str:
    """The name transformers 5 writes for a canonical tensor name (``kind``: ``llava``,
    ``causal_lm`` or ``qwen2_vl``, which Qwen2.5-VL shares)."""
    for old, new in _EXPORT[kind]:
        if canonical.startswith(old):
            return new + canonical[len(old) :]
    return canonical  # lm_head.weight


def param_name(path: tuple[str, ...]) -> tuple[str, str]:
    """(canonical HF name, transform) of the parameter at ``path`` (keys as strings)."""
    *mods, leaf = (str(p) for p in path)
    base = ".".join(mods)
    if leaf == "patch_embedding":
        return f"{base}.patch_embedding.weight", "conv"
    hf_leaf, transform = _LEAVES.get(leaf, (leaf, "copy"))
    return (f"{base}.{hf_leaf}" if base else hf_leaf), transform


def to_flax(x, transform: str):
    """An HF tensor in our layout."""
    return _TO_FLAX[transform](x)


def to_hf(x, transform: str):
    """One of our parameters in HF's layout."""
    return _TO_HF[transform](x)


def flax_shape(hf_shape, transform: str) -> tuple[int, ...]:
    """Our shape of an HF tensor of ``hf_shape`` (a zero-stride view: nothing is allocated)."""
    return tuple(to_flax(np.broadcast_to(np.int8(0), tuple(hf_shape)), transform).shape)


def hf_shape(shape, transform: str) -> tuple[int, ...]:
    """HF's shape of one of our parameters of ``shape``."""
    return tuple(to_hf(np.broadcast_to(np.int8(0), tuple(shape)), transform).shape)


def key_path(kp) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as a tuple of strings."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def flatten_params(params) -> dict:
    """``{"a/b/c": leaf}`` of a nested parameter tree (the paths checkpoints and adapters use)."""
    import jax

    return {"/".join(key_path(kp)): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_params(flat: dict, like) -> dict:
    """The nested tree of ``like`` (any tree of that structure) with the leaves of ``flat``
    (``{"a/b/c": leaf}``); a missing path raises KeyError."""
    import jax

    kps, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat["/".join(key_path(kp))] for kp, _ in kps])
