"""Prodigy (Mishchenko & Defazio 2023): Adam whose step size D is estimated on the fly from the distance the
parameters travelled, one estimate for the whole model."""

from __future__ import annotations

import math
import warnings

import torch

from ..distributed import all_reduce_flat

from . import kernels
from ._base import WhitenOptimizer
from .checks import check_betas, check_bool, check_int, check_lr, check_range, check_role, check_weight_decay
from .deferred import _read, _to_host
from .update import (apply_all, cache_runs, commit, commit_all, decays, ema_all, host_values, masked, state_dtype,
                     write)

__all__ = ["Prodigy"]

# Settings the reference reads from the first group only: they shape the one estimate of D, so whiten requires
# every group to carry the same value rather than silently using the first group's.
SHARED = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "decouple")
# The estimate itself, kept in every group as the reference does (torch.distributed.checkpoint saves groups).
ESTIMATE = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")
# whiten's own entry beside it: the steps at which D was held at its finite limit (see d_limit); absent from
# checkpoints written before it existed, hence read with .get
CAPPED = "d_capped"


def d_limit(coefficient: float, dtype: torch.dtype) -> float:
    """The largest D for which ``D² · coefficient`` (the largest multiplier of a gradient the step forms, see
    :class:`Prodigy`) stays at most the square root of ``dtype``'s largest finite number, which leaves the other
    half of the exponent range to the gradient it multiplies and to the accumulation of the D statistics."""
    return math.sqrt(math.sqrt(torch.finfo(dtype).max) / coefficient)


def _check_finite(name: str, value, low: float = -math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: a finite number >= {low})")


