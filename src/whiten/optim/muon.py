"""Muon (Jordan et al. 2024): momentum orthogonalised by Newton–Schulz for hidden matrices, AdamW for the rest,
in one optimizer."""

from __future__ import annotations

import math

import torch

from ..averaging import AveragingMixin
from ..linalg import matrix_view, newton_schulz, ns_schedule
from ..roles import role_from_shape
from ._base import WhitenOptimizer
from .checks import (check_bool, check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .stacks import bucket
from .update import commit, decays, grad_in, lerp_all, state_dtype, step_all, stored_dtype
from .adamw_path import AdamWPath, adamw_step, check_adamw_path

__all__ = ["Muon", "OrthogonalMomentum"]

MUON_ROLES = ("hidden", "conv", "experts")  # roles stepped by Newton–Schulz; every other role is stepped by AdamW
SCALINGS = ("original", "match_rms_adamw", "none")


def _uses_muon(p: torch.Tensor, role: str | None) -> bool:
    return p.ndim >= 2 and (role or role_from_shape(p)) in MUON_ROLES


def check_batch_dims(group: dict) -> None:
    """``batch_dims`` is an integer >= 0 and every matrix parameter of the group has 2 dims beyond it."""
    check_int("batch_dims", group["batch_dims"], 0)
    bd = group["batch_dims"]
    for i, p in enumerate(group["params"]):
        if bd and isinstance(p, torch.Tensor) and _uses_muon(p, group.get("role")) and p.ndim < bd + 2:
            raise ValueError(f"Invalid batch_dims: {bd} leading dims leave parameter {i} of the group (shape "
                             f"{tuple(p.shape)}) no matrix (it needs at least {bd + 2} dims)")


def _matrices(p: torch.Tensor, group: dict) -> tuple[tuple[int, ...], int, int]:
    """(stack dims, m, n) of a parameter of a group with ``batch_dims`` > 0; ((), 0, 0) otherwise."""
    bd = group.get("batch_dims", 0)
    if not bd or p.ndim < bd + 2:
        return (), 0, 0
    return matrix_view(p.shape, bd)


def _plain(coefficients):
    """A schedule as stored in param groups: a name as is, triples as tuples (lists from a config file too)."""
    if isinstance(coefficients, (tuple, list)) and coefficients and isinstance(coefficients[0], (tuple, list)):
        return tuple(tuple(t) for t in coefficients)
    return tuple(coefficients) if isinstance(coefficients, list) else coefficients


def _scale(m: int, n: int, scaling: str) -> float:
    """Multiplier of lr for an (m, n) = (d_out, d_in·k·k) update."""
    if scaling == "original":  # Keller Jordan's Muon and torch.optim.Muon's default
        return math.sqrt(max(1.0, m / n))
    if scaling == "match_rms_adamw":  # Moonlight: an update RMS like AdamW's, so AdamW's lr and decay carry over
        return 0.2 * math.sqrt(max(m, n))
    return 1.0


class OrthogonalMomentum(AdamWPath, AveragingMixin, WhitenOptimizer):
    """What Muon and SpecGD share: momentum (Nesterov or not) of hidden matrices, orthogonalised in stacks of
    same-shape matrices and scaled, decoupled decay, and AdamW (:class:`whiten.optim.adamw_path.AdamWPath`) for every
    other parameter. Subclasses define ``_orthogonalize(X, group)`` (the orthogonalised directions of a (B, m, n)
    stack it may overwrite) and ``_lr_multiplier(m, n, group)``, their constructor's options and their checks
    (calling this class's :meth:`validate_group`)."""

    SECOND_MOMENT_KEY = "exp_avg_sq"  # restarted where it overflowed (WhitenOptimizer.restart_overflowed_moments)

    def uses_own_rule(self, p: torch.Tensor, role: str | None) -> bool:
        return _uses_muon(p, role)

    def elementwise(self, p: torch.Tensor, group: dict) -> bool:
        return not _uses_muon(p, group["role"])  # the AdamW path (and its average): stepped where it lies

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_bool("nesterov", group["nesterov"])
        check_batch_dims(group)
        check_weight_decay(group["weight_decay"])
        check_adamw_path(group)
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])
        state_dtype_option(group.get("state_dtype"))

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        lead, m, n = _matrices(p, group)
        return float(math.prod(lead) * m * n * (m + n) + p.numel()) if lead else super().work_cost(p, group)

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        lead, m, n = _matrices(p, group)  # a stack's members are its matrices: their sizes decide the alignment
        return all(size % 16 == 0 for size in (m * n, m * m, n * n)) if lead else super().stack_invariant(p, group)

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        keys = ("momentum",) if _uses_muon(p, group["role"]) else ("exp_avg", "exp_avg_sq")
        return {"step": None, **{k: tuple(p.shape) for k in keys}}

    def stored_dtypes(self, p: torch.Tensor, group: dict) -> dict:
        stored = stored_dtype(p, group)
        return {"momentum": stored} if stored != state_dtype(p) and _uses_muon(p, group["role"]) else {}

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                dtype = state_dtype(p)
                state["step"] = 0
                if _uses_muon(p, group["role"]):  # state_dtype (Muon): the momentum stored in bfloat16
                    state["momentum"] = torch.zeros(p.shape, dtype=stored_dtype(p, group), device=p.device)
                else:
                    state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["step"] += 1
        self.update_averages(group, params, [self.state[p] for p in params])
        muon = [p for p in params if "momentum" in self.state[p]]
        adam = [p for p in params if "exp_avg" in self.state[p]]
        if muon:
            self._muon(gi, group, muon)
        if adam:
            adamw_step(group, adam, [self.state[p] for p in adam], self._ok)

    def _muon(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        mu, lr = group["momentum"], float(group["lr"]) * group["lr_scale"]
        moms = [self.state[p]["momentum"] for p in params]
        work = [state_dtype(p) for p in params]  # the arithmetic's dtype
        grads = [grad_in(p, d) for p, d in zip(params, work)]
        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it
        if all(m.dtype == d for m, d in zip(moms, work)):
            lerp_all(moms, grads, 1.0 - mu, ok)
        else:  # state_dtype: the bfloat16 momentum cast up, updated, rounded once; the step reads the stored value
            for m, g, d in zip(moms, grads, work):
                commit(m, m.to(d).lerp_(g, 1.0 - mu), ok)
            moms = [m.to(d) for m, d in zip(moms, work)]
        # conv weights as (out, in·k·k); with batch_dims, a stack of such matrices (the experts of an MoE layer)
        views = [matrix_view(p.shape, group["batch_dims"]) for p in params]
        counts = [math.prod(lead) for lead, _, _ in views]
        shapes = [(m, n) for _, m, n in views]
        key = (lambda i: (shapes[i], moms[i].dtype, moms[i].device)) if self.batched else (lambda i: i)
        for idxs in bucket(range(len(params)), key).values():
            # The direction is built in the stack Newton–Schulz works in, a launch per op for the whole bucket;
            # Nesterov's is (1-mu) g + mu B (g copied into the stack, then lerped in place), so p.grad stays the
            # user's.
            m, n = shapes[idxs[0]]
            starts = [0]
            for i in idxs:
                starts.append(starts[-1] + counts[i])
            X = torch.cat([(grads[i] if group["nesterov"] else moms[i]).reshape(-1, m, n) for i in idxs])
            if group["nesterov"]:
                rows = [X[starts[j]:starts[j + 1]] for j in range(len(idxs))]
                torch._foreach_lerp_(rows, [moms[i].reshape(r.shape) for i, r in zip(idxs, rows)], mu)
            # in ns_dtype; the step's dtype lets one fused add take the bucket (widening from bfloat16 is exact: the
            # same numbers as add_ promoting the direction, as torch.optim.Muon)
            O = self._orthogonalize(X, group).to(X.dtype)
            if group.get("transposed"):  # stored (in, out) (Conv1D); NS commutes with the transpose, the scale not
                m, n = n, m
            step = -lr * self._lr_multiplier(m, n, group)
            ps = [params[i] for i in idxs]
            step_all(ps, [moms[i].dtype for i in idxs],
                     [O[starts[j]:starts[j + 1]].view(p.shape) for j, p in enumerate(ps)],
                     [1.0 - lr * group["weight_decay"] * decays(p, group) for p in ps], alpha=step, ok=ok)

class Muon(OrthogonalMomentum):
    r"""Muon for hidden matrices and AdamW for every other parameter, in one torch optimizer.

    For a hidden matrix :math:`W \in \mathbb{R}^{m \times n}` (a conv weight is viewed as (out, in·k·k)) with gradient
    :math:`G`:

    .. math::
        B &\leftarrow \mu B + (1-\mu) G, \qquad \tilde B = (1-\mu) G + \mu B \ \text{(Nesterov) or } B \\
        O &= \mathrm{NS}_k(\tilde B) \approx U V^\top \quad (\tilde B = U S V^\top) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(m, n)\, O

    with :math:`s = \sqrt{\max(1, m/n)}` (``scaling="original"``), :math:`0.2\sqrt{\max(m, n)}`
    (``"match_rms_adamw"``) or 1 (``"none"``). :math:`\mathrm{NS}_k` is ``ns_steps`` Newton–Schulz iterations with
    Keller Jordan's quintic coefficients (or the schedule ``ns_coefficients`` names), in ``ns_dtype``. Same-shape
    matrices are orthogonalised as one batch. A group with ``"transposed": True`` (from :func:`whiten.param_groups`
    for Hugging Face's Conv1D, which stores (in, out)) takes :math:`s` of the real (out, in) shape.

    Parameters whose role is ``embedding``, ``head`` or ``vector`` (or, without a role, that are not ≥2-D) are
    stepped by AdamW (decoupled decay, bias correction) with β1 = the group's ``momentum``, β2 =
    ``adam_betas[1]`` and ``adam_eps``. A group without a role that mixes both kinds (e.g. ``model.parameters()``)
    is split into a Muon group and an AdamW group.

    Every group steps with ``lr × lr_scale`` (``lr_scale`` defaults to 1). A group whose parameters all go to AdamW
    and that sets no ``lr`` of its own keeps the shared ``lr`` and gets ``lr_scale = adam_lr / lr``, and, unless it
    sets ``momentum``, ``momentum = adam_betas[0]``. So every group carries the same ``lr`` and ``momentum`` keys:
    a loop that writes one lr into every group (nanoGPT's ``g['lr'] = lr``) keeps AdamW's ratio to Muon, and
    ``OneCycleLR(cycle_momentum=True)`` cycles Muon's μ and AdamW's β1 alike. Weight decay is off for the
    ``vector`` and ``embedding`` roles. ``p.grad`` is never modified.

    State per parameter (float32, float64 for float64 parameters): Muon path ``step`` (int), ``momentum`` (shape of
    p); AdamW path ``step``, ``exp_avg``, ``exp_avg_sq`` (shape of p); ``ema`` when averaging.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η for Muon matrices (default 0.02, Keller Jordan's).
        momentum: μ (default 0.95). nesterov: Nesterov momentum (default True).
        ns_steps: Newton–Schulz iterations (default 5).
        ns_coefficients: the Newton–Schulz schedule (see :func:`whiten.linalg.ns_schedule`): ``"jordan"``
            (default: Keller Jordan's quintic (3.4445, -4.7750, 2.0315) at every iteration), ``"polar_express"``
            (the per-iteration polynomials of Polar Express, arXiv 2505.16932, with its 1.01 safety scaling;
            closer to U Vᵀ at the same cost), ``"cubic"`` (the convergent (1.5, -0.5, 0): U Vᵀ in the limit, slowly),
            one triple (a, b, c), or a sequence of triples, one per iteration. docs/orthogonalization.md has the
            error of each against the SVD.
        eps: guards the Frobenius normalisation before Newton–Schulz (default 1e-7).
        weight_decay: λ, decoupled, ``W *= 1 - η λ`` for both paths (default 0.0).
        scaling: ``"original"`` (default), ``"match_rms_adamw"`` or ``"none"``.
        ns_dtype: dtype of the Newton–Schulz iteration; None (default) = bfloat16 on CUDA, the state dtype
            elsewhere (float32; float64 for float64 parameters), the more accurate choice. bfloat16 is what
            torch.optim.Muon always uses; on a CPU with bfloat16 matrix units it is faster (2.2x on the
            AVX512-BF16 CPU of docs/performance.md; on CPUs without native bfloat16 it is many times slower),
            so pass ``ns_dtype=torch.bfloat16`` there for speed.
        adam_lr: lr of groups stepped by AdamW that do not set their own (default 3e-4), applied as
            ``lr_scale = adam_lr / lr`` so that it follows the schedule of ``lr``.
        adam_betas, adam_eps: AdamW's (default (0.9, 0.95), 1e-10, as Keller Jordan's Muon); ``adam_betas[0]``
            becomes the ``momentum`` of groups stepped by AdamW.
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the AdamW path and the update).
        batched: orthogonalise same-shape matrices in one batched call (default True).
        batch_dims: the number of leading dims that index a stack of matrices (default 0): a group of mixture-of-
            experts weights (E, out, in) with ``batch_dims=1`` orthogonalises E (out, in) matrices, each with the
            scale of (out, in), instead of one (E, out·in) matrix.
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): the storage of the Muon path's ``momentum``, half the bytes; the update is
            computed in float32 and rounded once into it (μ = 0.95 adds 5% of G - B a step, well above bfloat16's
            2^-9). The AdamW path's moments stay float32. Set it before the first step.

    References: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024); J. Liu et al.,
    "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """

    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    MEMORY_OPTIONS = {"state_dtype": (("momentum",), "torch.bfloat16 stores the matrices' momentum in half the "
                                      "bytes (float32 arithmetic)")}  # see memory_report

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: str | tuple = "jordan",
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        scaling: str = "original",
        ns_dtype: torch.dtype | None = None,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        ema_rate: float | None = None,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        batched: bool = True,
        batch_dims: int = 0,
        state_dtype: torch.dtype | str | None = None,
    ):
        check_lr("adam_lr", adam_lr)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, batch_dims=batch_dims,
                        ns_coefficients=_plain(ns_coefficients), eps=eps, weight_decay=weight_decay, scaling=scaling,
                        ns_dtype=ns_dtype, adam_lr=adam_lr, adam_betas=adam_betas, adam_eps=adam_eps,
                        ema_rate=ema_rate, role=None, lr_scale=1.0, state_dtype=state_dtype)
        self.batched = bool(batched)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)


    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_int("ns_steps", group["ns_steps"], 0)
        ns_schedule(group["ns_coefficients"], "ns_coefficients")
        check_range("eps", group["eps"], 0.0, low_open=True)
        if group["scaling"] not in SCALINGS:
            raise ValueError(f"Invalid scaling: {group['scaling']!r} (allowed: {', '.join(map(repr, SCALINGS))})")
        if group["ns_dtype"] is not None and not (isinstance(group["ns_dtype"], torch.dtype)
                                                  and group["ns_dtype"].is_floating_point):
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (allowed: None or a floating torch.dtype)")

    def _orthogonalize(self, X: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised directions of a (B, m, n) stack that this call may overwrite."""
        dtype = group["ns_dtype"] or (torch.bfloat16 if X.device.type == "cuda" else X.dtype)
        return newton_schulz(X, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype, overwrite=True)

    def _lr_multiplier(self, m: int, n: int, group: dict) -> float:
        return _scale(m, n, group["scaling"])
