"""Tensor and data parallel generate on a device mesh: every sharding rule lives here.

A mesh has two axes (docs/architecture.md, "Scaling out"):

* ``data``: batch rows (the cache rows and the prompts);
* ``model``: tensor parallel: query heads, KV heads and the MLP hidden size, and the
  vocabulary (embedding rows and the output head's columns).

A dimension is split over an axis only when the axis divides it (:func:`sharded_over`),
otherwise it is replicated: a model with fewer KV heads than the ``model`` axis keeps its
K/V projections and its KV cache replicated (each shard reads the KV heads its query heads
use), a vocabulary the axis does not divide keeps the embedding and head replicated. The
vision tower, the projector and the norms are replicated. Parameters are restored by Orbax
straight into these shardings (:func:`qcache_jax.io.checkpoint.load_params` with
``shardings``), and the decoding state is created in its own (:func:`state_shardings`): the
lazy cache's missing key arrays stay missing.

The rules need only the mesh's axis sizes, so they also take a ``jax.sharding.AbstractMesh``
(per-device bytes of a mesh one does not have: :func:`per_device_bytes`). Nothing here runs
without a mesh: single-device generate never calls into this module.
"""

from __future__ import annotations

import fnmatch
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import LlavaConfig
from ..errors import QCacheError
from ..nn.attention import DATA, MODEL, axis_size, sharded_over

AXES = (DATA, MODEL)

# (parameter path glob, which dimension of the weight is split over ``model``, the size that
# the axis must divide). Matched in order; a path no rule matches is replicated. Paths are
# our parameter tree's, dot-joined (``language_model.layers.3.self_attn.q_proj.kernel``).
# Kernels are [in, out]: column parallel splits the output dimension, row parallel the input.
RULES = (
    ("language_model.layers.*.self_attn.q_proj.kernel", 1, "heads"),
    ("language_model.layers.*.self_attn.q_proj.bias", 0, "heads"),
    ("language_model.layers.*.self_attn.[kv]_proj.kernel", 1, "kv_heads"),
    ("language_model.layers.*.self_attn.[kv]_proj.bias", 0, "kv_heads"),
    ("language_model.layers.*.self_attn.o_proj.kernel", 0, "heads"),
    ("language_model.layers.*.mlp.gate_proj.kernel", 1, "intermediate"),
    ("language_model.layers.*.mlp.up_proj.kernel", 1, "intermediate"),
    ("language_model.layers.*.mlp.gate_proj.bias", 0, "intermediate"),
    ("language_model.layers.*.mlp.up_proj.bias", 0, "intermediate"),
    ("language_model.layers.*.mlp.down_proj.kernel", 0, "intermediate"),
    ("language_model.embed_tokens.embedding", 0, "vocab"),
    ("lm_head.kernel", 1, "vocab"),
)


def _sizes(cfg: LlavaConfig) -> dict:
    t = cfg.text
    return {"heads": t.num_heads, "kv_heads": t.num_kv_heads, "intermediate": t.intermediate_size,
            "vocab": t.vocab_size}


