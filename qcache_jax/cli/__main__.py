"""``python -m qcache_jax.cli``: the same as the ``qcache`` console script."""

import sys

from . import main

sys.exit(main())
