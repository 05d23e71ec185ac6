"""Sophia (Liu et al. 2023), SophiaG: momentum divided by an EMA of a diagonal Hessian estimate from gradients of
labels sampled from the model (Gauss–Newton–Bartlett), element-wise clipped."""

from __future__ import annotations

import torch

from ..averaging import AveragingMixin
from ..fisher import FisherMixin

from . import kernels
from ._base import WhitenOptimizer
from .checks import check_betas, check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay
from .update import decays, grads_in, lerp_all, lerp_values, masked, state_dtype, step_all

__all__ = ["Sophia"]

# The reference's guard against a zero Hessian: |m| / (ρ·bs·h + 1e-15), so h = 0 gives a full (clipped) sign step.
HESSIAN_EPS = 1e-15


class Sophia(FisherMixin, AveragingMixin, WhitenOptimizer):
    r"""SophiaG, with the update rule of the authors' code (Liuhong99/Sophia, ``sophia.py`` and
    ``train_sophiag.py``), without the extra ``bs`` argument.

    Every ``k`` steps the user's ``opt.sample_fisher(logits)`` (see :mod:`whiten.fisher`) gives :math:`\hat g`, the
    gradient of the mean loss over the :math:`n` labels sampled from the model, and

    .. math::
        h &\leftarrow \beta_2 h + (1-\beta_2)\, n\, \hat g \odot \hat g \qquad \text{(Gauss–Newton–Bartlett)}\\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad \theta \leftarrow \theta (1 - \eta\lambda) \\
        \theta &\leftarrow \theta - \eta\, \mathrm{sign}(m) \min\!\Big(1, \frac{|m|}{\rho\, h + 10^{-15}}\Big)

    **The batch size.** The reference keeps :math:`h_{ref} = \mathrm{EMA}(\hat g^2)` and steps with
    :math:`\rho \cdot bs \cdot h_{ref}`, ``bs`` given to ``step(bs=...)``: the number of tokens per step,
    ``total_bs * block_size`` in ``train_sophiag.py``, which is also the number of labels its sampled loss averages
    over. whiten takes :math:`n` from ``sample_fisher`` (all calls since the last step, summed over the ranks of a
    distributed run: the labels the mean gradient averages over) and folds it into the EMA, so ``state["hessian"]``
    is :math:`bs \cdot h_{ref}` and ``rho`` means the reference's ρ. With a constant n this is the reference's rule
    exactly (tested in float64); with a varying n each estimate keeps its own scale.

    **Schedule.** ``sample_fisher`` is due when the steps taken are a positive multiple of ``k`` (10, 20, …): the
    reference updates the Hessian after its steps 10, 20, … (``iter_num % k == k - 1``), before the next step, as
    here. Before the first update :math:`h = 0` and the step is the clipped sign step :math:`\eta\,\mathrm{sign}(m)`
    (:math:`m \neq 0`), as the reference; a loop that never calls ``sample_fisher`` keeps taking it.

    **Where whiten departs from the reference.** The reference samples on a separate batch with its own forward;
    ``sample_fisher`` reuses the training forward of the step (one extra backward, no extra forward). The
    reference's training script clips the sampled gradient's norm to 1 (``grad_clip``) before ``update_hessian``;
    whiten takes the gradient as it is. Weight decay is off for the ``vector`` and ``embedding`` roles (whiten's
    convention; nanoGPT's ``configure_optimizers`` decays embeddings too). The reference's ``maximize`` and
    ``capturable`` options are not offered.

    State per parameter (float32, float64 for float64 parameters): ``step`` (int), ``exp_avg`` and ``hessian``
    (shape of p), ``ema`` when averaging.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η (default 1e-4, the reference class's; its GPT-2 small script uses 6e-4 with warm-up and cosine decay).
        betas: (β1, β2) (default (0.965, 0.99)).
        rho: ρ (default 0.04, the reference class's; GPT-2 small: 0.05).
        weight_decay: λ, decoupled (default 0.1; GPT-2 small: 0.2).
        k: steps between Hessian updates, i.e. between sampled backwards (default 10, ``hess_interval``).
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        fisher_seed: seed of the sampled labels (default 0).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient (ordinary or sampled).
        process_group: a ``torch.distributed`` group (DDP: replicated parameters, averaged gradients); the step
            is elementwise: every rank steps the block of each parameter it holds, with nothing exchanged, and the
            sampled gradients are averaged over the group.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`). A step
            that consumes sampled gradients decides on the host.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`).

    Reference: H. Liu, Z. Li, D. Hall, P. Liang, T. Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training", ICLR 2024 (arXiv 2305.14342); code github.com/Liuhong99/Sophia.
    """

    PICKLED = {"k": 10}  # a setting kept as an attribute, with its default
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)


    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        k: int = 10,
        ema_rate: float | None = None,
        fisher_seed: int = 0,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
    ):
        check_int("k", k, 1)
        self.k = k
        self._init_fisher(fisher_seed)
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, ema_rate=ema_rate, role=None)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_range("rho", group["rho"], 0.0)
        check_weight_decay(group["weight_decay"])
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])

    def fisher_schedule(self, step: int) -> bool:
        return step > 0 and step % self.k == 0

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # element-wise: a parameter's numbers never depend on its neighbours

    def elementwise(self, p: torch.Tensor, group: dict) -> bool:
        return True  # its sampled curvature too: each rank keeps its rows of the mean sampled gradient

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        return float(p.numel())

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": None, "exp_avg": tuple(p.shape), "hessian": tuple(p.shape)}

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        states = []
        for p in params:
            s = self.state[p]
            if not s:
                dtype = state_dtype(p)
                s.update(step=0, exp_avg=torch.zeros(p.shape, dtype=dtype, device=p.device),
                         hessian=torch.zeros(p.shape, dtype=dtype, device=p.device))
            s["step"] += 1
            states.append(s)
        self.update_averages(group, params, states)
        beta1, beta2 = group["betas"]
        lr, rho = float(group["lr"]), group["rho"]
        # the Hessian EMA first: the reference updates it after the previous step, so this step uses it
        sampled = [(s["hessian"], self.fisher_grad(p)) for p, s in zip(params, states)]
        sampled = [(h, g if g.dtype == h.dtype else g.to(h.dtype)) for h, g in sampled if g is not None]
        if sampled:
            hs, gs = [h for h, _ in sampled], [g for _, g in sampled]
            torch._foreach_mul_(hs, beta2)
            torch._foreach_addcmul_(hs, gs, gs, value=(1.0 - beta2) * self.fisher_n)
        ms, hs = [s["exp_avg"] for s in states], [s["hessian"] for s in states]
        grads = grads_in(params, ms)
        ok = self._ok  # a sync-free step's device-side flag: the new values are computed aside and committed
        if kernels.active(params, ms, hs, grads):
            keeps = [1.0 - lr * group["weight_decay"] * decays(p, group) for p in params]
            values = kernels.step_values([1.0 - beta1, rho] + keeps + [-lr], params[0].device)
            _step_kernel(params, ms, hs, grads, values, ok)
            return
        ms = lerp_all(ms, grads, 1.0 - beta1, ok)
        # sign(m) · min(1, |m| / (ρh + 1e-15)), the reference's arithmetic, with foreach kernels
        denom = torch._foreach_mul(hs, rho)
        torch._foreach_add_(denom, HESSIAN_EPS)
        steps = torch._foreach_abs(ms)
        torch._foreach_div_(steps, denom)
        torch._foreach_clamp_max_(steps, 1.0)
        torch._foreach_mul_(steps, torch._foreach_sign(ms))
        keeps = [1.0 - lr * group["weight_decay"] * decays(p, group) for p in params]
        step_all(params, [m.dtype for m in ms], steps, keeps, alpha=-lr, ok=ok)


@kernels.kernel
def _step_kernel(params, ms, hs, grads, values, ok):
    """:meth:`Sophia._step_group`'s update after the Hessian EMA (compiled=True, whiten.optim.kernels): ``values`` =
    1 − β1, ρ, each parameter's keep, −lr."""
    n = len(params)
    m = lerp_values(ms, grads, values[0])
    denom = torch._foreach_mul(hs, values[1])
    torch._foreach_add_(denom, HESSIAN_EPS)
    steps = torch._foreach_abs(m)
    torch._foreach_div_(steps, denom)
    torch._foreach_clamp_max_(steps, 1.0)
    torch._foreach_mul_(steps, torch._foreach_sign(m))
    xs = [p if p.dtype == mm.dtype else p.to(mm.dtype) for p, mm in zip(params, ms)]
    new = torch._foreach_mul(xs, [values[2 + i] for i in range(n)])
    torch._foreach_add_(new, torch._foreach_mul(steps, values[2 + n]))
    torch._foreach_copy_(ms, masked(ok, m, ms))
    torch._foreach_copy_(params, masked(ok, new, xs))
