"""This project's checkpoint -> a Hugging Face model directory (the inverse of the converter).

Every parameter is named by :mod:`qcache_jax.io.names` and transformed back (``kernel``
[in, out] -> ``weight`` [out, in]; the HWIO patch convolution -> OIHW). Tensors are written in
the layout transformers 5 uses for the module (``model.language_model.*``,
``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``, ``lm_head.*``; a
text-only checkpoint as a ``*ForCausalLM``) as ``model.safetensors``, with ``config.json``
rebuilt from the checkpoint's config (or the original HF config the converter kept, when it
still describes the same model) and the tokenizer / processor / chat template files copied.
Written to a temporary directory and renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from .._files import atomic_output_dir, current_umask
from ..errors import QCacheError
from ..lazy.schedule import format_layers
from .checkpoint import HF_CONFIG_FILE, SIDE_FILES, load_params, read_config, read_pruned
from .hf_config import from_hf_config, to_hf_config
from .names import export_name, key_path, param_name, to_hf


def hf_tensors(cfg, params) -> dict[str, np.ndarray]:
    """HF state-dict name -> numpy array (contiguous, the checkpoint's dtype)."""
    kind = "qwen2_vl" if cfg.family != "llava" else ("llava" if cfg.has_vision else "causal_lm")
    out = {}
    for kp, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, transform = param_name(key_path(kp))
        out[export_name(name, kind)] = np.ascontiguousarray(to_hf(np.asarray(value), transform))
    return out


def _hf_config(ckpt: Path, cfg):
    """The kept original HF config when it still describes ``cfg``, else one rebuilt from ``cfg``."""
    from transformers import AutoConfig

    kept = ckpt / HF_CONFIG_FILE
    if kept.is_file():
        try:
            d = json.loads(kept.read_text())
            hf = AutoConfig.for_model(d.pop("model_type"), **d)
            if from_hf_config(hf, dtype=cfg.dtype) == cfg:
                return hf
        except (ValueError, KeyError, TypeError, QCacheError):
            pass
    hf = to_hf_config(cfg)
    if from_hf_config(hf, dtype=cfg.dtype) != cfg:  # pragma: no cover - a field we cannot express
        raise QCacheError(f"{ckpt}: the model config cannot be expressed as a transformers config")
    return hf


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    def as_torch(a: np.ndarray):
        if dtype == "bfloat16":
            return torch.from_numpy(np.asarray(a).view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(a))

    save_file({k: as_torch(v).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())  # like every other file we write


def export_hf(ckpt, hf_dir, *, force: bool = False) -> Path:
    """Write checkpoint ``ckpt`` as a Hugging Face model directory ``hf_dir``.

    ``hf_dir`` must not exist unless ``force``. Returns its path. The result loads with
    ``LlavaForConditionalGeneration.from_pretrained(hf_dir)`` (a text-only checkpoint with
    ``AutoModelForCausalLM``, a Qwen2-VL one with its ``*ForConditionalGeneration``), and ``AutoProcessor`` when the checkpoint has processor files,
    and computes the same logits as the checkpoint.
    """
    ckpt = Path(ckpt).expanduser()
    if not ckpt.is_dir():
        raise QCacheError(f"{ckpt}: no such checkpoint directory")
    out = Path(hf_dir).expanduser().absolute()
    if out.exists() and not force:
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    cfg = read_config(ckpt)
    if read_pruned(ckpt):
        raise QCacheError(f"{ckpt}: a pruned checkpoint (no q_proj/k_proj in layers "
                          f"{format_layers(read_pruned(ckpt))}) cannot be exported: Hugging Face models need every weight")
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
