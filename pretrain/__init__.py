"""pretrain: one tool to pretrain Transformer language models with the classic self-supervised objectives.

Importing this package is cheap: torch, datasets and sentencepiece are imported lazily where used.
"""

__version__ = "0.1.0"
