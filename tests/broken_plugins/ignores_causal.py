"""Deliberately broken plugin: declares ``supports_causal`` but ignores the flag.

Every query sees every key, also the later ones: the worst bug an attention library
can have, because nothing crashes. The conformance kit's ``causal_no_leak`` property
must catch it with a shrunk counter-example. Used by tests/test_conformance.py and
tests/test_cli_plugins.py.
"""

from tinytx.functional import scaled_dot_product_attention
from tinytx.plugins import register_attention


@register_attention(
    "broken_causal",
    description="softmax attention that drops causal=True (broken on purpose)",
    normalized=True,
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
)
def broken_causal(q, k, v, *, mask=None, causal=False, scale=None):
    """softmax attention; ``causal`` is accepted and silently ignored."""
    return scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
