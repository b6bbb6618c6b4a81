"""jina-jax: jina-embeddings-v3 in pure JAX/Flax."""

from .config import JinaConfig
from .model import EncoderOutput, JinaEncoder
from .modeling import JinaEmbeddingsV3

__all__ = ["JinaConfig", "JinaEncoder", "EncoderOutput", "JinaEmbeddingsV3"]
__version__ = "0.1.0"
