"""The Python API: ``load(ckpt_dir)`` returns a :class:`QCacheModel`."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import QCacheError
from .images import open_image
from .io.checkpoint import load_params, read_config, read_pruned
from .kernels import IMPLS
from .lazy.schedule import Schedule
from .nn.layers import LOOPS
from .nn.families import abstract_model


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Every option of :meth:`QCacheModel.generate` (and ``qcache generate``), validated once.

    ``lazy``/``mode``: the schedule (any SPEC form) and mode (None: what a schedule file
    records, else ``vla``). ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off.
    ``eos_token_id``: None = the model's. ``cache_len``: a fixed cache capacity (tokens per
    row). ``max_context``: the longest prompt + new tokens allowed (default: the model's
    ``max_position_embeddings``; raising it runs the model past the length it was trained on).
    ``loop``: ``unroll`` (fast decode) or ``scan``. ``return_logits``: keep each generated
    token's logits. ``fastv_layer`` K / ``fastv_keep`` R: FastV on top (None: off): after layer
    K keep the fraction R of the visual tokens that the last prompt token attends to most
    (``qcache_jax.lazy.fastv``; a lazy block straddling K is cut there).
    """

    lazy: Any = None
    mode: str | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    raw: bool = False
    eos_token_id: Any = None
    cache_len: int | None = None
    max_context: int | None = None
    attention_impl: str = "auto"
    reuse_probs: bool = True
    return_logits: bool = False
    loop: str = "unroll"
    fastv_layer: int | None = None
    fastv_keep: float = 0.5

    def __post_init__(self):
        def bad(name, want):
            raise QCacheError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", ">= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 = off)")
        if self.cache_len is not None and self.cache_len < 1:
            bad("cache_len", ">= 1")
        if self.max_context is not None and self.max_context < 1:
            bad("max_context", ">= 1")
        if self.attention_impl not in IMPLS:
            bad("attention_impl", f"one of {', '.join(IMPLS)}")
        if self.loop not in LOOPS:
            bad("loop", f"one of {', '.join(LOOPS)}")


