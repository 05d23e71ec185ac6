"""Host syncs and dispatched ops of one ordinary step (no refresh due), for every whiten optimizer: what a GPU run
pays in queue stalls and kernel launches (issue 22). Counted on the CPU, where they are the same calls.

    python benchmarks/host_syncs.py                 # 4 and 16 blocks of Linear(32, 32) + LayerNorm(32)
    python benchmarks/host_syncs.py --blocks 4,16 --optimizers SPlus,Muon

A host sync is a read of a tensor's value in Python: ``item``, ``tolist``, ``bool``, ``float``, ``int`` (counted by
wrapping those methods of ``torch.Tensor`` while the step runs), plus any ``aten._local_scalar_dense`` they did not
cover, plus ``torch.tensor(data, device=...)`` (a copy of host data that synchronizes the stream on CUDA); ops are the aten ops dispatched inside ``step()``. Of those, kernels are the ops that launch work on a GPU (not
views, reshapes of metadata or allocations), and matmuls the kernels of matrix products and factorizations. The step
measured is the one after a refresh period (``inverse_every`` and its kin set to 1000, so the measured step refreshes
nothing).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import whiten
from whiten.optim import deferred, kernels

SYNC_OPS = {"aten._local_scalar_dense.default"}
NO_REFRESH = {"SPlus": dict(inverse_every=1000), "SOAP": dict(precondition_frequency=1000),
              "Shampoo": dict(precondition_frequency=1000), "PSGDKron": dict(preconditioner_update_probability=1e-6),
              "Conda": dict(update_proj_gap=1000), "TNT": dict(update_freq=1000, inverse_freq=1000),
              "KFAC": dict(factor_every=1000, inverse_every=1000), "EKFAC": dict(factor_every=1000, inverse_every=1000),
              "Sophia": dict(k=1000), "MFAC": dict(ngrads=8)}
NAMES = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "Muon", "SpecGD", "Scion", "Conda", "Prodigy", "ScheduleFreeAdamW",
         "TNT", "Sophia", "KFAC", "EKFAC", "MFAC"]


READS = ("item", "tolist", "__bool__", "__float__", "__int__")
# ops that launch no kernel beyond views: allocations and metadata changes
NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_",
             "resize_", "_local_scalar_dense"}
MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "mv", "addmv", "addmv_", "dot", "matmul", "vdot",
           "_linalg_eigh", "_linalg_svd", "linalg_cholesky_ex", "linalg_solve_triangular", "cholesky_solve",
           "_linalg_solve_ex", "linalg_qr", "_linalg_det"}


def is_kernel(func) -> bool:
    """Whether an aten op launches a kernel on a GPU: not a view, an in-place view or an allocation."""
    return not (func.is_view or torch.Tag.inplace_view in func.tags or func.overloadpacket.__name__ in NO_KERNEL)


def is_matmul(func) -> bool:
    return func.overloadpacket.__name__ in MATMULS


class Counts(NamedTuple):
    syncs: int  # Python reads of tensor values
    ops: int  # aten ops dispatched
    kernels: int  # of those, the ones that launch a kernel
    matmuls: int  # of those, matrix products and factorizations
    lagged: int = 0  # reads of a sync-free step's flags one step later, from host memory: not syncs
    compiled: int = 0  # calls of compiled kernels (compiled=True), each counted among the kernels


class Count(TorchDispatchMode):
    """Aten ops dispatched, and Python reads of tensor values, while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.kernels = Counter()
        self.matmuls = Counter()
        self.reads = 0
        self.lagged = 0
        self.compiled = 0
        self._quiet = False
        self._saved = {}

    def __enter__(self):
        for name in READS:
            real = self._saved[name] = getattr(torch.Tensor, name)

            def read(t, *a, _real=real, **k):
                self.reads += not self._quiet
                with torch._C.DisableTorchFunction():
                    return _real(t, *a, **k)
            setattr(torch.Tensor, name, read)
        # torch.tensor(data, device=...) copies host data to the device: on CUDA, from pageable memory, a copy that
        # synchronizes the stream (whiten.optim.update.host_values is the way without)
        real_tensor = self._real_tensor = torch.tensor

        def tensor(*a, **k):
            self.reads += k.get("device") is not None and not self._quiet
            return real_tensor(*a, **k)
        torch.tensor = tensor
        real_flags = self._real_flags = deferred.read_flags

        def read_flags(host):  # a pinned host copy on a GPU, its event waited for: counted apart
            self.lagged += 1
            self._quiet = True
            try:
                return real_flags(host)
            finally:
                self._quiet = False
        deferred.read_flags = read_flags
        # compiled=True: torch.compile runs under no dispatch mode, so a compiled kernel runs with the mode off and
        # counts as one kernel (one fused pass on a CPU; on a GPU inductor emits one or a few Triton kernels for it).
        # Its reads are not counted: inductor's CPU wrapper reads its float64 step values with item() (host memory);
        # on a GPU they are a device tensor that the kernel loads itself (scripts/gpu_issue22.sh checks it there)
        real_call = self._real_call = kernels.Kernel.__call__

        def call(kernel, *a, **k):
            self.compiled += 1
            self._quiet = True
            try:
                with torch.utils._python_dispatch._disable_current_modes():
                    return real_call(kernel, *a, **k)
            finally:
                self._quiet = False
        kernels.Kernel.__call__ = call
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        deferred.read_flags = self._real_flags
        torch.tensor = self._real_tensor
        kernels.Kernel.__call__ = self._real_call
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        if str(func) not in SYNC_OPS and is_kernel(func):
            self.kernels[str(func)] += 1
            if is_matmul(func):
                self.matmuls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def model(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(32, 32), nn.LayerNorm(32))])


