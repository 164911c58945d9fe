"""Benchmark scripts: `python -m benchmarks.run` writes BENCHMARKS.md and benchmarks/plots/."""
