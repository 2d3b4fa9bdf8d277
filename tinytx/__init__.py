"""tinytx: a transformer you can read.

Small array-API layers that run unchanged on NumPy, CuPy or array-api-strict; attention
variants as plugins; a trace of every forward pass. Start with :mod:`tinytx.layers`.
"""

__version__ = "0.1.0"

from tinytx import optim  # noqa: E402  (tinytx.optim.AdamW without a second import)
from tinytx.backends import (  # noqa: E402
    Backend,
    BackendUnavailable,
    available_backends,
    current_backend,
    get_backend,
    use_backend,
)
from tinytx.backward import loss_and_grads, vjp  # noqa: E402
from tinytx.pretrained import default_model_path, load_pretrained  # noqa: E402
from tinytx.trace import trace  # noqa: E402

__all__ = [
    "Backend",
    "BackendUnavailable",
    "__version__",
    "available_backends",
    "current_backend",
    "default_model_path",
    "get_backend",
    "load_pretrained",
    "loss_and_grads",
    "optim",
    "trace",
    "use_backend",
    "vjp",
]
