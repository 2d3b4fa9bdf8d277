"""Whole models built from :mod:`tinytx.layers`. The encoder stack lives in
``tinytx.layers.Encoder``; pretrained loaders and a GPT arrive here in later issues."""

from tinytx.layers.encoder import Encoder
from tinytx.models.gpt import GPT, GPTConfig
from tinytx.models.seq2seq import Seq2Seq, Seq2SeqConfig

__all__ = ["Encoder", "GPT", "GPTConfig", "Seq2Seq", "Seq2SeqConfig"]
