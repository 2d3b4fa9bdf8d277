"""What ``tinytx info`` and ``tinytx plugins`` print: versions, backends, attention variants.

Listing and importing plugins: ``info`` names the installed plugin packages' variants from
their entry-point metadata alone, without importing their code (a broken or slow plugin
cannot break ``info``). ``plugins`` shows what each variant *promises*, its paper and its
options; those exist only in the plugin's ``register_attention(...)`` call, so listing them
imports every installed plugin, as pytest imports its plugins to learn their hooks. A
plugin that fails to import is shown as SKIPPED with the reason, and
``TINYTX_DISABLE_PLUGIN_AUTOLOAD=1`` turns discovery off. Every other command imports only
the variant it is asked to use.
"""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["info_text", "plugins_text"]

DISTRIBUTIONS = (
    "numpy",
    "array-api-compat",
    "array-api-strict",
    "click",
    "threadpoolctl",
    "cupy-cuda13x",
    "cupy-cuda12x",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    """tinytx's version, its dependencies', each backend (its device, or why it cannot run
    here) and the attention variants: registered ones, and installed plugin packages'
    from their metadata (not imported)."""
    import tinytx
    from tinytx.backends import available_backends
    from tinytx.plugins import installed_plugins, registered_names

    lines = [f"tinytx {tinytx.__version__} on Python {platform.python_version()}"]
    lines += [f"  {dist:<17} {_version(dist)}" for dist in DISTRIBUTIONS]
    lines.append("backends:")
    for name, status in available_backends().items():
        state = f"available, device {status.device}" if status.available else status.reason
        lines.append(f"  {name:<7} {state}")
    registered = registered_names()
    lines.append("attention variants: " + ", ".join(registered))
    installed = {n: o for n, o in installed_plugins().items() if n not in registered}
    if installed:
        listing = ", ".join(f"{name} ({origin})" for name, origin in installed.items())
        lines.append(f"installed plugins, imported when used: {listing}")
    return "\n".join(lines)


def plugins_text() -> str:
    """Every attention variant (installed plugins imported): description, promises, paper,
    options and origin; plugins that failed to load, with the reason."""
    from tinytx.plugins import available_attention, broken_plugins

    lines = []
    for name, variant in available_attention().items():
        promises = ", ".join(variant.promises.names()) or "no promises"
        lines.append(f"{name:<16} {variant.description}  [{promises}]")
        if variant.paper:
            lines.append(f"{'':<16} paper: {variant.paper}")
        for opt_name, spec in variant.options.items():
            helptext = f"  ({spec.help})" if spec.help else ""
            default = f"{opt_name}={spec.default!r} ({spec.type.__name__})"
            lines.append(f"{'':<16} option: {default}{helptext}")
        if not variant.builtin:
            lines.append(f"{'':<16} from: {variant.source}")
    for name, reason in broken_plugins().items():
        lines.append(f"{name:<16} SKIPPED: {reason}")
    return "\n".join(lines)
