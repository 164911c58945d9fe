"""Training in this project's Flax model with optax: the training loop and lazy-aware tuning.

What trains is a part of the parameters (:class:`Trainable`: new parts such as a vision tower
and projector, and optionally pretrained decoder layers fine-tuned at their own learning rate),
or low-rank adapters on the decoder (:class:`Adapters`); the rest is frozen and, with
``compute_dtype`` bfloat16, stored in bf16 once. Every step runs the model's own forward, the
one layer stack (:func:`qcache_jax.runtime.forward.hidden_states`, scanned, with the lazy
schedule as a traced mask so that a schedule change never recompiles) and applies the output
head only at the scored positions: the answer tokens and the end-of-turn token after them
(``ans_pos`` / ``ans_tgt`` / ``ans_mask``, see :mod:`qcache_jax.tools.packing`). The loss is
their cross-entropy, plus ``distill`` x KL(dense teacher || student) when tuning a lazy
schedule; accuracy is teacher-forced exact match, which equals greedy generation.

:func:`fit` is the loop: a jitted step (global-norm clipping, AdamW per group with linear
warmup and cosine decay), an Orbax ``CheckpointManager`` in a work directory (an interrupted
run started again with the same command resumes from its last saved step; the batch of a step
is a pure function of the step, so it computes what an uninterrupted run would), and progress
(tqdm or log lines) with the validation accuracy. :func:`tune` continues a checkpoint with a
lazy schedule switched on and writes a checkpoint whose ``schedule.json`` records it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .._files import atomic_output_dir
from ..config import LlavaConfig
from ..errors import QCacheError
from ..io.checkpoint import HF_CONFIG_FILE, save_checkpoint, save_tokenizer_and_processor
from ..io.names import flatten_params, unflatten_params
from ..lazy.schedule import SCHEDULE_FILE, check_mode
from ..nn.families import abstract_model, build_model
from .scoring import answer_logits, answer_stats
from .vqa import Example

TRAIN_STATE_FILE = "train_config.json"


# -- the model ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def graphdef_for(cfg: LlavaConfig):
    """The model's graphdef, one object per config: compiled train steps are cached per graphdef,
    and two graphdefs built separately never compare equal (they hold fresh activation closures)."""
    return abstract_model(cfg)[0]


def init_params(cfg: LlavaConfig, seed: int = 0, *, scheme: str = "fan_in"):
    """Freshly initialised parameters as a pure dict (``nnx.merge(graphdef, params)`` runs it).

    ``scheme``: ``hf`` keeps the modules' N(0, 0.02) weights; ``fan_in`` (default) draws every
    weight matrix from N(0, 1/fan_in) and the token / position embeddings from N(0, 1), so each
    layer's output is of the same scale as the residual stream from the first step. With the
    N(0, 0.02) start, the image features reach the answer position as a tiny fraction of the text
    embeddings and training sits for hundreds of steps at the language-only prior.
    """
    model = build_model(cfg, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if scheme == "hf":
        return params
    if scheme != "fan_in":
        raise QCacheError(f"unknown init scheme {scheme!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    out = []
    for (kp, x), key in zip(leaves, keys):
        name, shape = str(getattr(kp[-1], "key", kp[-1])), x.shape
        if name == "kernel":
            std = 1.0 / np.sqrt(shape[0])
        elif name == "patch_embedding":
            std = 1.0 / np.sqrt(np.prod(shape[:3]))
        elif name in ("embedding", "class_embedding"):
            std = 1.0
        else:
            out.append(x)
            continue
        out.append((std * jax.random.normal(key, x.shape)).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# -- which parameters train ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which parameters train, by path prefix (``language_model/layers/27``, ``vision_tower``):
    ``new`` parts at ``learning_rate`` with weight decay on matrices, ``decoder`` (pretrained)
    parts at ``decoder_learning_rate`` without weight decay (it would pull them towards 0); the
    rest is frozen. ``float32``: prefixes computed in float32 whatever ``compute_dtype`` is
    (XLA CPU has no fast bf16 convolution, and the vision tower is small)."""

    new: tuple[str, ...] = ("",)
    decoder: tuple[str, ...] = ()
    float32: tuple[str, ...] = ("vision_tower", "multi_modal_projector")

    def group(self, path: str) -> str | None:
        if any(path.startswith(p) for p in self.decoder):
            return "decoder"
        if any(path.startswith(p) for p in self.new):
            return "new"
        return None


