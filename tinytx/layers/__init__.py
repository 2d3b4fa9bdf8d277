"""The layers of a transformer, each a small module around plain array code.

Read them in this order: :mod:`~tinytx.layers.basic` (Linear, Embedding, norms,
feed-forward), :mod:`~tinytx.layers.positions`, :mod:`~tinytx.layers.attention`,
:mod:`~tinytx.layers.blocks`, :mod:`~tinytx.layers.encoder`,
:mod:`~tinytx.layers.transformer`. The arithmetic they share
is in :mod:`tinytx.functional`.
"""

from tinytx.layers.attention import MultiHeadAttention, merge_heads, split_heads
from tinytx.layers.basic import Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from tinytx.layers.blocks import DecoderBlock, EncoderBlock
from tinytx.layers.encoder import Encoder, mean_pool, mean_pool_backward
from tinytx.layers.masks import causal_mask, padding_mask
from tinytx.layers.module import BackendMismatchError, Module, NoBackwardError, StateDictError
from tinytx.layers.positions import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    sinusoidal_table,
)
from tinytx.layers.transformer import Transformer, TransformerDecoder

__all__ = [
    "BackendMismatchError",
    "DecoderBlock",
    "Embedding",
    "Encoder",
    "EncoderBlock",
    "FeedForward",
    "LayerNorm",
    "LearnedPositions",
    "Linear",
    "Module",
    "MultiHeadAttention",
    "NoBackwardError",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "StateDictError",
    "Transformer",
    "TransformerDecoder",
    "causal_mask",
    "mean_pool",
    "mean_pool_backward",
    "merge_heads",
    "padding_mask",
    "sinusoidal_table",
    "split_heads",
]
