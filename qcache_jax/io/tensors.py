"""Read the tensors of a Hugging Face checkpoint lazily, one at a time, with clear errors.

safetensors files are parsed directly (header + memory map) so that bfloat16 works without
torch and a truncated or corrupted file is reported by name; ``pytorch_model*.bin`` files go
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import QCacheError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One ``.safetensors`` file: validated header, tensors read on demand from a memory map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QCacheError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise QCacheError(f"{path}: corrupted or truncated safetensors file (header length {n} > file size)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise QCacheError(f"{path}: corrupted safetensors header ({e})") from None
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + n + end > size:
            raise QCacheError(f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + n + end})")
        self.header, self.base = header, 8 + n
        self._mm = None

    def keys(self):
        return self.header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise QCacheError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start, stop = info["data_offsets"]
        buf = self._mm[self.base + start : self.base + stop]
        return np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class TorchBinFile:
    """One ``pytorch_model*.bin`` file, loaded with ``weights_only=True`` (no pickled code)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dev dependency
            raise QCacheError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
        try:
            self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad file
            raise QCacheError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        self.path = path

    def keys(self):
        return self.sd.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self.sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class TensorSource:
    """All tensors of a checkpoint directory, by their names in the files."""

    def __init__(self, src: Path):
        files = _weight_files(src)
        self.files = [SafetensorsFile(p) if p.suffix == ".safetensors" else TorchBinFile(p) for p in files]
        self.where: dict[str, object] = {}
        for f in self.files:
            for k in f.keys():
                self.where[k] = f

    def keys(self):
        return self.where.keys()

    def shape(self, key: str):
        return self.where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get(key)


def _weight_files(src: Path) -> list[Path]:
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise QCacheError(f"{index}: unreadable index ({e})") from None
            missing = [n for n in names if not (src / n).exists()]
            if missing:
                raise QCacheError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            return [src / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(p for p in src.glob(pattern) if os.path.isfile(p))
        if found:
            return found
    raise QCacheError(f"{src}: no *.safetensors or pytorch_model*.bin weight files found")