EVERYTHING = Trainable()
NOTHING = Trainable(new=())


@dataclasses.dataclass(frozen=True)
class Adapters:
    """Low-rank adapters on the decoder: ``kernel + a @ b`` (``a`` [in, rank], ``b`` [rank,
    out], ``b`` starting at zero) for the ``targets`` projections of ``layers``. They change the
    decoder's weights through a few parameters, and merge into the weights for inference."""

    rank: int
    layers: tuple[int, ...]
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def keys(self, params: dict) -> list[str]:
        """The parameter paths (``/``-joined) of the adapted kernels."""
        out = []
        for l in self.layers:
            layer = params["language_model"]["layers"][l]
            for block in ("self_attn", "mlp"):
                for t in self.targets:
                    if t in layer[block]:
                        out.append(f"language_model/layers/{l}/{block}/{t}/kernel")
        return out

    def init(self, params: dict, seed: int) -> dict:
        flat = flatten_params(params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(self.keys(params)))
        return {
            k: {"a": jax.random.normal(r, (flat[k].shape[0], self.rank), jnp.float32) / np.sqrt(flat[k].shape[0]),
                "b": jnp.zeros((self.rank, flat[k].shape[1]), jnp.float32)}
            for k, r in zip(self.keys(params), keys)
        }


def merge_adapters(flat: dict, adapters: dict, dtype=None) -> dict:
    """``flat`` with every adapted kernel replaced by ``kernel + a @ b`` (in ``dtype``)."""
    out = dict(flat)
    for k, ab in adapters.items():
        w = flat[k]
        out[k] = (w.astype(jnp.float32) + ab["a"] @ ab["b"]).astype(dtype or w.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class Split:
    """The static bookkeeping of a (trainable, frozen) split of a parameter tree."""

    like: object  # the tree structure (ShapeDtypeStructs)
    groups: tuple[tuple[str, str | None], ...]  # (path, group) for every leaf
    float32: tuple[str, ...]

    @classmethod
    def of(cls, params, trainable: Trainable) -> "Split":
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        return cls(like, tuple((k, trainable.group(k)) for k in flatten_params(params)), trainable.float32)

    def __hash__(self):
        return hash(self.groups)

    def __eq__(self, other):
        return isinstance(other, Split) and self.groups == other.groups and self.float32 == other.float32

    def parts(self, params) -> tuple[dict, dict]:
        """({path: trainable leaf}, {path: frozen leaf})."""
        flat = flatten_params(params)
        train = {k: flat[k] for k, g in self.groups if g is not None}
        return train, {k: flat[k] for k, g in self.groups if g is None}

    def cast(self, flat: dict, dtype) -> dict:
        """Floating leaves in ``dtype``, except the float32 prefixes."""
        keep = lambda k: any(k.startswith(p) for p in self.float32)
        return {k: v if keep(k) or not jnp.issubdtype(v.dtype, jnp.floating) else v.astype(dtype)
                for k, v in flat.items()}

    def full(self, state: dict, frozen: dict, dtype=None) -> dict:
        """The whole parameter tree from the training state (``params``, ``adapters``) and the
        frozen leaves, in ``dtype`` (None: as stored)."""
        flat = {**frozen, **(self.cast(state["params"], dtype) if dtype else state["params"])}
        if state.get("adapters"):
            flat = merge_adapters(flat, state["adapters"], None)
        return unflatten_params(flat, self.like)


# -- batches -------------------------------------------------------------------------------------


class Batcher:
    """:class:`~qcache_jax.tools.vqa.Example` lists -> fixed-shape batches, one question per row,
    through the checkpoint's processor (chat template, image-token expansion, CLIP
    preprocessing), exactly as :meth:`QCacheModel.encode` prepares a prompt.

    A batch: ``input_ids`` [B, T] (prompt + answer, right-padded), ``attention_mask``,
    ``pixel_values`` [B, C, H, W] and the scored positions ``ans_pos`` / ``ans_tgt`` /
    ``ans_mask`` [B, 1, A] (the answer tokens and the EOS), ``slot_valid`` [B, 1].
    """

    def __init__(self, processor, seq_len: int = 32, max_answer_tokens: int = 2):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.seq_len = seq_len
        self.answer_slots = max_answer_tokens + 1
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, image) -> list[int]:
        """The prompt's token ids (the chat template with one image), cached per question."""
        if question not in self._prompts:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            enc = self.processor(images=[image], text=[text], return_tensors="np")
            self._prompts[question] = enc["input_ids"][0].tolist()
        return self._prompts[question]

    def __call__(self, exs: Sequence[Example]) -> dict:
        b, t, a = len(exs), self.seq_len, self.answer_slots
        ids = np.full((b, t), self.pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        pos = np.zeros((b, 1, a), np.int32)
        tgt = np.zeros((b, 1, a), np.int32)
        amask = np.zeros((b, 1, a), np.float32)
        for i, ex in enumerate(exs):
            prompt = self.prompt_ids(ex.question, ex.image)
            answer = self.tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            if len(answer) > a:
                raise QCacheError(f"answer {ex.answer!r} has {len(answer) - 1} tokens (at most {a - 1})")
            row = prompt + answer[:-1]
            if len(row) > t:
                raise QCacheError(f"example of {len(row)} tokens does not fit the training length {t}")
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            n = len(answer)
            pos[i, 0, :n] = np.arange(len(prompt) - 1, len(prompt) - 1 + n)
            pos[i, 0, n:] = pos[i, 0, n - 1]
            tgt[i, 0, :n] = answer
            amask[i, 0, :n] = 1.0
        pv = self.processor.image_processor([ex.image for ex in exs], return_tensors="np")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv.astype(np.float32), "ans_pos": pos,
                "ans_tgt": tgt, "ans_mask": amask, "slot_valid": np.ones((b, 1), np.float32)}


