"""M-FAC (Frantar, Kurtic, Alistarh 2021): the inverse of a damped empirical Fisher over a sliding window of the
last m gradients, applied to the gradient with the Woodbury identity, all parameters as one vector."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..distributed import all_reduce_flat

from ._base import WhitenOptimizer
from .checks import check_int, check_lr, check_range, check_role, check_weight_decay
from .stacks import bucket
from .update import decays, state_dtype, step_all

__all__ = ["MFAC"]


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: the driver's count; CPU: MemAvailable of /proc/meminfo), None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class _Entry(NamedTuple):
    pos: int  # position among all parameters (of every rank)
    group: dict
    q: torch.Tensor  # the tensor stepped (the local part of a DTensor)
    has_grad: bool


def _where(flags: list[bool], items: list) -> list:
    return [x for f, x in zip(flags, items) if f]


class MFAC(WhitenOptimizer):
    r"""M-FAC, the dynamic algorithm of the authors' optimizer (IST-DASLab/M-FAC, ``optim.py``), with its state in
    the optimizer so checkpoints resume exactly, on CPU and GPU.

    All parameters of all groups form one vector :math:`\theta \in \mathbb{R}^P`. The window holds the last
    :math:`m` gradients :math:`G = [g_1, \dots, g_m]^\top` (rows of zeros before m steps), and the step applies the
    inverse of the damped empirical Fisher :math:`F = \lambda I + \tfrac1m G^\top G`:

    .. math::
        g &= \nabla + \mu_{wd}\,\theta \ (\text{L2}), \qquad \text{the oldest row of } G \leftarrow g \\
        u &= F^{-1} g = \tfrac1\lambda\big(g - G^\top (m\lambda I + G G^\top)^{-1} G g\big)
           = m\, G^\top (m\lambda I + G G^\top)^{-1} e_{new} \\
        v &\leftarrow \beta v + (1-\beta) u \ \ (\text{momentum } \beta > 0;\ u \leftarrow v), \qquad
        \theta \leftarrow \theta - \eta u

    The last form holds because g is the window's newest row (:math:`g = G^\top e_{new}`); whiten computes it so:
    the reference's form subtracts two nearly equal vectors and divides by λ = 1e-5, which loses the small
    directions in float32. The m × m matrix :math:`K = G G^\top` is kept up to date one row per step (the new row is
    :math:`G g`, one product with the window) and :math:`m\lambda I + K` is factored by Cholesky in float64 (an
    eigendecomposition if rounding made it indefinite). The reference factors it by LU without pivoting, which
    torch does not implement on the CPU; the result is the same matrix product.

    **Memory: m × P numbers** (float32; float64 for float64 parameters), 1024 × the model with the default m:
    a 100M-parameter model needs 400 GB. The constructor raises a ValueError when the window does not fit in
    ``max_memory`` bytes (default: the device's free memory) on this process; lower ``ngrads``. In a distributed
    run each rank holds the window of the parameters it owns (about 1/N of it).

    **Distributed** (``process_group=`` or FSDP2): the window is split by parameter, each owner holding its
    parameters' columns of G (the reference's ``gpus=`` split the columns over devices the same way). The only
    global quantities are the new row of K, a sum over parameters of per-parameter products; each rank fills its
    parameters' entries of a (parameter tensors × m) table, one all-reduce fills the table everywhere (x + 0 is
    exact) and every rank sums it in the same order, so K, its factorization and the coefficients are the same on
    every rank, those of one process bit for bit. Each owner then forms its parameters' part of u. Communication
    per step: (number of parameter tensors) × m float64 numbers, however large the tensors are.

    Where whiten departs from the reference: a parameter without a gradient this step contributes zeros to the
    window's new row and is not moved (the reference requires every gradient); weight decay is off for the
    ``vector`` and ``embedding`` roles (as in every whiten optimizer; the reference adds it to every parameter) and
    may differ by group, as lr and momentum may; ``p.grad`` is never modified; no ``sparse=`` mode. K, its
    counter and the window's position travel in ``state_dict()["param_groups"][0]["mfac"]``.

    State per parameter: ``step`` (int), ``grads`` (m, numel) — the parameter's columns of the window — and
    ``momentum`` (shape of p) when the group's momentum is > 0. Global: K (m, m, float64) and the number of
    gradients taken.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η (default 1e-3). momentum: β of the EMA of the steps (default 0).
        weight_decay: added to the gradient as L2, λ_wd θ, before it enters the window (default 0).
        ngrads: m, the window's length (default 1024; the authors' experiments use 512 and 1024).
        damp: λ (default 1e-5).
        max_memory: bytes the window may take on this process (default None: the device's free memory).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the window over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the parameter update).

    Reference: E. Frantar, E. Kurtic, D. Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021.
    """

    MEMORY_OPTIONS = {"ngrads": (("grads",), "the window holds ngrads past gradients of every parameter")}  # see memory_report
    STEPS_EXPERTS = False  # one vector of all parameters: an experts tensor is its part of it, as any tensor
    # No sync_free (SYNC_FREE stays False): the Cholesky's success could stay on the device (cholesky_ex and a
    # torch.where), but its fallback is an eigendecomposition, whose torch.linalg.eigh checks its result on the host
    # on CUDA; computing both at every step would still sync and add an m x m eigh (m = 1024 by default) to every
    # step. (The window's position is a Python counter: no read.)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damp: float = 1e-5,
        max_memory: int | None = None,
        nonfinite: str = "skip",
        process_group=None,
        compiled: bool = False,
    ):
        check_int("ngrads", ngrads, 1)
        check_range("damp", damp, 0.0, low_open=True)
        if max_memory is not None:
            check_int("max_memory", max_memory, 0)
        self.ngrads, self.damp, self.max_memory = ngrads, float(damp), max_memory
        self._gram: torch.Tensor | None = None  # K = G Gᵀ, float64, the same on every rank
        self._count = 0  # gradients taken; the newest row of the window is _count % ngrads
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, role=None)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, compiled=compiled)
        self._constructed = True
        self.check_memory()

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_role(group["role"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_constructed", False):
            try:
                self.check_memory()
            except ValueError:
                self.param_groups.pop()
                raise

    # ----- memory -------------------------------------------------------------------------------------------------
    def window_bytes(self) -> int:
        """Bytes of the gradient window on this process: m × (the parameters it owns) × the state's element size."""
        ctx = self.distributed_context() if self.param_groups else None
        total = 0
        for g in self.param_groups:
            for p in g["params"]:
                if ctx is None or ctx.owns(p):
                    total += p.numel() * torch.empty(0, dtype=state_dtype(p)).element_size()
        return total * self.ngrads

    def check_memory(self) -> None:
        """Raise a ValueError, before anything is allocated, when the window cannot fit (see ``max_memory``)."""
        need = self.window_bytes()
        if need == 0:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        limit, what = self.max_memory, "max_memory"
        if limit is None:
            device = self._device()
            limit, what = _available_bytes(device), f"the free memory of {device}"
            if limit is None:
                return
        if need > limit:
            count = sum(p.numel() for p in params)
            raise ValueError(
                f"MFAC: the window of ngrads={self.ngrads} gradients needs {_gib(need)} on this process "
                f"(ngrads x {count:,} parameters x bytes per number), more than {what} ({_gib(limit)}). "
                "Lower ngrads, optimize fewer parameters with M-FAC, or split the window over ranks "
                "(process_group=)."
            )

    def check_state_memory(self) -> None:
        pass  # the window is m times the model by design; stated up front and checked by check_memory()

    # ----- distribution ---------------------------------------------------------------------------------------------
    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        return float(p.numel())  # two products with the parameter's (m, numel) columns of the window

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # no stacks: each parameter's products run on its own tensors

    # ----- state ----------------------------------------------------------------------------------------------------
    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": None, "grads": (self.ngrads, p.numel())}
        if group["momentum"] > 0:
            state["momentum"] = tuple(p.shape)
        return state

    def _gram_on(self, device: torch.device) -> torch.Tensor:
        if self._gram is None:
            self._gram = torch.zeros(self.ngrads, self.ngrads, dtype=torch.float64, device=device)
        elif self._gram.device != device:
            self._gram = self._gram.to(device)
        return self._gram

    # ----- the step -----------------------------------------------------------------------------------------------
    def apply_step(self, work) -> None:
        ctx = self._dist[1] if self._dist is not None else None
        m, slot = self.ngrads, self._count % self.ngrads
        # Every parameter this process steps, with or without a gradient: one without writes zeros into its
        # columns of the new row (the window moves for the whole vector).
        entries = []
        pos = 0
        for group in self.param_groups:
            for p in group["params"]:
                if ctx is None or ctx.owns(p):
                    q = ctx.view(p) if ctx is not None else p
                    if q.numel() > 0 and (q.grad is not None or self.state.get(q)):
                        entries.append(_Entry(pos, group, q, q.grad is not None))
                pos += 1
        device = self._device()
        gram = self._gram_on(device)
        for e in entries:
            if not self.state[e.q]:
                self.state[e.q].update(step=0, grads=torch.zeros(m, e.q.numel(), dtype=state_dtype(e.q),
                                                                 device=e.q.device))
        # The elementwise work runs as _foreach ops over the parameters whose windows share a dtype (one launch per
        # op, whatever the number of parameters); the products with each window stay one per parameter.
        zero = torch.zeros(m, dtype=torch.float64, device=device)
        rows = [zero] * pos  # the rows of a (parameter tensors × m) table; zeros for those not stepped here
        for dtype, part in bucket(entries, lambda e: self.state[e.q]["grads"].dtype).items():
            windows = [self.state[e.q]["grads"] for e in part]
            news = [w[slot] for w in windows]
            with_grad = [e.has_grad for e in part]
            if any(with_grad):
                torch._foreach_copy_(_where(with_grad, news), [e.q.grad.reshape(-1) for e in part if e.has_grad])
            if not all(with_grad):
                torch._foreach_zero_(_where([not h for h in with_grad], news))
            decayed = [i for i, e in enumerate(part) if e.has_grad and decays(e.q, e.group)]
            for wd, members in bucket(decayed, lambda i: part[i].group["weight_decay"]).items():
                if wd != 0:  # L2, as the reference
                    torch._foreach_add_([news[i] for i in members],
                                        [part[i].q.reshape(-1).to(dtype) for i in members], alpha=wd)
            # each parameter's part of the new row of K, G g; scaled so that one huge finite gradient does not
            # overflow the float32 products (its square does)
            tops = torch.stack(torch._foreach_norm(news, float("inf")))
            tops = torch.where(tops > 0, tops, torch.ones_like(tops))
            scaled = torch._foreach_div(news, list(tops.unbind()))
            products = torch.stack([w @ g for w, g in zip(windows, scaled)])
            for e, row in zip(part, (products.to(torch.float64) * tops.to(torch.float64).unsqueeze(1)).unbind()):
                rows[e.pos] = row
        rows = torch.stack(rows) if rows else zero[:0].view(0, m)
        if ctx is not None:
            rows = all_reduce_flat([rows], ctx.group)[0].to(device)
        row = rows.sum(0)  # in parameter order: the same bits on every rank and on one process
        gram[slot] = row
        gram[:, slot] = row
        w = self._solve(gram, slot)  # (mλI + K)⁻¹ e_new
        top = w.abs().amax()
        top = torch.where(top > 0, top, torch.ones_like(top))
        coef = w / top
        scale = top * m  # u = m Gᵀ w = (Gᵀ (w / top)) · (m · top), in the window's dtype without underflow
        for dtype, part in bucket([e for e in entries if e.has_grad], lambda e: self.state[e.q]["grads"].dtype).items():
            coef_d, scale_d = coef.to(dtype), scale.to(dtype)
            us = [(coef_d @ self.state[e.q]["grads"]).view(e.q.shape) for e in part]
            torch._foreach_mul_(us, scale_d)
            for _, members in bucket(list(range(len(part))), lambda i: id(part[i].group)).items():
                group, qs, updates = part[members[0]].group, [part[i].q for i in members], [us[i] for i in members]
                for q in qs:
                    self.state[q]["step"] += 1
                mu = group["momentum"]
                if mu > 0:
                    for q in qs:
                        if "momentum" not in self.state[q]:  # momentum raised from 0 by a scheduler
                            self.state[q]["momentum"] = torch.zeros(q.shape, dtype=dtype, device=q.device)
                    moms = [self.state[q]["momentum"] for q in qs]
                    torch._foreach_mul_(moms, mu)
                    torch._foreach_add_(moms, updates, alpha=1 - mu)
                    updates = moms
                step_all(qs, [dtype] * len(qs), updates, [1.0] * len(qs), alpha=-float(group["lr"]))
        self._count += 1

    def _solve(self, gram: torch.Tensor, slot: int) -> torch.Tensor:
        """(mλI + K)⁻¹ e_slot in float64: Cholesky, or, where rounding made the matrix indefinite, an
        eigendecomposition with K's eigenvalues clamped at 0 (K = G Gᵀ is positive semi-definite)."""
        m = gram.shape[0]
        shift = m * self.damp
        e = torch.zeros(m, 1, dtype=gram.dtype, device=gram.device)
        e[slot] = 1.0
        A = gram.clone()
        A.diagonal().add_(shift)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(e, L).squeeze(1)
        vals, vecs = torch.linalg.eigh(gram)
        return vecs @ (vecs[slot] / (vals.clamp_min(0) + shift))

    # ----- checkpoints and pickling -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        """Where K lives: the device of the first parameter (its local shard's for a DTensor)."""
        for g in self.param_groups:
            for p in g["params"]:
                return _local(p).device
        return torch.device("cpu")

    # ----- checkpoints and copies (whiten.optim.checkpoints) ----------------------------------------------------------
    GLOBAL_STATE_KEYS = ("mfac",)
    PICKLED = {"ngrads": 1024, "damp": 1e-5, "max_memory": None, "_constructed": True}

    def global_state(self) -> dict:
        return {**super().global_state(), "mfac": {"gram": self._gram_on(self._device()), "count": self._count}}

    def check_global_state(self, saved: dict, state_dict: dict) -> None:
        super().check_global_state(saved, state_dict)
        saved = saved.get("mfac")
        has_state = any(entry for entry in state_dict["state"].values())
        if saved is None:
            if has_state:
                raise ValueError("MFAC.load_state_dict: the checkpoint has window state but no 'mfac' entry (K and "
                                 "the window's position) in its first param group")
            return
        gram, count = saved.get("gram") if isinstance(saved, dict) else None, saved.get("count")
        if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (self.ngrads, self.ngrads):
            got = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ValueError(f"MFAC.load_state_dict: the checkpoint's K is {got}, expected ({self.ngrads}, "
                             f"{self.ngrads}) for ngrads={self.ngrads} (saved with another ngrads?)")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError("MFAC.load_state_dict: the checkpoint's K is not finite")
        if isinstance(count, torch.Tensor):
            count = count.item()
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"MFAC.load_state_dict: the checkpoint's gradient count is {count!r} (allowed: an "
                             "integer >= 0)")

    def load_global_state(self, saved: dict) -> None:
        super().load_global_state(saved)
        saved = saved.get("mfac")
        if saved is not None:
            self._gram = saved["gram"].detach().to(device=self._device(), dtype=torch.float64, copy=True)
            count = saved["count"]
            self._count = int(count.item() if isinstance(count, torch.Tensor) else count)

    def reset_transient(self) -> None:
        super().reset_transient()
        self.__dict__.setdefault("_gram", None)  # a copy's come with its optimizer-wide state
        self.__dict__.setdefault("_count", 0)