class QCacheModel:
    """A loaded checkpoint: ``config``, ``params`` (pytree with Hugging Face's names, one array
    per layer), ``graphdef``, ``tokenizer``, ``processor`` and the inference methods.

    ``log``: where progress messages go (loading, compiling a new shape); None = silent.
    ``mesh``: a device mesh to run on (a ``jax.sharding.Mesh`` with axes ``data`` and
    ``model``, or ``"data=D,model=M"``): parameters are placed in their shardings
    (:mod:`qcache_jax.runtime.mesh`) and every pass runs tensor and data parallel. None: one
    device, as without this option.
    """

    def __init__(self, config, params, *, path: Path | None = None, tokenizer=None, processor=None,
                 log: Callable[[str], None] | None = None, mesh=None):
        self.mesh = None
        if mesh is not None:
            from .runtime.mesh import as_mesh, check_model, shard_params

            self.mesh = as_mesh(mesh)
            check_model(config, self.mesh)
            params = shard_params(params, config, self.mesh)
        self.config, self.params, self.path = config, params, path
        # a pruned checkpoint (`qcache prune`): layers without q_proj/k_proj weights
        self.pruned = read_pruned(path) if path is not None else []
        self.graphdef, _ = abstract_model(config)
        # Given objects, or loaded from the checkpoint on first use: loading them imports
        # transformers (and with it torch, when installed), which a run on token ids never needs.
        self._helpers = {"tokenizer": tokenizer, "processor": processor}
        self.log = log
        self._engines: dict = {}

    def with_params(self, params) -> "QCacheModel":
        """The same model (config, checkpoint path, tokenizer, processor, mesh) with other
        parameters of the same tree, shapes and dtypes (tuned ones, say). The new model builds its
        own engines; ``self`` is unchanged."""
        like = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), self.params)
        got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
        if jax.tree.structure(like) != jax.tree.structure(got) or like != got:
            raise QCacheError("with_params: the parameters do not match this model's tree, shapes and dtypes")
        return QCacheModel(self.config, params, path=self.path, tokenizer=self._helpers["tokenizer"] or None,
                           processor=self._helpers["processor"] or None, log=self.log, mesh=self.mesh)

    def _helper(self, kind: str):
        if self._helpers[kind] is None and self.path is not None and (kind == "tokenizer" or self.config.has_vision):
            self._helpers[kind] = _load_hf_helper(kind, self.path, self.config.family) or False
        return self._helpers[kind] or None

    @property
    def tokenizer(self):
        """The checkpoint's Hugging Face tokenizer (None if it has none); loaded on first use."""
        return self._helper("tokenizer")

    @tokenizer.setter
    def tokenizer(self, value):
        self._helpers["tokenizer"] = value

    @property
    def processor(self):
        """The checkpoint's Hugging Face processor (None if it has none); loaded on first use."""
        return self._helper("processor")

    @processor.setter
    def processor(self, value):
        self._helpers["processor"] = value

    @property
    def num_layers(self) -> int:
        return self.config.text.num_layers

    def module(self):
        """The NNX module with this model's parameters (for inspection; inference is functional)."""
        return nnx.merge(self.graphdef, self.params)

    def resolve_lazy(self, lazy, mode: str | None = None) -> Schedule:
        """The :class:`Schedule` for any accepted ``lazy`` form and ``mode`` (the one resolver:
        an explicit mode wins, else the mode a schedule file records, else ``vla``)."""
        return Schedule.resolve(lazy, self.num_layers, mode=mode, ckpt_dir=self.path)

    def resolve_fastv(self, layer, keep=0.5):
        """The :class:`~qcache_jax.lazy.fastv.FastV` for ``fastv_layer`` / ``fastv_keep`` (None:
        off, also for keep 1, which prunes nothing); bad values are a QCacheError."""
        from .lazy import fastv

        return fastv.make(layer, keep, self.num_layers)

    def effective_schedule(self, lazy, mode=None, fastv=None) -> Schedule:
        """The schedule that runs: ``lazy``/``mode`` resolved, cut at FastV's layer when on
        (checked against a pruned checkpoint's removed weights)."""
        return self.check_schedule(self.resolve_lazy(lazy, mode), fastv)

    def check_schedule(self, schedule: Schedule, fastv=None) -> Schedule:
        """``schedule`` if it runs on these weights; a pruned checkpoint lacks the q_proj/k_proj
        of some layers, so every one of them must be a GLA lazy layer (QCacheError otherwise).
        With ``fastv`` the schedule that runs is the one cut at its layer (returned)."""
        if fastv is not None:
            self.check_schedule(schedule)
            cut = fastv.cut(schedule)
            if fastv.layer + 1 in set(self.pruned) - set(cut.unused_qk_layers):
                raise QCacheError(
                    f"FastV {fastv.describe()} makes layer {fastv.layer + 1} an anchor (no lazy block may straddle "
                    f"its layer), but this pruned checkpoint has no q_proj/k_proj there; choose a FastV layer K "
                    f"whose layer K+1 is an anchor of the schedule ({schedule.describe()})"
                )
            return self.check_schedule(cut)
        missing = sorted(set(self.pruned) - set(schedule.unused_qk_layers))
        if missing:
            from .lazy.schedule import format_layers

            raise QCacheError(
                f"this checkpoint was pruned (`qcache prune`): layers {format_layers(self.pruned)} have no q_proj/k_proj "
                f"weights, but schedule {schedule.describe()} needs them in layers {format_layers(missing)}; run it "
                f"with --lazy auto --mode gla (its recorded schedule) or a GLA schedule whose lazy layers include them"
            )
        return schedule

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, image_grid_thw=None):
        """Validate HF-style inputs; returns them as numpy arrays (LLaVA-NeXT pixel values with
        their ``image_sizes`` as a host :class:`~qcache_jax.nn.anyres.AnyresPixels`; Qwen2-VL
        pixel values unchanged, checked with their ``image_grid_thw`` by :meth:`model_images`).
        Raises QCacheError naming the problem."""
        cfg = self.config
        ids = _to_numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise QCacheError(f"input_ids must be an integer array [batch, tokens], got {ids.dtype} {ids.shape}")
        if ids.shape[1] == 0:
            raise QCacheError("input_ids is empty (a prompt needs at least one token)")
        if ids.min() < 0 or ids.max() >= cfg.text.vocab_size:
            raise QCacheError(f"input_ids has token ids outside the vocabulary [0, {cfg.text.vocab_size})")
        mask = _to_numpy(attention_mask)
        if mask is not None:
            mask = mask.reshape(ids.shape) if mask.size == ids.size else mask
            if mask.shape != ids.shape:
                raise QCacheError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        pv = _to_numpy(pixel_values)
        n_img_tokens = int((ids == cfg.image_token_id).sum()) if cfg.has_vision else 0
        if image_grid_thw is not None and cfg.family == "llava":
            raise QCacheError("image_grid_thw is for Qwen2-VL checkpoints; this LLaVA one takes pixel_values "
                              + ("and image_sizes" if cfg.anyres else "[N, C, H, W]"))
        if cfg.family != "llava":
            if image_sizes is not None:
                raise QCacheError("image_sizes is for LLaVA-NeXT checkpoints; Qwen2-VL takes image_grid_thw")
            return ids.astype(np.int32), None if pv is None else pv.astype(np.float32), mask
        if image_sizes is not None and not cfg.anyres:
            raise QCacheError("image_sizes is for LLaVA-NeXT checkpoints; this one takes pixel_values [N, C, H, W]")
        if pv is not None and cfg.anyres:
            return ids.astype(np.int32), self._check_next_images(pv, image_sizes, n_img_tokens), mask
        if pv is not None:
            if not cfg.has_vision:
                raise QCacheError("this is a text-only checkpoint: it takes no pixel_values")
            v = cfg.vision
            want = (v.num_channels, v.image_size, v.image_size)
            if pv.ndim != 4 or tuple(pv.shape[1:]) != want:
                raise QCacheError(
                    f"pixel_values must be [N, {want[0]}, {want[1]}, {want[2]}] (NCHW), got {tuple(pv.shape)}"
                )
            expected = pv.shape[0] * cfg.image_tokens_per_image
            if n_img_tokens != expected:
                raise QCacheError(
                    f"image features and image tokens do not match: {pv.shape[0]} image(s) need {expected} "
                    f"image tokens (id {cfg.image_token_id}) in input_ids, found {n_img_tokens}"
                )
            pv = pv.astype(np.float32)
        elif n_img_tokens:
            raise QCacheError(f"input_ids has {n_img_tokens} image tokens but no pixel_values were given")
        return ids.astype(np.int32), pv, mask

    def _check_next_images(self, pv, image_sizes, n_img_tokens: int):
        """LLaVA-NeXT pixel values [N, views, C, H, W] (or [views, C, H, W]) and image_sizes
        [N, 2], checked against the image tokens, packed for the model."""
        from .nn import anyres

        if image_sizes is None:
            raise QCacheError(
                "a LLaVA-NeXT checkpoint needs image_sizes with pixel_values (as LlavaNextProcessor returns them)"
            )
        sizes = _to_numpy(image_sizes)
        images = anyres.pack(pv, sizes, self.config)
        expected = len(images.index)
        if n_img_tokens != expected:
            raise QCacheError(
                f"image features and image tokens do not match: {len(sizes.reshape(-1, 2))} image(s) of these sizes "
                f"need {expected} image tokens (id {self.config.image_token_id}) in input_ids, found {n_img_tokens}"
            )
        return images

    def model_images(self, input_ids, valid, pixel_values, meta=None):
        """What the model's passes take for one batch's images, by family: (pixels, RoPE
        positions or None). ``input_ids`` / ``valid`` [B, T]; ``pixel_values`` and ``meta`` as
        :meth:`encode` gives them (LLaVA-NeXT: ``image_sizes``, Qwen2-VL: ``image_grid_thw``)."""
        from .runtime.images import image_inputs

        return image_inputs(self.config).model_inputs(input_ids, valid, pixel_values, meta)

    def logits(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        lazy=None,
        mode: str | None = None,
        *,
        image_sizes=None,
        image_grid_thw=None,
        loop: str = "scan",
        attention_impl: str = "auto",
        fastv_layer: int | None = None,
        fastv_keep: float = 0.5,
        fastv_row=None,
        fastv_kept: bool = False,
    ):
        """Full-sequence logits [B, T, V] (float32 numpy) with HF's input conventions.

        ``lazy``: a schedule in any accepted form (None = dense); ``mode``: ``vla`` or ``gla``
        (None: the mode a schedule file records, else ``vla``). ``loop``: ``scan`` (one
        compiled layer) or ``unroll``; both compute the same numbers. LLaVA-NeXT:
        ``pixel_values`` [N, views, C, H, W] and ``image_sizes`` [N, 2], as
        ``LlavaNextForConditionalGeneration`` takes them. Qwen2-VL / Qwen2.5-VL: ``pixel_values``
        [N_patches, C*T*P*P] and ``image_grid_thw`` [N, 3], as ``Qwen2VLForConditionalGeneration``
        takes them (the M-RoPE positions are computed here). ``fastv_layer`` / ``fastv_keep``: FastV
        as in :class:`GenerateOptions`; the visual tokens are ranked by the attention of
        ``fastv_row`` (a position per row, or one for all; default: each row's last valid token,
        the last prompt token when ``input_ids`` is a prompt). The logits at dropped positions
        are not FastV's (FastV removes those tokens; here they only stop being keys).
        ``fastv_kept``: return which visual tokens FastV keeps, [B, T] bool, instead.
        """
        from .runtime.forward import logits_fn

        ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask, image_sizes, image_grid_thw)
        rope_positions = None
        if self.config.family != "llava":  # Qwen2-VL: packed patches and M-RoPE positions
            valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
            pv, rope_positions = self.model_images(ids, valid, pv, _to_numpy(image_grid_thw))
        fastv = self.resolve_fastv(fastv_layer, fastv_keep)
        schedule = self.effective_schedule(lazy, mode, fastv)
        if fastv_kept and fastv is None:
            raise QCacheError("fastv_kept needs FastV on (fastv_layer, and fastv_keep below 1)")
        static = None
        if self.pruned:  # removed weights: only an unrolled pass with the schedule fixed leaves them out
            static, loop = schedule, "unroll"
        put = jnp.asarray
        if self.mesh is not None:  # inputs replicated over the mesh (every process gives the same)
            from .runtime.mesh import put as mesh_put, replicated

            put = functools.partial(mesh_put, sharding=replicated(self.mesh))
        if fastv_row is not None:
            row = np.asarray(fastv_row)
            b, t = np.shape(ids)[:2]
            if fastv_layer is None:
                raise QCacheError("fastv_row is given without fastv_layer")
            if row.ndim > 1 or (row.ndim == 1 and row.shape[0] != b) or not np.issubdtype(row.dtype, np.integer) \
                    or row.min() < 0 or row.max() >= t:
                raise QCacheError(f"fastv_row must be one position or one per row ({b}), each in 0..{t - 1}; "
                                  f"got {row.tolist()}")
        out = logits_fn(
            self.graphdef,
            self.params,
            put(ids),
            None if pv is None else jax.tree.map(put, pv),
            None if mask is None else put(mask),
            None if schedule.is_dense or static is not None else put(schedule.mask),
            mode=schedule.mode,
            loop=loop,
            impl=attention_impl,
            mesh=self.mesh,
            fastv=fastv,
            fastv_row=None if fastv is None or fastv_row is None else put(np.asarray(fastv_row, np.int32)),
            kept=fastv_kept,
            schedule=static,
            rope_positions=None if rope_positions is None else put(rope_positions),
        )
        return np.asarray(out)

    # -- generation ---------------------------------------------------------------------------

    def engine(self, attention_impl: str = "auto"):
        """The (cached) :class:`~qcache_jax.runtime.engine.Engine` holding compiled executables per plan."""
        from .runtime.engine import Engine

        if attention_impl not in self._engines:
            self._engines[attention_impl] = Engine(
                self.graphdef, self.params, self.config, attention_impl=attention_impl, log=self.log, mesh=self.mesh
            )
        return self._engines[attention_impl]

    def encode(self, prompt: str, images=(), *, raw: bool = False):
        """Token ids (image tokens expanded) and pixel values for one text prompt and its images,
        through the checkpoint's chat template and HF processor. For a LLaVA-NeXT checkpoint a
        third item: ``image_sizes`` [N, 2] (pixel values are then [N, views, C, H, W], and each
        image's token count depends on its size); for Qwen2-VL ``image_grid_thw`` [N, 3] (pixel
        values [N_patches, C*T*P*P])."""
        if isinstance(images, (str, Path)) or hasattr(images, "convert"):
            images = [images]  # one image given alone, not a list of them
        images = [open_image(im) for im in images]
        if not isinstance(prompt, str):
            raise QCacheError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip() and not images:
            raise QCacheError("the prompt is empty (give some text or an image)")
        if self.processor is None and self.tokenizer is None:
            raise QCacheError(f"{self.path}: checkpoint has no tokenizer; pass input_ids instead of a prompt")
        if images and not self.config.has_vision:
            raise QCacheError("this is a text-only checkpoint: it takes no images")
        if raw:
            text = prompt
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            text = self.chat_text([{"role": "user", "content": content}])
        return self._encode_text(text, images, raw=raw)

    def chat_text(self, messages: list[dict]) -> str:
        """The prompt text of a conversation through the checkpoint's chat template, ending with
        the assistant's turn. ``messages``: Hugging Face chat format, each ``content`` a string or
        a list of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts (a text-only
        checkpoint gets its parts' text joined: its template takes plain strings)."""
        templater = self.processor if self.processor is not None else self.tokenizer
        if getattr(templater, "chat_template", None) is None:
            raise QCacheError(f"{self.path}: checkpoint has no chat template; use --raw")
        if not self.config.has_vision:
            messages = [{**m, "content": m["content"] if isinstance(m["content"], str) else
                         "".join(p.get("text", "") for p in m["content"])} for m in messages]
        return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_chat(self, messages: list[dict], images=()):
        """Like :meth:`encode` for a whole conversation (:meth:`chat_text`'s format) whose
        ``{"type": "image"}`` parts take ``images`` in order."""
        images = [open_image(im) for im in images]
        if images and not self.config.has_vision:
            raise QCacheError("this is a text-only checkpoint: it takes no images")
        return self._encode_text(self.chat_text(messages), images, raw=False)

    def _encode_text(self, text: str, images, *, raw: bool):
        """Token ids and pixel values of a formatted prompt with its (opened) images."""
        if self.config.has_vision:
            placeholders = text.count(self._image_token_text())
            if placeholders != len(images):
                raise QCacheError(
                    f"the prompt has {placeholders} image placeholder(s) ({self._image_token_text()}) "
                    f"for {len(images)} image(s)" + (" (with --raw, write one placeholder per image)" if raw else "")
                )
        if images:
            if self.processor is None:
                raise QCacheError(f"{self.path}: checkpoint has no image processor, so it cannot take images")
            enc = self.processor(images=images, text=[text], return_tensors="np")
            ids, pv = enc["input_ids"][0].tolist(), enc["pixel_values"].astype(np.float32)
            if self.config.family != "llava":
                return ids, pv, np.asarray(enc["image_grid_thw"])
            return (ids, pv, np.asarray(enc["image_sizes"])) if self.config.anyres else (ids, pv)
        ids = self._tokenizer()(text)["input_ids"]
        return (ids, None, None) if self.config.anyres or self.config.family != "llava" else (ids, None)

    def _image_token_text(self) -> str:
        tok = self._tokenizer()
        return tok.convert_ids_to_tokens(self.config.image_token_id) if tok is not None else "<image>"

    def options(self, options: GenerateOptions | None = None, **kwargs) -> GenerateOptions:
        """``options`` with ``kwargs`` replaced (unknown names are a TypeError)."""
        base = options or GenerateOptions()
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(GenerateOptions)}
        if unknown:
            raise TypeError(f"unexpected generate options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **kwargs)

    def generate(self, prompt=None, images=(), *, input_ids=None, pixel_values=None, attention_mask=None,
                 image_sizes=None, image_grid_thw=None, options: GenerateOptions | None = None,
                 **kwargs) -> "GenerateResult":
        """Jitted prefill + ``lax.while_loop`` decode for one prompt or a batch.

        Give either ``prompt`` (a string, or a list of strings) with ``images`` (a path or PIL
        image, or a list of them; for a batch, one list per prompt), formatted with the chat
        template unless ``raw``; or HF-style ``input_ids`` [B, T] (image tokens expanded;
        padding on either side marked by ``attention_mask``) with ``pixel_values`` [N, C, H, W]
        (LLaVA-NeXT: [N, views, C, H, W] and ``image_sizes`` [N, 2]; Qwen2-VL: [N_patches,
        C*T*P*P] and ``image_grid_thw`` [N, 3]; rows may hold different numbers of image tokens).
        Options: a :class:`GenerateOptions` and/or its fields as keywords (``lazy``, ``mode``,
        ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``raw``,
        ``eos_token_id``, ``cache_len``, ``max_context``, ``attention_impl``,
        ``reuse_probs``, ``return_logits``, ``loop``, ``fastv_layer``, ``fastv_keep``). Rows stop on EOS, at
        ``max_new_tokens`` or when their cache is full. A prompt that cannot fit the model's
        context (or ``cache_len``) is an error before anything is allocated.
        """
        from .runtime.engine import Sampling

        opts = self.options(options, **kwargs)
        engine, plan, prompts, pv, schedule = self._setup(
            prompt, images, input_ids, pixel_values, attention_mask, opts, image_sizes, image_grid_thw
        )
        sampling = Sampling.make(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, opts.seed)
        out = engine.generate(prompts, pv, plan, sampling)
        return GenerateResult(
            token_ids=out.token_ids,
            prompt_token_ids=prompts,
            kv_cache_bytes=out.kv_cache_bytes,
            dense_kv_cache_bytes=out.dense_kv_cache_bytes,
            prefill_seconds=out.prefill_seconds,
            decode_tokens_per_second=out.decode_tokens_per_second,
            compile_seconds=out.compile_seconds,
            lazy_layers=schedule.lazy_layers,
            mode=schedule.label,
            schedule=schedule,
            fastv=None if out.layout.fastv is None else out.layout.fastv.describe(),
            logits=out.logits,
            detokenize=self.detokenize,
        )

    def stream(self, prompt=None, images=(), *, input_ids=None, pixel_values=None, attention_mask=None,
               image_sizes=None, image_grid_thw=None, options: GenerateOptions | None = None,
               stats: dict | None = None, **kwargs):
        """Like :meth:`generate` (same arguments), yielding each step's new token per prompt as
        a list (None for prompts that have finished). ``stats``, when given, receives the
        compile and prefill seconds, the KV cache bytes and the schedule before the first token."""
        from .runtime.engine import Sampling

        opts = self.options(options, **kwargs)
        if opts.return_logits:
            raise QCacheError("stream() does not return logits; use generate(return_logits=True)")
        engine, plan, prompts, pv, _ = self._setup(
            prompt, images, input_ids, pixel_values, attention_mask, opts, image_sizes, image_grid_thw
        )
        sampling = Sampling.make(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, opts.seed)
        yield from engine.stream(prompts, pv, plan, sampling, opts.max_new_tokens, stats=stats)

    def plan(self, prompts, n_images_per_row, opts: GenerateOptions, schedule: Schedule | None = None):
        """(engine, plan) for token-id prompts under ``opts`` (what generate compiles)."""
        fastv = self.resolve_fastv(opts.fastv_layer, opts.fastv_keep)
        schedule = schedule or self.resolve_lazy(opts.lazy, opts.mode)
        self.check_schedule(schedule, fastv)  # the planner cuts it for FastV
        if self.pruned and opts.loop != "unroll":
            raise QCacheError("a pruned checkpoint runs with loop='unroll' only (a scanned loop stacks every "
                              "layer's q_proj/k_proj)")
        engine = self.engine(opts.attention_impl)
        plan = engine.plan(
            prompts,
            n_images_per_row,
            schedule=schedule,
            max_new_tokens=opts.max_new_tokens,
            eos=self._eos(opts.eos_token_id),
            pad_id=self.pad_id(),
            cache_len=opts.cache_len,
            max_context=opts.max_context,
            reuse_probs=opts.reuse_probs,
            keep_logits=opts.return_logits,
            loop=opts.loop,
            fastv=fastv,
        )
        return engine, plan

    def _setup(self, prompt, images, input_ids, pixel_values, attention_mask, opts: GenerateOptions,
               image_sizes=None, image_grid_thw=None):
        """Validate inputs; (engine, plan, prompts, pixel values, schedule that runs)."""
        schedule = self.effective_schedule(opts.lazy, opts.mode, self.resolve_fastv(opts.fastv_layer, opts.fastv_keep))
        prompts, pv, counts = self._prompts(
            prompt, images, input_ids, pixel_values, attention_mask, opts.raw, image_sizes, image_grid_thw
        )
        if self.config.anyres:
            n_img = self._next_images_per_row(prompts, counts)
        else:
            per = self.config.image_tokens_per_image
            n_img = [sum(1 for t in p if t == self.config.image_token_id) // per if per else 0 for p in prompts]
        engine, plan = self.plan(prompts, n_img, opts, schedule)
        return engine, plan, prompts, pv, schedule

    def _prompts(self, prompt, images, input_ids, pixel_values, attention_mask, raw, image_sizes=None,
                 image_grid_thw=None):
        """Per-row prompt token lists (no padding), the batch's pixel values (LLaVA-NeXT: a host
        :class:`~qcache_jax.nn.anyres.AnyresPixels` of the batch's images, in row order; Qwen2-VL:
        (pixel_values, image_grid_thw)) and, for LLaVA-NeXT, each image's token count (else None)."""
        if (prompt is None) == (input_ids is None):
            raise QCacheError("give exactly one of prompt or input_ids")
        if image_grid_thw is not None and prompt is not None:
            raise QCacheError("image_grid_thw goes with pixel_values; with a prompt, give the images")
        if self.config.family != "llava":
            return self._qwen_prompts(prompt, images, input_ids, pixel_values, attention_mask, raw, image_sizes,
                                      image_grid_thw)
        if prompt is not None:
            if image_sizes is not None:
                raise QCacheError("image_sizes goes with pixel_values; with a prompt, give the images")
            rows, pvs, sizes = self._encode_prompts(prompt, images, raw)
            if self.config.anyres:
                return self._next_rows(rows, pvs, sizes)
            pv = np.concatenate(pvs) if pvs else None
        else:
            ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask, image_sizes)
            rows = _unpadded_rows(ids, mask)
            if self.config.anyres:
                from .nn import anyres

                if any(len(r) == 0 for r in rows):
                    raise QCacheError("a prompt has no tokens")
                counts = [] if pv is None else anyres.image_token_counts(_to_numpy(image_sizes), self.config)
                return rows, pv, counts
        if any(len(r) == 0 for r in rows):
            raise QCacheError("a prompt has no tokens")
        per = self.config.image_tokens_per_image
        if per and not self.config.anyres:  # LLaVA-NeXT: checked by check_inputs and the planner
            flat = np.array([t for r in rows for t in r])
            n_tok = int((flat == self.config.image_token_id).sum())
            n_pv = 0 if pv is None else pv.shape[0]
            if n_tok != n_pv * per:
                raise QCacheError(f"{n_pv} image(s) need {n_pv * per} image tokens, the prompts have {n_tok}")
            for r in rows:
                if sum(1 for t in r if t == self.config.image_token_id) % per:
                    raise QCacheError(f"a prompt's image tokens are not a whole number of images ({per} tokens each)")
        return rows, pv, None

    def _encode_prompts(self, prompt, images, raw):
        """A prompt or a list of them with their images (one list per prompt) through
        :meth:`encode`: (rows, pixel values of the rows with images, and each such row's third
        item of :meth:`encode` (``image_sizes`` / ``image_grid_thw``; None for LLaVA-1.5))."""
        single = isinstance(prompt, str)
        batch = [prompt] if single else list(prompt)
        if not batch:
            raise QCacheError("empty prompt list")
        if single:
            per_row = [images]
        else:
            per_row = [x for x in images] if images else [[] for _ in batch]
        if len(per_row) != len(batch):
            raise QCacheError(f"{len(batch)} prompts but {len(per_row)} image lists")
        rows, pvs, metas = [], [], []
        for p, ims in zip(batch, per_row):
            ids, pv, *meta = self.encode(p, ims, raw=raw)
            rows.append(ids)
            if pv is not None:
                pvs.append(pv)
                metas.append(meta[0] if meta else None)
        return rows, pvs, metas

    def _qwen_prompts(self, prompt, images, input_ids, pixel_values, attention_mask, raw, image_sizes,
                      image_grid_thw):
        """:meth:`_prompts` for Qwen2-VL: the rows and (pixel_values, image_grid_thw), checked
        now (before anything compiles) by the same packing the engine runs."""
        from .nn.qwen2_vl import prepare_inputs

        if prompt is not None:
            rows, pvs, grids = self._encode_prompts(prompt, images, raw)
            pv = np.concatenate(pvs) if pvs else None
            grid = np.concatenate(grids) if grids else None
        else:
            ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask, image_sizes, image_grid_thw)
            rows = _unpadded_rows(ids, mask)
            grid = None if image_grid_thw is None else _to_numpy(image_grid_thw)
        if any(len(r) == 0 for r in rows):
            raise QCacheError("a prompt has no tokens")
        t = max(len(r) for r in rows)
        padded = np.zeros((len(rows), t), np.int64)
        valid = np.zeros((len(rows), t), bool)
        for i, r in enumerate(rows):
            padded[i, : len(r)], valid[i, : len(r)] = r, True
        prepare_inputs(self.config, padded, valid, pv, grid, pack=False)  # raises on any mismatch
        return rows, None if pv is None else (pv, grid), None

    def _next_rows(self, rows, pvs, sizes):
        """LLaVA-NeXT, encoded prompts: (rows, one host AnyresPixels of all their images in
        order, each image's token count)."""
        from .nn import anyres

        if any(len(r) == 0 for r in rows):
            raise QCacheError("a prompt has no tokens")
        if not pvs:
            return rows, None, []
        views = [anyres.pack(pv, size, self.config).views for pv, size in zip(pvs, sizes)]
        sizes = np.concatenate(sizes)
        images = anyres.pack(np.concatenate(views), sizes, self.config)
        return rows, images, anyres.image_token_counts(sizes, self.config)

    def _next_images_per_row(self, prompts, counts) -> list[int]:
        """LLaVA-NeXT: how many images each row holds (images come in row order; each fills as
        many image tokens as its size gives it)."""
        k, out = 0, []
        for p in prompts:
            need, n = sum(1 for t in p if t == self.config.image_token_id), 0
            while need > 0 and k < len(counts):
                need -= counts[k]
                k, n = k + 1, n + 1
            if need:
                raise QCacheError(
                    "a prompt's image tokens do not add up to whole images (each image's size fixes its count)"
                )
            out.append(n)
        return out

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        if eos_token_id is not None:
            return tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
        if self.config.text.eos_token_id:
            return self.config.text.eos_token_id
        tok = self._tokenizer()
        return (tok.eos_token_id,) if tok is not None and tok.eos_token_id is not None else ()

    def pad_id(self) -> int:
        """The token id used to pad prompts and finished rows (never the image token)."""
        pad = self.config.text.pad_token_id
        if pad is None:
            tok = self._tokenizer()
            pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        return int(pad) if int(pad) != self.config.image_token_id else 0

    def _tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        return getattr(self.processor, "tokenizer", None)

    def detokenize(self, ids) -> str | None:
        """Text for token ids (special tokens skipped), or None without a tokenizer."""
        tok = self._tokenizer()
        return None if tok is None else tok.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass
