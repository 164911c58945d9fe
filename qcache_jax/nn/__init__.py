"""Neural-network modules with Hugging Face parameter names: layers, RoPE, CLIP vision tower, decoder, LLaVA."""
