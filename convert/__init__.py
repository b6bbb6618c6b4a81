"""Checkpoint formats of jina-embeddings-v3 -> the jina-jax parameter tree (and back)."""

from .formats import Checkpoint, detect_format, load, save_native
from .safetensors_io import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "detect_format", "load", "save_native"]
