"""PSGD-Kron (Li 2015/2018; the ``kron_torch`` formulation): momentum preconditioned by a Kronecker product of
triangular (or diagonal) factors fitted online from random probes, with a deterministic update schedule."""

from __future__ import annotations

import math
import random
import warnings
from typing import Callable, NamedTuple

import torch

from ..averaging import AveragingMixin
from ..kron_kernels import (UpdateProbabilitySchedule, balance_factors_, clip_rms_, fit_factors_, per_slice,
                            precond_update_prob_schedule, precondition, update_due)
from ._base import WhitenOptimizer
from .checks import (check_bool, check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .stacks import bucket
from .update import add_all, commit, decays, ema_all, host_values, state_dtype, stored_dtype, write

__all__ = ["PSGDKron", "UpdateProbabilitySchedule", "precond_update_prob_schedule"]

MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")
BALANCE_PROBABILITY = 0.01  # factors are rebalanced on about 1 in 100 preconditioner updates
MAX_UPDATE_RMS = 1.1


# ----- layout ---------------------------------------------------------------------------------------------------


class _Layout(NamedTuple):
    """How one parameter is treated, derived from its shape and its group (never stored)."""

    shape: tuple[int, ...]  # the shape the preconditioner sees (merged dims; a scalar is (1,))
    triangular: tuple[bool, ...]  # per dim of `shape`: triangular factor (else diagonal)
    decay: bool  # weight decay applies


def _work_shape(shape: tuple[int, ...], merge_dims: bool) -> tuple[int, ...]:
    if len(shape) == 0:
        return (1,)
    if len(shape) > 2 and merge_dims:
        # kron_torch's choice between the two matrix views, signed differences included
        s1 = (math.prod(shape[:-1]), shape[-1])
        s2 = (shape[0], math.prod(shape[1:]))
        return s1 if s1[1] - s1[0] <= s2[1] - s2[0] else s2
    return tuple(shape)


def _triangular_dims(shape: tuple[int, ...], max_size: int, min_ndim: int, mode) -> tuple[bool, ...]:
    n = len(shape)
    diag = [mode == "all_diag"] * n
    if mode in ("one_diag", "smart_one_diag") and n > 0:
        # the largest dim, ties going to the last one (numpy's argsort(shape)[::-1][0] in kron_torch)
        largest = max(range(n), key=lambda i: (shape[i], i))
        ordered = sorted(shape)
        if mode == "one_diag" or (n > 1 and ordered[-1] > ordered[-2]):
            diag[largest] = True
    return tuple(not (d == 1 or d > max_size or n < min_ndim or diag[i]) for i, d in enumerate(shape))


def _layout(p: torch.Tensor, group: dict) -> _Layout:
    shape = _work_shape(tuple(p.shape), group["merge_dims"])
    tri = _triangular_dims(shape, group["max_size_triangular"], group["min_ndim_triangular"],
                           group["memory_save_mode"])
    return _Layout(shape, tri, decays(p, group))


# ----- the optimizer --------------------------------------------------------------------------------------------


class PSGDKron(AveragingMixin, WhitenOptimizer):
    r"""PSGD with Kronecker-factored preconditioners, as ``kron_torch.Kron`` (0.3.3) computes it.

    For a parameter θ seen as a tensor of shape :math:`(d_1, \dots, d_n)` (``merge_dims``: a ≥3-D tensor is first
    viewed as the squarer of ``(∏d_{<n}, d_n)`` and ``(d_1, ∏d_{>1})``), the preconditioner is
    :math:`P = \bigotimes_k Q_k^\top Q_k` with each :math:`Q_k` upper triangular (:math:`d_k \times d_k`) or
    diagonal. At step :math:`t` with gradient :math:`G`:

    .. math::
        M &\leftarrow \beta_1 M + (1-\beta_1) G, \qquad \hat M = M / (1-\beta_1^t) \\
        &\text{on update steps: } V \sim \mathcal N(0, I),\;
            \hat M \leftarrow \hat M + \sqrt{\epsilon_{32}}\,\overline{|\hat M|}\, V, \quad
            A = \hat M \times_k Q_k, \quad B = V \times_k Q_k^{-\top} \\
        &\qquad Q_k \leftarrow Q_k - \eta_Q \frac{\mathrm{triu}(A_{(k)}A_{(k)}^\top - B_{(k)}B_{(k)}^\top)}
            {\mathrm{lb}\,\|A_{(k)}A_{(k)}^\top + B_{(k)}B_{(k)}^\top\|_2}\, Q_k
            \quad\text{(diagonal: } \eta_Q\,(a - b)\,Q_k / \max|a + b| \text{)} \\
        U &= P \hat M, \qquad U \leftarrow U \cdot \min(1, 1.1/\mathrm{RMS}(U)) \\
        \bar\theta &\leftarrow r\,\bar\theta + (1-r)\,\theta \qquad\text{(pre-update } \theta\text{, if averaging)} \\
        \theta &\leftarrow \theta - \eta\,(U + \lambda\,\theta)

    ``lb`` is a cheap lower bound of the spectral norm (the column of largest norm, one power-iteration step).
    With ``momentum_into_precond_update=False`` the probe is the gradient instead of :math:`\hat M` (and the
    damping does not touch :math:`\hat M`). On about 1 in 100 update steps the factors of each ≥2-D parameter are
    first rescaled to a common max-abs (``balancing``; :math:`P` is unchanged). A dim is diagonal if it has size 1,
    exceeds ``max_size_triangular``, the tensor has fewer than ``min_ndim_triangular`` dims (so all 1-D
    parameters), or ``memory_save_mode`` says so. Scalars are treated as 1-element vectors.

    **Update schedule.** Factors are updated on the same steps for all parameters, deterministically: a counter
    counts steps and triggers an update when ``counter >= 1/prob`` (then resets), ``prob`` being
    ``preconditioner_update_probability``. The default schedule is 1.0 for 500 steps, then
    ``clamp(exp(-0.001 (n - 500)), 0.03, 1)`` (see :func:`precond_update_prob_schedule`).

    **Randomness and exact resume.** The probes V come from a ``torch.Generator`` per device, seeded with ``seed``
    and drawn parameter by parameter in group and parameter order (the same numbers whatever ``batched``); the
    balancing coin is a ``random.Random(seed)`` drawn once per step. The global RNG is never used.
    ``state_dict()["psgd_kron"]`` holds the generator states, the coin state and the schedule counters, so a run
    resumed from a checkpoint draws the same probes and makes the same decisions as the uninterrupted one.

    **Differences from kron_torch** (none changes a result in normal conditions; the tests compare both):
    weight decay is masked by role (``vector`` and ``embedding`` roles are not decayed; without roles this is
    kron_torch's ``ndim >= 2``); momentum is kept in float32 (float64 for float64 parameters), not in the
    parameter's dtype; factors are float64 for float64 parameters and the triangular solves run in the factor
    dtype (kron_torch always solves in float32); low-precision parameters are updated in float32 and rounded once;
    the gradient is never modified in place; the Gram matrices and the update RMS are computed on exactly rescaled
    copies so huge gradients cannot overflow them; a parameter whose probe is exactly zero keeps its factors
    (kron_torch grows them by ~precond_lr per update, without bound); scalars work; the update probability is an
    optimizer setting, not a group key (kron_torch reads only the first group's anyway); the coin is seeded from
    ``seed`` (kron_torch: ``random.Random(42)``; pass ``seed=42`` for its coin sequence).

    State per parameter (``optimizer.state[p]``), in float32 (float64 for float64 parameters): ``step`` (int),
    ``momentum`` (shape of p), ``factor_k`` for each dim k of the preconditioned shape: ``(d_k, d_k)`` upper
    triangular or ``(d_k,)`` diagonal; ``ema`` (shape of p) when the group averages. With
    ``state_dtype=torch.bfloat16`` ``momentum`` and the factors are bfloat16.

    Args:
        params: parameters or param-group dicts; a group may carry a ``role`` (see :func:`whiten.param_groups`),
            otherwise a parameter's role comes from its shape.
        lr: learning rate η (default 3e-4; the kron_torch README: about 3× smaller than Adam's).
        b1: momentum β1 (default 0.9), kept in each group as ``momentum`` (torch's name, which
            ``OneCycleLR(cycle_momentum=True)`` cycles).
        weight_decay: λ, decoupled, multiplied by lr (default 0.0).
        preconditioner_update_probability: None (default: the schedule above), a probability in (0, 1], or a
            callable of the number of steps taken so far (0, 1, ...) returning one (a float or a 0-d tensor).
        max_size_triangular: dims larger than this get a diagonal factor (default 8192).
        min_ndim_triangular: tensors with fewer dims get diagonal factors only (default 2).
        memory_save_mode: None (default: triangular wherever allowed), ``"smart_one_diag"`` (the largest dim is
            diagonal if strictly the largest), ``"one_diag"`` (the largest dim is diagonal), ``"all_diag"``.
        momentum_into_precond_update: fit the preconditioner to the debiased momentum (default True) or to the
            gradient.
        precond_lr: η_Q, step size of the factor fit (default 0.1).
        precond_init_scale: initial P is this times the identity (default 1.0).
        merge_dims: view ≥3-D tensors as matrices (default True).
        ema_rate: r, rate of the parameter average used by ``eval()`` (default None: no averaging).
        seed: seed of the probe generators and of the balancing coin (default 0).
        nonfinite: ``"skip"`` (default: a step with a non-finite gradient changes nothing, the schedule and the
            random sources included, is counted in ``counters["skipped_steps"]`` and warns) or ``"raise"``
            (FloatingPointError).
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: a step that does not update the factors never waits for the device;
            the non-finite check is decided there, every write masked by it, and read one step later (see
            :class:`whiten.SPlus`). With the default schedule the factors are updated at every step for the first
            500, then at 3% of them by about step 4000.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the momentum and the update).
        batched: process same-shape parameters of a group as one stack with batched matmuls and triangular solves
            (default True). False does each parameter alone; the results are the same up to rounding.
        cache_preconditioner: on steps that do not update the factors, precondition with a cached
            :math:`Q_k^\top Q_k` (one dense product per triangular factor) instead of :math:`Q_k^\top (Q_k x)`
            (two triangular ones); it is recomputed on the first such step after the factors change (default True).
            It costs one more (d_k, d_k) matrix per triangular factor, kept outside the state dict (a checkpoint
            is unchanged, and a resumed run recomputes it from the factors, bit for bit). It pays once the update
            probability falls below 1: from step 500 on with the default schedule.
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): ``momentum`` and the factors ``factor_*`` (Q) stored in bfloat16, half
            their bytes (kron_torch offers the same as ``mu_dtype`` and ``precond_dtype``, computing in them);
            the arithmetic stays float32: the stored values are cast up, a fit or a balancing of Q and the new
            momentum are rounded once into storage, and the step uses the stored values. Plain rounding drops the
            smallest changes of a fit (measured: 5% of the changed entries of Q on average, at most 17%), yet the
            fitted preconditioner stays within 2.2% of float32's after 200 updates, where another probe seed
            moves it by 12%; on whiten-bench's lm the final loss was 0.008 higher (2 seeds, about their spread;
            docs/memory.md). ``ema`` stays float32. Set it before the first step.

    References: X.-L. Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018 (arXiv 1512.04202);
    X.-L. Li, "Black Box Lie Group Preconditioners for SGD", arXiv 2211.04422 (2022);
    E. Walton, ``kron_torch`` (github.com/evanatyourservice/kron_torch), the reference for this class.
    """

    MEMORY_OPTIONS = {"max_size_triangular": (("factor",), "a side larger than this gets a diagonal factor instead of a "
                                          "triangular one"),
                      "memory_save_mode": (("factor",), "'one_diag', 'smart_one_diag' or 'all_diag' make sides "
                                       "diagonal"),
                      "state_dtype": (("momentum", "factor"), "torch.bfloat16 stores the momentum and the factors Q "
                                      "in half the bytes (float32 arithmetic)")}  # see memory_report

    def __init__(
        self,
        params,
        lr: float = 3e-4,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | Callable | None = None,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float = 1.0,
        merge_dims: bool = True,
        ema_rate: float | None = None,
        seed: int = 0,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        batched: bool = True,
        cache_preconditioner: bool = True,
        state_dtype: torch.dtype | str | None = None,
    ):
        prob = preconditioner_update_probability
        if prob is not None and not callable(prob):
            check_range("preconditioner_update_probability", prob, 0.0, 1.0, low_open=True)
        check_int("seed", seed, 0)
        check_bool("batched", batched)
        check_bool("cache_preconditioner", cache_preconditioner)
        defaults = dict(lr=lr, momentum=b1, weight_decay=weight_decay, max_size_triangular=max_size_triangular,
                        min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode,
                        momentum_into_precond_update=momentum_into_precond_update, precond_lr=precond_lr,
                        precond_init_scale=precond_init_scale, merge_dims=merge_dims, ema_rate=ema_rate, role=None,
                        state_dtype=state_dtype)
        self.preconditioner_update_probability = prob
        self.seed = seed
        self.batched = batched
        self.cache_preconditioner = cache_preconditioner
        self._grams: dict = {}  # bucket -> [(factor stack, its version, QᵀQ or None)]
        self._reset_random_sources()
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)
        # every device's generator exists from the start, so a checkpoint template (DCP's) always has its entry
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            self._generator(device)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("b1 (momentum)", group["momentum"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_int("max_size_triangular", group["max_size_triangular"], 0)
        check_int("min_ndim_triangular", group["min_ndim_triangular"], 0)
        if group["memory_save_mode"] not in MEMORY_SAVE_MODES:
            raise ValueError(f"Invalid memory_save_mode: {group['memory_save_mode']!r} "
                             f"(allowed: {', '.join(map(repr, MEMORY_SAVE_MODES))})")
        for name in ("momentum_into_precond_update", "merge_dims"):
            check_bool(name, group[name])
        check_range("precond_lr", group["precond_lr"], 0.0)
        check_range("precond_init_scale", group["precond_init_scale"], 0.0, low_open=True)
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])
        state_dtype_option(group.get("state_dtype"))

    # ----- random sources and schedule ------------------------------------------------------------------------
    def _reset_random_sources(self) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._coin = random.Random(self.seed)
        self._prob_step = 0  # steps taken (the schedule's n)
        self._update_counter = 0  # steps since the last preconditioner update

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key, self._generators.get(device.type))
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def _draw_noise(self, out: torch.Tensor) -> None:
        """Fill ``out`` (one parameter's probe, contiguous) with N(0, 1) from this optimizer's generator."""
        out.normal_(generator=self._generator(out.device))

    def _probability(self):
        prob = self.preconditioner_update_probability
        if prob is None:
            prob = _DEFAULT_SCHEDULE
        if callable(prob):
            prob = prob(self._prob_step)
            value = float(prob)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Invalid preconditioner_update_probability: the schedule returned {value!r} at "
                                 f"step {self._prob_step} (allowed: (0, 1])")
        return prob

    def _advance_schedule(self) -> bool:
        """One step of the deterministic schedule: True when the factors are updated this step."""
        prob = self._probability()
        self._update_counter += 1
        due = update_due(self._update_counter, prob)
        if due:
            self._update_counter = 0
        self._prob_step += 1
        return due

    def _random_state(self) -> dict:
        """Schedule counters, coin and generators as ints and tensors (what DCP and ``weights_only`` load keep).
        Generators are keyed by device type where a process has one device of that type (``"cuda"``, not
        ``"cuda:3"``), so ranks of a distributed run, which draw the same numbers, save the same entry."""
        version, internal, _ = self._coin.getstate()  # random() never sets the cached gauss value
        types = [torch.device(k).type for k in self._generators]
        return {"schedule_step": self._prob_step, "update_counter": self._update_counter,
                "coin": torch.tensor([version, *internal], dtype=torch.int64),
                "generators": {(torch.device(k).type if types.count(torch.device(k).type) == 1 else k): g.get_state()
                               for k, g in self._generators.items()}}

    def _set_random_state(self, saved: dict) -> None:
        self._prob_step = int(saved["schedule_step"])
        self._update_counter = int(saved["update_counter"])
        coin = saved["coin"]
        if isinstance(coin, torch.Tensor):
            version, *internal = coin.tolist()
            gauss = None
        else:  # checkpoints of whiten 0.1: (version, internal, gauss)
            version, internal, gauss = coin
        self._coin.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self._generators = {}
        for key, gen_state in saved["generators"].items():
            try:
                gen = self._generator(torch.device(key))
            except RuntimeError:  # saved on a device this process does not have
                warnings.warn(f"{type(self).__name__}: the checkpoint's random state for device {key!r} cannot be "
                              "restored here; that device's probes restart from the seed", RuntimeWarning,
                              stacklevel=3)
                continue
            gen.set_state(gen_state.detach().to("cpu", torch.uint8).clone())

    # ----- step -----------------------------------------------------------------------------------------------
    def initial_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, _layout(p, group), group)

    def _init_state(self, p: torch.Tensor, layout: _Layout, group: dict) -> dict:
        dtype = stored_dtype(p, group)  # state_dtype: the momentum and the factors Q in bfloat16
        scale = group["precond_init_scale"] ** (1 / len(layout.shape))
        state = {"step": 0, "momentum": torch.zeros(p.shape, dtype=dtype, device=p.device)}
        for k, (d, tri) in enumerate(zip(layout.shape, layout.triangular)):
            eye = torch.eye(d, dtype=dtype, device=p.device) if tri else torch.ones(d, dtype=dtype, device=p.device)
            state[f"factor_{k}"] = scale * eye
        return state

    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    def needs_host_check(self, work) -> bool:
        """Steps that update the factors (the schedule's decision, taken without advancing it) decide on the host,
        and so does one that creates a parameter's momentum."""
        if any("momentum" not in self.state[p] for _, params in work for p in params):
            return True
        return update_due(self._update_counter + 1, self._probability())

    def python_extras(self):
        coin = self._coin.getstate()  # drawn at every step (the balancing's coin)
        return lambda: self._coin.setstate(coin)

    def before_step(self, work) -> None:
        """The schedule, the coin and, on update steps, the probes of every parameter with a gradient, drawn one
        parameter at a time in group and parameter order: every rank of a distributed run draws the same numbers
        in the same order, and each parameter gets the ones it gets on one process."""
        self._update = self._advance_schedule()
        self._balance = self._coin.random() < BALANCE_PROBABILITY and self._update  # drawn every step
        self._probes = {}
        if self._update:
            for group, params in work:
                for p in params:
                    probe = torch.empty(_layout(p, group).shape, dtype=state_dtype(p), device=p.device)
                    self._draw_noise(probe)
                    self._probes[p] = probe

    def apply_step(self, work) -> None:
        try:
            for gi, (group, params) in enumerate(work):
                if params:
                    self._step_group(gi, group, params, self._update, self._balance)
        finally:
            self._probes = {}

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor], update: bool, balance: bool) -> None:
        layouts = [_layout(p, group) for p in params]
        states = []
        for p, layout in zip(params, layouts):
            if "momentum" not in self.state[p]:
                self.state[p].update(self._init_state(p, layout, group))
            states.append(self.state[p])
        self.update_averages(group, params, states)
        for state in states:
            state["step"] += 1

        b1 = group["momentum"]
        moms = [s["momentum"] for s in states]
        work = [state_dtype(p) for p in params]  # the arithmetic's dtype (state_dtype may store M and Q lower)
        grads = [p.grad if p.grad.dtype == d else p.grad.to(d) for p, d in zip(params, work)]
        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it
        if all(m.dtype == d for m, d in zip(moms, work)):
            ema_all(moms, grads, b1, 1.0 - b1, ok)
        else:  # state_dtype: cast up, update (the same two operations), round once into the stored momentum
            for m, g, d in zip(moms, grads, work):
                commit(m, m.to(d).mul_(b1).add_(g, alpha=1.0 - b1), ok)

        def key_of(q):
            if not self.batched:
                return ("single", gi, id(q))
            lay = _layout(q, group)
            return (gi, lay.shape, lay.triangular, self.state[q]["momentum"].dtype, q.device)

        buckets = bucket(range(len(params)), lambda i: key_of(params[i]))
        probes = {}
        if update:  # drawn in before_step, so the numbers do not depend on batching or on the rank
            probes = {bkey: torch.stack([self._probes[params[i]] for i in idxs]) for bkey, idxs in buckets.items()}

        updates: list = [None] * len(params)
        for bkey, idxs in buckets.items():
            pre = self._precondition_bucket(gi, bkey, key_of, idxs, layouts[idxs[0]], group, params, grads, states,
                                            probes.get(bkey), balance)
            for j, i in enumerate(idxs):
                updates[i] = pre[j].view(params[i].shape)

        lr, wd = float(group["lr"]), group["weight_decay"]
        same = [i for i, p in enumerate(params) if p.dtype == updates[i].dtype]
        decayed = [i for i in same if wd != 0 and layouts[i].decay]
        if decayed:
            torch._foreach_add_([updates[i] for i in decayed], [params[i] for i in decayed], alpha=wd)
        if same:
            add_all([params[i] for i in same], [updates[i] for i in same], -lr, ok)
        for i, p in enumerate(params):
            if p.dtype != updates[i].dtype:  # low-precision parameter: update in the state dtype, round once
                decay = wd if layouts[i].decay else 0.0

                def step(x, u=updates[i], decay=decay):
                    x.add_(u.add_(x, alpha=decay) if decay else u, alpha=-lr)

                write(p, updates[i].dtype, step, ok)

    def _precondition_bucket(self, gi, bkey, key_of, idxs, layout: _Layout, group: dict, params, grads, states,
                             probe: torch.Tensor | None, balance: bool) -> torch.Tensor:
        """Factor update (on update steps) and the clipped preconditioned momentum, for a stack of same-layout
        parameters whose state lives in persistent stacks (every member of the group with state; the ones without
        a gradient this step are left out by index)."""
        n = len(layout.shape)
        shapes = {"momentum": layout.shape}
        for k, (d, tri) in enumerate(zip(layout.shape, layout.triangular)):
            shapes[f"factor_{k}"] = (d, d) if tri else (d,)
        S, pos = self.bucket_stacks(gi, bkey, [params[i] for i in idxs], key_of, shapes)
        if pos is None:
            return self._precondition_stacks(bkey, S, idxs, layout, group, grads, states, probe, balance)
        sub = {k: v[pos] for k, v in S.items()}  # copies of the members with a gradient
        pre = self._precondition_stacks(None, sub, idxs, layout, group, grads, states, probe, balance)
        for k in range(n):  # the fit and the balancing changed the copies' factors
            S[f"factor_{k}"].index_copy_(0, pos, sub[f"factor_{k}"])
        return pre

    def _precondition_stacks(self, bkey, S, idxs, layout, group, grads, states, probe, balance) -> torch.Tensor:
        n = len(layout.shape)
        stored = [S[f"factor_{k}"] for k in range(n)]
        work = grads[idxs[0]].dtype  # the arithmetic's dtype
        # state_dtype: the stored bfloat16 momentum and factors cast up; a fit or a balancing is rounded once back
        # into storage, and the step preconditions with the stored (rounded) factors
        qs = [q.to(work) for q in stored]
        mom = S["momentum"].to(work)
        b1 = group["momentum"]
        debias = [1.0 - b1 ** states[i]["step"] for i in idxs]
        if len(set(debias)) == 1:  # (a Python number: no copy to the device; the same float32 division)
            m_hat = mom / debias[0]
        else:  # members at different steps (one had no gradient for a while)
            m_hat = mom / per_slice(host_values(debias, mom.dtype, mom.device), mom.ndim)
        if balance and n > 1:
            balance_factors_(qs)
        if probe is not None:
            if group["momentum_into_precond_update"]:
                # the damping lands in m_hat too, which is then preconditioned: kron_torch does the same
                probe_g = m_hat
            else:
                probe_g = torch.stack([grads[i].reshape(layout.shape) for i in idxs])
            fit_factors_(qs, probe_g, probe, group["precond_lr"])
        low = any(q.dtype != work for q in stored)
        if low and (probe is not None or (balance and n > 1)):
            for q, new in zip(stored, qs):
                q.copy_(new)
            qs = [q.to(work) for q in stored]
        # no cache for copies (bkey None): they are new tensors at every step
        grams = None
        if self.cache_preconditioner and probe is None and bkey:
            grams = self._factor_grams(bkey, stored, work) if low else self._factor_grams(bkey, stored)
        pre = precondition(qs, m_hat, grams)
        clip_rms_(pre, MAX_UPDATE_RMS)
        return pre

    def _factor_grams(self, bkey, qs: list[torch.Tensor], dtype: torch.dtype | None = None) -> list:
        """Q_kᵀQ_k of each triangular factor stack (None for diagonal ones), in ``dtype`` (the arithmetic's, where
        state_dtype stores Q lower; default the stacks' own), cached while the stacks are the same tensors and
        unmodified: any in-place change (the fit, balancing, a load) bumps a tensor's version."""
        cached = self._grams.get(bkey)
        if cached is not None and all(q is cq and q._version == version for q, (cq, version, _) in zip(qs, cached)):
            return [gram for _, _, gram in cached]
        dtype = dtype or qs[0].dtype
        entries = [(q, q._version, q.to(dtype).mT @ q.to(dtype) if q.ndim == 3 else None) for q in qs]
        self._grams[bkey] = entries
        return [gram for _, _, gram in entries]

    # ----- checkpoints and copies (whiten.optim.checkpoints) -----------------------------------------------------
    GLOBAL_STATE_KEYS = ("psgd_kron",)  # the update schedule's counters, the coin and the generators
    PICKLED = {"preconditioner_update_probability": None, "seed": 0, "cache_preconditioner": True}

    def global_state(self) -> dict:
        return {**super().global_state(), "psgd_kron": self._random_state()}

    def check_global_state(self, saved: dict, state_dict: dict) -> None:
        super().check_global_state(saved, state_dict)
        saved = saved.get("psgd_kron")
        if saved is None:
            return
        # checked here, before anything changes: _set_random_state runs after the state was replaced
        name = type(self).__name__
        missing = [k for k in ("schedule_step", "update_counter", "coin", "generators") if k not in saved]
        if not isinstance(saved, dict) or missing:
            raise ValueError(f"{name}.load_state_dict: the checkpoint's random state lacks {missing or 'everything'}")
        coin = saved["coin"]
        try:
            version, *internal = coin.tolist() if isinstance(coin, torch.Tensor) else [coin[0], *coin[1]]
            random.Random().setstate((int(version), tuple(int(x) for x in internal), None))
            int(saved["schedule_step"]), int(saved["update_counter"])
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{name}.load_state_dict: the checkpoint's random state is unreadable ({e})") from None
        if not isinstance(saved["generators"], dict) or not all(
                isinstance(g, torch.Tensor) for g in saved["generators"].values()):
            raise ValueError(f"{name}.load_state_dict: the checkpoint's generator states are not tensors")

    def load_global_state(self, saved: dict) -> None:
        super().load_global_state(saved)
        if saved.get("psgd_kron") is not None:
            self._set_random_state(saved["psgd_kron"])

    def reset_transient(self) -> None:
        super().reset_transient()
        self._grams = {}
        self._reset_random_sources()


_DEFAULT_SCHEDULE = precond_update_prob_schedule()
