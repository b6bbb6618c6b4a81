"""jina-jax: jina-embeddings-v3 in pure JAX/Flax."""

from .config import JinaConfig
from .model import EncoderOutput, JinaEncoder
from .heads import (
    JinaEmbeddingsV3ForMaskedLM,
    JinaEmbeddingsV3ForQuestionAnswering,
    JinaEmbeddingsV3ForSequenceClassification,
    JinaEmbeddingsV3ForTokenClassification,
)
from . import losses
from .modeling import JinaEmbeddingsV3
from . import training
from .training import CoSENT, Contrastive, HeadLoss, Trainer, TrainState

__all__ = [
    "JinaConfig", "JinaEncoder", "EncoderOutput", "JinaEmbeddingsV3", "losses",
    "JinaEmbeddingsV3ForMaskedLM", "JinaEmbeddingsV3ForSequenceClassification",
    "JinaEmbeddingsV3ForTokenClassification", "JinaEmbeddingsV3ForQuestionAnswering",
    "training", "Trainer", "TrainState", "Contrastive", "CoSENT", "HeadLoss",
]
__version__ = "0.1.0"