class GenerateResult:
    """What :meth:`QCacheModel.generate` returns: one entry per prompt in ``text``, ``token_ids``
    (generated, EOS included when hit) and ``prompt_token_ids``; sizes in bytes; times in s.
    ``mode`` is ``dense``, ``gla`` or ``vla``. ``text`` is detokenized on first access (None
    entries without a tokenizer)."""

    token_ids: list
    prompt_token_ids: list
    kv_cache_bytes: int
    dense_kv_cache_bytes: int
    prefill_seconds: float
    decode_tokens_per_second: float
    compile_seconds: float
    lazy_layers: list
    mode: str
    schedule: Schedule | None = None
    fastv: str | None = None  # "K:R" when FastV pruned visual tokens
    logits: list | None = None  # with return_logits: per prompt, [n_generated, V] float32
    detokenize: Callable | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def text(self) -> list:
        """The generated text per prompt (special tokens skipped)."""
        return [self.detokenize(t) if self.detokenize else None for t in self.token_ids]

    @property
    def kv_saved_fraction(self) -> float:
        return 1.0 - self.kv_cache_bytes / self.dense_kv_cache_bytes

    def to_json(self, row: int | None = None) -> dict:
        """A JSON-ready dict; with ``row`` the per-prompt fields are that prompt's."""
        skip = ("logits", "schedule", "detokenize")
        d = {"text": self.text, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}}
        if row is not None:
            for k in ("text", "token_ids", "prompt_token_ids"):
                d[k] = d[k][row]
        d["kv_saved_fraction"] = self.kv_saved_fraction
        return d


