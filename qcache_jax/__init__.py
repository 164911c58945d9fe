"""qcache-jax: Lazy Attention with Q Cache for LLaVA-family multimodal LLMs in JAX/Flax."""

from .api import GenerateOptions, GenerateResult, QCacheModel, load
from .config import LlavaConfig, TextConfig, VisionConfig
from .errors import QCacheError
from .io.convert import convert_hf
from .lazy.schedule import Schedule

__all__ = [
    "convert_hf",
    "load",
    "QCacheModel",
    "GenerateOptions",
    "GenerateResult",
    "Schedule",
    "LlavaConfig",
    "TextConfig",
    "VisionConfig",
    "QCacheError",
]
__version__ = "0.2.0"