def list_stream(exs: Sequence[Example], batch_size: int, seed: int = 0) -> Callable[[int], list]:
    """Step -> a batch cycling through ``exs`` in a per-epoch permutation (deterministic in the step)."""
    n = len(exs)
    if n == 0:
        raise QCacheError("no training examples")

    def at(step: int):
        out = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(k, n)
            out.append(exs[int(np.random.default_rng([seed, epoch]).permutation(n)[i])])
        return out

    return at


# -- loss, steps -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``learning_rate``: peak of the new parts and the adapters;
    ``decoder_learning_rate``: peak of fine-tuned pretrained parts (default: the same).
    ``lazy``: L booleans (None: dense) in ``mode``; ``distill``: weight of the KL(dense teacher
    || student) term on the scored positions (0: task loss only). ``compute_dtype``: the
    decoder's dtype in the step (master weights stay float32). ``attention_impl``: ``xla_train``
    (the direct formula with a hand-written backward pass) on CPU. ``loop``: ``unroll`` (default):
    a frozen layer costs only its input gradients; a scanned loop stacks every layer's weights and
    computes weight gradients for all of them inside the scan (measured about 1.5-2x slower per
    step on the real-weights model), in exchange for a faster compile."""

    steps: int = 1800
    batch_size: int = 32
    learning_rate: float = 1e-3
    decoder_learning_rate: float | None = None
    warmup_steps: int = 100
    end_lr_fraction: float = 0.02
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b2: float = 0.98
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    lazy: tuple | None = None
    mode: str = "vla"
    distill: float = 0.0
    compute_dtype: str = "float32"
    attention_impl: str = "xla_train"
    loop: str = "unroll"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def optimizer(tc: TrainConfig, split: Split) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per group with linear warmup and cosine decay: ``new``
    (weight decay on matrices), ``decoder`` (its own learning rate, no weight decay) and
    ``adapter`` (no weight decay)."""

    def sched(peak):
        return optax.warmup_cosine_decay_schedule(
            init_value=peak / max(tc.warmup_steps, 1),  # the first step already learns
            peak_value=peak,
            warmup_steps=max(1, min(tc.warmup_steps, tc.steps - 1)),
            decay_steps=max(tc.steps, 2),
            end_value=peak * tc.end_lr_fraction,
        )

    groups = dict(split.groups)
    decoder_lr = tc.decoder_learning_rate or tc.learning_rate

    def labels(state):
        return {
            "params": {k: groups[k] for k in state["params"]},
            "adapters": jax.tree.map(lambda _: "adapter", state["adapters"]),
        }

    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.multi_transform(
            {
                "new": optax.adamw(sched(tc.learning_rate), b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay,
                                   mask=decay_mask),
                "decoder": optax.adamw(sched(decoder_lr), b1=0.9, b2=tc.b2, weight_decay=0.0),
                "adapter": optax.adamw(sched(tc.learning_rate), b1=0.9, b2=tc.b2, weight_decay=0.0),
            },
            labels,
        ),
    )


