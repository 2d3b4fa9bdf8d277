"""Attention variants as plugins.

``register_attention(name, ...)`` registers a function that follows the attention
contract (see :mod:`tinytx.plugins.registry`); ``get_attention(name)`` and
``available_attention()`` look variants up. The built-in variants (one short module
each) register when this package is imported; third-party ones are discovered through
the entry-point group ``tinytx.attention`` or loaded with ``load_plugin(path_or_module)``.
"""

from tinytx.plugins import (  # noqa: E402,F401  (importing them registers the built-ins)
    alibi,
    blockwise,
    cosine,
    linear,
    sigmoid,
    sliding_window,
    softmax,
)
from tinytx.plugins.registry import (
    ENTRY_POINT_GROUP,
    AttentionError,
    AttentionVariant,
    Option,
    PluginError,
    PluginWarning,
    Promises,
    UnknownAttentionError,
    available_attention,
    broken_plugins,
    get_attention,
    installed_plugins,
    load_plugin,
    register_attention,
    registered_names,
    unregister_attention,
)

BUILTIN_VARIANTS = (
    "softmax",
    "blockwise",
    "sliding_window",
    "linear",
    "alibi",
    "sigmoid",
    "cosine",
)

__all__ = [
    "BUILTIN_VARIANTS",
    "ENTRY_POINT_GROUP",
    "AttentionError",
    "AttentionVariant",
    "Option",
    "PluginError",
    "PluginWarning",
    "Promises",
    "UnknownAttentionError",
    "available_attention",
    "broken_plugins",
    "get_attention",
    "installed_plugins",
    "load_plugin",
    "register_attention",
    "registered_names",
    "unregister_attention",
]
