"""``compiled=True``: a step's elementwise chains run as ``torch.compile``-d kernels, the Python around them eager.

What is compiled, and why only that. A whiten step is Python orchestration (layouts, buckets, refresh schedules,
the non-finite check, distributed owners) around tensor math. Traced whole, the orchestration becomes guards that
change at every step and state dynamo does not see change (whiten.optim.compiled). The tensor math that launches
the most kernels per FLOP is the elementwise chain of an update: an Adam-style tail is eight ``_foreach`` ops, one
launch each, that inductor fuses into one pass over memory (and, on a GPU, into a few horizontally fused kernels
for the whole list). Those chains are written as pure functions of tensor lists (:class:`Kernel`, beside the eager
code they stand for), compiled with ``fullgraph=True`` and static shapes; the matrix products and eigensolvers stay
as they are (a compiled matmul is the same cuBLAS or MKL call).

The numbers a kernel uses enter as one float64 tensor (:func:`step_values`): the lr a scheduler writes, bias
corrections, decay factors, and the betas too (a scheduler may cycle them). A Python number would be a guard, and a
new lr would recompile. So after the first steps (one graph per kernel and group, a second for the steps that take
the host check under ``sync_free``) nothing recompiles (tests/test_compiled_mode.py counts it).

The numbers: a fused chain rounds in another order (and lerp without torch's FMA), so the compiled step is the eager
one within float rounding, mostly not bit for bit; tests/test_compiled_mode.py holds every optimizer of the registry
to the eager numbers in float64. A lone lerp is not compiled (:func:`whiten.optim.update.lerp_all`). Under
``sync_free`` the masked select (``torch.where``) is fused into the kernels instead of costing a launch per written
tensor.

Where a step's tensors are not plain tensors on one device (DTensor shards) or no kernel is written for a path, that
path runs eagerly: the same numbers, only not fused. Where inductor cannot compile (no C++ compiler, no Triton), the
kernel runs eagerly, with a warning.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch

__all__ = ["Kernel", "kernel", "compiled_mode", "active", "step_values", "RECOMPILE_LIMIT"]

# One graph per kernel and distinct list of shapes (a group), and per host-checked / device-checked step: a model
# with many groups needs more than dynamo's default of 8 per function, which would silently turn compilation off.
RECOMPILE_LIMIT = 256

_MODE = threading.local()


@contextlib.contextmanager
def compiled_mode(on: bool):
    """Within it, :func:`active` is ``on``: :meth:`WhitenOptimizer.step` sets it from the ``compiled`` argument
    around the optimizer's own math, so the shared helpers (:mod:`whiten.optim.update`) pick the compiled kernel."""
    before = getattr(_MODE, "on", False)
    _MODE.on = on
    try:
        yield
    finally:
        _MODE.on = before


def active(*tensor_lists) -> bool:
    """Whether the step runs compiled kernels, and these tensors can take one: plain tensors or parameters on one
    device (not a DTensor or another subclass, which the kernel would trace through its dispatch)."""
    if not getattr(_MODE, "on", False):
        return False
    tensors = [t for ts in tensor_lists for t in ts]
    return bool(tensors) and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == tensors[0].device
                                 for t in tensors)


def step_values(values: list[float], device) -> torch.Tensor:
    """The numbers that change from step to step, as one float64 tensor on ``device`` for a kernel to index: no
    guard on their values, and no host sync to get them there (pinned memory on CUDA). float64 holds the Python
    numbers the eager step uses exactly; a kernel rounds each into the arithmetic's dtype as the eager op does."""
    from .update import host_values

    return host_values([float(v) for v in values], torch.float64, device)


class Kernel:
    """A pure function of tensor lists and numbers, compiled on first use (inductor, ``fullgraph=True``, static
    shapes), with room for one graph per group (:data:`RECOMPILE_LIMIT`)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._failed = False
        self._warned_limit = False

    def __call__(self, *args, **kwargs):
        if self._failed:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            try:
                self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
            except RuntimeError as e:  # torch.compile refused here (a Python version dynamo does not support)
                return self._eager_from_now(e, *args, **kwargs)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                            accumulated_recompile_limit=max(RECOMPILE_LIMIT, 256)):
                return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # more distinct lists of shapes than RECOMPILE_LIMIT (groups, on a CPU their cache-sized runs): the graphs
            # compiled so far keep running; this one, refused before it ran, runs eagerly
            if not self._warned_limit:
                self._warned_limit = True
                warnings.warn(f"compiled=True: the kernel {self.__name__} reached its {RECOMPILE_LIMIT} graphs "
                              "(one per group and list of shapes); new ones run eagerly (the same arithmetic, not "
                              "fused)", RuntimeWarning, stacklevel=3)
            return self.fn(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # Compilation fails before the kernel runs (no C++ compiler, no Triton): nothing was written, so the
            # same function runs eagerly, now and from then on, rather than leaving a step half done.
            return self._eager_from_now(e, *args, **kwargs)

    def _eager_from_now(self, error: Exception, *args, **kwargs):
        self._failed = True
        warnings.warn(f"compiled=True: the kernel {self.__name__} could not be compiled ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200] if str(error) else ''}); it runs eagerly (the same "
                      "arithmetic, not fused)", RuntimeWarning, stacklevel=4)
        return self.fn(*args, **kwargs)


def kernel(fn) -> Kernel:
    """Decorator: ``fn`` as a :class:`Kernel`."""
    return Kernel(fn)
