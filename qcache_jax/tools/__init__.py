"""Tools built on the public API: benchmarks, calibration, training and evaluation."""