class Prodigy(WhitenOptimizer):
    r"""Prodigy, with the update rule of ``prodigyopt`` 1.1.2 (konstmish/prodigy), the authors' package.

    One step size :math:`D` serves every parameter. At step :math:`k` (from 0), with :math:`\eta` the shared lr,
    :math:`b = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})` if ``use_bias_correction`` else 1 and
    :math:`\eta_D = D \eta b`, for every parameter :math:`x` with gradient :math:`g` and initial value :math:`x_0`:

    .. math::
        r &\leftarrow \beta_3 r + \tfrac{D}{D_0}\eta_D \textstyle\sum \langle g, x_0 - x\rangle, \qquad
        s \leftarrow \beta_3 s + \tfrac{D}{D_0}\eta_D\, g \ \ (\text{safeguard\_warmup: } \tfrac{D}{D_0} D g) \\
        m &\leftarrow \beta_1 m + D(1-\beta_1) g, \qquad v \leftarrow \beta_2 v + D^2 (1-\beta_2) g^2 \\
        \hat D &= c\, r / \textstyle\sum \|s\|_1, \quad D_{max} \leftarrow \max(D_{max}, \hat D), \quad
        D \leftarrow \min(D_{max}, \gamma D) \ \ (\text{first step: } D \leftarrow \max(D, \hat D)) \\
        x &\leftarrow x - \lambda \eta_D x \ (\text{decoupled}), \qquad
        x \leftarrow x - \eta_D\, m / (\sqrt v + D\epsilon)

    (:math:`c` = ``d_coef``, :math:`\gamma` = ``growth_rate``; sums over every parameter of every group; with
    β1 = 0 the numerator is :math:`D g`.) With both EMAs off (``betas=(0, 0)``) this is sign descent,
    :math:`x \leftarrow x - \eta D\,\mathrm{sign}(g)`, whose :math:`D = \max_k \langle g_k, x_0 - x_k\rangle /
    \|g_k\|_1` adapts the step (Bernstein & Newhouse, "Old Optimizer, New Norm").

    **The estimate is readable**: ``opt.d`` is the current D (the effective lr is ``D × lr``); every param group
    carries ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat`` and ``k`` as in the reference, and whiten's
    ``d_capped`` (below), so they are in ``state_dict()`` and torch.distributed.checkpoint saves them.

    **D is held where the step stays finite** (a departure from the reference). D never decreases, and on a loss
    with no finite minimum along the gradient (a linear loss; one gradient stepped again and again) it grows
    geometrically without end: the distance it estimates is infinite. The step multiplies gradients by
    :math:`D^2 \eta b / D_0` (the s update; :math:`D^2/D_0` with ``safeguard_warmup``), :math:`D^2 (1-\beta_2)` (the
    second moment) and :math:`D^2 \eta b` (the update with β1 = 0), and decoupled decay scales x by
    :math:`1 - \lambda D \eta b`. prodigyopt 1.1.2 lets D grow: with the defaults and float32 state, the first
    coefficient passes float32's largest number (3.4e38) at D ≈ 1.8e16, and ``add_`` raises ``RuntimeError: value
    cannot be converted to type float without overflow`` from inside the step (12 blocks of Linear(32, 32) +
    LayerNorm, one gradient: at step 56); with decoupled decay, once :math:`\lambda D \eta b > 2` every step
    multiplies x by more than 1 in size and the parameters overflow to inf. A crash or inf on finite input is no
    parity worth keeping, so whiten holds D at

    .. math::
        D \le \min\Big(\sqrt{\sqrt{F} / \max(\eta b / D_0,\ 1-\beta_2,\ \eta b)},\ \
        \frac{1}{\lambda \eta b}\Big)

    (:math:`F` the largest finite number of the state dtype, 3.4e38 in float32, so every coefficient stays within
    :math:`\sqrt F` = 1.8e19 and the other half of the exponent range is left to the gradients and the
    accumulation of s; :math:`\eta b/D_0` becomes :math:`1/D_0` with ``safeguard_warmup``; the second bound only
    with decoupled decay, λ the largest decay of a decaying parameter: the decay then at most zeroes a weight).
    With the defaults in float32 the limit is D ≈ 4.3e6, an Adam step of four million per coordinate, and with
    weight_decay = 0.1 at lr 1 it is D = 10: no run with a finite solution comes near either, so ordinary runs are
    the reference's bit for bit. Each step at which the limit binds adds 1 to every group's ``d_capped``; a
    RuntimeWarning says so once.

    **lr across groups** (the reference's rule): D is one estimate for all groups and every group steps with
    ``D × lr``, so all groups must have the same lr, or lr = 0 to freeze a group. Leave lr at 1.0 (the schedule
    multiplies it; a scheduler that scales every group alike keeps them equal) and tune ``d_coef``. A different lr
    in one group is refused with a ValueError at construction, at ``add_param_group``, at ``load_state_dict`` and at
    ``step()`` (for an lr a scheduler or loop wrote). Likewise ``betas``, ``beta3``, ``d0``, ``d_coef``,
    ``growth_rate``, ``use_bias_correction`` and ``decouple`` must be the same in every group (the reference reads
    them from the first group only).

    Departures from the reference (everything else is compared bit for bit with prodigyopt in the tests): D is
    held at the finite limit above; a group with lr = 0 is frozen (the reference still applies decoupled decay to
    it and, with β1 = 0, a step of ``g / eps``); ``p.grad`` is never modified (the reference adds the coupled decay
    into it); state is float32 for low-precision parameters (the reference keeps it in the parameter's dtype);
    weight decay is off for the ``vector`` and ``embedding`` roles (as in every whiten optimizer); ``fsdp_in_use``
    is not needed: in a distributed run (``process_group=`` or FSDP2) the per-parameter sums are all-reduced and
    added in parameter order, so every rank gets the same D, that of one process, bit for bit.

    **bfloat16 parameters** (no float32 master copy): the first steps, of size about D ≈ ``d0`` = 1e-6, are far
    below bfloat16's resolution (~0.4% of a weight), so the parameters never leave x0, the numerator stays 0 and D
    never grows; prodigyopt, which steps in bfloat16 too, stalls the same way. Keep float32 parameters (autocast for
    the compute), or start from ``d0=1e-2``.

    State per parameter (float32; float64 for float64 parameters): ``step`` (int), ``s`` and ``p0`` (every
    ``slice_p``-th entry of the flattened parameter; ``p0`` is a 0-dim zero for a parameter that starts at zero, as
    in the reference), ``exp_avg`` (β1 > 0) and ``exp_avg_sq`` (shape of p). About 4x the parameters' memory.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η, a multiplier of D shared by all groups (default 1.0: leave it, tune ``d_coef``).
        betas: (β1, β2) (default (0.9, 0.999)). beta3: EMA of the D statistics (default None: √β2).
        eps: ε, added as D·ε outside the square root (default 1e-8).
        weight_decay: λ (default 0). decouple: AdamW-style decay ``x -= λ η_D x`` (default True); False adds
            λx to the gradient (L2).
        use_bias_correction: Adam's bias correction in η_D (default False).
        safeguard_warmup: leave η out of the s update, for warm-up schedules (default False).
        d0: initial D (default 1e-6). d_coef: c, multiplies the estimate (default 1.0; the knob to tune).
        growth_rate: γ, the most D may grow per step (default inf: unrestricted).
        slice_p: estimate D from every slice_p-th entry of each parameter, to save memory (default 1: all).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`). D and its
            statistics are then computed on the device (float64, the same formulas; the products with the
            gradients are a multiply and an add where the default path passes D as a Python ``alpha``), so the
            numbers are the default path's within rounding. The estimate's entries of ``param_groups`` are brought
            up to date (one read) at ``opt.d``, ``state_dict()``, a copy, and a step that decides on the host (a
            parameter's first step, the restart of an overflowed second moment); between those they hold the
            values of the last such point. A step whose statistics are all zero (the reference's early return) is
            read one step later too: its step counts are put back, as on the default path; ``d_capped``'s warning
            comes one step later.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`).

    Reference: K. Mishchenko, A. Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
    arXiv 2306.06101 (ICML 2024).
    """

    SECOND_MOMENT_KEY = "exp_avg_sq"  # restarted where it overflowed (WhitenOptimizer.restart_overflowed_moments)
    SYNC_FREE = True  # its ordinary step masks every write, D on the device (whiten.optim.deferred)

    def __init__(
        self,
        params,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                        d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p, role=None,
                        d=d0, d_max=d0, d_numerator=0.0, d_denom=0.0, d_hat=0.0, k=0, d_capped=0)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    @property
    def d(self) -> float:
        """The current estimate D: every parameter steps with D × lr."""
        self._materialize()
        return self.param_groups[0]["d"]

    # ----- sync_free: the estimate on the device ------------------------------------------------------------------
    # While sync-free steps run, ESTIMATE's floats and CAPPED live in one float64 device tensor (_estimate), the
    # truth while it exists; the groups get them back (one read) where Python needs them.
    DEVICE_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat", CAPPED)

    def _device_estimate(self, device) -> torch.Tensor:
        est = self.__dict__.get("_estimate")
        if est is None or est.device != device:
            g0 = self.param_groups[0]
            values = [float(g0.get(k, 0)) for k in self.DEVICE_KEYS]  # (doubles: exact, and d_capped is an int)
            est = self._estimate = host_values(values, torch.float64, device)
        return est

    def _materialize(self) -> None:
        """The device estimate's values into every group, as Python numbers (a read), and the device copy dropped:
        the groups are the truth again."""
        self.resolve_pending()
        est = self.__dict__.get("_estimate")
        if est is None:
            return
        self._estimate = None
        values = dict(zip(self.DEVICE_KEYS, est.tolist()))
        values[CAPPED] = int(values[CAPPED])
        for group in self.param_groups:
            group.update(values)

    def resolve_pending(self) -> None:
        """A sync-free step whose statistics were all zero took no step (the reference's early return): its step
        counts and ``k`` are put back (its moments and s did change, as on the default path); one whose D was
        held at its limit warns now. Then the non-finite check's flags (the base's)."""
        lag = self.__dict__.get("_zero_pending")
        if lag is not None:
            self._zero_pending = None
            (host, event), changes, limit = lag
            stepped, capped = _read(host, event)
            if not stepped:
                self._restore_python_state((changes, None))
            elif capped:
                self._warn_capped(limit)
        super().resolve_pending()

    def state_dict(self):
        self._materialize()
        return super().state_dict()

    def __getstate__(self):
        self._materialize()
        return super().__getstate__()

    def after_load(self) -> None:
        super().after_load()
        self._estimate = None  # the loaded groups are the truth

    # ----- checks -------------------------------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        if group["beta3"] is not None:
            check_range("beta3", group["beta3"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_weight_decay(group["weight_decay"])
        for flag in ("decouple", "use_bias_correction", "safeguard_warmup"):
            check_bool(flag, group[flag])
        check_range("d0", group["d0"], 0.0, low_open=True)
        check_range("d_coef", group["d_coef"], 0.0, low_open=True)
        g = group["growth_rate"]
        if not (isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 1.0):  # inf allowed: the default
            raise ValueError(f"Invalid growth_rate: {g!r} (allowed: a number >= 1, or inf for no limit)")
        check_int("slice_p", group["slice_p"], 1)
        check_role(group["role"])
        _check_finite("d", group["d"], 0.0)
        if group["d"] <= 0:
            raise ValueError(f"Invalid d: {group['d']!r} (allowed: > 0)")
        _check_finite("d_max", group["d_max"], 0.0)
        for key in ("d_numerator", "d_denom", "d_hat"):
            _check_finite(key, group[key])
        check_int("k", group["k"], 0)
        check_int(CAPPED, group.get(CAPPED, 0), 0)

    @staticmethod
    def _lr_rule_error(groups: list[dict], where: str) -> str | None:
        """The reference's rule: every group's lr is the largest lr or 0. A message for the first group that breaks
        it, or None."""
        lrs = [g["lr"] for g in groups]
        top = max(lrs)
        first = next(i for i, lr in enumerate(lrs) if lr == top)
        for i, lr in enumerate(lrs):
            if lr not in (top, 0.0):
                return (f"Prodigy{where}: group {i} has lr {lr!r} but group {first} has lr {top!r}. Prodigy estimates "
                        "one step size D for all parameters and every group steps with D x lr, so all groups must "
                        "have the same lr (a multiplier of D; leave it at 1.0 and tune d_coef), or lr=0 to freeze a "
                        "group, as prodigyopt requires. For different step sizes use separate optimizers.")
        return None

    @staticmethod
    def _shared_error(groups: list[dict], where: str) -> str | None:
        for key in SHARED:
            for i, g in enumerate(groups[1:], 1):
                if g[key] != groups[0][key]:
                    return (f"Prodigy{where}: group {i} has {key}={g[key]!r} but group 0 has {groups[0][key]!r}; "
                            f"{key} shapes the one step-size estimate D of all groups (prodigyopt reads it from the "
                            "first group only), so every group must have the same value")
        return None

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:  # a group added later joins the running estimate (the reference reads group 0's)
            self._materialize()
            running = {k: self.param_groups[0][k] for k in ESTIMATE}
            running[CAPPED] = self.param_groups[0].get(CAPPED, 0)
            param_group = {**running, **param_group}
        super().add_param_group(param_group)

    def groups_error(self, groups: list[dict], where: str) -> str | None:
        return self._shared_error(groups, where) or self._lr_rule_error(groups, where)

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        shape = tuple(p.shape)
        state = {"step": None, "s": (len(range(0, p.numel(), group["slice_p"])),), "p0": None, "exp_avg_sq": shape}
        if group["betas"][0] > 0:
            state["exp_avg"] = shape
        return state

    # ----- the step -----------------------------------------------------------------------------------------------
    def before_step(self, work) -> None:
        # Every rank sees every parameter with a gradient here (its own as full-size stand-ins): the order of the
        # sums that give D.
        self._everyone = [(p, group) for group, params in work for p in params]

    def apply_step(self, work) -> None:
        try:
            self._prodigy_step(work)
        finally:
            self._everyone = []

    def _prodigy_step(self, work) -> None:
        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it
        if ok is None:
            self._materialize()  # a host step: the estimate in Python numbers (after sync-free steps)
            est = None
        else:  # D and its statistics as float64 tensors on the device: the same formulas, nothing read
            est = self._device_estimate(ok.device)
        g0 = self.param_groups[0]
        beta1, beta2 = g0["betas"]
        beta3 = g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2)
        k, d0 = g0["k"], g0["d0"]
        d, d_max, d_numerator = (g0["d"], g0["d_max"], g0["d_numerator"]) if est is None else est[:3].unbind()
        lr = max(g["lr"] for g in self.param_groups)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1
        # D only ever grows; on a loss with no finite minimum along the gradient (the same gradient stepped again
        # and again) it grows geometrically, until its products overflow the state (the reference's crash): held at
        # the largest D whose products stay finite (the docstring). Never binds on an ordinary run.
        limit = self._d_limit(lr * bias_correction)
        capped = d > limit
        d = min(d, limit) if est is None else torch.where(capped, limit, d)
        dlr = d * lr * bias_correction
        d_numerator = d_numerator * beta3

        # Each elementwise op runs once per group over its parameters (torch._foreach_*: one launch per op, not per
        # parameter). Per parameter stay the dot product and the sum of |s|: foreach has neither (_foreach_norm's
        # L1 norm sums in another order, other bits), and the reference's D is built from these exact values.
        grads: dict = {}
        stats: dict = {}  # parameter -> (<g, x0 - x>, ||s||_1), tensors
        for group, group_params in work:
            for p in group_params:
                if not self.state[p]:
                    self.state[p].update(self._init_state(p, group))
            if group["lr"] == 0 or not group_params:
                continue  # frozen (see the docstring): state only
            for run in cache_runs(group_params, compiled_chain=True):  # (on a CPU: runs that stay in cache)
                params = [group_params[i] for i in run]
                states = [self.state[p] for p in params]
                dtypes = [s["exp_avg_sq"].dtype for s in states]
                xs = [p if p.dtype == dtype else p.to(dtype) for p, dtype in zip(params, dtypes)]
                gs = [p.grad if p.grad.dtype == dtype else p.grad.to(dtype) for p, dtype in zip(params, dtypes)]
                # coupled decay: g + λ x, a new tensor (p.grad is kept)
                if group["weight_decay"] != 0 and not g0["decouple"]:
                    coupled = [i for i, p in enumerate(params) if decays(p, group)]
                    if coupled:
                        added = torch._foreach_add([gs[i] for i in coupled], [xs[i] for i in coupled],
                                                   alpha=group["weight_decay"])
                        for i, g in zip(coupled, added):
                            gs[i] = g
                grads.update(zip(params, gs))
                sp = group["slice_p"]
                sliced_grads = [g.reshape(-1) if sp == 1 else g.reshape(-1)[::sp] for g in gs]
                sliced_xs = [x.reshape(-1) if sp == 1 else x.reshape(-1)[::sp] for x in xs]
                # x0 - x; an all-zero parameter's x0 is a 0-dim zero, expanded (a view) to the sliced shape
                travelled = self.foreach_new("sub", [s["p0"].expand(x.shape) for s, x in zip(states, sliced_xs)],
                                             sliced_xs)
                if beta1 > 0:
                    for s in states:
                        if "exp_avg" not in s:  # β1 raised from 0 by a scheduler
                            s["exp_avg"] = torch.zeros_like(s["exp_avg_sq"])
                    # (in place; a sync-free step: aside, then committed under its flag)
                    ema_all([s["exp_avg"] for s in states], gs, beta1, d * (1 - beta1), ok)
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                new = apply_all("mul", exp_avg_sqs, beta2, ok=ok)
                if est is None:
                    torch._foreach_addcmul_(new, gs, gs, value=d * d * (1 - beta2))
                else:
                    torch._foreach_addcmul_(new, torch._foreach_mul(gs, d * d * (1 - beta2)), gs)
                commit_all(exp_avg_sqs, new, ok)
                alpha = (d / d0) * d if group["safeguard_warmup"] else (d / d0) * dlr
                ss = ema_all([s["s"] for s in states], sliced_grads, beta3, alpha, ok)
                # compiled=True: the sums of every parameter in one kernel (inductor's order of addition: within
                # rounding); eagerly one reduction per tensor, the reference's D from these exact values
                if kernels.active(sliced_grads, travelled, ss):
                    dots, abs_sums = _sums_kernel(sliced_grads, travelled, ss)
                else:
                    dots = [torch.dot(g, t) for g, t in zip(sliced_grads, travelled)]
                    abs_sums = [abs_s.sum() for abs_s in self.foreach_new("abs", ss, slot=1)]
                for p, dot, abs_sum in zip(params, dots, abs_sums):
                    stats[p] = (dot, abs_sum)

        if est is not None:
            self._device_tail(work, est, stats, grads, d, dlr, d_numerator, capped, limit)
            return
        # The sums over all parameters, in parameter order, as Python floats: the reference's arithmetic. In a
        # distributed run each owner fills its parameters' entries and one all-reduce gives every rank the same
        # values (x + 0 is exact), so every rank, like one process, adds them in the same order.
        order = [p for p, group in self._everyone if group["lr"] != 0]
        ctx = self._dist[1] if self._dist is not None else None
        if ctx is None:  # every parameter is here: one stack, one host sync
            values = torch.stack([t for p in order for t in stats[p]]).to(torch.float64).view(-1, 2) \
                if order else torch.zeros(0, 2, dtype=torch.float64)
        else:
            values = torch.zeros(len(order), 2, dtype=torch.float64, device=ctx.device)
            mine = [i for i, p in enumerate(order) if p in stats]
            if mine:
                flat = torch.stack([t for i in mine for t in stats[order[i]]]).to(torch.float64).view(-1, 2)
                values[torch.tensor(mine, device=values.device)] = flat.to(values.device)
            values = all_reduce_flat([values], ctx.group)[0]
        delta_numerator, d_denom = 0.0, 0.0
        for dot, abs_sum in values.tolist():
            delta_numerator += (d / d0) * dlr * dot
            d_denom += abs_sum
        if d_denom == 0:  # no gradient information yet (all zero): the reference returns here, D unchanged
            return

        global_numerator = d_numerator + delta_numerator
        d_hat = g0["d_coef"] * global_numerator / d_denom
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * g0["growth_rate"])
        if d > limit:
            capped, d = True, limit
        if capped:
            self._count_capped(limit)
        for group in self.param_groups:
            group.update(d_numerator=global_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)

        for group, group_params in work:
            if group["lr"] == 0:
                for p in group_params:
                    self.state[p]["step"] += 1
                continue
            decay = group["weight_decay"] if g0["decouple"] else 0.0
            for run in cache_runs(group_params, compiled_chain=True):  # (on a CPU: runs that stay in cache)
                params = [group_params[i] for i in run]
                states = [self.state[p] for p in params]
                for state in states:
                    state["step"] += 1
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                # the numerator: m, or with β1 = 0 the gradient (times D in the value)
                numerators = [s["exp_avg"] for s in states] if beta1 > 0 else [grads[p] for p in params]
                value = -dlr if beta1 > 0 else -dlr * d
                shrink = decay * dlr  # the reference's θ - λ·d·lr·θ before the step
                same = [i for i, p in enumerate(params) if p.dtype == exp_avg_sqs[i].dtype]
                if len(same) == len(params) and kernels.active(params, numerators, exp_avg_sqs):
                    shrinking = tuple(decay != 0 and decays(p, group) for p in params)
                    values = kernels.step_values([d * group["eps"], value, -shrink], params[0].device)
                    _update_kernel(params, numerators, exp_avg_sqs, values, shrinking, None)
                    continue
                denoms = self.foreach_new("sqrt", exp_avg_sqs)
                torch._foreach_add_(denoms, d * group["eps"])
                shrunk = [params[i] for i in same if decay != 0 and decays(params[i], group)]
                if shrunk:
                    torch._foreach_add_(shrunk, shrunk, alpha=-shrink)
                if same:
                    torch._foreach_addcdiv_([params[i] for i in same], [numerators[i] for i in same],
                                            [denoms[i] for i in same], value=value)
                for i, p in enumerate(params):  # a low-precision parameter: in the state's dtype, rounded once
                    if p.dtype == exp_avg_sqs[i].dtype:
                        continue
                    shrink_p = shrink if decay != 0 and decays(p, group) else 0.0

                    def update(x, numerator=numerators[i], denom=denoms[i], shrink=shrink_p):
                        if shrink:
                            x.add_(x, alpha=-shrink)
                        x.addcdiv_(numerator, denom, value=value)

                    write(p, exp_avg_sqs[i].dtype, update)
        for group in self.param_groups:
            group["k"] += 1

    def _device_tail(self, work, est, stats, grads, d, dlr, d_numerator, capped, limit) -> None:
        """The rest of a sync-free step (the default path's tail above, with D and its statistics as float64 device
        tensors): the new estimate, committed under the step's flag and a non-zero denominator (the reference
        returns before it otherwise), and the parameters' update under the same."""
        ok = self._ok
        g0 = self.param_groups[0]
        beta1 = g0["betas"][0]
        d0 = g0["d0"]
        order = [p for p, group in self._everyone if group["lr"] != 0]
        values = torch.stack([t for p in order for t in stats[p]]).to(torch.float64).view(-1, 2) \
            if order else est.new_zeros(0, 2)
        delta_numerator = ((d / d0) * dlr * values[:, 0]).sum()
        d_denom = values[:, 1].sum()
        stepped = ok & (d_denom != 0)
        global_numerator = d_numerator + delta_numerator
        d_hat = g0["d_coef"] * global_numerator / d_denom
        # Python's max(a, b) and min(a, b), as the default path takes them: b where b > a (b < a), else a
        d = torch.where((d == d0) & (d_hat > d), d_hat, d)
        d_max = torch.where(d_hat > est[1], d_hat, est[1])
        grown = d * g0["growth_rate"]
        d = torch.where(grown < d_max, grown, d_max)
        over = d > limit
        d = torch.where(over, limit, d)
        capped = (capped | over) & stepped
        commit(est, torch.stack([d, d_max, global_numerator, d_denom, d_hat, est[5] + capped]), stepped)

        changes = []  # the Python side a step with a zero denominator puts back (resolve_pending)
        for group, group_params in work:
            if group["lr"] == 0:
                for p in group_params:
                    changes.append((self.state[p], "step", self.state[p]["step"], self.state[p]["step"] + 1))
                    self.state[p]["step"] += 1
                continue
            decay = group["weight_decay"] if g0["decouple"] else 0.0
            shrink = decay * dlr
            for p in group_params:
                state = self.state[p]
                changes.append((state, "step", state["step"], state["step"] + 1))
                state["step"] += 1
            # The numbers of the update, once per group (the same tensors for every parameter)
            value = -dlr if beta1 > 0 else -dlr * d
            eps = d * group["eps"]
            for run in cache_runs(group_params, compiled_chain=True):  # (on a CPU: runs that stay in cache)
                params = [group_params[i] for i in run]
                self._device_update(params, grads, group, beta1, value, eps, -shrink if decay != 0 else None,
                                    stepped)
        for group in self.param_groups:
            changes.append((group, "k", group["k"], group["k"] + 1))
            group["k"] += 1
        self._zero_pending = (_to_host(torch.stack([d_denom != 0, capped])), changes, limit)

    def _device_update(self, params, grads, group, beta1, value, eps, neg_shrink, ok) -> None:
        """A sync-free step's parameter update, ``x ← x − shrink·x + value·num / (√v + D·ε)`` (``value``, ``eps``
        and ``neg_shrink`` 0-d device tensors; ``neg_shrink`` None: no decoupled decay), in the state's dtype and
        rounded once into a low-precision parameter, committed under ``ok``. The new values are computed over the
        whole list (``_foreach``, on a CPU the same per-tensor ops, so the same bits as one parameter at a time)
        and written by one :func:`commit_all`; under ``compiled=True`` the whole of it is one kernel."""
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        numerators = [self.state[p]["exp_avg"] for p in params] if beta1 > 0 else [grads[p] for p in params]
        shrinking = tuple(neg_shrink is not None and decays(p, group) for p in params)
        if kernels.active(params, numerators, exp_avg_sqs):
            shrink_value = eps if neg_shrink is None else neg_shrink  # (a placeholder where nothing shrinks)
            _update_kernel(params, numerators, exp_avg_sqs, torch.stack([eps, value, shrink_value]),
                                  shrinking, ok)
            return
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        steps = torch._foreach_div(numerators, denoms)
        torch._foreach_mul_(steps, value)
        xs = [p if p.dtype == v.dtype else p.to(v.dtype) for p, v in zip(params, exp_avg_sqs)]
        bases = list(xs)  # x, or x − shrink·x (as x.add_(x * −shrink): a multiply, then an add)
        shrunk = [i for i, s in enumerate(shrinking) if s]
        if shrunk:
            xs_shrunk = [xs[i] for i in shrunk]
            for i, t in zip(shrunk, torch._foreach_add(xs_shrunk, torch._foreach_mul(xs_shrunk, neg_shrink))):
                bases[i] = t
        # out of place: ``bases`` may be the parameters themselves, written only by the masked commit
        commit_all(params, torch._foreach_add(bases, steps), ok)

    def _d_limit(self, lr_scale: float) -> float:
        """The largest D the step can take with finite results (the docstring): ``lr_scale`` = lr × the bias
        correction; the narrowest state dtype and the largest decoupled decay of the parameters that step. The
        same on every rank (every rank sees every parameter in ``self._everyone``)."""
        g0 = self.param_groups[0]
        stepping = [(p, group) for p, group in self._everyone if group["lr"] != 0]
        dtype = min({state_dtype(p) for p, _ in stepping} or {torch.float32}, key=lambda t: torch.finfo(t).max)
        statistic = 1.0 / g0["d0"] if g0["safeguard_warmup"] else lr_scale / g0["d0"]  # s gets D² x this
        coefficient = max(statistic, 1.0 - g0["betas"][1], lr_scale)  # v: D²(1-β2); β1 = 0: the update's D²·lr
        limit = d_limit(coefficient, dtype)
        if g0["decouple"]:  # x -= λ·D·lr·x: past λ·D·lr = 1 it flips x's sign, past 2 it grows x geometrically
            decay = max((group["weight_decay"] for p, group in stepping if decays(p, group)), default=0.0)
            if decay * lr_scale > 0:
                limit = min(limit, 1.0 / (decay * lr_scale))
        return limit

    def _count_capped(self, limit: float) -> None:
        count = self.param_groups[0].get(CAPPED, 0) + 1
        for group in self.param_groups:
            group[CAPPED] = count
        self._warn_capped(limit)

    def _warn_capped(self, limit: float) -> None:
        if not getattr(self, "_warned_capped", False):
            self._warned_capped = True
            warnings.warn(
                f"Prodigy: the step-size estimate D reached {limit:.3g}, the largest D the step can take with finite "
                "results (its products with the gradients within the state's float range, the decoupled weight "
                "decay's lr x D x weight_decay at most 1), and is held there. D keeps growing only on a loss "
                "with no finite minimum along the gradient (for instance the same gradient stepped again and "
                "again); prodigyopt overflows here. Counted in param_groups[0]['d_capped']; this warning is "
                "shown once.", RuntimeWarning, stacklevel=5)

    def planned_state(self, p: torch.Tensor, group: dict) -> dict:
        planned = super().planned_state(p, group)
        planned["p0"] = planned["s"] if bool(p.any()) else ()  # as _init_state will make it
        return planned

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        dtype = state_dtype(p)
        flat = p.detach().flatten()[::group["slice_p"]]
        state = {"step": 0, "s": torch.zeros(flat.shape, dtype=dtype, device=p.device)}
        if p.any():
            state["p0"] = flat.to(dtype, copy=True)
        else:  # all zeros: a 0-dim zero saves the memory, as the reference does
            state["p0"] = torch.tensor(0.0, dtype=dtype, device=p.device)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return state


