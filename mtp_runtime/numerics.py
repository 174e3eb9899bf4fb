"""NaN/Inf detection: a cheap finiteness check on logits, and a diagnostic re-run that names the first module
whose output stopped being finite, so bad weights or an overflowing dtype raise an error instead of garbage text."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import NumericalError


def first_nonfinite_module(model: nn.Module, rerun: Callable[[], object]) -> str | None:
    """Re-run a forward with hooks on every submodule; the name of the first one (in completion order) whose
    output holds a NaN or Inf. Children complete before their parents, so this is the innermost origin."""
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            tensors = output if isinstance(output, tuple) else (output,)
            if not found and any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                                 for t in tensors):
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        rerun()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def ensure_finite(logits: torch.Tensor, what: str, locate: Callable[[], str | None] | None = None) -> None:
    """Raise NumericalError when `logits` hold NaN/Inf, naming the module `locate` finds (run only then)."""
    if bool(torch.isfinite(logits).all()):
        return
    origin = locate() if locate is not None else None
    where = f", first produced by {origin}" if origin else ""
    raise NumericalError(
        f"NaN/Inf in the {what} logits{where}; the checkpoint's weights hold non-finite values or the dtype "
        f"overflowed: check the weights, or load in float32 (--dtype float32)")
