"""What every whiten optimizer shares: argument checks, the non-finite-gradient policy, same-shape state kept in
stacks, state_dict hygiene and counters users can read."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch

from ..linalg import finite_flags, robust_eigh_basis, warn_eigh_failure
from ..roles import ROLES

NONFINITE_POLICIES = ("skip", "raise")


def check_range(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``low <= value <= high`` (open ends where asked)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {lo}{low}, {high}{hi})")


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= {low})")


def check_ema_rate(value) -> None:
    """``ema_rate`` is None (no averaging), ``"auto"`` (whiten.averaging) or a rate in [0, 1)."""
    if value is not None and value != "auto":
        check_range("ema_rate", value, 0.0, 1.0, high_open=True)


def check_betas(name: str, betas, count: int = 2) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {name}: {betas!r} (allowed: a tuple of {count} numbers, each in [0, 1))")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, high_open=True)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (allowed: True or False)")


def check_role(value) -> None:
    if value is not None and value not in ROLES:
        raise ValueError(f"Invalid role: {value!r} (allowed: None or one of {', '.join(ROLES)})")


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 whatever the parameter's dtype, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def bucket(items: Iterable, key: Callable) -> dict:
    out: dict = defaultdict(list)
    for item in items:
        out[key(item)].append(item)
    return out


def _new_counters() -> dict:
    return {"skipped_steps": 0, "eigh_retries": 0, "eigh_failures": 0}


class WhitenOptimizer(torch.optim.Optimizer):
    """Base class: a torch.optim.Optimizer with whiten's checks, counters and state handling.

    Counters (``optimizer.counters``, saved in the state_dict): ``skipped_steps`` (steps skipped because a
    gradient was not finite), ``eigh_retries`` (matrices whose eigendecomposition needed the float64 retry),
    ``eigh_failures`` (matrices whose basis could not be refreshed and was kept).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # apply_step's default loops over _step_group(gi, group, params), each optimizer's own math
        if cls.apply_step is WhitenOptimizer.apply_step and not hasattr(cls, "_step_group"):
            raise TypeError(f"{cls.__name__} must define _step_group(gi, group, params) or override apply_step")

    def __init__(self, params, defaults: dict, nonfinite: str = "skip"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (allowed: {', '.join(map(repr, NONFINITE_POLICIES))})")
        self.nonfinite = nonfinite
        self.counters = _new_counters()
        self._stacks: dict = {}
        super().__init__(params, defaults)

    # ----- construction -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was before the call
            raise

    def _check_group(self, index: int) -> None:
        group = self.param_groups[index]
        for i, p in enumerate(group["params"]):
            where = f"parameter {i} of group {index} (shape {tuple(p.shape)})"
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters: {where}")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"{type(self).__name__} does not support sparse parameters: {where}")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters: {where} is {p.dtype}")
        self.validate_group(group)

    def validate_group(self, group: dict) -> None:  # overridden by each optimizer
        pass

    # ----- stacked state ------------------------------------------------------------------------------------
    def stacked_state(self, key, params: list[torch.Tensor], shapes: dict[str, tuple[int, ...]],
                      names: list[dict[str, str]] | None = None) -> dict:
        """``{slot: (B, *shape) tensor}`` whose slices ARE ``self.state[p][slot]`` for ``params`` (in order).

        The first call for a set of parameters copies their state tensors into one stack per slot and makes every
        state entry a view of it, so later steps run batched kernels on the stack in place with no copies. When the
        members change or a state entry was replaced (``load_state_dict``), the stack is rebuilt the same way.
        State stays per parameter for checkpoints: the views serialize as ordinary tensors.

        ``names`` (one ``{slot: state key}`` per member) stacks entries whose keys differ between members, such as
        the blocks of one parameter in Shampoo; a parameter may then appear more than once. By default each slot is
        the state key of the same name.
        """
        if names is None:
            names = [{slot: slot for slot in shapes}] * len(params)
        entry = self._stacks.get(key)
        if entry is not None:
            members, stacks, views = entry
            if (len(members) == len(params)
                    and all(a is p and an == n for (a, an), p, n in zip(members, params, names))
                    and all(self.state[p][n[slot]] is views[slot][j]
                            for slot in shapes for j, (p, n) in enumerate(zip(params, names)))):
                return stacks
        stacks, views = {}, {}
        for slot, shape in shapes.items():
            originals = [self.state[p][n[slot]] for p, n in zip(params, names)]
            stacks[slot] = torch.stack([t.reshape(shape) for t in originals])
            views[slot] = [stacks[slot][j].view(t.shape) for j, t in enumerate(originals)]
            for p, n, v in zip(params, names, views[slot]):
                self.state[p][n[slot]] = v
        self._stacks[key] = (list(zip(params, names)), stacks, views)
        return stacks

    # ----- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        self.check_can_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self.params_with_grad()
        if self.grads_are_finite(work):  # checked before any state changes
            self.apply_step(work)
        return loss

    def check_can_step(self) -> None:  # raises where stepping now would corrupt the run (eval mode)
        pass

    def apply_step(self, work: list[tuple[dict, list[torch.Tensor]]]) -> None:
        """The update, given (group, parameters with a gradient) for every group; all gradients are finite."""
        for gi, (group, params) in enumerate(work):
            if params:
                self._step_group(gi, group, params)


    # ----- Shampoo factors and their eigenbases ---------------------------------------------------------------
    @staticmethod
    def factor_state(state: dict, matrix: tuple[int, int], left: bool, right: bool, dtype, device) -> dict:
        """Add zero factors ``factor_left`` (m, m) / ``factor_right`` (n, n) and identity bases ``basis_*`` for the
        sides of an (m, n) matrix view that have a factor; returns ``state``."""
        for side, d, present in (("left", matrix[0], left), ("right", matrix[1], right)):
            if present:
                state[f"factor_{side}"] = torch.zeros(d, d, dtype=dtype, device=device)
                state[f"basis_{side}"] = torch.eye(d, dtype=dtype, device=device)
        return state

    def refresh_bases(self, states: list[dict], eps: float, descending: bool = False) -> None:
        """``basis_*`` = eigenvectors of ``factor_* + eps·I`` (ascending eigenvalues, or descending), grouped by
        (size, dtype, device) for robust_eigh_basis; a matrix whose eigendecomposition fails keeps its old basis and
        is counted."""
        pairs = [(s[f"factor_{side}"], s[f"basis_{side}"]) for s in states for side in ("left", "right")
                 if f"factor_{side}" in s]
        key = (lambda fb: (fb[0].shape, fb[0].dtype, fb[0].device)) if getattr(self, "batched", True) else id
        for group_pairs in bucket(pairs, key).values():
            result = robust_eigh_basis([f for f, _ in group_pairs], eps)
            self.counters["eigh_retries"] += result.retried
            for (_, basis), ok, vectors in zip(group_pairs, result.ok, result.vectors):
                if ok:
                    basis.copy_(vectors.flip(-1) if descending else vectors)
            failed = result.ok.count(False)
            if failed:
                self.counters["eigh_failures"] += failed
                warn_eigh_failure(type(self).__name__, failed)

    # ----- gradients ------------------------------------------------------------------------------------------
    def params_with_grad(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """(group, its parameters that have a gradient), rejecting sparse gradients by name."""
        out = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: parameter {i} of group {gi} "
                        f"(shape {tuple(p.shape)}); use nn.Embedding(sparse=False)"
                    )
                params.append(p)
            out.append((group, params))
        return out

    def grads_are_finite(self, work: list[tuple[dict, list[torch.Tensor]]]) -> bool:
        """Check every gradient before any state changes; apply the non-finite policy. True: go ahead."""
        grads = [p.grad for _, params in work for p in params]
        if not grads:
            return True
        flags = finite_flags(grads)
        if all(flags):
            return True
        shapes = [(gi, tuple(p.shape)) for gi, (_, params) in enumerate(work) for p in params]
        bad = [where for where, ok in zip(shapes, flags) if not ok]
        message = (f"{type(self).__name__}: non-finite gradient in {len(bad)} parameter(s) "
                   f"(first: group {bad[0][0]}, shape {bad[0][1]})")
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.counters["skipped_steps"] += 1
        warnings.warn(message + "; step skipped, optimizer state untouched "
                      f"({self.counters['skipped_steps']} skipped so far)", RuntimeWarning, stacklevel=3)
        return False

    # ----- pickling and checkpoints ----------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, counters=dict(self.counters), batched=getattr(self, "batched", True))
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("counters", _new_counters())
        self.__dict__.setdefault("batched", True)
        self._stacks = {}  # rebuilt on the next step

    def state_dict(self):
        sd = super().state_dict()
        sd["whiten_counters"] = dict(self.counters)
        return sd

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._stacks = {}
        # torch casts floating-point state to the parameter's dtype; whiten keeps state in its own dtype (fp32
        # factors for bf16 parameters), so restore each saved tensor with its saved dtype. Cloning also keeps this
        # optimizer from sharing tensors with the dict it was loaded from.
        id_to_param = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(saved["params"], group["params"]))
        for pid, saved_state in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            self.state[p] = {
                k: v.detach().to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in saved_state.items()
            }
        self.counters.update(state_dict.get("whiten_counters", {}))
