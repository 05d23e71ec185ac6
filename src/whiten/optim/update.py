"""What every optimizer does around its own math, written once: which parameters decay, the gradient in the state's
dtype, and the write of the new value into the parameter, computed in the state's dtype and rounded once into a
low-precision (bf16, fp16) parameter, so that small steps are not lost to the parameter's rounding at every
intermediate operation."""

from __future__ import annotations

from typing import Callable

import torch

from ..roles import NO_DECAY_ROLES, role_from_shape
from . import kernels
from .checks import state_dtype_option

__all__ = ["state_dtype", "stored_dtype", "decays", "grad_in", "grads_in", "write", "step_to", "step_all", "commit",
           "apply_all", "commit_all", "lerp_all", "add_all", "ema_all", "cast_all", "host_values", "cache_runs",
           "masked", "lerp_values", "adam_direction_kernel", "second_moment_direction_kernel",
           "step_decay_after_kernel"]


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 whatever the parameter's dtype, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def stored_dtype(p: torch.Tensor, group: dict) -> torch.dtype:
    """The storage dtype of the state a group's ``state_dtype`` option covers (momenta, second moments, bases):
    bfloat16 when the option is on, else :func:`state_dtype`. The arithmetic stays in :func:`state_dtype`: the
    stored value is cast up, updated and rounded once on the way back. (A group from a checkpoint of before the
    option has no key: off.)"""
    return state_dtype_option(group.get("state_dtype")) or state_dtype(p)


def decays(p: torch.Tensor, group: dict) -> bool:
    """Whether weight decay applies to ``p``: not for the ``vector`` and ``embedding`` roles (the SPlus paper's mask:
    biases, norm gains, embeddings), taken from the group's role, else from ``p``'s shape."""
    return (group["role"] or role_from_shape(p)) not in NO_DECAY_ROLES


