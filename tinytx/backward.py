"""Gradients without autograd: :func:`vjp` and :func:`loss_and_grads`.

Every trainable module has a hand-written pair (see :mod:`tinytx.layers.module`)::

    out, saved = module.forward_and_save(*inputs, **kwargs)     # saved: what backward needs
    input_grads, param_grads = module.backward(grad_out, saved)

:func:`vjp` wraps it in JAX's convention (``jax.vjp``): the forward now, the backward later
as a function of the cotangent. For a scalar loss L = l(module(x)), the cotangent is
dL/d out and the pullback returns dL/dx and dL/dθ for every parameter θ: backpropagation is
the chain rule applied from the loss back to the inputs, one module's backward at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from tinytx import functional as F
from tinytx.layers.module import Module

Array = Any
Pullback = Callable[[Array], tuple[tuple[Array | None, ...], dict[str, Array]]]

__all__ = ["loss_and_grads", "vjp"]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # array_api_strict.float64 -> float64


def vjp(module: Module, *inputs: Any, **kwargs: Any) -> tuple[Array, Pullback]:
    """Run ``module`` forward and return ``(output, pullback)``.

    ``pullback(grad_output) -> (input_grads, param_grads)``:

    - ``grad_output``: the cotangent, an array of the output's shape and dtype on the
      module's backend (for a scalar loss L: dL/d output);
    - ``input_grads``: a tuple, one entry per positional input: dL/d input for floating
      arrays, None for integer inputs (token ids, offsets) and inputs that get none;
    - ``param_grads``: dL/d parameter for exactly the keys of ``module.parameters()``.

    Keyword arguments (``mask=``, ``causal=True``) go to the forward and get no gradient.
    The inputs are checked as a call ``module(*inputs, **kwargs)`` checks them.

    A pullback may be called any number of times (the saved state is never changed), e.g.
    once per cotangent to build a Jacobian row by row. It reads the parameters as they are
    when it runs: call it before an optimizer updates them in place.
    """
    if not isinstance(module, Module):
        raise TypeError(f"vjp expects a tinytx Module, got {type(module).__name__}")
    module.check_call(inputs, kwargs)
    output, saved = module.forward_and_save(*inputs, **kwargs)
    name = type(module).__name__
    xp = module.backend.xp
    differentiable = [is_array_api_obj(a) and xp.isdtype(a.dtype, "real floating") for a in inputs]

    def pullback(grad_output: Array) -> tuple[tuple[Array | None, ...], dict[str, Array]]:
        if not is_array_api_obj(grad_output) or not module.backend.owns(grad_output):
            raise TypeError(
                f"pullback of {name}: the cotangent must be an array on backend "
                f"{module.backend.name!r} of shape {tuple(output.shape)} and dtype "
                f"{_dtype_name(output.dtype)}, got a {type(grad_output).__name__}"
            )
        if tuple(grad_output.shape) != tuple(output.shape):
            raise ValueError(
                f"pullback of {name}: the cotangent must have the output's shape "
                f"{tuple(output.shape)}, got {tuple(grad_output.shape)}"
            )
        if grad_output.dtype != output.dtype:
            raise TypeError(
                f"pullback of {name}: the cotangent must have the output's dtype "
                f"{_dtype_name(output.dtype)}, got {_dtype_name(grad_output.dtype)}"
            )
        input_grads, param_grads = module.backward(grad_output, saved)
        if len(input_grads) < len(inputs):
            raise RuntimeError(
                f"{name}.backward returned {len(input_grads)} input gradients for "
                f"{len(inputs)} inputs; it must return one per positional input"
            )
        input_grads = tuple(
            grad if wanted else None
            for grad, wanted in zip(input_grads[: len(inputs)], differentiable, strict=True)
        )
        return input_grads, _in_parameter_order(module, param_grads)

    return output, pullback


def _in_parameter_order(module: Module, grads: dict[str, Array]) -> dict[str, Array]:
    """``grads`` keyed and ordered exactly as ``module.parameters()``; a mismatch is a bug
    in a backward, reported with the keys it got wrong."""
    expected = list(module.parameters())
    missing = [key for key in expected if key not in grads]
    unknown = [key for key in grads if key not in expected]
    if missing or unknown:
        raise RuntimeError(
            f"{type(module).__name__}.backward returned gradients with the wrong keys: "
            f"missing {missing}, unknown {unknown}"
        )
    return {key: grads[key] for key in expected}


def loss_and_grads(model: Module, ids: Array, targets: Array) -> tuple[float, dict[str, Array]]:
    """The mean next-token cross-entropy of a GPT and its gradient for every parameter.

        loss = mean over the positions (b, t) with targets[b, t] != -100 of
               -log softmax(model(ids)[b, t])[targets[b, t]]

    ids, targets: integer (batch, seq) on the model's backend; targets[b, t] is the token
    that should follow ids[b, :t+1] (usually ids shifted by one), or -100 to ignore the
    position -> (loss as a Python float, {key: gradient} with exactly the keys of
    ``model.parameters()``). With every position ignored the loss and gradients are 0.

    A backend may compute the batch in parts side by side and add their shares (numpy
    with several threads: one part of whole sequences per thread, see
    :func:`_loss_share_and_grads`); the numbers then differ from the whole batch's only
    by the order of the sums over the batch, and are the same on every run.
    """
    from tinytx.models.gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"loss_and_grads expects a GPT, got {type(model).__name__}")
    model.check_call((ids,), {"targets": targets})
    xp = array_namespace(ids, targets)
    if not xp.isdtype(targets.dtype, "integral") or tuple(targets.shape) != tuple(ids.shape):
        raise ValueError(
            f"targets must be integer token ids of the ids' shape {tuple(ids.shape)}, got "
            f"dtype {_dtype_name(targets.dtype)} and shape {tuple(targets.shape)}"
        )
    vocab = model.config.vocab_size
    outside = xp.logical_and(targets != -100, xp.logical_or(targets < 0, targets >= vocab))
    if bool(xp.any(outside)):
        raise ValueError(
            f"targets must be token ids in [0, {vocab}) or -100 (ignored), got values from "
            f"{int(xp.min(targets))} to {int(xp.max(targets))}"
        )
    kept = int(xp.sum(xp.astype(targets != -100, xp.int64)))  # N: positions the mean runs over
    in_parts = model.backend.natives.get("sum_over_batch_parts")  # numpy: one part per thread
    if in_parts is not None:
        result = in_parts(partial(_loss_share_and_grads, model, kept=kept), ids, targets)
        if result is not NotImplemented:  # the parts' shares, added up
            loss, grads = result
            return loss, _in_parameter_order(model, grads)
    loss, grads = _loss_share_and_grads(model, ids, targets, kept=kept)  # the whole batch
    return loss, _in_parameter_order(model, grads)


def _loss_share_and_grads(
    model: Module, ids: Array, targets: Array, *, kept: int
) -> tuple[float, dict[str, Array]]:
    """The share of the loss held by the sequences in ``ids`` when the mean runs over
    ``kept`` positions in all, and its gradients:

        share = (n / kept) * mean over the n kept positions of ids of the cross-entropy

    For the whole batch (n = kept) this is the loss itself, with weight exactly 1. For a
    part of the batch the shares of the parts add up to the loss, and so do their
    gradients (a sum of the positions' terms, split into parts): this is how a batch can be
    computed in parts side by side (the numpy backend's ``sum_over_batch_parts``, one part
    per thread) or one after another (gradient accumulation).
    ids, targets: integer (batch, seq) -> (share as a Python float, {key: gradient}).
    """
    xp = array_namespace(ids, targets)
    n = int(xp.sum(xp.astype(targets != -100, xp.int64)))  # kept positions in this part
    weight = n / kept if kept else 1.0  # everything ignored: the loss and gradients are 0
    logits, saved = model.forward_and_save(ids)  # (batch, seq, vocab)
    loss = F.cross_entropy(logits, targets)  # 0-d, mean over this part's kept positions
    grad_loss = xp.ones_like(loss) * weight  # d share / d loss
    grad_logits = F.cross_entropy_backward(grad_loss, logits, targets)  # (batch, seq, vocab)
    _, grads = model.backward(grad_logits, saved)
    return float(loss) * weight, grads