def _accuracy(hit, batch):
    valid = batch["slot_valid"]
    return (hit * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def make_steps(graphdef, split: Split, tx: optax.GradientTransformation, tc: TrainConfig):
    """(train_step, eval_step), jitted.

    ``train_step(state, opt_state, frozen, batch, lazy, teacher) -> (state, opt_state,
    metrics)``; ``eval_step(state, frozen, batch, lazy) -> (loss, exact match [R, slots])``.
    ``state``: {"params": trainable leaves, "adapters": ...}; ``lazy``: a bool array [L] or None
    (dense); ``teacher``: the dense model's whole parameter tree (for ``distill``)."""
    dtype = jnp.dtype(tc.compute_dtype)
    kw = dict(mode=tc.mode, impl=tc.attention_impl, loop=tc.loop)

    def logits_of(state, frozen, batch, lazy):
        return answer_logits(graphdef, split.full(state, frozen, dtype), batch, lazy, **kw)

    def loss_fn(state, frozen, batch, lazy, teacher):
        logits = logits_of(state, frozen, batch, lazy)
        task, hit = answer_stats(logits, batch)
        loss, kl = task, jnp.float32(0.0)
        if tc.distill > 0:
            t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(answer_logits(graphdef, teacher, batch, None, **kw)), -1)
            per_pos = jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(logits, -1)), axis=-1)
            mask = batch["ans_mask"]
            kl = (per_pos * mask).sum() / jnp.maximum(mask.sum(), 1.0)
            loss = task + tc.distill * kl
        return loss, {"loss": loss, "task_loss": task, "kl": kl, "accuracy": _accuracy(hit, batch)}

    @jax.jit
    def train_step(state, opt_state, frozen, batch, lazy, teacher):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state, frozen, batch, lazy, teacher)
        updates, opt_state = tx.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state, opt_state, metrics

    @jax.jit
    def eval_step(state, frozen, batch, lazy):
        return answer_stats(logits_of(state, frozen, batch, lazy), batch)

    return train_step, eval_step


@functools.lru_cache(maxsize=8)
def _compiled_steps(graphdef, split: Split, tc: TrainConfig):
    tx = optimizer(tc, split)
    return (tx, *make_steps(graphdef, split, tx, tc))


def _step_key(tc: TrainConfig) -> TrainConfig:
    """The fields of ``tc`` that change the compiled step (seed, eval and save cadence, and the
    lazy flags, which are a traced argument, do not)."""
    return dataclasses.replace(tc, seed=0, eval_every=1, save_every=1, lazy=None)


def compiled_steps(graphdef, split: Split, tc: TrainConfig):
    """(optimizer, train_step, eval_step) for ``tc``, shared by every run in this process with
    the same model structure, split and settings (a resumed run does not compile again)."""
    return _compiled_steps(graphdef, split, _step_key(tc))


