"""Iterate averaging: an average of the parameters that evaluation uses, and the eval()/train() swap.

Training at a high learning rate leaves the live parameters noisy; their average is what should be evaluated
(SPlus paper, §3.3). The optimizer keeps ``state["ema"]`` (the average of the pre-update parameters, in the state
dtype) and ``state["step"]``. A group's ``ema_rate`` says which average:

- ``"auto"``: an average over about the last 10% of the steps taken, whose horizon shrinks with the learning rate
  when a schedule decays it (``avg <- avg + c_t (theta - avg)``, ``c_t = min(1, 1 / (0.1 t rho_t))``, ``rho_t`` =
  the group's lr / the largest lr it has had). At constant lr this is the paper's rule (0.999 at 10k steps) without
  knowing the run's length; under a decaying schedule the average becomes the live parameters as the lr goes to 0,
  so evaluating it is never worse than the live weights there (docs/averaging.md has the measurements).
  ``state["ema"]`` is the average itself.
- a float ``r`` in [0, 1): the fixed EMA ``ema <- r ema + (1-r) theta`` from zero, used bias-corrected,
  ``ema / (1 - r^t)``.
- ``None``: no average.

Modes follow the convention of torch.optim users (Hugging Face's Trainer calls ``optimizer.eval()`` before
evaluating and ``optimizer.train()`` before each training step) and of Schedule-Free: each param group has a
``train_mode`` flag. ``eval()`` puts the average into the parameters of the groups that average, keeps the live
values in ``state["live"]`` and sets ``train_mode=False``; ``train()`` puts them back, bit for bit. Both modes are
ordinary optimizer state, so ``state_dict()`` works in either mode and a checkpoint taken in eval mode (together
with the model's weights, which then hold the average that was scored) resumes exactly: ``load_state_dict`` takes
the mode and the live values from the checkpoint and the next ``train()`` restores the live weights. An optimizer
none of whose groups average has no eval mode: ``eval()`` and ``train()`` change nothing.

Buffers (BatchNorm's running statistics) are not parameters and are not averaged: after ``eval()`` they are the
ones the live weights produced. :func:`whiten.integrations.recompute_batchnorm` recomputes them for the averaged
weights from a few training batches.
"""

from __future__ import annotations

import torch

__all__ = ["AUTO", "HORIZON", "AveragingMixin", "SwapsWeights", "average_weight", "averaged_value", "check_ema_rate"]

AUTO = "auto"
# The "auto" average covers about this fraction of the steps taken: the paper's ema_rate 0.999 over 10k steps.
HORIZON = 0.1


def check_ema_rate(value) -> None:
    """``ema_rate`` is None (no averaging), ``"auto"`` or a rate in [0, 1)."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid ema_rate: {value!r} (allowed: None, 'auto' or a number in [0, 1))")


def average_weight(step: int, lr_ratio: float = 1.0) -> float:
    """``c_t`` of the ``"auto"`` average at ``step`` (from 1), with ``lr_ratio`` = lr / the largest lr so far."""
    window = HORIZON * step * lr_ratio
    return 1.0 if window <= 1.0 else 1.0 / window


def averaged_value(ema: torch.Tensor, ema_rate, step: int) -> torch.Tensor:
    """The average that ``eval()`` puts into a parameter, from its ``state["ema"]`` and ``state["step"]``."""
    if ema_rate == AUTO:
        return ema
    return ema / (1.0 - ema_rate**step)


class SwapsWeights:
    """Mixin of an optimizer with an eval mode (parameter averaging, Schedule-Free): its groups carry ``train_mode``,
    and ``eval()`` keeps the live weights in ``state["live"]``. It owns these entries of the checkpoints. The
    optimizer defines ``swaps_weights(group) -> bool``: whether eval() swaps that group's parameters."""

    def extend_state_dict(self, sd: dict) -> None:
        """An optimizer with an eval mode (parameter averaging, Schedule-Free) saves its mode and the live weights
        (``state["live"]`` in eval mode). DCP loads only the keys that the loading optimizer's own state dict has, and
        a fresh optimizer is in train mode: without the same keys in every state dict an eval-mode checkpoint came
        back as a train-mode one whose model held the average, and training went on from the average. So each
        swapping group always carries ``train_mode`` and each of its parameters a ``"live"`` entry: the saved live
        weights in eval mode, else a copy of the parameter (a parameter not swapped, or train mode).
        :meth:`load_state_dict` keeps them only for a group in eval mode. A copy, not the parameter itself: DCP loads
        in place, into the template's tensors, and a slot sharing the parameter's storage would take the model's
        weights or the live ones, whichever DCP wrote last."""
        super().extend_state_dict(sd)
        index = 0
        for saved, group in zip(sd["param_groups"], self.param_groups):
            if self.swaps_weights(group):
                saved["train_mode"] = group.get("train_mode", True)
                for i, p in enumerate(group["params"], start=index):
                    entry = sd["state"].get(i, {})
                    # a new dict: the optimizer's own state is left as it is
                    sd["state"][i] = {**entry, "live": entry["live"] if "live" in entry else p.detach().clone()}
            index += len(group["params"])

    def after_load(self) -> None:
        super().after_load()
        for group in self.param_groups:  # train mode: a saved "live" is only the slot state_dict() adds
            if group.get("train_mode", True):
                for p in group["params"]:
                    if p in self.state:
                        self.state[p].pop("live", None)
                        if not self.state[p]:
                            del self.state[p]


