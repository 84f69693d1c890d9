"""The one Transformer backbone (decoder, encoder, encoder-decoder) and its configuration."""

from models.config import ModelConfig
from models.transformer import KVCache, ModelOutput, Transformer

__all__ = ["KVCache", "ModelConfig", "ModelOutput", "Transformer"]
