"""Iterate averaging: an EMA of the parameters that evaluation uses, and the eval()/train() swap.

Training at a high learning rate leaves the live parameters noisy; their average is what should be evaluated
(SPlus paper, §3.3). The optimizer keeps ``state["ema"]`` (an EMA of the pre-update parameters, in the state
dtype) and ``state["step"]``; ``eval()`` puts the bias-corrected average ``ema / (1 - ema_rate**step)`` into the
parameters and ``train()`` puts the live ones back, bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["AveragingMixin", "averaged_value"]


def averaged_value(ema: torch.Tensor, ema_rate: float, step: int) -> torch.Tensor:
    """The bias-corrected average after ``step`` updates of an EMA that started at zero."""
    return ema / (1.0 - ema_rate**step)


class AveragingMixin:
    """eval()/train() for a torch.optim.Optimizer whose state holds ``"ema"`` and ``"step"`` per parameter and whose
    groups hold ``"ema_rate"`` (``None``: that group does not average).

    An optimizer calls :meth:`update_averages` once per step with the parameters before their update; ``step`` must
    count those calls.

    While in eval mode the parameters hold the averages, so ``step()``, ``state_dict()`` and ``load_state_dict()``
    raise: training or saving the averaged weights as if they were the live ones would silently corrupt the run.
    """

    _live: dict | None = None

    @property
    def in_eval_mode(self) -> bool:
        return self._live is not None

    @torch.no_grad()
    def eval(self):
        """Swap the averaged parameters in. Parameters that were never stepped are their own average."""
        if self._live is not None:
            return self
        rates = {p: g["ema_rate"] for g in self.param_groups if g.get("ema_rate") is not None for p in g["params"]}
        if self.distributed_context() is None:  # distributed: the owners know which have an average
            rates = {p: r for p, r in rates.items() if "ema" in self.state.get(p, {})}
        live = {p: p.detach().clone() for p in rates}

        def put_average(p, value, state):
            if "ema" in state:
                value.copy_(averaged_value(state["ema"], rates[p], state["step"]))

        self.owner_update(list(rates), put_average)
        self._live = live
        return self

    @torch.no_grad()
    def train(self):
        """Put the live parameters back exactly as they were before ``eval()``."""
        if self._live is None:
            return self
        for p, value in self._live.items():
            p.copy_(value)
        self._live = None
        return self

    @torch.no_grad()
    def update_averages(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        """``ema = r*ema + (1-r)*p`` for the (pre-update) parameters; ``ema`` is created on first use in float32
        (float64 for float64 parameters). Nothing happens when the group's ``ema_rate`` is None."""
        rate = group.get("ema_rate")
        if rate is None or not params:
            return
        emas = []
        for p, state in zip(params, states):
            if "ema" not in state:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                state["ema"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            emas.append(state["ema"])
        thetas = [p if p.dtype == e.dtype else p.to(e.dtype) for p, e in zip(params, emas)]
        torch._foreach_lerp_(emas, thetas, 1.0 - rate)

    def check_can_step(self) -> None:
        self._refuse_in_eval_mode("step")

    def state_dict(self):
        self._refuse_in_eval_mode("state_dict")
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._refuse_in_eval_mode("load_state_dict")
        super().load_state_dict(state_dict)

    def _refuse_in_eval_mode(self, what: str) -> None:
        if self._live is not None:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() called in eval mode: the parameters hold the averaged weights. "
                "Call optimizer.train() first."
            )
