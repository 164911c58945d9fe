"""The small toy model trained from scratch on the synthetic VQA task (:mod:`.synthetic_vqa`):
fast to train and to test, so the test suite can exercise training, tuning and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from ..config import LlavaConfig
from ..io.hf_config import to_hf_config
from ..tools.train import (
    Batcher,
    ExampleSource,
    TrainConfig,
    default_work_dir,
    fit,
    graphdef_for,
    init_params,
    prepare_out,
    write_checkpoint,
)
from . import synthetic_vqa
from .hf_models import tiny_config

DEMO_VAL_EXAMPLES = 256


def demo_config(
    *,
    vocab_size: int,
    image_token_id: int,
    hidden_size: int = 96,
    intermediate_size: int = 256,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    image_size: int = synthetic_vqa.IMAGE_SIZE,
    patch_size: int = synthetic_vqa.PATCH_SIZE,
    max_position_embeddings: int = 256,
) -> LlavaConfig:
    """The toy VQA model: a CLIP tower and a Llama decoder. The last CLIP layer's features are
    used (``vision_feature_layer=-1``) so no tower layer is dead weight. Token ids: <s> 1,
    </s> 2, <pad> 3 (:mod:`qcache_jax.demo.tokenizer`)."""
    return tiny_config(
        vocab_size=vocab_size,
        image_token_id=image_token_id,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        vision_feature_layer=-1,
    )


def demo_model(**model_kwargs):
    """(transformers config, our config, processor) of the toy VQA model; ``model_kwargs`` go to
    :func:`demo_config` (sizes; the processor follows ``image_size`` / ``patch_size``)."""
    processor = synthetic_vqa.build_processor(
        image_size=model_kwargs.get("image_size", synthetic_vqa.IMAGE_SIZE),
        patch_size=model_kwargs.get("patch_size", synthetic_vqa.PATCH_SIZE),
    )
    tok = processor.tokenizer
    cfg = demo_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), **model_kwargs)
    return to_hf_config(cfg), cfg, processor


def synthetic_source(seed: int, batch_size: int, *, image_size: int = synthetic_vqa.IMAGE_SIZE,
                     val_examples: int = DEMO_VAL_EXAMPLES) -> ExampleSource:
    """The synthetic task's train stream (a pure function of the step) and validation split."""
    stream_seed = seed * 100 + synthetic_vqa.SPLITS["train"]
    return ExampleSource(
        at=lambda step: synthetic_vqa.examples(stream_seed, step * batch_size, batch_size, image_size=image_size),
        validation=synthetic_vqa.split("validation", val_examples, base_seed=seed, image_size=image_size),
        name="synthetic-vqa",
    )


def train_demo(
    out,
    *,
    tc: TrainConfig | None = None,
    model_kwargs: dict | None = None,
    work_dir=None,
    val_examples: int = DEMO_VAL_EXAMPLES,
    init_seed: int = 0,
    force: bool = False,
    keep_work_dir: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    stop_after: int | None = None,
) -> tuple[Path | None, dict]:
    """Train the toy VQA model from scratch and write the checkpoint ``out``.

    Returns (out, history); with ``stop_after`` (a simulated interruption) the run stops early,
    writes nothing at ``out`` and returns (None, history). The work directory (default
    ``.<out>.train`` beside ``out``) holds the Orbax training state until the checkpoint is
    written; running the same command again after an interruption resumes from it.
    """
    tc = tc or TrainConfig()
    out = prepare_out(out, force)
    work_dir = Path(work_dir).absolute() if work_dir else default_work_dir(out)
    kw = dict(model_kwargs or {})
    hf_cfg, cfg, processor = demo_model(**kw)
    graphdef = graphdef_for(cfg)
    params = init_params(cfg, init_seed)
    batcher = Batcher(processor)
    source = synthetic_source(tc.seed, tc.batch_size, image_size=cfg.vision.image_size, val_examples=val_examples)
    val = source.validation
    val_batches = [batcher(val[i : i + 64]) for i in range(0, len(val), 64)]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if log:
        log(f"VQA demo model: {n_params / 1e6:.2f}M parameters, {cfg.text.num_layers} decoder layers; "
            f"{tc.steps} steps of batch {tc.batch_size}")
    meta = {"model": {"init_seed": init_seed, **kw}, "val_examples": val_examples}
    result = fit(
        graphdef, params, tc, lambda s: batcher(source.at(s)), work_dir=work_dir, val_batches=val_batches,
        progress=progress, stop_after=stop_after, log=log, meta=meta,
    )
    params, history = result.params, result.history
    if history["end_step"] < tc.steps:
        return None, history
    final_val = history["val"][-1][1] if history["val"] else float("nan")
    info = {"kind": "vqa-demo", "train": tc.to_json(), "model": meta["model"], "validation_accuracy": final_val,
            "train_seconds_this_run": history["seconds"], "steps_this_run": tc.steps - history["start_step"]}
    write_checkpoint(out, cfg, params, processor, hf_config=hf_cfg, force=force,
                     extra_files={"training.json": json.dumps(info, indent=2) + "\n"})
    if not keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return out, history
