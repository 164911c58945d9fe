"""qcache_jax.host_memory: the XLA flag the entry points add, and giving freed heap back."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from qcache_jax.host_memory import LEAN_XLA_FLAGS, release_freed, use_lean_xla_flags

FLAG = LEAN_XLA_FLAGS[0]


def test_lean_flags_are_added_once_and_never_override_the_user():
    env = {}
    use_lean_xla_flags(env)
    assert env["XLA_FLAGS"] == FLAG
    use_lean_xla_flags(env)
    assert env["XLA_FLAGS"] == FLAG  # not twice
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    use_lean_xla_flags(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {FLAG}"
    mine = FLAG.replace("=false", "=true")
    env = {"XLA_FLAGS": mine}
    use_lean_xla_flags(env)
    assert env["XLA_FLAGS"] == mine  # the opt-out


def test_the_flag_is_one_xla_knows():
    """A misspelt or retired flag makes XLA abort at start-up: start a CPU backend with it."""
    code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    env = {**os.environ, "XLA_FLAGS": " ".join(LEAN_XLA_FLAGS), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


def test_calling_main_leaves_the_environment_alone(capsys):
    """Only the ``qcache`` executable (cli.console) sets the flag; cli.main from Python does not."""
    from qcache_jax.cli import main

    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ.get("XLA_FLAGS") == before


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_release_freed_on_glibc():
    assert release_freed() is True