def grad_in(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p.grad`` in ``dtype`` (the state's): the gradient itself when it has it, else a cast copy. Never written."""
    return p.grad if p.grad.dtype == dtype else p.grad.to(dtype)


def grads_in(params: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`grad_in` for each parameter, in the dtype of the matching tensor of ``like`` (its state)."""
    return [grad_in(p, t.dtype) for p, t in zip(params, like)]


def write(p: torch.Tensor, dtype: torch.dtype, update: Callable[[torch.Tensor], object],
          ok: torch.Tensor | None = None) -> None:
    """Run ``update`` (in place, on the parameter's value) in ``dtype``: on ``p`` itself when it has that dtype, else
    on a ``dtype`` copy that is rounded once into ``p``. For updates whose arithmetic is an optimizer's own (its
    reference's order of operations); :func:`step_to` covers the common one. ``ok``: a sync-free step's flag (the
    update runs on a copy, :func:`commit`-ed under it)."""
    x = p if p.dtype == dtype and ok is None else p.to(dtype, copy=True)
    update(x)
    if x is not p:
        commit(p, x, ok)


def step_to(p: torch.Tensor, dtype: torch.dtype, direction: torch.Tensor, alpha: float, keep: float = 1.0,
            decay_first: bool = True, ok: torch.Tensor | None = None) -> None:
    """``θ ← keep·θ + alpha·direction`` (``decay_first``: decoupled decay of the old value, AdamW's order) or
    ``θ ← keep·(θ + alpha·direction)`` (decay after the step: SOAP's order), where ``keep = 1 − lr·λ`` (1 where
    :func:`decays` is False), computed in ``dtype`` and rounded once into a low-precision ``p`` (``ok``: see
    :func:`write`)."""
    def update(x: torch.Tensor) -> None:
        if decay_first:
            if keep != 1.0:
                x.mul_(keep)
            x.add_(direction, alpha=alpha)
        else:
            x.add_(direction, alpha=alpha).mul_(keep)

    write(p, dtype, update, ok)


# On a CPU an elementwise chain of _foreach ops over a whole group streams every tensor from memory at every op; in
# runs of about a core's cache (a larger tensor alone), each run goes through all the ops while it is still in cache
# (Conda's step: 49 ms over the whole group against 29 ms one parameter at a time, width 256). On an accelerator one
# run: one launch per op.
CPU_RUN_BYTES = 1 << 20
# Whether CPU tensors take the CPU's own paths (cache_runs, WhitenOptimizer.foreach_new's reused buffers); False:
# the accelerator's (benchmarks/host_syncs.py counts the launches a GPU would see). The numbers are the same.
CPU_PATHS = True


def cache_runs(tensors: list[torch.Tensor], compiled_chain: bool = False) -> list[list[int]]:
    """The indices of ``tensors`` in runs for elementwise ``_foreach`` chains: on a CPU, runs whose tensors together
    hold at most ``CPU_RUN_BYTES`` (or one larger tensor); elsewhere all of them in one run. The numbers do not depend
    on the runs (each tensor gets the same operations). ``compiled_chain``: the run's elementwise chain
    is one compiled kernel under ``compiled=True`` (whiten.optim.kernels), which streams each tensor once anyway:
    one run, one kernel call (each call costs its guards; Prodigy's step 1.3x the eager one in runs)."""
    if not tensors:
        return []
    if not CPU_PATHS or tensors[0].device.type != "cpu" or (compiled_chain and kernels.active(tensors)):
        return [list(range(len(tensors)))]
    runs, run, size = [], [], 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if run and size + nbytes > CPU_RUN_BYTES:
            runs.append(run)
            run, size = [], 0
        run.append(i)
        size += nbytes
    return runs + [run] if run else runs


def cast_all(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]``: the tensors already in ``dtype`` themselves, the others cast by one
    ``_foreach_copy_`` (the same rounding as ``to``)."""
    out = list(tensors)
    other = [i for i, t in enumerate(tensors) if t.dtype != dtype]
    if other:
        fresh = [torch.empty_like(tensors[i], dtype=dtype) for i in other]
        torch._foreach_copy_(fresh, [tensors[i] for i in other])
        for i, t in zip(other, fresh):
            out[i] = t
    return out


def host_values(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of Python numbers on ``device``, copied there without a host sync: on CUDA a copy from ordinary
    (pageable) host memory synchronizes the stream, waiting for every queued kernel; from pinned memory it is queued
    like a kernel."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


def commit(dst: torch.Tensor, new: torch.Tensor, ok: torch.Tensor | None) -> None:
    """``dst ← new`` (rounded into ``dst``'s dtype as ``copy_`` rounds). Under a sync-free step's device-side flag
    ``ok`` (a 0-d bool tensor, :mod:`whiten.optim.deferred`): ``new`` where ``ok``, else ``dst`` left bit for bit
    as it was, in one kernel and with no host read."""
    if ok is None:
        dst.copy_(new)
    else:  # (where's out= takes no other dtype: round first, as copy_ would)
        torch.where(ok, new if new.dtype == dst.dtype else new.to(dst.dtype), dst, out=dst)


def apply_all(op: str, tensors: list[torch.Tensor], *args, ok: torch.Tensor | None, **kwargs) -> list[torch.Tensor]:
    """``torch._foreach_<op>(tensors, *args)`` as the first op of an update that :func:`commit_all` writes back: in
    place (the tensors themselves are returned), or, under a sync-free step's flag ``ok``, into new tensors."""
    if ok is None:
        getattr(torch, f"_foreach_{op}_")(tensors, *args, **kwargs)
        return tensors
    return list(getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs))


def commit_all(dsts: list[torch.Tensor], news: list[torch.Tensor], ok: torch.Tensor | None) -> None:
    """:func:`commit` of each new value that is not its destination itself (an update made in place); without a
    flag, one ``_foreach_copy_`` (the same rounding as ``copy_``)."""
    pairs = [(dst, new) for dst, new in zip(dsts, news) if new is not dst]
    if not pairs:
        return
    if ok is None:
        torch._foreach_copy_([dst for dst, _ in pairs], [new for _, new in pairs])
    elif kernels.active([dst for dst, _ in pairs], [new for _, new in pairs]):
        _commit_kernel([dst for dst, _ in pairs], [new for _, new in pairs], ok)  # one pass, not one per tensor
    else:
        for dst, new in pairs:
            commit(dst, new, ok)


def lerp_all(dsts: list[torch.Tensor], ends: list[torch.Tensor], weight: float,
             ok: torch.Tensor | None) -> list[torch.Tensor]:
    """``dst ← dst + weight·(end − dst)`` for each pair, fused (``_foreach_lerp``), in place or :func:`commit`-ed
    under a sync-free step's flag ``ok``. Returns the new values (``dsts`` themselves in place). Never compiled: it
    is one fused op already, and inductor's lerp rounds differently from torch's (which uses an FMA), which SPlus's
    sign of a near-zero rotated momentum (a LayerNorm's rank-deficient gradient) would turn into a different step."""
    new = apply_all("lerp", dsts, ends, weight, ok=ok)
    commit_all(dsts, new, ok)
    return new


def add_all(dsts: list[torch.Tensor], others: list[torch.Tensor], alpha: float, ok: torch.Tensor | None) -> None:
    """``dst ← dst + alpha·other`` for each pair, fused (``_foreach_add``), in place or :func:`commit`-ed under a
    sync-free step's flag ``ok``."""
    if kernels.active(dsts, others) and all(d.dtype == o.dtype for d, o in zip(dsts, others)):
        values = kernels.step_values([1.0] * len(dsts) + [alpha], dsts[0].device)
        _step_all_kernel(dsts, others, values, ok)
        return
    commit_all(dsts, apply_all("add", dsts, others, alpha=alpha, ok=ok), ok)


def ema_all(dsts: list[torch.Tensor], others: list[torch.Tensor], beta: float, weight: float | torch.Tensor,
            ok: torch.Tensor | None) -> list[torch.Tensor]:
    """``dst ← beta·dst + weight·other`` for each pair (a momentum: a multiply, then an add with alpha; a ``weight``
    that is a 0-d device tensor, as a sync-free step's, multiplies ``other`` first: a tensor is no add's alpha), in
    place or :func:`commit`-ed under a sync-free step's flag ``ok``. Returns the new values (``dsts`` themselves in
    place)."""
    if (not isinstance(weight, torch.Tensor) and kernels.active(dsts, others)
            and all(d.dtype == o.dtype for d, o in zip(dsts, others))):
        _step_all_kernel(dsts, others, kernels.step_values([beta] * len(dsts) + [weight], dsts[0].device), ok)
        return dsts
    new = apply_all("mul", dsts, beta, ok=ok)
    if isinstance(weight, torch.Tensor):
        torch._foreach_add_(new, torch._foreach_mul(others, weight))
    else:
        torch._foreach_add_(new, others, alpha=weight)
    commit_all(dsts, new, ok)
    return new


def step_all(params: list[torch.Tensor], dtypes: list[torch.dtype], updates: list[torch.Tensor],
             keeps: list[float], alpha: float = 1.0, ok: torch.Tensor | None = None) -> None:
    """``θ ← keep·θ + alpha·update`` for many parameters: fused (``_foreach``) for those that have their state's
    dtype, one at a time, in the state's dtype and rounded once, for low-precision ones. :func:`step_to`'s
    arithmetic (decay first), one launch per op instead of per parameter. ``ok``: a sync-free step's flag (the
    new values are computed aside and :func:`commit`-ed, the same arithmetic)."""
    if kernels.active(params, updates) and all(u.dtype == d for u, d in zip(updates, dtypes)):
        _step_all_kernel(params, updates, kernels.step_values(list(keeps) + [alpha], params[0].device), ok)
        return
    same = [i for i, p in enumerate(params) if p.dtype == dtypes[i]]
    if same:
        ps = [params[i] for i in same]
        if ok is None:
            kept = [i for i in same if keeps[i] != 1.0]  # (a multiply by 1 changes nothing: no pass for it)
            if kept:
                torch._foreach_mul_([params[i] for i in kept], [keeps[i] for i in kept])
            new = ps
        else:
            new = apply_all("mul", ps, [keeps[i] for i in same], ok=ok)
        torch._foreach_add_(new, [updates[i] for i in same], alpha=alpha)
        commit_all(ps, new, ok)
    for i, p in enumerate(params):
        if p.dtype != dtypes[i]:
            commit(p, p.to(dtypes[i]).mul_(keeps[i]).add_(updates[i], alpha=alpha), ok)


# ----- compiled twins (compiled=True, whiten.optim.kernels): the same arithmetic, numbers as float64 tensors ------

def lerp_values(starts: list[torch.Tensor], ends: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """Inside a kernel: ``start + weight·(end − start)`` (``_foreach_lerp`` with a tensor weight is not lowered by
    inductor: it would run as one aten call per tensor). Eager ``lerp`` switches to ``end − (1 − w)(end − start)``
    for w ≥ 0.5: the same value within rounding."""
    return torch._foreach_add(starts, torch._foreach_mul(torch._foreach_sub(ends, starts), weight))


def masked(ok: torch.Tensor | None, new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inside a kernel: ``new`` where the sync-free step's flag ``ok`` holds, else ``old`` (fused into the kernel's
    pass, not a launch of its own)."""
    return new if ok is None else [torch.where(ok, n, o) for n, o in zip(new, old)]


@kernels.kernel
def _commit_kernel(dsts, news, ok):
    """:func:`commit_all` under a sync-free step's flag: the same selects and roundings (exact: the eager bits)."""
    torch._foreach_copy_(dsts, [torch.where(ok, n.to(d.dtype), d) for d, n in zip(dsts, news)])


@kernels.kernel
def _step_all_kernel(params, updates, values, ok):
    """:func:`step_all`: ``values`` the keeps, one per parameter, then alpha; a low-precision parameter computed in
    its update's dtype and rounded once by the copy back."""
    n = len(params)
    xs = [p if p.dtype == u.dtype else p.to(u.dtype) for p, u in zip(params, updates)]
    new = torch._foreach_mul(xs, [values[i] for i in range(n)])
    torch._foreach_add_(new, torch._foreach_mul(updates, values[n]))
    torch._foreach_copy_(params, masked(ok, new, xs))


def _second_moment_direction(ms, vs, grads, values, ok):
    """Inside a kernel: v ← β2·v + (1 − β2)·g², and m / (√v + ε), ``values`` = (…, β2, 1 − β2, ε) at 1, 2, 3."""
    v = torch._foreach_mul(vs, values[1])
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), values[2]))
    torch._foreach_copy_(vs, masked(ok, v, vs))
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, values[3])
    return torch._foreach_div(ms, denom)


@kernels.kernel
def adam_direction_kernel(ms, vs, grads, values, ok):
    """Adam's moments and direction (SOAP's, in its eigenbasis): m ← lerp(m, g, 1 − β1), v as
    :func:`second_moment_direction_kernel`; ``values`` = 1 − β1, β2, 1 − β2, ε. Returns m / (√v + ε)."""
    m = lerp_values(ms, grads, values[0])
    torch._foreach_copy_(ms, masked(ok, m, ms))
    return _second_moment_direction(m, vs, grads, values, ok)


@kernels.kernel
def second_moment_direction_kernel(ms, vs, grads, values, ok):
    """v ← β2·v + (1 − β2)·g², written under a sync-free step's flag ``ok`` (None: in place), and m / (√v + ε)
    (Conda's, m already updated); ``values`` = (unused), β2, 1 − β2, ε."""
    return _second_moment_direction(ms, vs, grads, values, ok)


@kernels.kernel
def step_decay_after_kernel(params, directions, values, ok):
    """θ ← (θ − size·d)·keep (SOAP's and Conda's order: the decay after the step); ``values`` = the step sizes, then
    the keeps."""
    n = len(params)
    new = torch._foreach_sub(params, torch._foreach_mul(directions, [values[i] for i in range(n)]))
    torch._foreach_mul_(new, [values[n + i] for i in range(n)])
    torch._foreach_copy_(params, masked(ok, new, params))
