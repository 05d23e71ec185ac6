"""AdamW for the parameters a matrix method does not take (embeddings, heads, vectors), shared by every optimizer
that steps the rest with its own rule (Muon, SpecGD): the groups, their lr as a ratio to the shared lr, and the
step itself, with torch.optim.AdamW's arithmetic."""

from __future__ import annotations

import math

import torch

from . import kernels
from .checks import check_betas, check_lr, check_range
from .update import apply_all, commit_all, decays, grads_in, lerp_all, lerp_values, masked, write

__all__ = ["AdamWPath", "adamw_step", "check_adamw_path"]


def check_adamw_path(group: dict) -> None:
    check_lr("adam_lr", group["adam_lr"])
    check_betas("adam_betas", group["adam_betas"])
    check_range("adam_eps", group["adam_eps"], 0.0)
    check_range("lr_scale", group["lr_scale"], 0.0)


def adamw_step(group: dict, params: list[torch.Tensor], states: list[dict], ok: torch.Tensor | None = None) -> None:
    """One AdamW step (decoupled decay where :func:`decays`, bias correction) of ``params`` with their ``states``
    (``step`` already counted, ``exp_avg``, ``exp_avg_sq``): β1 = the group's ``momentum``, β2 =
    ``adam_betas[1]``, lr = ``lr × lr_scale``, ε = ``adam_eps``. ``ok``: a sync-free step's device-side flag (the
    new values are computed aside and committed, the same arithmetic)."""
    beta1, beta2 = group["momentum"], group["adam_betas"][1]
    lr, eps = float(group["lr"]) * group["lr_scale"], group["adam_eps"]
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    grads = grads_in(params, m)
    if kernels.active(params, m, v, grads):
        steps = [s["step"] for s in states]
        values = ([1.0 - beta1, beta2, 1.0 - beta2, eps]
                  + [1.0 - lr * group["weight_decay"] * decays(p, group) for p in params]
                  + [-lr / (1.0 - beta1**t) for t in steps] + [math.sqrt(1.0 - beta2**t) for t in steps])
        _adamw_kernel(params, m, v, grads, kernels.step_values(values, params[0].device), ok)
        return
    m = lerp_all(m, grads, 1.0 - beta1, ok)
    kept, v = v, apply_all("mul", v, beta2, ok=ok)
    torch._foreach_addcmul_(v, grads, grads, 1.0 - beta2)
    commit_all(kept, v, ok)
    # torch.optim.AdamW's arithmetic: p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    steps = [s["step"] for s in states]
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    keeps = [1.0 - lr * group["weight_decay"] * decays(p, group) for p in params]
    alphas = [-lr / (1.0 - beta1**t) for t in steps]
    same = [i for i, p in enumerate(params) if p.dtype == m[i].dtype]  # fused: a launch per op, not per parameter
    if same:
        ps = [params[i] for i in same]
        new = apply_all("mul", ps, [keeps[i] for i in same], ok=ok)
        torch._foreach_addcdiv_(new, [m[i] for i in same], [denom[i] for i in same], [alphas[i] for i in same])
        commit_all(ps, new, ok)
    for i, p in enumerate(params):  # a low-precision parameter: in the state's dtype, rounded once
        if p.dtype != m[i].dtype:
            write(p, m[i].dtype, lambda x, i=i: x.mul_(keeps[i]).addcdiv_(m[i], denom[i], value=alphas[i]), ok)


@kernels.kernel
def _adamw_kernel(params, ms, vs, grads, values, ok):
    """:func:`adamw_step`'s arithmetic as one kernel (compiled=True): ``values`` = 1 − β1, β2, 1 − β2, ε, then per
    parameter the keeps, the step sizes −lr/bc1 and the roots √bc2."""
    n = len(params)
    weight, beta2, rest2, eps = values[0], values[1], values[2], values[3]
    keeps, alphas, roots = ([values[4 + k * n + i] for i in range(n)] for k in range(3))
    m = lerp_values(ms, grads, weight)
    v = torch._foreach_mul(vs, beta2)
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), rest2))
    denom = torch._foreach_div(torch._foreach_sqrt(v), roots)
    torch._foreach_add_(denom, eps)
    xs = [p if p.dtype == mm.dtype else p.to(mm.dtype) for p, mm in zip(params, ms)]
    new = torch._foreach_mul(xs, keeps)
    torch._foreach_add_(new, torch._foreach_mul(torch._foreach_div(m, denom), alphas))
    torch._foreach_copy_(ms, masked(ok, m, ms))
    torch._foreach_copy_(vs, masked(ok, v, vs))
    torch._foreach_copy_(params, masked(ok, new, xs))


class AdamWPath:
    """Mixin for an optimizer whose rule covers some parameters (``uses_own_rule``) and AdamW the others.

    Its defaults carry ``adam_lr``, ``adam_betas``, ``adam_eps`` and ``lr_scale``. A group without a role that mixes
    both kinds (e.g. ``model.parameters()``) is split into two groups. A group whose parameters all go to AdamW and
    that sets no ``lr`` of its own keeps the shared ``lr`` and gets ``lr_scale = adam_lr / lr``, and, unless it sets
    ``momentum``, ``momentum = adam_betas[0]``: every group carries the same ``lr`` and ``momentum`` keys, so a loop
    that writes one lr into every group (nanoGPT's ``g['lr'] = lr``) keeps AdamW's ratio to the shared lr, and
    ``OneCycleLR(cycle_momentum=True)`` cycles μ and AdamW's β1 alike.

    The optimizer defines ``uses_own_rule(p, role) -> bool``: whether its own rule steps ``p`` (else AdamW does)."""

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if param_group.get("role") is None:
            own = [p for p in params if self.uses_own_rule(p, None)]
            adam = [p for p in params if not self.uses_own_rule(p, None)]
            if own and adam:  # split so each path has its own lr
                super().add_param_group({**param_group, "params": own})
                try:
                    self.add_param_group({**param_group, "params": adam})
                except Exception:
                    self.param_groups.pop()  # all or nothing: not the first half alone
                    raise
                return
        group = {**param_group, "params": params}
        if params and not any(self.uses_own_rule(p, group.get("role")) for p in params):  # stepped by AdamW
            if "lr" not in group and "lr_scale" not in group:
                # A ratio to the shared lr, not an lr of its own: schedulers and loops that write g["lr"] into
                # every group then move AdamW with the rest instead of overwriting adam_lr.
                lr, adam_lr = self.defaults["lr"], group.get("adam_lr", self.defaults["adam_lr"])
                if isinstance(lr, (int, float)) and lr > 0:
                    group["lr_scale"] = adam_lr / lr
                else:
                    group["lr"] = adam_lr
            if "momentum" not in group:
                group["momentum"] = group.get("adam_betas", self.defaults["adam_betas"])[0]
        super().add_param_group(group)
