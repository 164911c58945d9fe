"""Checkpoint input/output: tensor readers, HF names, conversion, export, Orbax checkpoints."""
