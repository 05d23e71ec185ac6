"""What ``torch.compile(opt.step)`` does with a whiten optimizer: the step runs eagerly inside the compiled function,
with the eager numbers, and says so once.

Why not let dynamo trace the step: it traces the Python around the tensor math too, and part of that is state it
does not see change. Traced, the steps of K-FAC, EKFAC, K-BFGS and TNT missed the statistics their layer hooks
collect during the forward and backward passes, M-FAC's gradient window and Conda's projection moved differently,
SOAP's refresh sorted near-equal eigenvalue estimates another way (max |compiled − eager| 1e-2 to 18 after 6 steps
in float64), and PSGD-Kron, Prodigy and Shampoo failed. The steps that did agree (SPlus, Muon, SpecGD, Scion,
Schedule-Free AdamW, to 2e-16) recompiled at every step on guards over Python-side state (per-parameter step
counts, the number of state entries, gradients that ``zero_grad`` frees, each group's role) until dynamo's
recompile limit turned tracing off. tests/test_compile.py holds every optimizer of the registry to the eager
numbers under ``torch.compile``, with no recompilation after the first step."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["eager_under_compile"]


@torch.compiler.disable
def _warn_eager(optimizer) -> None:
    if getattr(optimizer, "_warned_eager_compile", False):
        return
    optimizer._warned_eager_compile = True
    warnings.warn(f"torch.compile: {type(optimizer).__name__}.step() runs eagerly inside the compiled function, with "
                  "the eager numbers (a traced step would follow Python-side state that dynamo does not see change; "
                  "see whiten.optim.compiled). Compile the model, not the step; compiled=True compiles the step's "
                  "elementwise kernels (whiten.optim.kernels). This warning is shown once.",
                  RuntimeWarning, stacklevel=3)


def eager_under_compile(step):
    """Wrap a ``step(self, closure=None)`` so that under ``torch.compile`` it runs as it does eagerly
    (``torch.compiler.disable``) and warns once."""
    if getattr(step, "_whiten_compile_wrapped", False):
        return step
    eager = torch.compiler.disable(step)

    @functools.wraps(step)
    def wrapper(self, closure=None):
        if torch.compiler.is_compiling():
            _warn_eager(self)
            return eager(self, closure)
        return step(self, closure)

    wrapper._whiten_compile_wrapped = True
    return wrapper
