"""This project's checkpoint -> a Hugging Face ``LlavaForConditionalGeneration`` directory.

The inverse of :mod:`qcache_jax.convert`: every parameter is named by
:func:`~qcache_jax.convert.hf_name` (per-layer stacks are split again) and transformed back
(``kernel`` [in, out] -> ``weight`` [out, in]; the HWIO patch convolution -> OIHW). Tensors are
written in the layout transformers 5 uses for the module (``model.language_model.*``,
``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``, ``lm_head.*``) as
``model.safetensors``, with ``config.json`` rebuilt from the checkpoint's config (or the
original HF config the converter kept, when it still describes the same model) and the
tokenizer / processor / chat template files copied. Written to a temporary directory and
renamed at the end, so a failure leaves nothing at the destination.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from .checkpoint import HF_CONFIG_FILE, SIDE_FILES, atomic_output_dir, load_params, read_config
from .config import LlavaConfig, from_hf_config
from .convert import hf_name
from .errors import QCacheError

# Canonical (converter) prefixes -> the names of LlavaForConditionalGeneration's state dict.
_HF_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def hf_state_name(canonical: str) -> str:
    for old, new in _HF_PREFIXES:
        if canonical.startswith(old):
            return new + canonical[len(old) :]
    return canonical  # lm_head.weight


def _to_hf(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv":  # HWIO -> OIHW
        return x.transpose(3, 2, 0, 1)
    return x


def hf_tensors(cfg: LlavaConfig, params) -> dict[str, np.ndarray]:
    """HF state-dict name -> numpy array (contiguous, the checkpoint's dtype)."""
    out = {}
    for kp, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        name, stack, transform = hf_name(path)
        arr = np.asarray(value)
        if stack is None:
            out[hf_state_name(name)] = np.ascontiguousarray(_to_hf(arr, transform))
        else:
            for i in range(arr.shape[0]):
                out[hf_state_name(name.format(i=i))] = np.ascontiguousarray(_to_hf(arr[i], transform))
    return out


def hf_config_for(cfg: LlavaConfig):
    """A ``transformers`` LlavaConfig describing ``cfg`` (the inverse of ``from_hf_config``)."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig as HFLlavaConfig

    t, v = cfg.text, cfg.vision
    rope = {"rope_type": t.rope.rope_type, "rope_theta": t.rope.theta}
    if t.rope.rope_type in ("linear", "llama3"):
        rope["factor"] = t.rope.factor
    if t.rope.rope_type == "llama3":
        rope.update(
            low_freq_factor=t.rope.low_freq_factor,
            high_freq_factor=t.rope.high_freq_factor,
            original_max_position_embeddings=t.rope.original_max_position_embeddings,
        )
    text_kw = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=(list(t.eos_token_id) if len(t.eos_token_id) > 1 else (t.eos_token_id[0] if t.eos_token_id else None)),
        pad_token_id=t.pad_token_id,
    )
    if t.model_type == "llama":
        if t.qkv_bias != t.o_bias:
            raise QCacheError("a Llama text model has attention biases on all of q/k/v/o or none")
        text_kw.update(attention_bias=t.qkv_bias, mlp_bias=t.mlp_bias)
    elif t.qkv_bias != (t.model_type == "qwen2") or t.o_bias or t.mlp_bias:
        raise QCacheError(f"biases of this checkpoint cannot be expressed as a {t.model_type} config")
    text = AutoConfig.for_model(t.model_type, **text_kw)
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
    )
    vfl = cfg.vision_feature_layer
    return HFLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.image_seq_length,
        vision_feature_layer=vfl if isinstance(vfl, int) else list(vfl),
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.projector_bias,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def _hf_config(ckpt: Path, cfg: LlavaConfig):
    """The kept original HF config when it still describes ``cfg``, else one rebuilt from ``cfg``."""
    from transformers import LlavaConfig as HFLlavaConfig

    kept = ckpt / HF_CONFIG_FILE
    if kept.is_file():
        try:
            hf = HFLlavaConfig.from_dict(json.loads(kept.read_text()))
            if from_hf_config(hf, dtype=cfg.dtype) == cfg:
                return hf
        except (ValueError, KeyError, TypeError, QCacheError):
            pass
    hf = hf_config_for(cfg)
    if from_hf_config(hf, dtype=cfg.dtype) != cfg:  # pragma: no cover - a field we cannot express
        raise QCacheError(f"{ckpt}: the model config cannot be expressed as a transformers LlavaConfig")
    return hf


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    def as_torch(a: np.ndarray):
        if dtype == "bfloat16":
            return torch.from_numpy(np.asarray(a).view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(a))

    save_file({k: as_torch(v).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def export_hf(ckpt, hf_dir, *, force: bool = False) -> Path:
    """Write checkpoint ``ckpt`` as a Hugging Face LLaVA model directory ``hf_dir``.

    ``hf_dir`` must not exist unless ``force``. Returns its path. The result loads with
    ``LlavaForConditionalGeneration.from_pretrained(hf_dir)`` (and ``AutoProcessor`` when the
    checkpoint has processor files) and computes the same logits as the checkpoint.
    """
    ckpt = Path(ckpt).expanduser()
    if not ckpt.is_dir():
        raise QCacheError(f"{ckpt}: no such checkpoint directory")
    out = Path(hf_dir).expanduser().absolute()
    if out.exists() and not force:
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    cfg = read_config(ckpt)
    params = load_params(ckpt, cfg)
    hf = _hf_config(ckpt, cfg)
    tensors = hf_tensors(cfg, params)
    with atomic_output_dir(out, force=force) as tmp:
        _save_safetensors(tensors, tmp / "model.safetensors", cfg.dtype)
        d = hf.to_dict()
        d["dtype"] = cfg.dtype
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        for name in SIDE_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
    return out
