"""Deliberately broken plugin: it registers a variant, then raises while being imported.

Loading it must fail with an error naming this file, and leave the registry as it was
(``broken_import`` must not stay registered). Used by tests/test_plugins.py.
"""

from tinytx.functional import scaled_dot_product_attention
from tinytx.plugins import register_attention


@register_attention("broken_import", supports_mask=True, supports_causal=True)
def broken_import(q, k, v, *, mask=None, causal=False, scale=None):
    """Never usable: the module fails below."""
    return scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)


raise RuntimeError("this plugin is broken on purpose (fails at import)")
