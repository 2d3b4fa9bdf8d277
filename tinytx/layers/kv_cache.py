"""The key/value cache: what a decoder remembers between generation steps.

A causal decoder's keys and values at position p depend only on tokens 0..p, so once
computed they never change. Generating token t+1 therefore needs only the *new* token's
query, key and value; the keys and values of positions 0..t are read back from here:

    step 0 (the prompt, s tokens):  K[:, :, 0:s]   = k_new       length 0 -> s
    step i (one new token):          K[:, :, L:L+1] = k_new       length L -> L + 1
    attention at step i:             softmax(q_new K[:, :, :L+1]^T * scale) V[:, :, :L+1]

so each step costs one position's projections and feed-forward instead of the whole
prefix's. The buffers are allocated once, for ``max_len`` positions, and filled in place:
a step writes only its new positions and reads the earlier ones through a view.

Keys are stored *after* the rotary rotation (their position is already baked in) and
*before* the grouped-query repeat (only the ``n_kv_heads`` distinct heads take memory;
with fewer key/value heads than query heads, attention repeats them on the fly).
"""

from __future__ import annotations

from typing import Any

from tinytx.backends import Backend, resolve_backend

Array = Any

__all__ = ["KVCache", "LayerKVCache", "format_bytes"]


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', 75497472 -> '72.0 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class LayerKVCache:
    """The cached keys and values of one self-attention layer.

    ``key_buffer``, ``value_buffer``: (batch, heads_kv, max_len, d_head), of which the
    first ``length`` positions are filled; ``keys`` and ``values`` are those filled parts
    (views, no copy).
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        d_head: int,
        max_len: int,
        *,
        backend: str | Backend | None = None,
        dtype: str = "float32",
    ) -> None:
        self.backend = resolve_backend(backend)
        self.max_len = _positive_int(max_len, "max_len")
        xp = self.backend.xp
        shape = (
            _positive_int(batch, "batch"),
            _positive_int(n_kv_heads, "n_kv_heads"),
            self.max_len,
            _positive_int(d_head, "d_head"),
        )
        kind = getattr(xp, dtype)
        self.key_buffer = xp.zeros(shape, dtype=kind, device=self.backend.device)  # (b, h_kv, T, d)
        self.value_buffer = xp.zeros(shape, dtype=kind, device=self.backend.device)  # same
        self.length = 0  # positions filled so far

    @property
    def keys(self) -> Array:
        """The cached keys: (batch, heads_kv, length, d_head), a view of the buffer."""
        return self.key_buffer[:, :, : self.length, :]

    @property
    def values(self) -> Array:
        """The cached values: (batch, heads_kv, length, d_head), a view of the buffer."""
        return self.value_buffer[:, :, : self.length, :]

    @property
    def nbytes(self) -> int:
        """Memory held by the two buffers, in bytes (allocated, filled or not)."""
        xp = self.backend.xp
        count = 1
        for n in self.key_buffer.shape:
            count *= n
        return 2 * count * (xp.finfo(self.key_buffer.dtype).bits // 8)

    def append(self, k: Array, v: Array) -> tuple[Array, Array]:
        """Write the new positions' keys and values; return all keys and values so far.

        k, v: (batch, heads_kv, seq_new, d_head)
        -> keys, values: (batch, heads_kv, length + seq_new, d_head) (views of the buffers).
        """
        expected = (self.key_buffer.shape[0], self.key_buffer.shape[1], self.key_buffer.shape[3])
        for name, a in (("keys", k), ("values", v)):
            if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != expected:
                raise ValueError(
                    f"KV cache expects new {name} of shape (batch, heads_kv, seq, d_head) with "
                    f"(batch, heads_kv, d_head) = {expected}, got {tuple(a.shape)}"
                )
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.max_len:
            raise ValueError(
                f"KV cache is full: it holds {self.max_len} positions, {start} are filled and "
                f"{k.shape[2]} more were given"
            )
        self.key_buffer[:, :, start:stop, :] = k  # fill positions start .. stop-1 in place
        self.value_buffer[:, :, start:stop, :] = v
        self.length = stop
        return self.keys, self.values  # (batch, heads_kv, stop, d_head) each

    def __repr__(self) -> str:
        shape = tuple(self.key_buffer.shape)
        return f"LayerKVCache(length={self.length}/{self.max_len}, buffers 2 x {shape})"


class KVCache:
    """One :class:`LayerKVCache` per decoder layer, filled in step.

    ``cache.length`` is the number of positions seen so far (the position of the next
    token); ``cache.nbytes`` the memory of all buffers; ``print(cache.describe())`` a table
    of every layer's shapes and memory.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        d_head: int,
        max_len: int,
        *,
        backend: str | Backend | None = None,
        dtype: str = "float32",
    ) -> None:
        backend = resolve_backend(backend)
        self.layers = [
            LayerKVCache(batch, n_kv_heads, d_head, max_len, backend=backend, dtype=dtype)
            for _ in range(_positive_int(n_layers, "n_layers"))
        ]
        self.max_len = max_len

    @property
    def length(self) -> int:
        """Positions cached so far (every layer holds the same number)."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Memory of every layer's key and value buffers, in bytes."""
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def describe(self) -> str:
        """A small table: each layer's filled keys/values shape and its buffer memory."""
        lines = [f"KV cache: {self.length} of {self.max_len} positions filled"]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"  layer {i:>2}: keys {tuple(layer.keys.shape)}  values "
                f"{tuple(layer.values.shape)}  buffers {format_bytes(layer.nbytes)}"
            )
        lines.append(f"  total: {format_bytes(self.nbytes)} allocated for {self.max_len} positions")
        return "\n".join(lines)

    def __repr__(self) -> str:
        shape = tuple(self.layers[0].key_buffer.shape)
        return (
            f"KVCache(layers={len(self.layers)}, length={self.length}/{self.max_len}, "
            f"buffers 2 x {shape} per layer, {format_bytes(self.nbytes)})"
        )
