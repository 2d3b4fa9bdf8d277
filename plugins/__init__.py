"""Attention variants as plugins.

``register_attention(name, ...)`` registers a function that follows the attention
contract (see :mod:`tinytx.plugins.registry`); ``get_attention(name)`` and
``available_attention()`` look variants up. The built-in variants register when this
package is imported.
"""

from tinytx.plugins import softmax  # noqa: E402,F401  (registers the built-ins)
from tinytx.plugins.registry import (
    AttentionError,
    AttentionVariant,
    Option,
    Promises,
    UnknownAttentionError,
    available_attention,
    get_attention,
    register_attention,
    unregister_attention,
)

__all__ = [
    "AttentionError",
    "AttentionVariant",
    "Option",
    "Promises",
    "UnknownAttentionError",
    "available_attention",
    "get_attention",
    "register_attention",
    "unregister_attention",
]
