"""Conda (Wang et al. 2025): Adam in a one-sided singular basis of the momentum for hidden matrices, refreshed
every ``update_proj_gap`` steps; AdamW for the other parameters, in one optimizer."""

from __future__ import annotations

import math

import torch

from ..linalg import finite_flags, warn_eigh_failure
from ..roles import role_from_shape
from . import kernels
from ._base import WhitenOptimizer
from .checks import (check_betas, check_bool, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .update import (apply_all, cache_runs, commit_all, decays, ema_all, grad_in, second_moment_direction_kernel,
                     state_dtype, step_decay_after_kernel, stored_dtype, write)

__all__ = ["Conda"]

CONDA_ROLES = ("hidden", "conv", "experts")  # projected; every other role takes the AdamW path, as the authors' scripts do


def _matrix(p: torch.Tensor, group: dict) -> tuple[int, int] | None:
    """The (m, n) view a projected parameter is rotated in (a conv weight as (out, in·k·k)), or None: AdamW."""
    if p.ndim < 2 or (group["role"] or role_from_shape(p)) not in CONDA_ROLES:
        return None
    return p.shape[0], math.prod(p.shape[1:])


def _side(matrix: tuple[int, int]) -> str:
    """'std' projection: rotate the shorter side, with the right singular vectors when rows >= columns."""
    return "right" if matrix[0] >= matrix[1] else "left"


def _rotate(X: torch.Tensor, B: torch.Tensor, right: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Into the basis: ``X Bᵀ`` (right side) or ``Bᵀ X``, written into ``out`` when given."""
    return torch.mm(X, B.T, out=out) if right else torch.mm(B.T, X, out=out)


def _unrotate(X: torch.Tensor, B: torch.Tensor, right: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Back to the parameter's basis: ``X B`` (right side) or ``B X``."""
    if out is None:
        return X @ B if right else B @ X
    return torch.mm(X, B, out=out) if right else torch.mm(B, X, out=out)


def _add_by_alpha(xs: list[torch.Tensor], ys: list[torch.Tensor], alphas: list[float],
                  in_place: bool = True) -> list[torch.Tensor]:
    """``x.add_(y, alpha=a)`` for each triple (``in_place`` False: ``x + a·y`` into new tensors, the same bits): one
    ``_foreach_add`` per distinct alpha (it takes one alpha per call), so the launches follow the number of
    distinct step sizes, not of parameters. Returns the results (``xs`` themselves in place)."""
    by_alpha: dict[float, list[int]] = {}
    for i, a in enumerate(alphas):
        by_alpha.setdefault(a, []).append(i)
    out = list(xs)
    for a, idx in by_alpha.items():
        x, y = [xs[i] for i in idx], [ys[i] for i in idx]
        if in_place:
            torch._foreach_add_(x, y, alpha=a)
        else:
            for i, t in zip(idx, torch._foreach_add(x, y, alpha=a)):
                out[i] = t
    return out


class Conda(WhitenOptimizer):
    r"""Conda, with the update rule of the authors' code (jie040109/Conda, ``conda_torch/conda.py`` and
    ``projector.py``, projection type ``'std'``).

    For a hidden matrix :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G` (a conv weight is viewed as
    (out, in·k·k)), at step :math:`t` (from 0):

    .. math::
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        &\text{if } t \bmod T = 0:\ B = V^\top \ (m \ge n) \text{ or } U \ (m < n) \text{ of }
            M = U S V^\top \ (\text{float32 SVD, reduced}) \\
        \tilde G &= G B^\top \ \text{or}\ B^\top G, \qquad \tilde M = M B^\top \ \text{or}\ B^\top M, \qquad
        V \leftarrow \beta_2 V + (1-\beta_2) \tilde G^2 \\
        W &\leftarrow W - \eta \tfrac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}\, s\,
            \big(\tfrac{\tilde M}{\sqrt V + \epsilon}\big) B \ \text{or}\ B\big(\cdot\big), \qquad
        W \leftarrow W - \eta\lambda W

    :math:`B` is a full rotation of the shorter side (min(m, n) square, no rank truncation); :math:`V` lives in the
    rotated basis and is not rotated when B changes, as in the reference. Every other parameter (embeddings, head,
    vectors; any parameter with fewer than 2 dims) takes the same step without the projection and without
    :math:`s`: the reference's plain-Adam group of the same optimizer, with the same lr.

    Where whiten departs from the reference, and why:

    * **Checkpointable state.** The reference keeps a Python projector object in the state, which
      ``state_dict()`` cannot save as a tensor and ``torch.distributed.checkpoint`` cannot save at all; a resumed
      run also recomputes the basis at once. Here the basis is a tensor (``basis_left`` or ``basis_right``) and a
      resumed run continues exactly.
    * **M is kept in the rotated basis** (:math:`\tilde M`), moved into the new basis only at a refresh: two
      one-sided products per step instead of the reference's three, the same numbers in exact arithmetic.
    * The SVD runs in ``svd_dtype`` (float32, the reference's, by default; None: the state's dtype, e.g. float64
      for float64 parameters). A refresh whose SVD fails keeps the previous basis (counted in
      ``counters["eigh_failures"]``); moments that overflowed (one huge finite gradient) are restarted from zero at
      the next refresh (``counters["factor_restarts"]``).
    * Which parameters are projected comes from roles (``hidden`` and ``conv``; :func:`whiten.param_groups`), not
      from a group key: the reference projects the groups the training script marks (its scripts: the Linear
      layers of attention and MLP blocks, which the ``hidden`` role is). Conv weights are projected as matrices;
      the reference has no conv path.
    * Weight decay is off for the ``vector`` and ``embedding`` roles (the reference decays every parameter).
    * State is float32 for low-precision parameters (the reference keeps it, and the basis, in the parameter's
      dtype), and ``p.grad`` is never modified.

    ``pytorch_optimizer.Conda`` computes the same step with two differences: it refreshes the basis at its 1-based
    steps T, 2T, ... (the reference at 0-based steps T, 2T, ..., one step later), and it projects every 2-D
    parameter. Both agree until the first refresh after the initial one.

    State per parameter (float32; float64 for float64 parameters): ``step`` (int), ``exp_avg`` (shape of p; for a
    projected parameter in the rotated basis), ``exp_avg_sq`` (shape of p), and for a projected (m, n) parameter
    ``basis_right`` (n, n) when m >= n, else ``basis_left`` (m, m). Memory: 2 + min(m, n)²/(mn) times the
    parameters.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η (default 1e-3, the reference class's; its scripts use 0.01 for LLaMA, 6e-3 for GPT-2 125M).
        betas: (β1, β2) (default (0.9, 0.999); the scripts use (0.9, 0.99)).
        eps: ε outside the square root (default 1e-8). weight_decay: λ, decoupled, after the step (default 0).
        correct_bias: Adam's bias correction (default True).
        update_proj_gap: T, steps between basis refreshes (default 2000, every shipped script's).
        scale: s, multiplies the projected update (default 0.25, every shipped script's).
        svd_dtype: dtype of the refresh's SVD (default torch.float32; None: the state dtype).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`).
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): ``exp_avg`` and the basis stored in bfloat16, half their bytes; each step
            works on float32 copies, rounded once back. ``exp_avg_sq`` stays float32: with β2 = 0.999 its update
            (0.1% a step) is below bfloat16's rounding and would be lost. Set it before the first step.

    Reference: J. Wang et al., "Conda: Column-Normalized Adam for Training Large Language Models Faster",
    arXiv 2509.24218 (2025).
    """

    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    MEMORY_OPTIONS = {"state_dtype": (("exp_avg", "basis"), "torch.bfloat16 stores m and the basis in half the "
                                      "bytes (float32 arithmetic)")}  # see memory_report

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        update_proj_gap: int = 2000,
        scale: float = 0.25,
        svd_dtype: torch.dtype | None = torch.float32,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        state_dtype: torch.dtype | str | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, svd_dtype=svd_dtype, role=None,
                        state_dtype=state_dtype)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"])
        check_bool("correct_bias", group["correct_bias"])
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_range("scale", group["scale"], 0.0)
        dt = group["svd_dtype"]
        if dt is not None and dt not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid svd_dtype: {dt!r} (allowed: None, torch.float32 or torch.float64)")
        check_role(group["role"])
        state_dtype_option(group.get("state_dtype"))

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # every parameter is stepped on its own tensors: no stacks whose layout could change the bits

    def initial_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, group)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        dtype = stored_dtype(p, group)  # state_dtype: m and the basis in bfloat16
        # v stays in the state dtype: β2 = 0.999 adds 0.1% a step, under bfloat16's rounding (its updates are lost)
        state = {"step": 0, "exp_avg": torch.zeros(p.shape, dtype=dtype, device=p.device),
                 "exp_avg_sq": torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)}
        matrix = _matrix(p, group)
        if matrix is not None:
            side = _side(matrix)
            k = matrix[1] if side == "right" else matrix[0]
            state[f"basis_{side}"] = torch.eye(k, dtype=dtype, device=p.device)
        return state

    def needs_host_check(self, work) -> bool:
        """Steps with a basis due for a refresh decide on the host."""
        return any(self.state[p]["step"] % group["update_proj_gap"] == 0 for group, params in work for p in params)

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        gap = group["update_proj_gap"]
        states = []
        for p in params:
            if not self.state[p]:
                self.state[p] = self._init_state(p, group)
            states.append(self.state[p])
        due = [s for s in states if s["step"] % gap == 0]
        if due:  # moments overflowed by a huge gradient would stop the parameter for good: restart them
            for s, bad in zip(due, self.restart_nonfinite([s["exp_avg_sq"] for s in due])):
                if bad or not bool(torch.isfinite(s["exp_avg"]).all()):
                    s["exp_avg"].zero_()
                    s["exp_avg_sq"].zero_()
        # Each elementwise op runs once over the whole group (torch._foreach_*: one launch per op, not per
        # parameter), on a CPU once per run of parameters that fits in cache; only the per-matrix products and a due
        # refresh's SVD are per parameter.
        for run in cache_runs(params, compiled_chain=True):
            self._step_run(group, [params[i] for i in run], [states[i] for i in run])

    def _step_run(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        beta1, beta2 = group["betas"]
        gap = group["update_proj_gap"]
        lr = float(group["lr"])
        # state_dtype: float32 copies of the stored state, rounded once back at the end (the others: the state's own)
        # A sync-free step (its device-side flag ``ok``) computes each new value aside, over the whole list, and
        # commits it under the flag (eagerly one select per tensor; under compiled=True the select is fused into
        # the kernels that write): no copy of the state or of the parameters beforehand.
        ok = self._ok
        work = [s if s["exp_avg"].dtype == state_dtype(p) else
                {k: v.to(state_dtype(p)) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for p, s in zip(params, states)]
        ms, vs = [w["exp_avg"] for w in work], [w["exp_avg_sq"] for w in work]
        grads = [grad_in(p, m.dtype) for p, m in zip(params, ms)]
        matrices = [_matrix(p, group) for p in params]
        rotated = list(grads)  # the gradient in the basis the moments live in (the plain path: itself)
        ordinary = []  # whose momentum takes the ordinary update m <- β1 m + (1-β1) g̃
        for i, (p, w, matrix) in enumerate(zip(params, work, matrices)):
            if matrix is None:
                ordinary.append(i)
                continue
            right = _side(matrix) == "right"
            B = w["basis_right"] if right else w["basis_left"]
            G, M = grads[i].reshape(matrix), ms[i].view(matrix)
            if w["step"] % gap == 0:  # (a host-checked step: ok is None)
                # the momentum in the parameter's basis, updated; the new basis from its SVD; kept rotated
                full = _unrotate(M, B, right) if w["step"] > 0 else torch.zeros_like(M)
                full.mul_(beta1).add_(G, alpha=1 - beta1)
                self._refresh(B, full, "right" if right else "left", group["svd_dtype"])
                _rotate(full, B, right, out=M)
            else:
                ordinary.append(i)
            rotated[i] = _rotate(G, B, right).view(p.shape)
        if ordinary:  # (the new values: ms[i] itself, or under ok eagerly a new tensor, committed)
            new = ema_all([ms[i] for i in ordinary], [rotated[i] for i in ordinary], beta1, 1 - beta1, ok)
            for i, m in zip(ordinary, new):
                ms[i] = m
        if kernels.active(ms, vs, rotated):
            values = kernels.step_values([0.0, beta2, 1 - beta2, group["eps"]], ms[0].device)
            directions = list(second_moment_direction_kernel(ms, vs, rotated, values, ok))
        else:
            new_vs = apply_all("mul", vs, beta2, ok=ok)
            torch._foreach_addcmul_(new_vs, rotated, rotated, value=1 - beta2)
            commit_all(vs, new_vs, ok)
            denom = torch._foreach_sqrt(new_vs)
            torch._foreach_add_(denom, group["eps"])
            directions = list(torch._foreach_div(ms, denom))
        step_sizes, decay_rates = [], []
        for i, (p, w, matrix) in enumerate(zip(params, work, matrices)):
            w["step"] += 1
            t = w["step"]
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if group["correct_bias"] else lr
            if matrix is not None:  # back to the parameter's basis
                right = _side(matrix) == "right"
                B = w["basis_right"] if right else w["basis_left"]
                directions[i] = _unrotate(directions[i].view(matrix), B, right).view(p.shape)
                step_size *= group["scale"]
            step_sizes.append(step_size)
            decay_rates.append(lr * group["weight_decay"] if group["weight_decay"] > 0 and decays(p, group) else 0.0)
        # the reference's θ - lr·λ·θ after the step (not a multiplication by 1 - lr·λ)
        same = [i for i, p in enumerate(params) if p.dtype == ms[i].dtype]
        ps, ds = [params[i] for i in same], [directions[i] for i in same]
        if same and kernels.active(ps, ds):
            values = [step_sizes[i] for i in same] + [1.0 - decay_rates[i] for i in same]
            step_decay_after_kernel(ps, ds, kernels.step_values(values, ms[0].device), ok)
        elif same:
            new = _add_by_alpha(ps, ds, [-step_sizes[i] for i in same], in_place=ok is None)
            decayed = [j for j, i in enumerate(same) if decay_rates[i]]  # (new[j]: p itself, or a new tensor)
            kept = [new[j] for j in decayed]
            _add_by_alpha(kept, kept, [-decay_rates[same[j]] for j in decayed])
            commit_all(ps, new, ok)
        for i, p in enumerate(params):  # a low-precision parameter: in the state's dtype, rounded once
            if p.dtype != ms[i].dtype:
                def update(x, direction=directions[i], step_size=step_sizes[i], decay=decay_rates[i]):
                    x.add_(direction, alpha=-step_size)
                    if decay:
                        x.add_(x, alpha=-decay)

                write(p, ms[i].dtype, update, ok)
        olds, news = [], []
        for s, w in zip(states, work):
            if w is not s:
                keys = [k for k, value in w.items() if isinstance(value, torch.Tensor)]
                olds += [s[k] for k in keys]  # (a basis read only, and v: the state's own, skipped)
                news += [w[k] for k in keys]
                s.update((k, value) for k, value in w.items() if not isinstance(value, torch.Tensor))
        commit_all(olds, news, ok)  # in one call: one kernel under compiled=True

    def _refresh(self, B: torch.Tensor, M: torch.Tensor, side: str, svd_dtype) -> None:
        """B <- Vᵀ (side right) or U (side left) of the reduced SVD of M; on failure B is kept and counted."""
        try:
            U, _, Vh = torch.linalg.svd(M.to(svd_dtype or M.dtype), full_matrices=False)
            new = Vh if side == "right" else U
            ok = finite_flags([new])[0]
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            ok = False
        if ok:
            B.copy_(new)
        else:
            self.counters["eigh_failures"] += 1
            warn_eigh_failure(type(self).__name__, 1)