def batch_accuracy(eval_step, state, frozen, batches, lazy) -> float:
    """Teacher-forced exact-match accuracy over prepared batches (valid slots only)."""
    hits = [(np.asarray(eval_step(state, frozen, b, lazy)[1]), np.asarray(b["slot_valid"]) > 0) for b in batches]
    return float(np.concatenate([h[v] for h, v in hits]).mean()) if hits else float("nan")


# -- the loop ----------------------------------------------------------------------------------


def _manager(work_dir: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(work_dir).absolute() / "state", options=options)


def _check_work_dir(work_dir: Path, tc: TrainConfig, extra: dict) -> None:
    """A work directory belongs to one run: resuming with other settings is an error."""
    meta = {"train": tc.to_json(), **extra}
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back
    path = work_dir / TRAIN_STATE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise QCacheError(
                f"{work_dir}: holds an interrupted run with other settings ({', '.join(diff)}); "
                "delete it or pass another --work-dir"
            )
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2, sort_keys=True))


@dataclasses.dataclass
class FitResult:
    """``params``: the whole trained tree (adapters merged, float32 where it was); ``state``:
    what trained (``params`` leaves by path, ``adapters``); ``history``: per-step losses and
    accuracies, validation accuracies, seconds, start and end step."""

    params: dict
    state: dict
    history: dict


