"""Checkpoint directories: Orbax parameters, the model config and HF side files.

Layout of a checkpoint directory::

    params/               Orbax (StandardCheckpointer) parameter pytree, one array per
                          parameter and layer (``language_model.layers.3.self_attn...``)
    qcache_config.json    LlavaConfig (frozen dataclasses as JSON)
    schedule.json         optional: the calibrated lazy schedule (``--lazy auto``)
    pruned.json           optional (``qcache prune``): the layers whose q_proj/k_proj weights were
                          removed because the schedule never uses them (GLA lazy layers)
    tokenizer*, preprocessor_config.json, chat_template.*, ...  copied from the HF model
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from ..config import LlavaConfig, config_from_dict
from ..errors import QCacheError
from ..host_memory import release_freed
from ..nn.families import abstract_model

CONFIG_FILE = "qcache_config.json"
PARAMS_DIR = "params"
# The size of every file under params/, written after saving: a truncated or missing file is
# then reported before Orbax reads anything (a failed Orbax read also leaves its other reads in
# flight, whose callbacks print "Event loop is closed" tracebacks at random).
PARAMS_MANIFEST = "params_files.json"
HF_CONFIG_FILE = "hf_config.json"
PRUNED_FILE = "pruned.json"
PRUNED_PROJECTIONS = ("q_proj", "k_proj")
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


@contextlib.contextmanager
def _checkpointer():
    """An Orbax checkpointer that is always closed: an unclosed one can print 'Event loop is
    closed' tracebacks at interpreter exit after an error."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        yield ckptr
    finally:
        ckptr.close()


def save_checkpoint(directory: Path, cfg: LlavaConfig, params) -> None:
    """Write ``params`` (Orbax) and ``cfg`` (JSON) into ``directory``."""
    directory = Path(directory).absolute()
    params = jax.tree.map(np.asarray, params)
    with _checkpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    root = directory / PARAMS_DIR
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    (directory / PARAMS_MANIFEST).write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    (directory / CONFIG_FILE).write_text(cfg.to_json())


def check_params_files(directory: Path) -> None:
    """QCacheError naming the first file under params/ that is missing or has another size than
    when it was saved (checkpoints without a manifest are not checked)."""
    manifest = Path(directory) / PARAMS_MANIFEST
    if not manifest.is_file():
        return
    try:
        sizes = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QCacheError(f"{manifest}: corrupted (not JSON)") from None
    root = Path(directory) / PARAMS_DIR
    for name, size in sizes.items():
        path = root / name
        if not path.is_file():
            raise QCacheError(f"{path}: missing (the checkpoint is incomplete)")
        if path.stat().st_size != size:
            raise QCacheError(f"{path}: {path.stat().st_size} bytes, saved with {size} (truncated or damaged file)")


def copy_hf_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, processor, chat template and generation files, and the HF config."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "config.json").is_file():
        shutil.copy2(src / "config.json", dst / HF_CONFIG_FILE)


def save_tokenizer_and_processor(directory: Path, processor=None, tokenizer=None) -> None:
    """Write a live processor (with its tokenizer) or tokenizer in HF format: the side files
    :func:`qcache_jax.load` reads back."""
    directory = Path(directory)
    if processor is not None:
        processor.save_pretrained(str(directory))
        tokenizer = tokenizer or processor.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def read_config(directory: Path) -> LlavaConfig:
    """The checkpoint's :class:`LlavaConfig` (cheap: no weights are read)."""
    if not Path(directory).is_dir():
        raise QCacheError(f"{directory}: no such checkpoint directory")
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise QCacheError(f"{directory}: not a qcache checkpoint (no {CONFIG_FILE}); convert it with `qcache convert`")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise QCacheError(f"{path}: corrupted config ({e})") from None


def read_pruned(directory: Path) -> list[int]:
    """The layers whose q_proj/k_proj a pruned checkpoint lacks (``pruned.json``; [] when the
    checkpoint is not pruned)."""
    path = Path(directory) / PRUNED_FILE
    if not path.is_file():
        return []
    try:
        return sorted(int(i) for i in json.loads(path.read_text())["layers"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise QCacheError(f"{path}: corrupted (not a JSON object with a 'layers' list)") from None


def _projections(tree, layers):
    """(layer dict, projection name) of every q_proj/k_proj of ``layers`` in a parameter tree."""
    stack = tree["language_model"]["layers"]
    return [(stack[i]["self_attn"], name) for i in layers for name in PRUNED_PROJECTIONS]


def without_projections(tree, layers):
    """A copy of the parameter tree without the q_proj/k_proj weights of ``layers`` (the
    tree a pruned checkpoint saves)."""
    tree = jax.tree.map(lambda x: x, tree)  # a new container structure; the arrays are shared
    for attn, name in _projections(tree, layers):
        del attn[name]
    return tree


def _placeholder(a):
    """What stands in for a removed weight: the same rank and dtype, no element (a pass that
    reaches it fails; the model refuses schedules that would, QCacheModel.check_schedule)."""
    return jax.device_put(np.zeros(tuple(a.shape[:-1]) + (0,), a.dtype), a.sharding)


def load_params(directory: Path, cfg: LlavaConfig, *, shardings=None):
    """Restore the parameter pytree as jax arrays (on the default device, once: numpy arrays
    would be copied to the device at every call), checked against the config's abstract tree.
    A pruned checkpoint (``pruned.json``) is checked against that tree less its removed
    weights, which come back as empty placeholders (:func:`_placeholder`).

    ``shardings``: a sharding per parameter (a pytree like the parameters, e.g.
    :func:`qcache_jax.runtime.mesh.param_shardings`): each array is restored straight into
    its sharding, every device (and process) reading only its own shard."""
    directory = Path(directory).absolute()
    _, abstract = abstract_model(cfg)
    # With a sharding on every leaf Orbax restores straight into device arrays: no host copy
    # of the weights stays behind.
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if not (directory / PARAMS_DIR).is_dir():
        raise QCacheError(f"{directory}: missing {PARAMS_DIR}/ (incomplete checkpoint)")
    check_params_files(directory)
    pruned = read_pruned(directory)
    full, abstract = abstract, without_projections(abstract, pruned) if pruned else abstract
    try:
        with _checkpointer() as ckptr:
            params = ckptr.restore(directory / PARAMS_DIR, abstract)
    except Exception as e:  # orbax raises a variety of types for damaged or mismatched files
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise QCacheError(f"{directory}/{PARAMS_DIR}: cannot restore parameters ({type(e).__name__}: {msg})") from None
    bad = [
        jax.tree_util.keystr(p)
        for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(params))
        if tuple(a.shape) != tuple(np.shape(b))
    ]
    if bad:
        raise QCacheError(f"{directory}: parameters do not match the config: {', '.join(bad[:10])}")
    if pruned:
        for (attn, name), (full_attn, _) in zip(_projections(params, pruned), _projections(full, pruned)):
            attn[name] = jax.tree.map(_placeholder, full_attn[name])
    release_freed()  # the restore's temporary buffers: ~100 MB resident per 500 MB of weights
    return params
