"""Training in this project's Flax model with optax: the training loop and lazy-aware tuning.

* :func:`fit` trains a parameter pytree on a stream of batches (the demo models are trained
  with it: :mod:`qcache_jax.demo`).
* :func:`tune` continues training a checkpoint with a lazy schedule switched on (the full-sequence
  forward is differentiable; the schedule is a traced mask), with the task loss and optionally a
  KL distillation loss to the dense model's logits, and writes a new checkpoint whose
  ``schedule.json`` records the schedule, the mode and how it was tuned (``--lazy auto`` reads it).

Both run :func:`fit`: a jitted train step (AdamW, linear warmup then cosine decay, global-norm
clipping), an Orbax ``CheckpointManager`` in a work directory (an interrupted run resumes from
its last saved step when started again with the same command), and a tqdm bar showing the loss
and the validation accuracy. The batch of step ``s`` is a pure function of ``(seed, s)``, so a
resumed run computes exactly what an uninterrupted one would have.

The loss covers the answer tokens and the EOS after them (the prompt is context only). The
validation accuracy is teacher-forced exact match: every answer token and the EOS are the
argmax, which for greedy decoding is the same as generating exactly the answer.
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
from ..lazy.attention import LazyAttention
from ..lazy.schedule import SCHEDULE_FILE, Schedule, check_mode
from ..nn.llava import Llava, abstract_model
from ..runtime.forward import sequence_logits
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
    model = Llava(cfg, rngs=nnx.Rngs(seed))
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


# -- batches -----------------------------------------------------------------------------------


class Batcher:
    """Turns :class:`~qcache_jax.tools.vqa.Example` lists into fixed-shape training batches through
    the checkpoint's processor (chat template, image-token expansion, CLIP preprocessing), exactly
    as :meth:`QCacheModel.encode` prepares a prompt.

    A batch: ``input_ids`` [B, T] (prompt + answer + EOS, right-padded), ``attention_mask``,
    ``weights`` [B, T] (1 where the *next* token is an answer token or the EOS) and
    ``pixel_values`` [B, C, H, W].
    """

    def __init__(self, processor, seq_len: int = 32):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.seq_len = seq_len
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
        b, t = len(exs), self.seq_len
        ids = np.full((b, t), self.pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        weights = np.zeros((b, t), np.float32)
        for i, ex in enumerate(exs):
            prompt = self.prompt_ids(ex.question, ex.image)
            answer = self.tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            row = prompt + answer
            if len(row) > t:
                raise QCacheError(f"example of {len(row)} tokens does not fit the training length {t}")
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            weights[i, len(prompt) - 1 : len(row) - 1] = 1.0
        pv = self.processor.image_processor([ex.image for ex in exs], return_tensors="np")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "weights": weights, "pixel_values": pv.astype(np.float32)}


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
    """Optimisation settings. ``lazy``: L booleans (None: dense); ``distill``: weight of the
    KL(dense teacher || student) term on the answer positions (0: task loss only)."""

    steps: int = 1800
    batch_size: int = 32
    learning_rate: float = 1e-3
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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay; weight decay on weight matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=tc.learning_rate / max(tc.warmup_steps, 1),  # the first step already learns
        peak_value=tc.learning_rate,
        warmup_steps=max(1, min(tc.warmup_steps, tc.steps - 1)),
        decay_steps=max(tc.steps, 2),
        end_value=tc.learning_rate * tc.end_lr_fraction,
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )


def _answer_stats(logits, batch):
    """(mean token NLL, per-row exact match, log-probs) over the weighted (answer) positions."""
    ids, w = batch["input_ids"], batch["weights"]
    tgt = jnp.roll(ids, -1, axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    loss = (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
    hit = (jnp.argmax(logits, -1) == tgt) | (w == 0)
    return loss, jnp.all(hit, axis=1), logp


def make_steps(graphdef, tx: optax.GradientTransformation, *, mode: str, distill: float):
    """(train_step, eval_step), both jitted.

    ``train_step(params, opt_state, batch, lazy, teacher_params) -> (params, opt_state, metrics)``;
    ``eval_step(params, batch, lazy) -> (loss, per-row exact match)``. ``lazy``: a boolean [L]
    array or None (dense); ``teacher_params``: the frozen dense model (used when ``distill`` > 0).
    """

    attn = LazyAttention(mode=mode)

    def logits_of(params, batch, lazy):
        model = nnx.merge(graphdef, params)
        return sequence_logits(
            model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], lazy, attn=attn, loop="scan"
        )

    def loss_fn(params, batch, lazy, teacher_params):
        logits = logits_of(params, batch, lazy)
        task, hit, logp = _answer_stats(logits, batch)
        loss, kl = task, jnp.float32(0.0)
        if distill > 0:
            t_logits = jax.lax.stop_gradient(logits_of(teacher_params, batch, None))
            t_logp = jax.nn.log_softmax(t_logits, -1)
            w = batch["weights"]
            per_pos = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1)
            kl = (per_pos * w).sum() / jnp.maximum(w.sum(), 1.0)
            loss = task + distill * kl
        return loss, {"loss": loss, "task_loss": task, "kl": kl, "accuracy": hit.mean()}

    @jax.jit
    def train_step(params, opt_state, batch, lazy, teacher_params):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, lazy, teacher_params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    @jax.jit
    def eval_step(params, batch, lazy):
        loss, hit, _ = _answer_stats(logits_of(params, batch, lazy), batch)
        return loss, hit

    return train_step, eval_step


def _optimizer_key(tc: TrainConfig) -> TrainConfig:
    """The fields of ``tc`` that define the optimiser (the rest does not change compiled code)."""
    return dataclasses.replace(tc, seed=0, eval_every=1, save_every=1, lazy=None, mode="vla", distill=0.0)


@functools.lru_cache(maxsize=8)
def _compiled_steps(graphdef, opt_tc: TrainConfig, mode: str, distill: float):
    tx = optimizer(opt_tc)
    return (tx, *make_steps(graphdef, tx, mode=mode, distill=distill))


def compiled_steps(graphdef, tc: TrainConfig):
    """(optimizer, train_step, eval_step) for ``tc``, shared by every run in this process with
    the same model structure and optimiser settings (a resumed run does not compile again)."""
    return _compiled_steps(graphdef, _optimizer_key(tc), tc.mode, tc.distill)


def batch_accuracy(eval_step, params, batches, lazy) -> float:
    """Teacher-forced exact-match accuracy over prepared batches."""
    hits = [np.asarray(eval_step(params, b, lazy)[1]) for b in batches]
    return float(np.concatenate(hits).mean()) if hits else float("nan")


# -- the loop ----------------------------------------------------------------------------------


def _manager(work_dir: Path, tc: TrainConfig):
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


def fit(
    graphdef,
    params,
    tc: TrainConfig,
    batch_at: Callable[[int], dict],
    *,
    work_dir: Path | None = None,
    val_batches: Sequence[dict] = (),
    teacher_params=None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    meta: dict | None = None,
) -> tuple[dict, dict]:
    """Train ``params`` for ``tc.steps`` steps; returns (params, history).

    ``batch_at(step)`` gives the batch of a step. With ``work_dir`` the optimiser state is saved
    every ``tc.save_every`` steps (and at the end) by an Orbax CheckpointManager, and a run
    started again resumes from the latest saved step. ``stop_after``: return after that many
    steps of this call (to simulate an interruption in tests). ``history``: per-step losses,
    validation accuracies, timings.
    """
    from tqdm.auto import tqdm

    check_mode(tc.mode)
    if tc.steps < 1 or tc.batch_size < 1:
        raise QCacheError(f"need steps >= 1 and batch size >= 1 (got {tc.steps}, {tc.batch_size})")
    if tc.distill > 0 and teacher_params is None:
        raise QCacheError("distillation needs the dense teacher's parameters")
    tx, train_step, eval_step = compiled_steps(graphdef, tc)
    lazy = None if tc.lazy is None or not any(tc.lazy) else jnp.asarray(tc.lazy, bool)
    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)
    start, mngr = 0, None
    if work_dir is not None:
        import orbax.checkpoint as ocp

        work_dir = Path(work_dir)
        _check_work_dir(work_dir, tc, meta or {})
        mngr = _manager(work_dir, tc)
        latest = mngr.latest_step()
        if latest is not None:
            restored = mngr.restore(latest, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}))
            # Plain host-backed arrays again, so the jitted step sees the same argument kinds as
            # on a fresh start and does not compile a second time.
            restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
            params, opt_state, start = restored["params"], restored["opt_state"], int(latest)
            if log:
                log(f"resuming from step {start} saved in {work_dir}")
    history = {"loss": [], "accuracy": [], "val": [], "seconds": 0.0, "start_step": start}
    teacher = teacher_params if tc.distill > 0 else None
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    val_acc = float("nan")
    bar = tqdm(total=tc.steps, initial=start, desc="train" if lazy is None else f"tune {tc.mode}", unit="step", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, end):
            batch = batch_at(step)
            params, opt_state, m = train_step(params, opt_state, batch, lazy, teacher)
            loss = float(m["loss"])
            if not np.isfinite(loss):
                raise QCacheError(f"the loss became {loss} at step {step}; lower the learning rate")
            history["loss"].append(loss)
            history["accuracy"].append(float(m["accuracy"]))
            done = step + 1
            if val_batches and (done % tc.eval_every == 0 or done == tc.steps):
                val_acc = batch_accuracy(eval_step, params, val_batches, lazy)
                history["val"].append((done, val_acc))
            if mngr is not None and (done % tc.save_every == 0 or done == tc.steps):
                mngr.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.3f}", refresh=False)
    finally:
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    history["seconds"] = time.perf_counter() - t0
    history["end_step"] = end
    return params, history


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
    out = Path(out).absolute()
    return out.parent / f".{out.name}.train"


def prepare_out(out: Path, force: bool) -> Path:
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
    schedule = model.resolve_lazy(lazy, mode)
    if schedule.is_dense:
        raise QCacheError("tune needs a lazy schedule with at least one lazy layer (e.g. --lazy 2-3,5-7)")
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
    probe = [batcher.prompt_ids(e.question, e.image) for e in val[:1]]
    if probe and len(probe[0]) + 8 > seq_len:
        batcher.seq_len = seq_len = int(2 ** np.ceil(np.log2(len(probe[0]) + 8)))
    val_batches = [batcher(val[i : i + 64]) for i in range(0, len(val), 64)]
    meta = {"checkpoint": str(Path(ckpt).absolute()), "data": source.name}
    teacher = model.params if distill > 0 else None
    params, history = fit(
        model.graphdef, model.params, tc, lambda s: batcher(source.at(s)), work_dir=work_dir, val_batches=val_batches,
        teacher_params=teacher, progress=progress, stop_after=stop_after, log=log, meta=meta,
    )
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
