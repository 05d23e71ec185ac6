"""A slow, obviously-correct float64 reference of Shampoo as Distributed Shampoo computes it (ALGORITHMS.md §1.2).
One parameter, one block, one mode at a time; no stacks, no views into optimizer state, no tricks."""

from __future__ import annotations

import itertools
import math

import torch


def reference_merge(shape, max_dim):
    """Squeeze size-1 dims; merge neighbours from the right while the product stays <= max_dim."""
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    out = []
    acc = dims[-1]
    for d in reversed(dims[:-1]):
        if acc * d <= max_dim:
            acc *= d
        else:
            out.append(acc)
            acc = d
    out.append(acc)
    return tuple(reversed(out))


def reference_modes(dims, ratio=None):
    """The preconditioned modes of a block: all (DS); with a ratio, drop the largest (the first of equal ones)
    while 2 Σ_kept d² > ratio · Π d and 2^16."""
    kept = list(range(len(dims)))
    while ratio is not None and kept and 2 * sum(dims[j] ** 2 for j in kept) > max(ratio * math.prod(dims), 2**16):
        sizes = [dims[j] for j in kept]
        kept.pop(sizes.index(max(sizes)))
    return kept


def reference_split(X, max_dim):
    """Split along dim 0, then every piece along dim 1, ... (DS multi_dim_split); returns views of X."""
    pieces = [X]
    for dim in range(X.ndim):
        pieces = [s for t in pieces for s in torch.split(t, max_dim, dim=dim)]
    return pieces


def reference_inverse_root(A, root, eps):
    """(A + eps I)^(-1/root) with the eigenvalue shift of DS's default EigenConfig, in float64."""
    A = A.to(torch.float64)
    L, Q = torch.linalg.eigh(A + eps * torch.eye(A.shape[0], dtype=torch.float64))
    lam_min = L.min()
    if lam_min < eps:
        L = L - lam_min + eps
    return Q @ torch.diag(L ** (-1.0 / root)) @ Q.T


def mode_product(X, R, j):
    """X ×_j R: multiply mode j of X by the matrix R."""
    Y = torch.movedim(X, j, 0)
    shape = Y.shape
    Y = (R @ Y.reshape(shape[0], -1)).reshape(shape)
    return torch.movedim(Y, 0, j)


class ReferenceShampoo:
    def __init__(self, named_params, decay, lr=1e-2, betas=(0.9, 1.0), epsilon=1e-12, weight_decay=0.0,
                 max_preconditioner_dim=1024, max_factor_ratio=None, precondition_frequency=1, start_preconditioning_step=None,
                 use_bias_correction=True, grafting="adam", grafting_beta2=None, grafting_epsilon=1e-10):
        self.theta = {k: v.detach().to(torch.float64).clone() for k, v in named_params.items()}
        self.decay = decay  # name -> bool
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], epsilon, weight_decay
        self.max_dim, self.ratio, self.freq = max_preconditioner_dim, max_factor_ratio, precondition_frequency
        self.start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
        self.bc, self.grafting, self.geps = use_bias_correction, grafting, grafting_epsilon
        if grafting_beta2 is None:
            grafting_beta2 = {"adam": 0.999, "rmsprop": 0.99, "adagrad": 1.0, None: 1.0}[grafting]
        self.gb2 = grafting_beta2
        self.t = 0
        self.M = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        self.V = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        self.F, self.Finv = {}, {}
        for k, v in self.theta.items():
            blocks = reference_split(torch.zeros(reference_merge(v.shape, self.max_dim), dtype=torch.float64),
                                     self.max_dim)
            self.F[k] = [[torch.zeros(d, d, dtype=torch.float64) for d in b.shape] for b in blocks]
            self.Finv[k] = [[torch.eye(d, dtype=torch.float64) for d in b.shape] for b in blocks]

    def step(self, grads):
        self.t += 1
        t = self.t
        due = (t % self.freq == 0 and t > self.start) or t == self.start
        for k, theta in self.theta.items():
            G = grads[k].to(torch.float64)
            if self.b1 > 0:
                self.M[k] = self.b1 * self.M[k] + (1 - self.b1) * G
                Gbar = self.M[k] / (1 - self.b1**t) if self.bc else self.M[k]
            else:
                Gbar = G
            D = None
            if self.grafting is not None:
                if self.grafting == "adagrad":
                    self.V[k] = self.V[k] + G * G
                else:
                    self.V[k] = self.gb2 * self.V[k] + (1 - self.gb2) * G * G
                bcg = 1 - self.gb2**t if self.grafting == "adam" else 1.0
                D = Gbar / (torch.sqrt(self.V[k] / bcg) + self.geps)
            merged = reference_merge(theta.shape, self.max_dim)
            P = torch.zeros(merged, dtype=torch.float64)
            blocks = zip(reference_split(G.reshape(merged), self.max_dim),
                         reference_split(Gbar.reshape(merged), self.max_dim),
                         reference_split(D.reshape(merged), self.max_dim) if D is not None else itertools.repeat(None),
                         reference_split(P, self.max_dim), self.F[k], self.Finv[k])
            for Gb, Gbarb, Db, Pb, Fs, Finvs in blocks:
                order = Gb.ndim
                kept = reference_modes(tuple(Gb.shape), self.ratio)  # the others: identity, never updated
                if self.start != math.inf:
                    for j in kept:
                        others = [i for i in range(order) if i != j]
                        outer = torch.tensordot(Gb, Gb, dims=(others, others))
                        if self.b2 == 1.0:
                            Fs[j] = Fs[j] + outer
                        else:
                            Fs[j] = self.b2 * Fs[j] + (1 - self.b2) * outer
                    if due:
                        bc2 = 1 - self.b2**t if self.bc and self.b2 < 1 else 1.0
                        for j in kept:
                            Finvs[j] = reference_inverse_root(Fs[j] / bc2, 2 * order, self.eps)
                if self.grafting is not None and (t < self.start or not kept):
                    Pb.copy_(Db)
                    continue
                X = Gbarb
                for j in kept:
                    X = mode_product(X, Finvs[j], j)
                if self.grafting is not None:
                    X = X * (torch.linalg.vector_norm(Db) / (torch.linalg.vector_norm(X) + 1e-16))
                Pb.copy_(X)
            P = P.reshape(theta.shape)
            wd = self.wd if self.decay[k] else 0.0
            self.theta[k] = theta - self.lr * (P + wd * theta)
