"""Deliberately broken plugin: returns its output with the last two axes swapped.

q: (batch, heads, seq_q, d) should give (batch, heads, seq_q, d_v); this gives
(batch, heads, d_v, seq_q). The registry's shape check must catch it, naming the
variant and this plugin. Used by tests/test_conformance.py and tests/test_cli_plugins.py.
"""

from array_api_compat import array_namespace

from tinytx.functional import scaled_dot_product_attention
from tinytx.plugins import register_attention


@register_attention(
    "broken_shape",
    description="softmax attention, output transposed (broken on purpose)",
    normalized=True,
    supports_mask=True,
    supports_causal=True,
)
def broken_shape(q, k, v, *, mask=None, causal=False, scale=None):
    """softmax attention with the output's last two axes swapped."""
    xp = array_namespace(q)
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    return xp.matrix_transpose(out), None  # (batch, heads, d_v, seq_q): wrong
