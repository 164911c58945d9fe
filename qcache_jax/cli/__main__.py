"""``python -m qcache_jax.cli``: the same as the ``qcache`` console script."""

import sys

from . import console

sys.exit(console())
