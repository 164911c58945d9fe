"""qcache-jax: Lazy Attention with Q Cache for LLaVA-family multimodal LLMs in JAX/Flax."""

from .api import QCacheModel, load
from .config import LlavaConfig, TextConfig, VisionConfig
from .convert import convert_hf
from .errors import QCacheError

__all__ = ["convert_hf", "load", "QCacheModel", "LlavaConfig", "TextConfig", "VisionConfig", "QCacheError"]
__version__ = "0.1.0"