def _unpadded_rows(ids, mask) -> list[list[int]]:
    """Each row's tokens without its padding (``mask`` None: no padding)."""
    mask = np.ones_like(ids, bool) if mask is None else mask.astype(bool)
    return [row[m].tolist() for row, m in zip(ids, mask)]


def _load_hf_helper(kind: str, path: Path, family: str = "llava"):
    """The tokenizer or processor saved with the checkpoint, or None when it has none (for
    Qwen2-VL the processor is :class:`~qcache_jax.io.qwen_processor.QwenImageProcessor`: images
    without transformers' video half)."""
    import transformers

    from .io.qwen_processor import QwenImageProcessor

    names = {
        "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
        "processor": ("preprocessor_config.json", "processor_config.json"),
    }
    if not any((path / n).is_file() for n in names[kind]):
        return None
    cls = transformers.AutoTokenizer if kind == "tokenizer" else transformers.AutoProcessor
    if kind == "processor" and family != "llava":
        cls = QwenImageProcessor
    try:
        return cls.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer must not block logits; say why it is missing
        import warnings

        warnings.warn(f"{path}: could not load the {kind} ({type(e).__name__}: {e})")
        return None


def load(ckpt_dir: str | Path, *, log: Callable[[str], None] | None = None, mesh=None) -> QCacheModel:
    """Load a checkpoint written by :func:`qcache_jax.convert_hf` (or ``qcache convert``).

    ``log``: a callable for progress messages (the CLI passes one that prints to stderr).
    ``mesh``: run on a device mesh, a ``jax.sharding.Mesh`` with axes ``data`` and ``model``
    or ``"data=D,model=M"`` (docs/architecture.md, "Scaling out"): Orbax restores every
    parameter straight into its sharding (each device reads only its shard; no full copy on
    one host). In a multi-process run call ``jax.distributed.initialize`` first."""
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise QCacheError(f"{ckpt_dir}: no such checkpoint directory")
    cfg = read_config(path)
    shardings = None
    if mesh is not None:
        from .runtime.mesh import as_mesh, check_model, describe, param_shardings

        mesh = as_mesh(mesh)
        check_model(cfg, mesh)
        shardings = param_shardings(abstract_model(cfg)[1], cfg, mesh)
    if log:
        on = "" if mesh is None else f" onto a {describe(mesh)} mesh of {mesh.devices.size} devices"
        log(f"loading {path} ({cfg.text.num_layers} decoder layers, {cfg.dtype}){on}...")
    params = load_params(path, cfg, shardings=shardings)
    return QCacheModel(cfg, params, path=path, log=log, mesh=mesh)
