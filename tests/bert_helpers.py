"""Helpers for the BERT tests: a tiny BERT checkpoint folder and a plain NumPy reference.

The tiny folder has the layout of a Hugging Face BERT folder (config.json,
model.safetensors with Hugging Face's key names and the position_ids buffer, a WordPiece
tokenizer.json that pads and truncates at a fixed length, as all-MiniLM-L6-v2's does), so
the loader, the tokenizer and every error path are tested without the 90 MB model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tinytx.models.bert import BertConfig, BertModel, to_hf_state_dict

WORDS = [
    "the", "a", "animal", "cat", "dog", "sat", "on", "mat", "it", "was", "tired", "street",
    "cross", "didn", "t", "because", "too", "hello", "world", "##s", "##ing", "run",
    ".", ",", "!", "?", "'",
]  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TINY_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": len(SPECIALS) + len(WORDS),
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


def tiny_weights(seed: int = 0, *, pooler: bool = True) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face's names (norm weights and biases random too)."""
    model = BertModel(BertConfig.from_dict(TINY_CONFIG), pooler=pooler, seed=seed)
    rng = np.random.default_rng(seed + 1)
    state = {
        key: (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
        for key, value in to_hf_state_dict(model.state_dict()).items()
    }
    state["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None, :]  # a buffer
    return state


def write_tokenizer(path: Path, fixed_length: int = 32) -> None:
    """A WordPiece tokenizer.json that pads and truncates at ``fixed_length``, like the
    shipped all-MiniLM-L6-v2 one (which tinytx must switch off)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    tok.enable_padding(length=fixed_length, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(fixed_length)
    tok.save(str(path))


def write_tiny_bert(
    folder: Path,
    *,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    config: dict | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny BERT folder (config.json, model.safetensors, tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    save_file(weights if weights is not None else tiny_weights(seed), folder / "model.safetensors")
    if tokenizer:
        write_tokenizer(folder / "tokenizer.json")
    return folder


# --- an independent NumPy BERT, written from the equations, for the tiny model -----------------

_erf = np.vectorize(math.erf)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def reference_embeddings(
    state: dict[str, np.ndarray], config: dict, ids: list[list[int]]
) -> np.ndarray:
    """BERT on each id list alone (no padding at all), in float64, then the masked mean and
    L2 normalisation: (n, hidden)."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    out = []
    for row in ids:
        n = len(row)
        x = s["embeddings.word_embeddings.weight"][row]
        x = x + s["embeddings.position_embeddings.weight"][:n]
        x = x + s["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, s["embeddings.LayerNorm.weight"], s["embeddings.LayerNorm.bias"], eps)
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def dense(h: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return h @ s[p + name + ".weight"].T + s[p + name + ".bias"]

            d = x.shape[-1] // heads
            q, k, v = (
                dense(x, f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)  # (heads, n, n)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            attended = (w @ v).transpose(1, 0, 2).reshape(n, heads * d)
            x = _layer_norm(
                x + dense(attended, "attention.output.dense"),
                s[p + "attention.output.LayerNorm.weight"],
                s[p + "attention.output.LayerNorm.bias"],
                eps,
            )
            h = dense(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _layer_norm(
                x + dense(h, "output.dense"),
                s[p + "output.LayerNorm.weight"],
                s[p + "output.LayerNorm.bias"],
                eps,
            )
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)
