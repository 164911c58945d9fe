"""runtime.host_memory: the XLA flag entry points add, and giving freed heap back."""

from __future__ import annotations

import subprocess
import sys

from qcache_jax.runtime.host_memory import LEAN_XLA_FLAGS, release_freed, use_lean_xla_flags

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
    assert env["XLA_FLAGS"] == mine


def test_the_flag_is_one_xla_knows():
    """A misspelt flag would make XLA abort at start-up: start a backend with it."""
    code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env={"XLA_FLAGS": " ".join(LEAN_XLA_FLAGS), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


def test_release_freed_runs():
    assert release_freed() in (True, False)
    assert release_freed() == release_freed()