class AveragingMixin(SwapsWeights):
    """eval()/train() for a torch.optim.Optimizer whose state holds ``"ema"`` and ``"step"`` per parameter and whose
    groups hold ``"ema_rate"`` (see the module's docstring).

    An optimizer calls :meth:`update_averages` once per step with the parameters before their update; ``step`` must
    count those calls (it is incremented before the call). ``step()`` in eval mode raises: the gradient would have
    been taken at the averaged weights and the update applied to them.
    """

    MEMORY_OPTIONS = {"ema_rate=None": (("ema",), "no average (eval() then evaluates the live weights)")}

    def planned_state(self, p: torch.Tensor, group: dict) -> dict:
        planned = super().planned_state(p, group)
        if group.get("ema_rate") is not None:
            planned["ema"] = tuple(p.shape)
        return planned

    @property
    def in_eval_mode(self) -> bool:
        return any(not group.get("train_mode", True) for group in self.param_groups)

    @staticmethod
    def swaps_weights(group: dict) -> bool:
        """Whether eval() swaps this group's parameters (it averages); its state dict then carries the mode."""
        return group.get("ema_rate") is not None

    def check_state_entry(self, pid, p: torch.Tensor, entry: dict, group: dict) -> None:
        super().check_state_entry(pid, p, entry, group)
        if (group.get("ema_rate") is not None and "ema" not in entry and isinstance(entry.get("step"), int)
                and entry["step"] > 0):  # the average would restart from zero in the middle of the run
            raise ValueError(f"{type(self).__name__}.load_state_dict: state of parameter {pid!r} (shape "
                             f"{tuple(p.shape)}) lacks 'ema', the average its group keeps (another optimizer's "
                             "settings?)")

    @torch.no_grad()
    def eval(self):
        """Swap the averaged parameters in (groups that average). Parameters never stepped are their own average."""
        groups = [g for g in self.param_groups if g.get("ema_rate") is not None and g.get("train_mode", True)]
        rates = {p: g["ema_rate"] for g in groups for p in g["params"]}
        if self.distributed_context() is None:  # distributed: every rank keeps its copy, the owners know the average
            rates = {p: r for p, r in rates.items() if "ema" in self.state.get(p, {})}
        for p in rates:
            self.state[p]["live"] = p.detach().clone()

        def put_average(p, value, state):
            if "ema" in state:
                value.copy_(averaged_value(state["ema"], rates[p], state["step"]))

        self.owner_update(list(rates), put_average)
        for g in groups:
            g["train_mode"] = False
        return self

    @torch.no_grad()
    def train(self):
        """Put the live parameters back exactly as they were before ``eval()`` (or as the checkpoint saved them)."""
        for group in self.param_groups:
            if group.get("train_mode", True):
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "live" in state:
                    p.copy_(state.pop("live"))
            group["train_mode"] = True
        return self

    @torch.no_grad()
    def update_averages(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        """Fold the (pre-update) parameters into ``state["ema"]``, created on first use in float32 (float64 for
        float64 parameters). Nothing happens when the group's ``ema_rate`` is None."""
        rate = group.get("ema_rate")
        if rate is None or not params:
            return
        if rate == AUTO:
            # The largest lr the group has had lives in the group, so checkpoints (DCP included) keep it.
            lr = float(group["lr"])
            group["ema_lr_max"] = lr_max = max(lr, group.get("ema_lr_max", 0.0))
            ratio = lr / lr_max if lr_max > 0 else 1.0
        emas, thetas, weights = [], [], []
        for p, state in zip(params, states):
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            if "ema" not in state:
                state["ema"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            emas.append(state["ema"])
            thetas.append(p if p.dtype == dtype else p.to(dtype))
            weights.append(average_weight(state["step"], ratio) if rate == AUTO else 1.0 - rate)
        from .optim.update import lerp_all  # here: whiten.optim imports this module

        ok = getattr(self, "_ok", None)  # a sync-free step's device-side flag: the writes are masked
        if rate != AUTO:
            lerp_all(emas, thetas, 1.0 - rate, ok)
            return
        # Parameters of one group can be at different steps (one that had no gradient for a while); bucket by weight.
        by_weight: dict[float, list[int]] = {}
        for i, w in enumerate(weights):
            by_weight.setdefault(w, []).append(i)
        for w, idx in by_weight.items():
            lerp_all([emas[i] for i in idx], [thetas[i] for i in idx], w, ok)

    def check_can_step(self) -> None:
        if self.in_eval_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the averaged weights. "
                "Call optimizer.train() first."
            )
        super().check_can_step()
