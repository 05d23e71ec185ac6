"""What an optimizer's state costs, in one call: :meth:`WhitenOptimizer.memory_report` before the first step (planned,
from each optimizer's own description of its state) or after it (held), per role and per kind of state, with the
parameters that hold the most and the options that would reduce it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..distributed.layout import local_shard
from ..roles import role_from_shape
from .update import state_dtype

__all__ = ["MemoryReport", "memory_report", "state_kind"]

MiB = 2**20


def state_kind(key: str) -> str:
    """A state key without its side or block index: ``factor_left`` and ``factor_0_1`` are ``factor``."""
    return re.sub(r"(_(left|right|\d+))+$", "", key)


@dataclass
class MemoryReport:
    """``rows``: ``(role, kind, tensors, bytes)``; ``largest``: ``(bytes, shape, role)`` of the parameters holding
    the most; ``options``: ``(option, bytes it governs, what it does)`` for the options of this optimizer that
    would reduce the state present. ``planned``: True before the first step (the state each parameter will get),
    False for the state held. In a distributed run: this process's share (the parameters it owns, its blocks of
    the elementwise ones)."""

    optimizer: str
    planned: bool
    parameter_bytes: int
    rows: list = field(default_factory=list)
    largest: list = field(default_factory=list)
    options: list = field(default_factory=list)
    global_bytes: int = 0  # optimizer-wide tensors (M-FAC's Gram matrix)

    @property
    def state_bytes(self) -> int:
        return sum(r[3] for r in self.rows) + self.global_bytes

    @property
    def ratio(self) -> float:
        """State bytes per parameter byte (AdamW: 2.0 for float32 parameters)."""
        return self.state_bytes / self.parameter_bytes if self.parameter_bytes else 0.0

    def by_role(self) -> dict:
        out: dict = {}
        for role, _, _, size in self.rows:
            out[role] = out.get(role, 0) + size
        return out

    def by_kind(self) -> dict:
        out: dict = {}
        for _, kind, _, size in self.rows:
            out[kind] = out.get(kind, 0) + size
        return out

    def __str__(self) -> str:
        what = "planned (before the first step)" if self.planned else "held"
        lines = [f"{self.optimizer} state, {what}: {self.state_bytes / MiB:.1f} MiB, {self.ratio:.1f}x the parameters' "
                 f"{self.parameter_bytes / MiB:.1f} MiB"]
        lines.append(f"  {'role':<10} {'kind':<12} {'tensors':>7} {'MiB':>10}")
        for role, kind, count, size in sorted(self.rows, key=lambda r: -r[3]):
            lines.append(f"  {role:<10} {kind:<12} {count:>7} {size / MiB:>10.2f}")
        if self.global_bytes:
            lines.append(f"  {'(global)':<10} {'':<12} {'':>7} {self.global_bytes / MiB:>10.2f}")
        if self.largest:
            lines.append("  largest: " + "; ".join(f"{role} {tuple(shape)} {size / MiB:.1f} MiB"
                                                    for size, shape, role in self.largest))
        for option, size, what in self.options:
            lines.append(f"  {option}: governs {size / MiB:.1f} MiB here; {what}")
        return "\n".join(lines)


def _tensor_bytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def memory_report(opt, top: int = 3) -> MemoryReport:
    """See :meth:`WhitenOptimizer.memory_report`."""
    ctx = opt.distributed_context()
    held = any(opt.state.get(p) for g in opt.param_groups for p in g["params"]) or any(opt.state.values())
    rows: dict = {}
    per_param: list = []
    param_bytes = 0
    for group in opt.param_groups:
        for p in group["params"]:
            param_bytes += p.numel() * p.element_size()
            if ctx is not None and not ctx.owns(p):
                continue
            q = ctx.view(p) if ctx is not None else p
            role = group.get("role") or role_from_shape(p)
            if held:  # (an experts parameter's state under EP: this rank's rows, its experts')
                entries = [(k, tuple(local_shard(v).shape), v.dtype)
                           for k, v in (opt.state.get(q) or opt.state.get(p) or {}).items() if isinstance(v, torch.Tensor)]
            else:
                shapes = opt.planned_state(p, group)
                if ctx is not None and p in ctx.experts:  # this rank's experts of the stack
                    mine = len(ctx.owned_experts(p))
                    shapes = {k: None if s is None else (mine, *s[1:]) for k, s in shapes.items()}
                if ctx is not None and ctx.is_local(p) and p in ctx.blocks:  # an elementwise one: this rank's block
                    size = ctx.blocks[p][ctx.rank][1]
                    shapes = {k: size if s == tuple(p.shape) else s for k, s in shapes.items()}
                stored = opt.stored_dtypes(p, group)
                entries = [(k, shape, stored.get(k, state_dtype(p))) for k, shape in shapes.items()
                           if shape is not None]
            total = 0
            for key, shape, dtype in entries:
                size = _tensor_bytes(shape, dtype)
                kind = state_kind(key)
                count, prev = rows.get((role, kind), (0, 0))
                rows[(role, kind)] = (count + 1, prev + size)
                total += size
            per_param.append((total, tuple(p.shape), role))
    report = MemoryReport(type(opt).__name__, not held, param_bytes,
                          rows=[(role, kind, count, size) for (role, kind), (count, size) in rows.items()])
    report.largest = sorted(per_param, key=lambda t: -t[0])[:top]
    report.global_bytes = sum(v.numel() * v.element_size() for v in _tensors(opt.global_state()))
    kinds = report.by_kind()
    for option, (governed, what) in opt.memory_options().items():
        size = sum(kinds.get(k, 0) for k in governed)
        if size:
            report.options.append((option, size, what))
    return report


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