def fit(
    graphdef,
    params,
    tc: TrainConfig,
    batch_at: Callable[[int], dict],
    *,
    trainable: Trainable = EVERYTHING,
    adapters: Adapters | None = None,
    work_dir: Path | None = None,
    val_batches: Sequence[dict] = (),
    teacher_params=None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    meta: dict | None = None,
) -> FitResult:
    """Train the ``trainable`` part of ``params`` (and/or ``adapters``) for ``tc.steps`` steps.

    ``batch_at(step)`` gives the batch of a step (numpy arrays, see :class:`Batcher` and
    :class:`~qcache_jax.tools.packing.PackedEncoder`). With ``work_dir`` the training state is
    saved every ``tc.save_every`` steps (and at the end) by an Orbax CheckpointManager, and a
    run started again resumes from the latest saved step. ``stop_after``: return after that many
    steps of this call (to simulate an interruption). ``teacher_params``: the dense model for
    ``distill`` (default: ``params`` themselves). ``log``: progress lines (every 10 steps and at
    each validation) when no tqdm bar is shown.
    """
    from tqdm.auto import tqdm

    check_mode(tc.mode)
    if tc.steps < 1 or tc.batch_size < 1:
        raise QCacheError(f"need steps >= 1 and batch size >= 1 (got {tc.steps}, {tc.batch_size})")
    split = Split.of(params, trainable)
    train_part, frozen = split.parts(params)
    dtype = jnp.dtype(tc.compute_dtype)
    frozen = {k: jnp.asarray(v) for k, v in split.cast(frozen, dtype).items()}
    state = {"params": {k: jnp.asarray(v, jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.asarray(v)
                        for k, v in train_part.items()},
             "adapters": adapters.init(params, tc.seed) if adapters else {}}
    tx, train_step, eval_step = compiled_steps(graphdef, split, tc)
    lazy = None if tc.lazy is None or not any(tc.lazy) else jnp.asarray(tc.lazy, bool)
    teacher = None
    if tc.distill > 0:
        source = teacher_params if teacher_params is not None else params
        teacher = unflatten_params({k: jnp.asarray(v) for k, v in split.cast(flatten_params(source), dtype).items()}, split.like)
    opt_state = tx.init(state)
    start, mngr = 0, None
    if work_dir is not None:
        import orbax.checkpoint as ocp

        work_dir = Path(work_dir)
        _check_work_dir(work_dir, tc, meta or {})
        mngr = _manager(work_dir)
        latest = mngr.latest_step()
        if latest is not None:
            restored = mngr.restore(latest, args=ocp.args.StandardRestore({"state": state, "opt_state": opt_state}))
            # Plain host-backed arrays again, so the jitted step sees the same argument kinds as
            # on a fresh start and does not compile a second time.
            restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
            state, opt_state, start = restored["state"], restored["opt_state"], int(latest)
            if log:
                log(f"resuming from step {start} saved in {work_dir}")
    history = {"loss": [], "accuracy": [], "val": [], "seconds": 0.0, "start_step": start}
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    val_acc = float("nan")
    desc = "train" if lazy is None else f"tune {tc.mode}"
    bar = tqdm(total=tc.steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    t0, step_seconds = time.perf_counter(), []
    try:
        for step in range(start, end):
            t_step = time.perf_counter()
            batch = {k: jnp.asarray(v) for k, v in batch_at(step).items()}
            state, opt_state, m = train_step(state, opt_state, frozen, batch, lazy, teacher)
            loss = float(m["loss"])
            if not np.isfinite(loss):
                raise QCacheError(f"the loss became {loss} at step {step}; lower the learning rate")
            history["loss"].append(loss)
            history["accuracy"].append(float(m["accuracy"]))
            done = step + 1
            if val_batches and (done % tc.eval_every == 0 or done == tc.steps):
                val_acc = batch_accuracy(eval_step, state, frozen, val_batches, lazy)
                history["val"].append((done, val_acc))
                if log and not progress:
                    log(f"{desc} step {done}/{tc.steps}: validation exact match {val_acc:.4f}")
            if mngr is not None and (done % tc.save_every == 0 or done == tc.steps or done == end):
                mngr.save(done, args=ocp.args.StandardSave({"state": state, "opt_state": opt_state}))
            step_seconds.append(time.perf_counter() - t_step)
            if log and not progress and (done % 10 == 0 or done == end):
                # The ETA leaves out this call's first step, which carries the compile.
                pace = float(np.mean(step_seconds[1:] or step_seconds))
                log(f"{desc} step {done}/{tc.steps}: loss {np.mean(history['loss'][-10:]):.4f} "
                    f"({step_seconds[-1]:.1f} s/step, ETA {_duration(pace * (tc.steps - done))})")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.3f}", refresh=False)
    finally:
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    history["seconds"] = time.perf_counter() - t0
    history["end_step"] = end
    _, frozen_orig = split.parts(params)
    full = split.full(jax.tree.map(np.asarray, state), frozen_orig)
    return FitResult(params=full, state=state, history=history)


def _duration(seconds: float) -> str:
    """``1h05m`` / ``7m30s``: a progress line's ETA."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# -- writing checkpoints -----------------------------------------------------------------------


def write_checkpoint(out: Path, cfg: LlavaConfig, params, processor, *, hf_config=None, schedule: tuple | None = None, extra_files: dict | None = None, force: bool = False) -> Path:
    """A checkpoint directory (Orbax params, config, tokenizer/processor files, optional
    schedule.json and HF config), written atomically. ``schedule``: (Schedule, details dict)."""
    out = Path(out).absolute()
    params = jax.tree.map(lambda x: np.asarray(x), params)
    with atomic_output_dir(out, force=force) as tmp:
        save_checkpoint(tmp, cfg, params)
        if processor is not None:
            save_tokenizer_and_processor(tmp, processor)
        if hf_config is not None:
            (tmp / HF_CONFIG_FILE).write_text(hf_config.to_json_string())
        if schedule is not None:
            schedule[0].write(tmp / SCHEDULE_FILE, **schedule[1])
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def default_work_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``.<name>.train`` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.train"


def prepare_out(out: Path, force: bool) -> Path:
    """``out`` as an absolute path, refused (one-line error) when it exists and ``force`` is off."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    return out


# -- lazy-aware tuning -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExampleSource:
    """Training data for :func:`tune`: ``at(step)`` -> that step's examples (a pure function of
    the step, so a resumed run sees the same batches), held-out ``validation`` examples and a
    ``name`` recorded with the result."""

    at: Callable[[int], list]
    validation: list
    name: str


def jsonl_source(path, batch_size: int, *, seed: int = 0, val_examples: int = 256) -> ExampleSource:
    """An :class:`ExampleSource` cycling through a ``{"image", "question", "answer"}`` JSONL file
    (the first ``val_examples`` lines also serve as validation)."""
    from .evaluate import load_examples

    exs = load_examples(path)
    return ExampleSource(list_stream(exs, batch_size, seed), exs[:val_examples], str(Path(path).absolute()))


def tune(
    ckpt,
    out,
    *,
    lazy,
    data,
    mode: str | None = None,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    warmup_steps: int = 30,
    distill: float = 1.0,
    seed: int = 0,
    work_dir=None,
    force: bool = False,
    keep_work_dir: bool = False,
    trainable: Trainable = EVERYTHING,
    adapters: Adapters | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    stop_after: int | None = None,
) -> tuple[Path | None, dict]:
    """Lazy-aware fine-tuning: continue training ``ckpt`` with the schedule ``lazy`` in ``mode``
    (None: the mode a schedule file records, else ``vla``).

    Loss: the answer tokens' cross-entropy plus ``distill`` x KL(dense teacher || lazy student)
    on the same positions (the teacher is ``ckpt`` itself, run dense). ``data``: a JSONL file of
    ``{"image", "question", "answer"}`` (see :mod:`qcache_jax.tools.evaluate`) or an
    :class:`ExampleSource`. Writes ``out``: the tuned parameters, the config, tokenizer /
    processor files and ``schedule.json`` with the schedule, the mode and the tuning settings
    (``lazy="auto"`` reads it).
    """
    from ..api import load

    model = load(ckpt)
    if model.pruned:  # the dense teacher and the scanned training pass need every weight
        raise QCacheError(f"{ckpt}: a pruned checkpoint cannot be tuned; tune the unpruned one and prune the result")
    schedule = model.resolve_lazy(lazy, mode)
    if schedule.is_dense:
        raise QCacheError("tune needs a lazy schedule with at least one lazy layer (e.g. --lazy 2-3,5-7)")
    if model.config.anyres or model.config.family != "llava":  # a prompt's length depends on its image's size
        raise QCacheError(f"{ckpt}: tune does not support LLaVA-NeXT or Qwen2-VL checkpoints yet")
    if model.processor is None:
        raise QCacheError(f"{ckpt}: checkpoint has no processor (tokenizer + image processor); cannot build batches")
    out = prepare_out(out, force)
    work_dir = Path(work_dir).absolute() if work_dir else default_work_dir(out)
    source = data if isinstance(data, ExampleSource) else jsonl_source(data, batch_size, seed=seed)
    tc = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                     seed=seed, lazy=schedule.lazy, mode=schedule.mode, distill=distill,
                     eval_every=max(1, min(100, steps)))
    seq_len = 32
    batcher = Batcher(model.processor, seq_len=seq_len)
    val = source.validation
    # The rows' length is fixed before training: sized from the longest validation prompt, with
    # headroom for longer training questions (a row that still does not fit is a clear error).
    longest = max((len(batcher.prompt_ids(e.question, e.image)) for e in val), default=0)
    if longest + 8 > seq_len:
        batcher.seq_len = seq_len = int(2 ** np.ceil(np.log2(longest + 8)))
    val_batches = [batcher(val[i : i + 64]) for i in range(0, len(val), 64)]
    meta = {"checkpoint": str(Path(ckpt).absolute()), "data": source.name}
    teacher = model.params if distill > 0 else None
    result = fit(
        model.graphdef, model.params, tc, lambda s: batcher(source.at(s)), trainable=trainable, adapters=adapters,
        work_dir=work_dir, val_batches=val_batches, teacher_params=teacher, progress=progress, stop_after=stop_after,
        log=log, meta=meta,
    )
    params, history = result.params, result.history
    if history["end_step"] < tc.steps:
        return None, history
    final_val = history["val"][-1][1] if history["val"] else float("nan")
    tuned = {
        "from": str(ckpt),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "distill": distill,
        "data": source.name,
        "validation_accuracy": final_val,
    }
    hf_cfg_path = Path(ckpt) / HF_CONFIG_FILE
    extra = {HF_CONFIG_FILE: hf_cfg_path.read_text()} if hf_cfg_path.is_file() else {}
    write_checkpoint(out, model.config, params, model.processor, schedule=(schedule, {"tuned": tuned}), force=force,
                     extra_files=extra)
    if not keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return out, history
