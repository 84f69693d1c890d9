"""The one Transformer backbone (decoder, encoder, encoder-decoder) and its configuration.

Import the model from `models.transformer`; this package file stays light so that reading a config
(`models.config`) never imports torch.
"""
