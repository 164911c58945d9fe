"""The Python API: ``load(ckpt_dir)`` returns a :class:`QCacheModel`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import load_params, read_config
from .config import LlavaConfig
from .errors import QCacheError
from .images import open_image
from .lazy_attention import MODES
from . import schedule as sched


def _to_numpy(x, name):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


class QCacheModel:
    """A loaded checkpoint: ``config``, ``params`` (pytree), ``graphdef``, ``tokenizer``,
    ``processor``, ``schedule`` (from schedule.json, or None) and the inference methods."""

    def __init__(self, config: LlavaConfig, params, *, path: Path | None = None, tokenizer=None, processor=None):
        from .convert import abstract_params

        self.config, self.params, self.path = config, params, path
        self.graphdef, _ = abstract_params(config)
        self.tokenizer, self.processor = tokenizer, processor
        self._engines: dict = {}

    @property
    def num_layers(self) -> int:
        return self.config.text.num_layers

    def module(self):
        """The NNX module with this model's parameters (for inspection; inference is functional)."""
        return nnx.merge(self.graphdef, self.params)

    def resolve_lazy(self, lazy) -> tuple[bool, ...]:
        """A schedule from any accepted form (see :func:`qcache_jax.schedule.resolve`)."""
        return sched.resolve(lazy, self.num_layers, self.path)

    def resolve_lazy_and_mode(self, lazy, mode: str | None) -> tuple[tuple[bool, ...], str]:
        """(schedule, mode): ``mode`` None takes the mode a schedule file records, else ``vla``."""
        schedule, recorded = sched.resolve_with_mode(lazy, self.num_layers, self.path)
        mode = mode or recorded or "vla"
        if mode not in MODES:
            raise QCacheError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        return schedule, mode

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None):
        """Validate HF-style inputs; returns them as numpy arrays. Raises QCacheError naming the problem."""
        cfg = self.config
        ids = _to_numpy(input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise QCacheError(f"input_ids must be an integer array [batch, tokens], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
            raise QCacheError(f"input_ids has token ids outside the vocabulary [0, {cfg.text.vocab_size})")
        mask = _to_numpy(attention_mask, "attention_mask")
        if mask is not None:
            mask = mask.reshape(ids.shape) if mask.size == ids.size else mask
            if mask.shape != ids.shape:
                raise QCacheError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        pv = _to_numpy(pixel_values, "pixel_values")
        n_img_tokens = int((ids == cfg.image_token_id).sum())
        if pv is not None:
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

    def logits(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        lazy=None,
        mode: str | None = None,
        *,
        unroll: bool = False,
        attention_impl: str = "auto",
    ):
        """Full-sequence logits [B, T, V] (float32 numpy) with HF's input conventions.

        ``lazy``: a schedule in any accepted form (None = dense); ``mode``: ``vla`` or ``gla``
        (None: the mode a schedule file records, else ``vla``).
        """
        from .model import logits_fn

        ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        schedule, mode = self.resolve_lazy_and_mode(lazy, mode)
        flags = None if not any(schedule) else jnp.asarray(schedule)
        out = logits_fn(
            self.graphdef,
            self.params,
            jnp.asarray(ids),
            None if pv is None else jnp.asarray(pv),
            None if mask is None else jnp.asarray(mask),
            flags,
            mode=mode,
            unroll=unroll,
            attention_impl=attention_impl,
        )
        return np.asarray(out)

    # -- generation ---------------------------------------------------------------------------

    def engine(self, attention_impl: str = "auto"):
        """The (cached) :class:`~qcache_jax.engine.Engine` holding compiled executables per bucket."""
        from .engine import Engine

        if attention_impl not in self._engines:
            self._engines[attention_impl] = Engine(
                self.graphdef, self.params, self.config, attention_impl=attention_impl
            )
        return self._engines[attention_impl]

    def encode(self, prompt, images=(), *, raw: bool = False):
        """Token ids (image tokens expanded) and pixel values for one text prompt and its images,
        through the checkpoint's chat template and HF processor."""
        images = [open_image(im) for im in images]
        if self.processor is None and self.tokenizer is None:
            raise QCacheError(f"{self.path}: checkpoint has no tokenizer; pass input_ids instead of a prompt")
        if raw:
            text = prompt
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            templater = self.processor if self.processor is not None else self.tokenizer
            if getattr(templater, "chat_template", None) is None:
                raise QCacheError(f"{self.path}: checkpoint has no chat template; use --raw")
            text = templater.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        if images:
            if self.processor is None:
                raise QCacheError(f"{self.path}: checkpoint has no image processor, so it cannot take images")
            enc = self.processor(images=images, text=[text], return_tensors="np")
            return enc["input_ids"][0].tolist(), enc["pixel_values"].astype(np.float32)
        tok = self.tokenizer if self.tokenizer is not None else self.processor.tokenizer
        return tok(text)["input_ids"], None

    def generate(
        self,
        prompt=None,
        images=(),
        *,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        lazy=None,
        mode: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        raw: bool = False,
        eos_token_id=None,
        cache_len: int | None = None,
        attention_impl: str = "auto",
        gla_reuse_probs: bool = True,
        return_logits: bool = False,
    ) -> "GenerateResult":
        """Jitted prefill + ``lax.while_loop`` decode for one prompt or a batch.

        Give either ``prompt`` (a string, or a list of strings) with ``images`` (paths or PIL
        images; for a batch, one list per prompt), formatted with the chat template unless
        ``raw``; or HF-style ``input_ids`` [B, T] (image tokens expanded; padding on either side
        marked by ``attention_mask``) with ``pixel_values`` [N, C, H, W]. Greedy when
        ``temperature`` is 0. ``mode`` None takes the mode a schedule file records, else
        ``vla``. ``return_logits`` keeps each generated token's logits. Rows stop on EOS, at
        ``max_new_tokens`` or when their cache is full; ``cache_len`` fixes the cache capacity
        (tokens per row), and a prompt that does not fit is an error.
        """
        engine, plan, prompts, pv, n_img, schedule, mode = self._setup(**_locals_for_setup(locals()))
        out = engine.generate(
            prompts,
            pv,
            n_img,
            plan,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        return GenerateResult(
            text=[self.detokenize(t) for t in out.token_ids],
            token_ids=out.token_ids,
            prompt_token_ids=prompts,
            kv_cache_bytes=out.kv_cache_bytes,
            dense_kv_cache_bytes=out.dense_kv_cache_bytes,
            prefill_seconds=out.prefill_seconds,
            decode_tokens_per_second=out.decode_tokens_per_second,
            compile_seconds=out.compile_seconds,
            lazy_layers=[i for i, f in enumerate(schedule) if f],
            mode=mode,
            logits=out.logits,
        )

    def stream(self, prompt=None, images=(), **kwargs):
        """Like :meth:`generate` (same arguments but ``return_logits``), yielding each step's
        new token per prompt as a list (None for prompts that have finished)."""
        unknown = set(kwargs) - set(_GENERATE_DEFAULTS) | {"return_logits"} & set(kwargs)
        if unknown:
            raise TypeError(f"stream() got unexpected arguments: {', '.join(sorted(unknown))}")
        args = dict(_GENERATE_DEFAULTS, prompt=prompt, images=images, **kwargs)
        engine, plan, prompts, pv, _, _, _ = self._setup(**_locals_for_setup(args))
        yield from engine.stream(
            prompts,
            pv,
            plan,
            max_new_tokens=args["max_new_tokens"],
            temperature=args["temperature"],
            top_k=args["top_k"],
            top_p=args["top_p"],
            seed=args["seed"],
        )

    def _setup(
        self,
        *,
        prompt,
        images,
        input_ids,
        pixel_values,
        attention_mask,
        lazy,
        mode,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        raw,
        eos_token_id,
        cache_len,
        attention_impl,
        gla_reuse_probs,
        return_logits,
    ):
        """Validate options and inputs; (engine, plan, prompts, pixel values, images per row, schedule, mode)."""
        if max_new_tokens < 1:
            raise QCacheError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise QCacheError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        schedule, mode = self.resolve_lazy_and_mode(lazy, mode)
        prompts, pv = self._prompts(prompt, images, input_ids, pixel_values, attention_mask, raw)
        per = self.config.image_tokens_per_image
        n_img = [sum(1 for t in p if t == self.config.image_token_id) // per for p in prompts]
        engine = self.engine(attention_impl)
        plan = engine.plan(
            prompts,
            n_img,
            schedule=schedule,
            mode=mode,
            max_new_tokens=max_new_tokens,
            eos=self._eos(eos_token_id),
            pad_id=self._pad_id(),
            cache_len=cache_len,
            reuse_probs=gla_reuse_probs,
            keep_logits=return_logits,
        )
        return engine, plan, prompts, pv, n_img, schedule, mode

    def _prompts(self, prompt, images, input_ids, pixel_values, attention_mask, raw):
        """Per-row prompt token lists (no padding) and the batch's pixel values."""
        if (prompt is None) == (input_ids is None):
            raise QCacheError("give exactly one of prompt or input_ids")
        if prompt is not None:
            batch = [prompt] if isinstance(prompt, str) else list(prompt)
            if not batch:
                raise QCacheError("empty prompt list")
            per_row = [list(images)] if isinstance(prompt, str) else [list(x) for x in (images or [[]] * len(batch))]
            if len(per_row) != len(batch):
                raise QCacheError(f"{len(batch)} prompts but {len(per_row)} image lists")
            rows, pvs = [], []
            for p, ims in zip(batch, per_row):
                ids, pv = self.encode(p, ims, raw=raw)
                rows.append(ids)
                if pv is not None:
                    pvs.append(pv)
            ids_check = rows
            pv = np.concatenate(pvs) if pvs else None
        else:
            ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask)
            mask = np.ones_like(ids, bool) if mask is None else mask.astype(bool)
            rows = [row[m].tolist() for row, m in zip(ids, mask)]
            ids_check = rows
        if any(len(r) == 0 for r in ids_check):
            raise QCacheError("a prompt has no tokens")
        flat = np.array([t for r in rows for t in r])
        n_tok = int((flat == self.config.image_token_id).sum())
        n_pv = 0 if pv is None else pv.shape[0]
        if n_tok != n_pv * self.config.image_tokens_per_image:
            raise QCacheError(
                f"{n_pv} image(s) need {n_pv * self.config.image_tokens_per_image} image tokens, the prompts have {n_tok}"
            )
        per = self.config.image_tokens_per_image
        for r in rows:
            if sum(1 for t in r if t == self.config.image_token_id) % per:
                raise QCacheError(f"a prompt's image tokens are not a whole number of images ({per} tokens each)")
        return rows, pv

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        if eos_token_id is not None:
            return tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
        if self.config.text.eos_token_id:
            return self.config.text.eos_token_id
        tok = self._tokenizer()
        return (tok.eos_token_id,) if tok is not None and tok.eos_token_id is not None else ()

    def _pad_id(self) -> int:
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
    (generated, EOS included when hit) and ``prompt_token_ids``; sizes in bytes; times in s."""

    text: list
    token_ids: list
    prompt_token_ids: list
    kv_cache_bytes: int
    dense_kv_cache_bytes: int
    prefill_seconds: float
    decode_tokens_per_second: float
    compile_seconds: float
    lazy_layers: list
    mode: str
    logits: list | None = None  # with return_logits: per prompt, [n_generated, V] float32

    @property
    def kv_saved_fraction(self) -> float:
        return 1.0 - self.kv_cache_bytes / self.dense_kv_cache_bytes

    def to_json(self, row: int | None = None) -> dict:
        """A JSON-ready dict; with ``row`` the per-prompt fields are that prompt's."""
        d = dataclasses.asdict(self)
        d.pop("logits")
        if row is not None:
            for k in ("text", "token_ids", "prompt_token_ids"):
                d[k] = d[k][row]
        d["kv_saved_fraction"] = self.kv_saved_fraction
        return d


_SETUP_ARGS = (
    "prompt images input_ids pixel_values attention_mask lazy mode max_new_tokens temperature top_p top_k raw "
    "eos_token_id cache_len attention_impl gla_reuse_probs return_logits"
).split()


def _locals_for_setup(scope: dict) -> dict:
    return {k: scope[k] for k in _SETUP_ARGS}


def _generate_defaults() -> dict:
    import inspect

    sig = inspect.signature(QCacheModel.generate)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _load_hf_helper(kind: str, path: Path):
    """The tokenizer or processor saved with the checkpoint, or None when it has none."""
    import transformers

    names = {
        "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
        "processor": ("preprocessor_config.json", "processor_config.json"),
    }
    if not any((path / n).is_file() for n in names[kind]):
        return None
    cls = transformers.AutoTokenizer if kind == "tokenizer" else transformers.AutoProcessor
    try:
        return cls.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer must not block logits; say why it is missing
        import warnings

        warnings.warn(f"{path}: could not load the {kind} ({type(e).__name__}: {e})")
        return None


def load(ckpt_dir: str | Path) -> QCacheModel:
    """Load a checkpoint written by :func:`qcache_jax.convert_hf` (or ``qcache convert``)."""
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise QCacheError(f"{ckpt_dir}: no such checkpoint directory")
    cfg = read_config(path)
    params = load_params(path, cfg)
    return QCacheModel(
        cfg,
        params,
        path=path,
        tokenizer=_load_hf_helper("tokenizer", path),
        processor=_load_hf_helper("processor", path),
    )


_GENERATE_DEFAULTS = _generate_defaults()
