"""Copy a finished `tinytx train` folder into tinytx/default_model/ (the shipped model).

Copies config.json, model.safetensors and tokenizer.json (float32, as training wrote
them), and writes model.safetensors.sha256 in `sha256sum` format, which
tinytx.load_pretrained checks on every load. The model card (README.md) is written by
hand from the run's metrics.json and benchmarks/default_model_loss.py.

    python benchmarks/ship_default_model.py /tmp/h12/run
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tinytx.pretrained import DEFAULT_MODEL_FOLDER, SHA256_FILE, sha256_of


def main(run: Path) -> None:
    DEFAULT_MODEL_FOLDER.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(run / name, DEFAULT_MODEL_FOLDER / name)
    digest = sha256_of(DEFAULT_MODEL_FOLDER / "model.safetensors")
    (DEFAULT_MODEL_FOLDER / SHA256_FILE).write_text(f"{digest}  model.safetensors\n")
    print(f"{DEFAULT_MODEL_FOLDER}: sha256 {digest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
