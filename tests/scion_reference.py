"""A float64 transcription of the reference Scion (LIONS-EPFL/scion, commit f58a393, ``scion.py``): the ``Scion``
step and the norms' LMOs, written per tensor and without torch.compile. The one change: Newton–Schulz runs in the
input's dtype (float64 here) instead of bfloat16, so the rule can be compared at float64 precision."""

from __future__ import annotations

import math

import torch

JORDAN = (3.4445, -4.7750, 2.0315)


def ns5(G: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = JORDAN
    X = G.T if G.size(0) > G.size(1) else G
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if G.size(0) > G.size(1) else X


def lmo(g: torch.Tensor, norm: str, kw: dict) -> torch.Tensor:
    eps = 1e-8
    if norm == "Auto":
        norm = "BiasRMS" if g.ndim < 2 else "Spectral" if g.ndim == 2 else "SpectralConv"
        kw = {}
    if norm == "BiasRMS":
        return g / (torch.sqrt(torch.mean(g**2, dim=0, keepdim=True)) + eps)
    if norm == "Sign":
        d_in = g.shape[1]
        return torch.sign(g) / d_in if kw.get("normalized", True) else torch.sign(g)
    if norm == "Spectral":
        u = ns5(g.reshape(len(g), -1), kw.get("steps", 5)).view(g.shape)
        d_out, d_in = g.shape
        scale = math.sqrt(d_out / d_in) if kw.get("normalized", True) else math.sqrt(d_out)
        if kw.get("max", False):
            scale = max(1, scale)
        return u * scale
    if norm == "SpectralConv":
        u = ns5(g.reshape(len(g), -1), kw.get("steps", 5)).view(g.shape)
        out_channels, in_channels, k = g.shape[:3]
        return u * ((out_channels / in_channels) ** 0.5 / (k if g.ndim == 3 else k**2))
    transpose = kw.get("transpose", False)
    if transpose:
        g = g.transpose(0, 1)
    if norm == "ColNorm":
        rms = 1 / math.sqrt(g.size(0)) * torch.sqrt(torch.sum(g**2, dim=0, keepdim=True))
        if kw.get("normalized", False):
            rms = rms * g.size(1)
    elif norm == "RowNorm":
        rms = torch.sqrt(torch.sum(g**2, dim=-1, keepdim=True))
        if kw.get("normalized", True):
            rms = rms * math.sqrt(g.size(-1))
    else:
        raise ValueError(norm)
    g = g / (rms + eps)
    return g.transpose(0, 1) if transpose else g


class ReferenceScion:
    """The reference's Scion.step for a list of (tensor, norm, norm_kwargs, scale); ``momentum`` in the reference's
    convention (the weight of the new gradient; 1.0 = none)."""

    def __init__(self, params, lr: float, momentum: float, unconstrained: bool):
        self.params, self.lr, self.momentum, self.unconstrained = params, lr, momentum, unconstrained
        self.bufs = [None] * len(params)

    def step(self, grads):
        for i, ((p, norm, kw, scale), g) in enumerate(zip(self.params, grads)):
            if self.momentum != 1:
                if self.bufs[i] is None:
                    self.bufs[i] = torch.zeros_like(g)
                self.bufs[i] = self.bufs[i] * (1 - self.momentum) + g * self.momentum
                g = self.bufs[i]
            update = scale * lmo(g, norm, kw)
            if not self.unconstrained:
                p.mul_(1 - self.lr)
            p.add_(update, alpha=-self.lr)
