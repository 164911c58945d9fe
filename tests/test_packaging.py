"""A fresh machine's view of the package: the checkout never shadows Hugging Face's ``kernels``,
and a wheel carries the kernels and the demo model's trained parts.

These failed before the fix: ``kernels/__init__.py`` made the checkout's ``kernels/`` a
top-level package that transformers (5.24+, which imports Hugging Face's ``kernels``) got
instead, and the demo's parts lived outside the package.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / "checkpoints" / "smollm2-easyvqa"


def _python(code: str, *, cwd, python=sys.executable, env=None, timeout=300):
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_checkout_root_first_on_sys_path_keeps_hf_kernels():
    """From the checkout's root (``python -c`` puts it first on sys.path, as ``python -m`` and
    the Makefile do): transformers' processors import, ``kernels`` is Hugging Face's, and
    ``qcache_jax.kernels`` is this project's."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers < 5.24)")
    code = f"""
import sys, importlib.util
assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]
from transformers import AutoProcessor, LlavaProcessor
import kernels
import qcache_jax.kernels as ours
from qcache_jax.kernels import flash_attention, decode_attention
import qcache_jax.kernels.dispatch as dispatch
root = {str(ROOT)!r}
assert not kernels.__file__.startswith(root + "/kernels/"), kernels.__file__
assert ours.__file__ == root + "/qcache_jax/kernels.py", ours.__file__
assert dispatch.__file__ == root + "/qcache_jax/kernels/dispatch.py", dispatch.__file__
assert dispatch.flash_attention is flash_attention
assert importlib.util.find_spec("kernels.dispatch") is None, "the project's kernels import as top-level kernels"
print("ok")
"""
    r = _python(code, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from the checkout without network (the venv's setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("qcache_jax-*.whl")
    return whl


def test_wheel_has_no_top_level_kernels_and_carries_the_parts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top and "checkpoints" not in top, sorted(top)
    assert "qcache_jax/kernels.py" in names and "qcache_jax/kernels/dispatch.py" in names
    shipped = sorted(p.name for p in PARTS.iterdir() if p.suffix in (".json", ".safetensors"))
    assert shipped, f"no shipped parts in {PARTS}"
    missing = [f for f in shipped if f"qcache_jax/demo/parts/{f}" not in names]
    assert not missing, f"the wheel lacks the demo parts {missing}"


def test_non_editable_install_runs_from_elsewhere(wheel, tmp_path):
    """The wheel unpacked into a fresh venv (its dependencies from this one, through a .pth), run
    from another directory: the kernels and the demo's parts come from the installed package, the
    parts load and equal the checkout's, and the demo reports missing parts as one line, exit 2."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel installs by unpacking
    (site / "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = str(venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"""
import json, numpy as np
from safetensors.numpy import load_file
from transformers import AutoProcessor
import qcache_jax, qcache_jax.kernels as K
from qcache_jax.kernels import flash_attention
from qcache_jax.demo import smollm2_vqa as S
site = {str(site)!r}
assert qcache_jax.__file__.startswith(site) and K.__file__.startswith(site), (qcache_jax.__file__, K.__file__)
assert str(S.PARTS_DIR).startswith(site), S.PARTS_DIR
ours = load_file(str(S.PARTS_DIR / "trained.safetensors"))
ref = load_file({str(PARTS / "trained.safetensors")!r})
assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)
manifest = json.loads((S.PARTS_DIR / "manifest.json").read_text())
assert set(manifest["new"]) | set(manifest["deltas"]) == set(ours)
print(json.dumps(S.variants()))
"""
    r = _python(code, cwd=elsewhere, python=python)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == sorted(
        p.stem[len("adapters-"):] for p in PARTS.glob("adapters-*.json"))
    env = {"PATH": "/usr/bin:/bin", "QCACHE_DEMO_PARTS": str(tmp_path / "no-parts"), "HOME": str(tmp_path)}
    r = subprocess.run([python, "-m", "qcache_jax.demo"], cwd=elsewhere, capture_output=True, text=True,
                       timeout=300, env=env)
    err = [line for line in r.stderr.strip().splitlines() if not line.startswith("[transformers]")]
    assert r.returncode == 2 and len(err) == 1 and "no trained parts" in err[0], r.stderr[-3000:]