def parse_mesh(spec: str) -> tuple[int, int]:
    """``"data=D,model=M"`` (either may be left out: 1) -> (D, M); QCacheError otherwise."""
    sizes = {}
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(data|model)=(\d+)", part)
        if not m or m.group(1) in sizes or int(m.group(2)) < 1:
            raise QCacheError(f"--mesh {spec!r}: expected data=D,model=M with positive integers (e.g. data=2,model=4)")
        sizes[m.group(1)] = int(m.group(2))
    return sizes.get(DATA, 1), sizes.get(MODEL, 1)


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` of ``data * model`` devices (all of ``devices``, default
    every device of every process, when they are that many; else the first ones) with axes
    ``("data", "model")``, automatic (not explicit) sharding. The ``model`` axis varies
    fastest, so a tensor-parallel group stays inside one host when it fits there."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * model
    if n > len(devices):
        hint = (" (on CPU, ask for more devices with JAX_NUM_CPU_DEVICES=N or "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N)") if devices[0].platform == "cpu" else ""
        raise QCacheError(f"mesh data={data},model={model} needs {n} devices, {len(devices)} available{hint}")
    if n < len(devices) and jax.process_count() > 1:
        raise QCacheError(f"mesh data={data},model={model} must use all {len(devices)} devices of a multi-process run")
    auto = (AxisType.Auto, AxisType.Auto)
    if n == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh((data, model), AXES, axis_types=auto)  # topology-aware order (TPU)
    return Mesh(np.array(devices[:n]).reshape(data, model), AXES, axis_types=auto)


def abstract_mesh(data: int = 1, model: int = 1):
    """A :class:`jax.sharding.AbstractMesh` of that shape: the rules and per-device sizes of a
    mesh this machine need not have."""
    return jax.sharding.AbstractMesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def as_mesh(mesh) -> Mesh | None:
    """A mesh from ``None``, a ``"data=D,model=M"`` string, a ``(D, M)`` pair or a
    :class:`jax.sharding.Mesh` (which must have the axes ``data`` and ``model``; explicit axes
    are made automatic)."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        return make_mesh(*parse_mesh(mesh))
    if isinstance(mesh, (tuple, list)):
        return make_mesh(*mesh)
    if set(mesh.axis_names) != set(AXES):
        raise QCacheError(f"a mesh needs the axes {AXES}, got {tuple(mesh.axis_names)}")
    if mesh.axis_names != AXES:
        mesh = Mesh(np.moveaxis(mesh.devices, [mesh.axis_names.index(a) for a in AXES], [0, 1]), AXES)
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    return mesh


def describe(mesh) -> str:
    """The mesh as the ``--mesh`` spec that makes it, e.g. ``data=2,model=4``."""
    return f"data={axis_size(mesh, DATA)},model={axis_size(mesh, MODEL)}"


# -- parameters ----------------------------------------------------------------------------------


def param_spec(path: str, shape, cfg: LlavaConfig, mesh) -> P:
    """The PartitionSpec of the parameter at ``path`` (dot-joined) with ``shape``."""
    sizes = _sizes(cfg)
    for pattern, dim, size in RULES:
        if fnmatch.fnmatchcase(path, pattern):
            if not sharded_over(sizes[size], mesh) or not sharded_over(sizes["heads"], mesh) and "heads" in size:
                return P()
            spec = [None] * len(shape)
            spec[dim] = MODEL
            return P(*spec)
    return P()


def _path(keys) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def param_specs(params, cfg: LlavaConfig, mesh):
    """The PartitionSpec of every leaf of a parameter pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(_path(p), x.shape, cfg, mesh), params)


def param_shardings(params, cfg: LlavaConfig, mesh):
    """A NamedSharding per parameter leaf (what Orbax restores into)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, cfg, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def put(x, sharding):
    """A global array of the host value ``x`` (the same in every process) with ``sharding``:
    each process places only its own shards (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params, cfg: LlavaConfig, mesh):
    """``params`` (host or device arrays) placed in their shardings; arrays already there
    (e.g. restored by Orbax into them) are kept as they are."""
    def place(x, s):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        return jax.device_put(x, s) if jax.process_count() == 1 else put(x, s)

    return jax.tree.map(place, params, param_shardings(params, cfg, mesh))


# -- the decoding state and the inputs -------------------------------------------------------------


def rows_spec(batch: int, mesh, ndim: int = 1) -> P:
    """Rows on ``data`` (when the axis divides them), every other dimension replicated."""
    return P(DATA if sharded_over(batch, mesh, DATA) else None, *([None] * (ndim - 1)))


def cache_spec(shape, mesh) -> P:
    """A KV segment [B, Hkv, S, D]: rows on ``data``, KV heads on ``model`` when it divides them."""
    return P(DATA if sharded_over(shape[0], mesh, DATA) else None, MODEL if sharded_over(shape[1], mesh) else None)


def state_specs(state, mesh):
    """PartitionSpecs of a :class:`~qcache_jax.lazy.cache.DecodingState` (arrays or shapes):
    KV segments by :func:`cache_spec`, the per-row counters on ``data``. A missing key
    array (None) stays None."""
    from ..lazy.cache import DecodingState

    return DecodingState(
        layers=tuple(jax.tree.map(lambda x: cache_spec(x.shape, mesh), layer) for layer in state.layers),
        n_img=rows_spec(state.n_img.shape[0], mesh),
        n_txt=rows_spec(state.n_txt.shape[0], mesh),
        positions=rows_spec(state.positions.shape[0], mesh),
    )


def named(specs, mesh):
    """PartitionSpecs -> NamedShardings on ``mesh`` (None stays None)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def round_rows(n: int, mesh) -> int:
    """``n`` rounded up to a multiple of the ``data`` axis (rows a batch-sharded plan allocates)."""
    d = 1 if mesh is None else axis_size(mesh, DATA)
    return -(-int(n) // d) * d


def check_model(cfg: LlavaConfig, mesh) -> None:
    """QCacheError when the ``model`` axis cannot split the attention heads (tensor parallel
    needs it to divide the number of query heads)."""
    m = axis_size(mesh, MODEL)
    if m > 1 and cfg.text.num_heads % m:
        raise QCacheError(
            f"the model axis ({m}) must divide the number of attention heads ({cfg.text.num_heads}); "
            f"use a model axis among {[d for d in range(1, cfg.text.num_heads + 1) if cfg.text.num_heads % d == 0]}"
        )


# -- sizes per device --------------------------------------------------------------------------------


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``
    (the largest shard of each leaf: every device holds one)."""
    leaves, treedef = jax.tree.flatten(tree)
    shards = treedef.flatten_up_to(shardings)
    return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


# -- several processes ---------------------------------------------------------------------------------


def parse_distributed(spec: str) -> dict:
    """``auto`` (cluster auto-detection: Cloud TPU, SLURM, Open MPI, Kubernetes) -> {}, or
    ``coordinator=HOST:PORT,processes=N,id=I`` -> jax.distributed.initialize's arguments."""
    if spec == "auto":
        return {}
    kw = {}
    for part in spec.split(","):
        key, _, val = part.partition("=")
        if key == "coordinator" and ":" in val:
            kw["coordinator_address"] = val
        elif key in ("processes", "id") and val.isdigit():
            kw["num_processes" if key == "processes" else "process_id"] = int(val)
        else:
            raise QCacheError(f"--distributed {spec!r}: expected auto or coordinator=HOST:PORT,processes=N,id=I")
    if len(kw) != 3:
        raise QCacheError(f"--distributed {spec!r}: give coordinator=HOST:PORT, processes=N and id=I together")
    return kw


def initialize_distributed(spec: str = "auto") -> None:
    """Join a multi-process run (JAX's own runtime: ``jax.distributed.initialize``), before
    anything touches a device. CPU processes exchange data through gloo collectives (set
    here unless ``jax_cpu_collectives_implementation`` is set already); GPU and TPU use their
    own (NCCL, ICI). Every process then sees every device, and a mesh spans them all."""
    kw = parse_distributed(spec)
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)


def spec_table(cfg: LlavaConfig, mesh) -> list[tuple[str, str]]:
    """(parameter glob, PartitionSpec) for the rules above, for ``cfg`` on ``mesh`` (docs)."""
    from ..nn.families import abstract_model

    _, abstract = abstract_model(cfg)
    specs = param_specs(abstract, cfg, mesh)
    seen = {}
    for keys, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]:
        path = re.sub(r"\.\d+\.", ".*.", _path(keys))
        seen.setdefault(path, str(spec))
    return sorted(seen.items())
