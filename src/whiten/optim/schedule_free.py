"""Schedule-Free AdamW (Defazio et al. 2024): no learning-rate decay schedule; the evaluation point is an average
of the iterates that the optimizer maintains itself."""

from __future__ import annotations

import torch

from ..averaging import SwapsWeights
from . import kernels
from ._base import WhitenOptimizer
from .checks import check_betas, check_int, check_lr, check_range, check_role, check_weight_decay
from .update import apply_all, commit_all, decays, grads_in, lerp_values, masked, state_dtype

__all__ = ["ScheduleFreeAdamW"]


class ScheduleFreeAdamW(SwapsWeights, WhitenOptimizer):
    r"""Schedule-Free AdamW, as ``schedulefree.AdamWScheduleFree`` (facebookresearch/schedule_free) computes it.

    The parameters hold :math:`y` while training and :math:`x` while evaluating; the state holds :math:`z`. At step
    :math:`k` (from 0), with :math:`\gamma_k` = lr × linear warm-up factor:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \qquad
        \hat g = g / (\sqrt{v / (1-\beta_2^{k+1})} + \epsilon) + \lambda y \\
        w_k &= (k+1)^r \,(\max_{j\le k}\gamma_j)^{p}, \qquad c = w_k / \textstyle\sum_{j\le k} w_j \\
        y &\leftarrow (1-c)\,y + c\,z + \gamma_k(\beta_1(1-c) - 1)\,\hat g, \qquad z \leftarrow z - \gamma_k \hat g

    which keeps :math:`y = (1-\beta_1) z + \beta_1 x` for the average :math:`x` of the :math:`z` iterates.
    ``eval()`` puts :math:`x` into the parameters and keeps :math:`y` in ``state["live"]``; ``train()`` puts
    :math:`y` back, bit for bit. This is the convention of whiten's averaging optimizers (:mod:`whiten.averaging`):
    the mode is saved in each param group (``train_mode``) and :math:`y` in the state, so a checkpoint taken in
    either mode, with the model's weights saved beside it, resumes exactly.

    Unlike the reference, the optimizer starts in train mode (no ``train()`` call is needed before the first step),
    never modifies ``p.grad``, keeps its state in float32 for low-precision parameters, and does not decay the
    ``vector`` and ``embedding`` roles. Calling ``step()`` in eval mode raises.

    State per parameter: ``z`` and ``exp_avg_sq`` (shape of p, float32; float64 for float64 parameters); ``live``
    (y, dtype of p) while in eval mode.
    Per group: ``k`` (steps taken), ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: γ (default 0.0025). betas: (β1, β2) (default (0.9, 0.999)). eps: ε (default 1e-8).
        weight_decay: λ, applied at y through the gradient as the reference does (default 0).
        warmup_steps: linear warm-up of γ over this many steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: weights of the average ∝ max lr so far to this power (default 2).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group (DDP: replicated parameters, averaged gradients); default
            None: one process, or the mesh of DTensor (FSDP2) parameters. The step is elementwise: every rank steps
            the block of each parameter it holds, with nothing exchanged; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`).

    Reference: A. Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
    """

    SECOND_MOMENT_KEY = "exp_avg_sq"  # restarted where it overflowed (WhitenOptimizer.restart_overflowed_moments)
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, role=None, k=0, train_mode=True, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        if group["betas"][0] == 0:
            raise ValueError("Invalid betas[0]: 0 (allowed: (0, 1); eval() divides by beta1)")
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"])
        check_int("warmup_steps", group["warmup_steps"], 0)
        check_range("r", group["r"], 0.0)
        check_range("weight_lr_power", group["weight_lr_power"], 0.0)
        check_role(group["role"])

    @property
    def in_eval_mode(self) -> bool:
        return any(not g["train_mode"] for g in self.param_groups)

    @torch.no_grad()
    def eval(self):
        """Put the averaged point x = (y - (1-β1) z) / β1 into the parameters."""
        groups = [g for g in self.param_groups if g["train_mode"]]
        beta1 = {p: g["betas"][0] for g in groups for p in g["params"]}
        if self.distributed_context() is None:  # distributed: every rank keeps its copy, the owners know z
            beta1 = {p: b for p, b in beta1.items() if "z" in self.state.get(p, {})}
        for p in beta1:
            self.state[p]["live"] = p.detach().clone()

        def to_x(p, value, state):
            z = state.get("z")
            if z is not None:
                value.copy_(value.to(z.dtype).lerp_(z, 1.0 - 1.0 / beta1[p]))

        self.owner_update(list(beta1), to_x)
        for g in groups:
            g["train_mode"] = False
        return self

    @torch.no_grad()
    def train(self):
        """Put the training point y back: exactly the one eval() replaced (kept in ``state["live"]``, checkpoints
        included); recomputed as y = (1-β1) z + β1 x for a checkpoint that lacks it."""
        groups = [g for g in self.param_groups if not g["train_mode"]]
        beta1 = {p: g["betas"][0] for g in groups for p in g["params"]}
        kept = {id(p) for p in beta1 if "live" in self.state.get(p, {})}
        for p in beta1:
            if id(p) in kept:
                p.copy_(self.state[p].pop("live"))

        def to_y(p, value, state):
            z = state.get("z")
            if z is not None:
                value.copy_(value.to(z.dtype).lerp_(z, 1.0 - beta1[p]))

        # the same list on every rank: eval() kept a copy of every parameter, or the checkpoint had none
        self.owner_update([p for p in beta1 if id(p) not in kept], to_y)
        for g in groups:
            g["train_mode"] = True
        return self

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"z": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def elementwise(self, p: torch.Tensor, group: dict) -> bool:
        return True  # every entry's step reads only its own z, v, y and g, and the group's scalars

    @staticmethod
    def swaps_weights(group: dict) -> bool:
        """Every group: eval() puts x in place of y (see WhitenOptimizer.state_dict)."""
        return True


    def check_can_step(self) -> None:
        if self.in_eval_mode:
            raise RuntimeError("ScheduleFreeAdamW.step() called in eval mode: the parameters hold the averaged "
                               "point x, not the training point y. Call optimizer.train() first.")
        super().check_can_step()

    def apply_step(self, work) -> None:
        for gi, (group, params) in enumerate(work):  # every group advances its k, with or without gradients
            self._step_group(gi, group, params)

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        k = group["k"]
        lr = float(group["lr"]) * ((k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = lr_max = max(lr, group["lr_max"])
        weight = (k + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
        group["weight_sum"] += weight
        c = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
        group["k"] = k + 1
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self.state[p] = {"z": p.detach().to(state_dtype(p), copy=True),
                                 "exp_avg_sq": torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)}
        z = [self.state[p]["z"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        grads = grads_in(params, z)
        y = [p if p.dtype == zi.dtype else p.to(zi.dtype) for p, zi in zip(params, z)]
        ok = self._ok  # a sync-free step's device-side flag: the new values are computed aside and committed
        if kernels.active(params, z, v, grads):
            wd = [group["weight_decay"] if decays(p, group) else 0.0 for p in params]
            values = [beta2, 1.0 - beta2, 1.0 - beta2 ** (k + 1), group["eps"], c,
                      lr * (beta1 * (1.0 - c) - 1.0), lr] + wd
            _step_kernel(params, z, v, grads, kernels.step_values(values, params[0].device), ok)
            return
        new_v = apply_all("mul", v, beta2, ok=ok)
        torch._foreach_addcmul_(new_v, grads, grads, 1.0 - beta2)
        denom = torch._foreach_div(new_v, 1.0 - beta2 ** (k + 1))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        step = torch._foreach_div(grads, denom)  # new tensors: p.grad stays the user's (the reference divides it)
        if group["weight_decay"] != 0:
            decayed = [i for i, p in enumerate(params) if decays(p, group)]
            if decayed:
                torch._foreach_add_([step[i] for i in decayed], [y[i] for i in decayed], alpha=group["weight_decay"])
        new_y = apply_all("lerp", y, z, c, ok=ok)
        torch._foreach_add_(new_y, step, alpha=lr * (beta1 * (1.0 - c) - 1.0))
        new_z = apply_all("sub", z, step, alpha=lr, ok=ok)
        # (a low-precision parameter's y is computed in the state dtype and rounded once into it)
        commit_all(v + z + params, new_v + new_z + new_y, ok)


@kernels.kernel
def _step_kernel(params, zs, vs, grads, values, ok):
    """:meth:`ScheduleFreeAdamW._step_group`'s update (compiled=True, whiten.optim.kernels): ``values`` = β2,
    1 − β2, the bias correction, ε, c, the step's factor on y, lr, then each parameter's weight decay (0 where it
    does not decay)."""
    n = len(params)
    y = [p if p.dtype == z.dtype else p.to(z.dtype) for p, z in zip(params, zs)]
    v = torch._foreach_mul(vs, values[0])
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), values[1]))
    denom = torch._foreach_div(v, values[2])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, values[3])
    step = torch._foreach_div(grads, denom)
    torch._foreach_add_(step, torch._foreach_mul(y, [values[7 + i] for i in range(n)]))
    new_y = lerp_values(y, zs, values[4])
    torch._foreach_add_(new_y, torch._foreach_mul(step, values[5]))
    new_z = torch._foreach_sub(zs, torch._foreach_mul(step, values[6]))
    torch._foreach_copy_(vs, masked(ok, v, vs))
    torch._foreach_copy_(zs, masked(ok, new_z, zs))
    torch._foreach_copy_(params, masked(ok, new_y, y))
