"""A slow, obviously-correct float64 reference of SPlus as the paper's experiment code computes it
(ALGORITHMS.md §S, "One step, as E computes it"). One parameter at a time, no batching, no tricks."""

from __future__ import annotations

import torch


class ReferenceSPlus:
    def __init__(self, named_params: dict[str, torch.Tensor], roles: dict[str, str], lr=0.2, b1=0.9, b2=0.95,
                 ema_rate=0.999, weight_decay=0.1, inverse_every=100, eps=1e-30, max_dim=10000,
                 nonstandard_constant=1e-3, whiten_conv=False, store_dtype=None):
        self.h = dict(lr=lr, b1=b1, b2=b2, r=ema_rate, wd=weight_decay, every=inverse_every, eps=eps,
                      max_dim=max_dim, c=nonstandard_constant, whiten_conv=whiten_conv)
        # store_dtype: the parameters' own dtype; the reference computes in float64 and rounds into it each step.
        self.store_dtype = store_dtype or {}
        self.theta = {k: v.detach().to(torch.float64).clone() for k, v in named_params.items()}
        self.roles = roles
        self.t = 0
        self.M = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        self.ema = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        self.L, self.R, self.QL, self.QR = {}, {}, {}, {}
        for k, v in self.theta.items():
            shape = self._matrix_shape(k)
            if shape is None:
                continue
            m, n = shape
            if m < max_dim:
                self.L[k], self.QL[k] = torch.zeros(m, m, dtype=torch.float64), torch.eye(m, dtype=torch.float64)
            if n < max_dim:
                self.R[k], self.QR[k] = torch.zeros(n, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)

    def _matrix_shape(self, k):
        v, role = self.theta[k], self.roles[k]
        if v.ndim == 2 and role != "vector":
            shape = tuple(v.shape)
        elif v.ndim >= 3 and self.h["whiten_conv"] and role in ("conv", "hidden"):
            shape = (v.shape[0], v.numel() // v.shape[0])
        else:
            return None
        if shape[0] >= self.h["max_dim"] and shape[1] >= self.h["max_dim"]:
            return None
        return shape

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        h = self.h
        self.t += 1
        for k, theta in self.theta.items():
            G = grads[k].to(torch.float64)
            role = self.roles[k]
            self.M[k] = h["b1"] * self.M[k] + (1 - h["b1"]) * G
            shape = self._matrix_shape(k)
            if shape is not None:
                Gm, Mm = G.reshape(shape), self.M[k].reshape(shape)
                if k in self.L:
                    self.L[k] = h["b2"] * self.L[k] + (1 - h["b2"]) * Gm @ Gm.T
                if k in self.R:
                    self.R[k] = h["b2"] * self.R[k] + (1 - h["b2"]) * Gm.T @ Gm
                X = Mm
                if k in self.QL:
                    X = self.QL[k].T @ X
                if k in self.QR:
                    X = X @ self.QR[k]
                U = torch.sign(X)
                if k in self.QL:
                    U = self.QL[k] @ U
                if k in self.QR:
                    U = U @ self.QR[k].T
                U = U.reshape(theta.shape)
                standard = role in ("hidden", "conv") and k in self.QL and k in self.QR
                scale = 2.0 / (shape[0] + shape[1]) if standard else h["c"]
            else:
                U = torch.sign(self.M[k])
                scale = h["c"]
            s = h["lr"] * scale
            wd = 0.0 if role in ("vector", "embedding") else h["wd"]
            self.ema[k] = h["r"] * self.ema[k] + (1 - h["r"]) * theta
            new = theta - s * (U + wd * theta)
            if k in self.store_dtype:
                new = new.to(self.store_dtype[k]).to(torch.float64)
            self.theta[k] = new
        if self.t == 1 or self.t % h["every"] == 0:
            for F, Q in ((self.L, self.QL), (self.R, self.QR)):
                for k in F:
                    eye = torch.eye(F[k].shape[0], dtype=torch.float64)
                    Q[k] = torch.linalg.eigh(F[k] + h["eps"] * eye).eigenvectors

    def averaged(self) -> dict[str, torch.Tensor]:
        return {k: e / (1 - self.h["r"] ** self.t) for k, e in self.ema.items()}
