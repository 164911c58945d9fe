"""The serving service between HTTP and the scheduler: a :class:`ChatRequest` becomes token ids
and pixel values (the checkpoint's chat template and HF processor), a runtime
:class:`~qcache_jax.runtime.scheduler.Request`, and its tokens become text again, cut at a
stop string (:class:`TextStream`).

:func:`build` sizes the slot pool from a KV budget: the slot length is ``max_model_len``
(visual capacity for ``max_images`` images, the rest text), and the slot count is what the
budget holds of the schedule's real cache arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from ..errors import QCacheError
from ..lazy.attention import LazyAttention
from ..lazy.schedule import Schedule
from ..runtime.mesh import DATA, axis_size
from ..runtime.scheduler import Request, Scheduler
from ..runtime.slots import RowSampling, SlotEngine, SlotLayout, slot_bytes, slots_for_budget
from .protocol import APIError, ChatRequest


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """A server's sizing and limits (``qcache serve``'s options)."""

    kv_budget: int  # bytes of KV cache for all slots together
    max_model_len: int | None = None  # tokens per sequence (prompt + output); None: the model's context
    max_images: int = 1  # images per request
    max_queue: int = 64  # requests waiting for a slot beyond which the answer is 429
    prefill_budget: int = 1024  # prompt tokens prefilled per scheduler iteration (at least one request)
    served_name: str = "qcache"


class TextStream:
    """Incremental detokenization: each call returns the new text since the last one, holding
    back what could still become a stop string or is an incomplete character, and notes when a
    stop string appears (the text ends before it).

    Only a short window of ids is decoded per token (as vLLM does: the ids since the last
    settled text, with the previous ones as context, so a tokenizer's spacing rules see their
    neighbour), so a long answer costs linear, not quadratic, time.
    """

    def __init__(self, detokenize: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.detokenize, self.stop = detokenize, stop
        self.ids: list[int] = []
        self.text = ""  # the settled text so far
        self.prefix = 0  # ids[prefix:read] decode to the end of self.text (context for the next piece)
        self.read = 0
        self.sent = 0  # characters already given out
        self.stopped = False

    def _settle(self, final: bool) -> None:
        before = self.detokenize(self.ids[self.prefix : self.read]) or ""
        after = self.detokenize(self.ids[self.prefix :]) or ""
        # A character split over tokens decodes to U+FFFD (one per pending byte) until its last
        # byte arrives: wait for it, unless nothing more will come.
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.ids.extend(tokens)
        self._settle(final)
        text = self.text
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped, final = text[:at], True, True
        end = len(text)
        if not final:
            for s in self.stop:  # the longest tail that begins a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        new, self.sent = text[self.sent : end], end
        return new


class ChatService:
    """One model, one schedule, one scheduler: what the HTTP app calls."""

    def __init__(self, model, schedule: Schedule, engine: SlotEngine, scheduler: Scheduler, cfg: ServeConfig):
        self.model, self.schedule, self.engine, self.scheduler, self.cfg = model, schedule, engine, scheduler, cfg
        self.eos = model._eos(None)

    @property
    def name(self) -> str:
        return self.cfg.served_name

    def encode(self, chat: ChatRequest) -> Request:
        """The runtime request for ``chat``; APIError 400 when the template, the processor or
        the slot size refuses it (with the numbers)."""
        m = self.model
        try:
            ids, pv = m.encode_chat(chat.messages, chat.images)
        except QCacheError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:  # a chat template raising on an unusual conversation, e.g. roles out of order
            raise APIError(400, f"the chat template or processor refused the messages: {type(e).__name__}: {e}") from None
        n_img = sum(1 for t in ids if t == m.config.image_token_id) if m.config.has_vision else 0
        room = self.engine.layout.text_len - (len(ids) - n_img)
        max_tokens = chat.max_tokens if chat.max_tokens is not None else room
        try:
            self.engine.check_fits(len(ids), n_img, max(max_tokens, 1))
        except QCacheError as e:
            raise APIError(400, str(e) + " (--max-model-len sets the slot length)") from None
        sampling = RowSampling(temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)
        return Request(prompt=ids, pixel_values=pv, n_image_tokens=n_img, max_tokens=max_tokens, sampling=sampling,
                       eos=() if chat.ignore_eos else self.eos)

    def text_stream(self, chat: ChatRequest) -> TextStream:
        return TextStream(self.model.detokenize, chat.stop)


def build(model, schedule: Schedule, cfg: ServeConfig, *, warmup_lengths=(), log=None) -> ChatService:
    """Size the pool from ``cfg.kv_budget`` and start the scheduler (see the module's doc)."""
    mc = model.config
    context = mc.text.max_position_embeddings
    max_len = context if cfg.max_model_len is None else int(cfg.max_model_len)
    if max_len > context:
        raise QCacheError(f"--max-model-len {max_len} exceeds the model's context of {context} tokens")
    if mc.has_vision and cfg.max_images < 0:
        raise QCacheError("--max-images must be >= 0")
    max_images = cfg.max_images if mc.has_vision else 0
    image_len = max_images * (mc.image_tokens_per_image if mc.has_vision and not mc.anyres else 0)
    text_len = max_len - image_len
    if text_len < 2:
        raise QCacheError(f"--max-model-len {max_len} leaves no room for text beside {image_len} image tokens")
    dtype = jax.tree.leaves(model.params)[0].dtype  # the cache dtype, as generate's engine takes it
    multiple = 1 if model.mesh is None else axis_size(model.mesh, DATA)
    n = slots_for_budget(cfg.kv_budget, mc, schedule, image_len, text_len, dtype, multiple)
    layout = SlotLayout(slots=n, image_len=image_len, text_len=text_len, schedule=schedule, max_images=max_images)
    attn = LazyAttention(mode=schedule.mode, mesh=model.mesh)
    engine = SlotEngine(model.graphdef, model.params, mc, layout, attn=attn, pad_id=model.pad_id(), mesh=model.mesh,
                        log=log)
    if log:
        per, dense = slot_bytes(mc, schedule, image_len, text_len, dtype)
        log(f"{n} slots of {max_len} tokens ({image_len} image + {text_len} text) under a KV budget of "
            f"{cfg.kv_budget / 2**20:.0f} MiB: {per / 2**20:.2f} MiB per slot with the {schedule.describe()} "
            f"schedule (dense: {dense / 2**20:.2f} MiB, {int(cfg.kv_budget // dense)} slots)")
    secs = engine.warmup(warmup_lengths, image_counts=(0, 1) if max_images else (0,))
    if log:
        log(f"compiled {engine.compiles} executables in {secs:.1f} s (other prompt sizes compile on first use)")
    scheduler = Scheduler(engine, max_queue=cfg.max_queue, prefill_budget=cfg.prefill_budget, log=log).start()
    return ChatService(model, schedule, engine, scheduler, cfg)
