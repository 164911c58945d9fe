"""The OpenAI chat-completions wire format: a request body checked into a :class:`ChatRequest`
(every problem an :class:`APIError` with its HTTP status), and the response, chunk and error
bodies. No model here: images are opened, not processed."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random
import urllib.parse
import uuid
from pathlib import Path

# Options that would change what the answer means; refused rather than silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
               "audio", "prediction", "logit_bias")
MAX_STOP = 4  # as OpenAI's API


class APIError(Exception):
    """A request the server answers with ``status`` and ``{"error": {"message", "type"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.status)


def error_body(message: str, type: str, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


@dataclasses.dataclass
class ChatRequest:
    """A checked chat request: ``messages`` in Hugging Face chat format (image parts as
    ``{"type": "image"}``), the opened ``images`` in order, and the generation options."""

    messages: list[dict]
    images: list
    max_tokens: int | None = None  # None: as many as the slot holds
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # parse_chat draws a fresh one when the request gives none
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks use it)


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return int(v) if integer else float(v)


def open_image_url(url: str):
    """A PIL image from a ``data:`` URL or a local ``file://`` path; APIError otherwise."""
    from PIL import Image, UnidentifiedImageError

    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise _bad("image_url: http(s) URLs are not fetched (the server assumes no network); "
                   "send the image as a data: URL or a file:// path")
    if scheme == "data":
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise _bad("image_url: a data: URL must be base64-encoded (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("image_url: the data: URL is not valid base64") from None
        source, where = io.BytesIO(raw), "the data: URL"
    elif scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        if not path.is_file():
            raise _bad(f"image_url: {path}: no such file")
        source, where = path, str(path)
    else:
        raise _bad(f"image_url: unsupported URL {url[:40]!r} (use a data: URL or a file:// path)")
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(f"image_url: {where} is not an image PIL can read ({type(e).__name__})") from None


def _content(content, images: list, where: str):
    """A message's content as HF parts, opening its images into ``images``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise _bad(f"{where}.content[{j}].image_url must hold a 'url' string")
            images.append(open_image_url(url))
            parts.append({"type": "image"})
        else:
            raise _bad(f"{where}.content[{j}]: a part must be {{'type': 'text', 'text': ...}} or "
                       f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}")
    return parts


def parse_chat(body, *, served_model: str, max_images: int) -> ChatRequest:
    """Check a ``POST /v1/chat/completions`` body; APIError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"model {model!r} is not served here (this server serves {served_model!r})",
                       "model_not_found")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise _bad(f"'{name}' is not supported by this server")
    if body.get("n") not in (None, 1):
        raise _bad("only n=1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"'{name}' is not supported by this server (only 0)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    hf, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}] must be an object with role 'system', 'user' or 'assistant'")
        if "content" not in m or m["content"] is None:
            raise _bad(f"messages[{i}] has no content")
        hf.append({"role": m["role"], "content": _content(m["content"], images, f"messages[{i}]")})
    if len(images) > max_images:
        raise _bad(f"the request has {len(images)} images; this server takes at most {max_images} per request")
    if not any(p.get("text", "").strip() or p["type"] == "image" for m in hf for p in m["content"]):
        raise _bad("the messages are empty (no text and no image)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 2**31, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stop = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings")
    if any(not s for s in stop):
        raise _bad("'stop' strings must not be empty")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be true or false")
    if ignore_eos and max_tokens is None:
        raise _bad("'ignore_eos' needs 'max_tokens'")
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    if seed is None:  # a fresh seed per request, as OpenAI's API: identical prompts then differ
        seed = random.SystemRandom().randrange(2**32)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object")
    return ChatRequest(
        messages=hf,
        images=images,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        model=model,
        ignore_eos=ignore_eos,
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, *,
               created: int) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, *, created: int) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