@kernels.kernel
def _update_kernel(params, numerators, exp_avg_sqs, values, shrinking, ok):
    """The parameter update θ ← θ − shrink·θ + value·num / (√v + D·ε) as one kernel (compiled=True), of a host step
    and of :meth:`Prodigy._device_update`: ``values`` = D·ε, value, −shrink (float64 device tensors: a sync-free
    step's D lives on the device); ``shrinking``: which parameters decay; a low-precision parameter computed in its
    state's dtype and rounded once by the copy back; the writes masked by ``ok`` (None: a host step)."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, values[0])
    steps = torch._foreach_mul(torch._foreach_div(numerators, denoms), values[1])
    xs = [p if p.dtype == v.dtype else p.to(v.dtype) for p, v in zip(params, exp_avg_sqs)]
    bases = [x + x * values[2] if s else x for x, s in zip(xs, shrinking)]
    torch._foreach_copy_(params, masked(ok, torch._foreach_add(bases, steps), xs))


@kernels.kernel
def _sums_kernel(grads, travelled, ss):
    """Each parameter's ⟨g, x0 − x⟩ and ‖s‖₁ (compiled=True): one kernel for the list, where eager makes one
    reduction per tensor (foreach has no sum or dot; ``_foreach_norm``'s L1 sums in yet another order). Within
    rounding of the eager sums."""
    return [torch.sum(g * t) for g, t in zip(grads, travelled)], [torch.sum(torch.abs(s)) for s in ss]