def counts(name: str, blocks: int, accelerator: bool = False, sync_free: bool = False,
           compiled: bool = False) -> Counts:
    """Host syncs, ops, kernels and matmuls of one ordinary step. ``accelerator``: the finiteness check takes the path it
    takes on a GPU (``_foreach_norm``, one op per dtype) instead of the CPU's per-tensor sums, and the elementwise
    chains their one-run path (``update.CPU_PATHS``), so the ops are the launches a GPU would see."""
    if accelerator:
        import functools

        from whiten.optim import _base

        from whiten.optim import update

        real = _base.finite_flags
        _base.finite_flags = functools.partial(real, fused=True)
        update.CPU_PATHS = False  # one run, one launch per op, as on a GPU (the same numbers)
        try:
            return counts(name, blocks, sync_free=sync_free, compiled=compiled)
        finally:
            _base.finite_flags = real
            update.CPU_PATHS = True
    net = model(blocks)
    kw = dict(NO_REFRESH.get(name, {}))
    if name in ("KFAC", "EKFAC"):
        kw["model"] = net
    if sync_free:
        kw["sync_free"] = True
    if compiled:
        kw["compiled"] = True
    opt = getattr(whiten, name)(whiten.param_groups(net), **kw)
    x = torch.randn(8, 32)
    for t in range(3):  # state created, first refresh done
        opt.zero_grad()
        net(x).square().mean().backward()
        if t < 2:
            opt.step()
    with Count() as c:
        opt.step()
    # a read through item/bool/float/int also dispatches _local_scalar_dense: count each read once
    return Counts(c.reads, sum(n for op, n in c.ops.items() if op not in SYNC_OPS) + c.compiled,
                  sum(c.kernels.values()) + c.compiled, sum(c.matmuls.values()), c.lagged, c.compiled)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="4,16")
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--accelerator", action="store_true",
                    help="the finiteness check's GPU path (_foreach_norm) instead of the CPU's per-tensor sums")
    ap.add_argument("--sync-free", action="store_true",
                    help="the optimizers that have it, with sync_free=True (the check decided on the device)")
    ap.add_argument("--compiled", action="store_true",
                    help="compiled=True: each call of a compiled kernel counts as one kernel")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    print("| optimizer | " + " | ".join(f"syncs, {b} blocks | ops | kernels | of which matmuls" for b in blocks)
          + (f" | ops {blocks[-1]} / {blocks[0]} | other kernels {blocks[-1]} / {blocks[0]} |"
             if len(blocks) > 1 else " |"))
    print("|---|" + "---|---|---|---|" * len(blocks) + ("---|---|" if len(blocks) > 1 else ""))
    names = args.optimizers.split(",")
    if args.sync_free:
        names = [n for n in names if getattr(whiten, n).SYNC_FREE]
    for name in names:
        row = [counts(name, b, args.accelerator, args.sync_free, args.compiled) for b in blocks]
        ratio = (f" {row[-1].ops / row[0].ops:.2f} | {other(row[-1]) / other(row[0]):.2f} |"
                 if len(blocks) > 1 else "")
        print(f"| {name} | " + " | ".join(f"{c.syncs} | {c.ops} | {c.kernels} | {c.matmuls}" for c in row) + " |"
              + ratio)


def other(c: Counts) -> int:
    """Kernels other than matmuls: elementwise work and reductions, which ``_foreach`` and stacks can keep flat."""
    return c.kernels - c.matmuls


if __name__ == "__main__":
    main()
