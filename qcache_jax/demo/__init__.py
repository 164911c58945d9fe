"""make demo and its models: tokenizers, the synthetic VQA task, tiny random HF models, the toy and real-weights demo models."""
