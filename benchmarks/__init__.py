"""Benchmark scripts: `python -m benchmarks.run` writes BENCHMARKS.md and its raw results, benchmarks/results.json."""
