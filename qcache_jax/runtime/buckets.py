"""Shape buckets: the padded sizes every compiled shape is rounded to, so a new prompt of a
known bucket never recompiles."""

from __future__ import annotations

# Below this many tokens prompts are padded to a power of two (few buckets, little waste);
# above it to a multiple of 1/8 of the power of two below, so padding stays <= 12.5%.
FINE_BUCKETS_ABOVE = 256


def bucket(n: int, minimum: int = 16) -> int:
    """The padded size for ``n`` tokens: a power of two up to 256, then the next multiple of
    2**(floor(log2 n) - 3) (e.g. 609 -> 640, 2881 -> 3072)."""
    n = max(int(n), minimum)
    if n <= FINE_BUCKETS_ABOVE:
        return 1 << (n - 1).bit_length()
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (image-count buckets)."""
    return 1 << (max(int(n), 1) - 1).bit_length()
