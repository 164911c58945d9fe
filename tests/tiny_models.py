"""Build tiny random LlavaForConditionalGeneration models in any of the key layouts seen in the wild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcache_jax.demo.hf_models import build_hf_llava, save_hf, tiny_tokenizer_and_processor  # noqa: F401


def layout_state_dict(model, layout: str) -> dict:
    """The model's tensors named as in ``layout``: ``loaded`` (model.language_model.*),
    ``hub`` (llava-hf: language_model.model.*, vision_tower.vision_model.*) or ``saved``
    (what transformers 5 writes: language_model.model.*, vision_tower.encoder.*)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout == "loaded":
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower.") :]
            k = ("vision_tower.vision_model." if layout == "hub" else "vision_tower.") + rest
        elif k.startswith("model.multi_modal_projector."):
            k = k[len("model.") :]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        out[k] = v
    return out


def make_inputs(cfg, batch: int, n_text: int, rng, *, images_per_row: int = 1):
    """input_ids with image tokens expanded (as HF processors do) and matching pixel_values."""
    tc, vc = cfg.text_config, cfg.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    per_image = n_patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    special = {cfg.image_token_index}
    rows = []
    for _ in range(batch):
        text = [int(t) for t in rng.integers(3, tc.vocab_size, size=n_text) if int(t) not in special]
        text = (text + [5] * n_text)[:n_text]
        row = text[:2]
        for _ in range(images_per_row):
            row += [cfg.image_token_index] * per_image
        rows.append(row + text[2:])
    ids = np.array(rows, dtype=np.int64)
    pv = rng.standard_normal((batch * images_per_row, vc.num_channels, vc.image_size, vc.image_size)).astype(np.float32)
    return ids, (pv if images_per_row else None)


def hf_logits(model, ids, pv=None, mask=None):
    with torch.no_grad():
        kw = {"input_ids": torch.tensor(ids)}
        if pv is not None:
            kw["pixel_values"] = torch.tensor(pv)
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        return model(**kw).logits.float().numpy()


def write_state_dict(sd: dict, directory: Path, fmt: str, *, shard_bytes: int | None = None):
    """Write tensors as one or several safetensors files (with an index) or a pytorch_model.bin."""
    from safetensors.torch import save_file
    import json

    directory.mkdir(parents=True, exist_ok=True)
    for p in (
        list(directory.glob("*.safetensors")) + list(directory.glob("*.bin")) + list(directory.glob("*.index.json"))
    ):
        p.unlink()
    if fmt == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
        return
    if not shard_bytes:
        save_file(sd, str(directory / "model.safetensors"))
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.numel() * v.element_size() > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update({k: name for k in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def converted(hf, directory: Path):
    """``hf`` saved as a Hugging Face folder under ``directory/hf``, converted to ``directory/ckpt``
    and loaded: the converted model the parity and lazy tests compare with ``hf``."""
    from qcache_jax import convert_hf, load

    directory = Path(directory)
    hf.save_pretrained(str(directory / "hf"))
    return load(convert_hf(directory / "hf", directory / "ckpt", progress=False))
