"""Lazy Attention with Q Cache: the schedule, the lazy KV cache, the per-layer attention and the layer stack."""
