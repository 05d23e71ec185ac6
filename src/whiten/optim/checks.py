"""Argument checks shared by the optimizers: each raises a ValueError that names the argument and what is allowed."""

from __future__ import annotations

import math

import torch

from ..averaging import check_ema_rate
from ..roles import ROLES

__all__ = ["LR_MAX", "WEIGHT_DECAY_MAX", "check_choice", "check_range", "check_lr", "check_weight_decay", "check_int", "check_ema_rate",
           "check_betas", "check_bool", "check_role", "ROTATION_DTYPES", "rotation_dtype"]

# Upper bounds: no run trains with a larger step or decay, and beyond ~1e38 the step sizes no longer fit the
# float32 scalars of in-place kernels (a float-conversion error mid-step); inf gives NaN parameters in one step.
LR_MAX = 1e6
WEIGHT_DECAY_MAX = 1e6


def check_range(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``low <= value <= high`` (open ends where asked). Infinity is never
    accepted: no hyperparameter of these optimizers works at inf (the step or the decay becomes NaN)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or math.isinf(value) or below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {lo}{low}, {high}{hi})")


def check_choice(name: str, value, allowed) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {', '.join(map(repr, allowed))})")


def check_lr(name: str, value) -> None:
    check_range(name, value, 0.0, LR_MAX)


def check_weight_decay(value) -> None:
    check_range("weight_decay", value, 0.0, WEIGHT_DECAY_MAX)


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= {low})")


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


# What ``rotation_dtype`` (SPlus, SOAP) accepts: None (off) or bfloat16, spelled as a dtype or as a string.
ROTATION_DTYPES = {None: None, torch.bfloat16: torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def state_dtype_option(value) -> torch.dtype | None:
    """The storage dtype of an optimizer's reduced-precision state (``state_dtype``): None (float32, float64 for
    float64 parameters) or torch.bfloat16, spelled as ``rotation_dtype`` is. Raises a ValueError naming
    ``state_dtype`` for anything else."""
    try:
        return ROTATION_DTYPES[value]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise ValueError(f"Invalid state_dtype: {value!r} (allowed: None, torch.bfloat16, 'bf16' or "
                         "'bfloat16')") from None


def rotation_dtype(value) -> torch.dtype | None:
    """The dtype of the rotations into and out of the eigenbasis: None (the state dtype) or torch.bfloat16.
    Raises a ValueError naming ``rotation_dtype`` for anything else."""
    try:
        return ROTATION_DTYPES[value]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise ValueError(f"Invalid rotation_dtype: {value!r} (allowed: None, torch.bfloat16, 'bf16' or "
                         "'bfloat16')") from None
