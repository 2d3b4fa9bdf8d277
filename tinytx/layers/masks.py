"""Attention masks. Boolean, True where attention is allowed, broadcastable to
(batch, heads, seq_q, seq_k)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as device_of

from tinytx.backends import Backend, resolve_backend
from tinytx.functional import causal_mask

Array = Any

__all__ = ["causal_mask", "padding_mask"]


def padding_mask(
    lengths: Sequence[int] | Array, seq_len: int, *, backend: str | Backend | None = None
) -> Array:
    """Mask out the padding at the end of each sequence.

    Sequence b holds ``lengths[b]`` real tokens followed by padding; key j is allowed
    when j < lengths[b]. lengths: (batch,) ints (a list, or an integer array, whose
    backend is then used) -> (batch, 1, 1, seq_len) boolean.
    """
    if is_array_api_obj(lengths):
        xp, device = array_namespace(lengths), device_of(lengths)
        if not xp.isdtype(lengths.dtype, "integral") or lengths.ndim != 1:
            raise ValueError(
                f"lengths must be a 1-D integer array, got {lengths.dtype} "
                f"of shape {tuple(lengths.shape)}"
            )
        values = [int(n) for n in lengths]
    else:
        chosen = resolve_backend(backend)
        xp, device = chosen.xp, chosen.device
        values = list(lengths)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in values):
            raise ValueError(f"lengths must be ints, got {values!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not values or any(n < 0 or n > seq_len for n in values):
        raise ValueError(f"every length must lie in [0, seq_len={seq_len}], got {values}")
    positions = xp.arange(seq_len, dtype=xp.int64, device=device)  # (seq_len,)
    limits = xp.asarray(values, dtype=xp.int64, device=device)  # (batch,)
    allowed = positions[None, :] < limits[:, None]  # (batch, seq_len)
    return allowed[:, None, None, :]  # (batch, 1, 1, seq_len)
