"""Continuous batching over a :class:`~qcache_jax.runtime.slots.SlotEngine`: a bounded queue
of requests, one thread that admits them into free slots and steps the pool.

Policy, each iteration of the loop:

1. Requests that were cancelled (a client went away, a stop string matched) or have finished
   free their slots.
2. Admission, first come first served: while a slot is free and a request waits, prefill it
   and insert it, until this iteration has prefilled ``prefill_budget`` prompt tokens (at
   least one request per iteration). A long burst of newcomers therefore delays the running
   slots' next token by a bounded amount: bounded prefill per step (no chunking inside a
   prompt).
3. One decode step for every active slot; each request gets its token.

Requests carry token ids and pixel values: tokenizing, chat templates and detokenizing are the
API layer's job. Events reach a request's :class:`RequestHandle` from the loop thread; a
``listener`` (e.g. an asyncio loop's ``call_soon_threadsafe``) can take them instead of its
queue.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable

import jax
import numpy as np

from ..errors import QCacheError
from .slots import RowSampling, SlotEngine


class QueueFull(QCacheError):
    """Every slot is busy and the waiting queue is at its bound."""


class ShuttingDown(QCacheError):
    """The scheduler no longer accepts requests."""


@dataclasses.dataclass
class Request:
    """One sequence to generate: ``prompt`` token ids (image tokens expanded), its images'
    ``pixel_values`` [N, C, H, W] or None, at most ``max_tokens`` new tokens, stopping early on
    any of ``eos`` (the EOS token is emitted)."""

    prompt: list[int]
    pixel_values: np.ndarray | None = None
    n_image_tokens: int = 0
    max_tokens: int = 16
    sampling: RowSampling = RowSampling()
    eos: tuple[int, ...] = ()


@dataclasses.dataclass
class Event:
    """What the loop tells a request: new ``tokens`` (possibly none), and when it ends its
    ``finish`` reason (``stop``: EOS or cancelled with that reason, ``length``: max_tokens,
    ``abort``: shut down or failed, with ``error``). ``time``: perf_counter when sent."""

    tokens: list[int]
    finish: str | None = None
    error: str | None = None
    time: float = 0.0


class RequestHandle:
    """The caller's side of a submitted request."""

    def __init__(self, request: Request, rid: int):
        self.request, self.id = request, rid
        self.events: queue.Queue[Event] = queue.Queue()
        self.listener: Callable[[Event], None] | None = None
        self.submitted = time.perf_counter()
        self.cancel_reason: str | None = None
        self.finished = False

    def cancel(self, reason: str = "abort") -> None:
        """Ask the loop to stop this request and free its slot (``reason`` becomes its finish
        reason: e.g. ``stop`` when the API layer matched a stop string)."""
        self.cancel_reason = self.cancel_reason or reason

    def _send(self, event: Event) -> None:
        event.time = time.perf_counter()
        if event.finish is not None:
            self.finished = True
        try:
            (self.listener or self.events.put)(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (e.g. its event loop closed): nobody to tell
            pass


@dataclasses.dataclass
class _Running:
    handle: RequestHandle
    n_out: int = 0


class Scheduler:
    """Admits requests into the engine's slots and steps them, in a thread of its own.

    ``max_queue``: requests that may wait for a slot (beyond it :meth:`submit` raises
    :class:`QueueFull`). ``prefill_budget``: prompt tokens prefilled per loop iteration at most
    (see the module's policy). ``on_step``: called after each decode step with (active
    slots, seconds), for metrics.
    """

    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, prefill_budget: int = 1024,
                 on_step: Callable[[int, float], None] | None = None, log: Callable[[str], None] | None = None):
        self.engine, self.max_queue, self.prefill_budget = engine, max_queue, prefill_budget
        self.on_step, self.log = on_step, log
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._free = list(range(engine.layout.slots))
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.finished = 0
        # Seconds the loop spent in prefill (+ insert) and in decode steps: the prefill share of
        # a server's time is what dilutes a lazy schedule's decode saving under load.
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    # -- the caller's side --------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="qcache-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, listener: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue ``request``; raises QCacheError when it cannot fit a slot (with the numbers),
        :class:`QueueFull` when the queue is at its bound, :class:`ShuttingDown` after
        :meth:`shutdown`. ``listener`` receives the request's events (called from the loop
        thread) instead of the handle's queue."""
        self.engine.check_fits(len(request.prompt), request.n_image_tokens, request.max_tokens)
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFull(f"all {self.engine.layout.slots} slots are busy and {len(self._waiting)} requests "
                                f"wait (--max-queue {self.max_queue})")
            handle = RequestHandle(request, next(self._ids))
            handle.listener = listener
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def stats(self) -> dict:
        """Slots (total, active), queue length and the KV bytes of the occupied slots."""
        with self._cv:
            active, waiting = len(self._running), len(self._waiting)
        return {"slots_total": self.engine.layout.slots, "slots_active": active, "queue_length": waiting,
                "kv_bytes_in_use": active * self.engine.slot_kv_bytes, "decode_steps": self.steps,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; let running and waiting requests finish for up to ``timeout``
        seconds, then end the rest with ``abort``; stop the thread."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not self._running and not self._waiting:
                    break
            time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(timeout, 5.0))

    # -- the loop -------------------------------------------------------------------------------------

    def _finish(self, slot: int, reason: str, error: str | None = None) -> None:
        run = self._running.pop(slot)
        self.engine.release(slot)
        with self._cv:
            self._free.append(slot)
        self.finished += 1
        run.handle._send(Event([], finish=reason, error=error))

    def _emit(self, slot: int, token: int) -> None:
        """Give the slot's request its token, and end it on EOS or at max_tokens."""
        run = self._running[slot]
        run.n_out += 1
        req = run.handle.request
        run.handle._send(Event([token]))
        if token in req.eos:
            self._finish(slot, "stop")
        elif run.n_out >= req.max_tokens:
            self._finish(slot, "length")

    def _drop_cancelled_waiting(self) -> None:
        """Requests cancelled while they waited leave the queue now (not when a slot frees up),
        so they count neither toward ``max_queue`` nor toward the queue length."""
        with self._cv:
            gone = [h for h in self._waiting if h.cancel_reason]
            if gone:
                self._waiting = collections.deque(h for h in self._waiting if not h.cancel_reason)
        for h in gone:
            h._send(Event([], finish=h.cancel_reason))

    def _admit(self) -> None:
        spent = 0
        while spent < self.prefill_budget:
            with self._cv:
                if not self._free or not self._waiting:
                    return
                handle = self._waiting.popleft()
                if handle.cancel_reason:
                    handle._send(Event([], finish=handle.cancel_reason))
                    continue
                slot = self._free.pop()
            req = handle.request
            t0 = time.perf_counter()
            try:
                # Finished before the insert: a prefill that fails (asynchronously, e.g. out of
                # memory) fails here, before the pool is donated to the insert.
                new = jax.block_until_ready(self.engine.prefill(req.prompt, req.pixel_values, req.sampling))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                with self._cv:
                    self._free.append(slot)
                handle._send(Event([], finish="abort", error=f"{type(e).__name__}: {e}"))
                if self.log:
                    self.log(f"request {handle.id} failed in prefill: {type(e).__name__}: {e}")
                continue
            finally:
                self.prefill_seconds += time.perf_counter() - t0
            try:
                first = self.engine.insert(slot, new)
            except Exception as e:  # noqa: BLE001 - the donated pool may be gone: start over
                with self._cv:
                    self._free.append(slot)
                handle._send(Event([], finish="abort", error=f"{type(e).__name__}: {e}"))
                self._fail_running(f"insert failed: {type(e).__name__}: {e}")
                continue
            self._running[slot] = _Running(handle)
            spent += len(req.prompt)
            self._emit(slot, first)

    def _fail_running(self, why: str) -> None:
        """Abort every running request and start from an empty pool (after a failed step or
        insert, the donated pool may be gone)."""
        if self.log:
            self.log(f"{why}; aborting {len(self._running)} running request(s)")
        for slot, run in list(self._running.items()):
            self._running.pop(slot)
            with self._cv:
                self._free.append(slot)
            self.finished += 1
            run.handle._send(Event([], finish="abort", error=why))
        self.engine.reset()

    @property
    def alive(self) -> bool:
        """The loop thread runs (``/health`` reports it)."""
        return self._thread is not None and self._thread.is_alive()

    def _iteration(self) -> None:
        for slot, run in list(self._running.items()):
            if run.handle.cancel_reason:
                self._finish(slot, run.handle.cancel_reason)
        self._drop_cancelled_waiting()
        self._admit()
        if not self._running:
            return
        t0 = time.perf_counter()
        try:
            tokens = self.engine.step()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the running requests, keep serving
            self._fail_running(f"decode step failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        self.decode_seconds += time.perf_counter() - t0
        if self.on_step:
            self.on_step(len(self._running), time.perf_counter() - t0)
        for slot in list(self._running):
            self._emit(slot, int(tokens[slot]))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._running and not (self._waiting and self._free):
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    break
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - a bug must not leave a server that queues forever
                if self.log:
                    self.log(f"scheduler iteration failed: {type(e).__name__}: {e}")
                try:
                    self._fail_running(f"scheduler error: {type(e).__name__}")
                except Exception:  # noqa: BLE001
                    break
        for slot in list(self._running):  # shutdown: whatever still runs is aborted
            self._finish(slot, "abort", error="the server shut down before the request finished")
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle._send(Event([], finish="abort", error="the server shut down before the request started"))
