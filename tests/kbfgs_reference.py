"""A float64 transcription of the official K-BFGS and K-BFGS(L) code, for parity tests of ``whiten.KBFGS``.

Read from renyiryry/kbfgs_neurips2020_public at commit be57dc380be1817dc9746d174fbe06e8fdeb1946 (the repository's
head, "add BibTeX"):

* ``training_function.py`` (``train_model``): the loop (gradient of the mean loss plus τ·θ, τ = 1e-5, on every
  weight and bias; its running average with ρ = 0.9 and weight 1 - ρ; the step θ += α·p) and the K-BFGS settings
  (A decay 0.9, ``Kron_BFGS_A_LM_epsilon`` = ``Kron_BFGS_H_epsilon`` = √λ, H_g's start 1·I, 100 L-BFGS pairs);
* ``training_utils.py`` (``train_initialization``): A from the mean over one pass of forwards, then no running
  average at step 0; the pairs' running average (0.9 for mini-batches); both variants take H_a by
  "Hessian-action-BFGS";
* ``kbfgs_utils.py``: ``Kron_BFGS_update`` and ``Kron_BFGS_update_per_layer`` (the direction, the second forward
  and backward on the same mini-batch after the step, s and y from the means of the pre-activations and of N times
  their gradients, H_a's Hessian-action update), ``get_BFGS_PowellHDamping`` / ``get_BFGS_ModifiedDamping``
  (double damping), ``get_BFGS_formula`` (the BFGS update with its skips), ``LBFGS_Hv`` and
  ``Kron_LBFGS_append_s_y`` (L-BFGS in compact form, kept incrementally: R⁻¹, YᵀY, D and the two factors).

Written from that reading as plain functions on float64 tensors of a fully connected model (the only model the
official code has): layers ``[(W, b), ...]`` with activations ``"relu"`` or ``"linear"``. The initial A (the
official pass over the training set) is given by the caller (:func:`mean_input_factor`), so the reference runs the
official mini-batch path: no A update and no decay at step 0.
"""

from __future__ import annotations

import math

import torch


def forward(params, activations, X):
    """(output, pre-activations a_l, inputs h_l): the official ``Model_class.forward``."""
    pre, inputs = [], []
    x = X
    for (W, b), act in zip(params, activations):
        inputs.append(x)
        a = x @ W.T + b
        pre.append(a)
        x = torch.relu(a) if act == "relu" else a
    return x, pre, inputs


def mean_input_factor(params, activations, batches):
    """The official initial A of each layer: the running mean over ``batches`` of homo(h)ᵀ homo(h) / N."""
    A = [torch.zeros(W.shape[1] + 1, W.shape[1] + 1, dtype=W.dtype) for W, _ in params]
    with torch.no_grad():
        for j, X in enumerate(batches, start=1):
            _, _, inputs = forward(params, activations, X)
            for l, h in enumerate(inputs):
                homo = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
                A[l] *= (j - 1) / j
                A[l] += homo.T @ homo / h.shape[0] / j
    return A


# ----- L-BFGS in the official compact form -------------------------------------------------------------------------

def new_pairs():
    return {"s": None, "y": None, "R_inv": None, "yTy": None, "D": None, "left": None, "right": None, "gamma": None}


def lbfgs_hv(v, pairs):
    """``LBFGS_Hv``: v itself without pairs, else γ v + left (right v)."""
    if pairs["s"] is None:
        return v
    vec = v.ndim == 1
    V = v[:, None] if vec else v
    out = pairs["gamma"] * V + pairs["left"] @ (pairs["right"] @ V)
    return out[:, 0] if vec else out


def lbfgs_append(s, y, pairs, g, gamma, memory, events=None):
    """``Kron_LBFGS_append_s_y``: keep (s, y) where |s|² is finite and yᵀs > 1e-4 |s|² |g|, dropping the oldest
    pair of a full memory, and rebuild R⁻¹ (upper triangular, R_ij = s_iᵀ y_j), YᵀY, D and the factors."""
    gg = float(g @ g)
    ys, ss = float(y @ s), float(s @ s)
    if math.isinf(ss) or not ys > 1e-4 * ss * math.sqrt(gg):
        _count(events, "skipped")
        return pairs
    if pairs["s"] is not None and pairs["s"].shape[0] == memory:
        _count(events, "dropped")
        pairs["R_inv"] = pairs["R_inv"][1:, 1:]
        pairs["yTy"] = pairs["yTy"][1:, 1:]
        pairs["s"], pairs["y"], pairs["D"] = pairs["s"][1:], pairs["y"][1:], pairs["D"][1:]
    if pairs["s"] is None:
        pairs["s"], pairs["y"] = s[None].clone(), y[None].clone()
        pairs["yTy"] = pairs["y"] @ pairs["y"].T
    else:
        pairs["s"] = torch.cat([pairs["s"], s[None]])
        pairs["y"] = torch.cat([pairs["y"], y[None]])
        col = pairs["y"] @ y  # the new column (and row) of YᵀY
        pairs["yTy"] = torch.cat([torch.cat([pairs["yTy"], col[:-1, None]], dim=1), col[None]], dim=0)
    if pairs["s"].shape[0] == 1:
        pairs["D"] = (pairs["s"] @ pairs["y"].T)[0]
        pairs["R_inv"] = (1.0 / pairs["D"][-1]).reshape(1, 1)
    else:
        sy = pairs["s"] @ y  # s_iᵀ y_new for every kept pair, the new one last
        pairs["D"] = torch.cat([pairs["D"], sy[-1:]])
        b22 = torch.tensor(1.0 / float(sy[-1]), dtype=s.dtype)
        old = pairs["R_inv"]
        top = torch.cat([old, torch.zeros(1, old.shape[1], dtype=s.dtype)], dim=0)
        right = torch.cat([-b22 * (old @ sy[:-1, None]), b22.reshape(1, 1)], dim=0)
        pairs["R_inv"] = torch.cat([top, right], dim=1)
    pairs["gamma"] = gamma
    RS = pairs["R_inv"] @ pairs["s"]
    pairs["left"] = torch.cat([RS.T, gamma * pairs["y"].T], dim=1)
    pairs["right"] = torch.cat([(torch.diag(pairs["D"]) + gamma * pairs["yTy"]) @ RS - gamma * pairs["y"], -RS],
                               dim=0)
    return pairs


# ----- BFGS and the damping -----------------------------------------------------------------------------------------

def bfgs_formula(H, s, y, g, events=None):
    """``get_BFGS_formula``: H unchanged where sᵀy <= 0, sᵀy <= 1e-4 |s|² |g| or the result has an inf."""
    sy = float(s @ y)
    if sy <= 0 or sy <= 1e-4 * float(s @ s) * math.sqrt(float(g @ g)):
        _count(events, "skipped")
        return H
    rho = 1.0 / sy
    Hy = H @ y
    new = H + (rho ** 2 * float(y @ Hy) + rho) * torch.outer(s, s) - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
    return H if bool(torch.isinf(new).any()) else new


def double_damping(s, y, hv, mu, events=None):
    """``kron_bfgs_update_damping``: Powell's damping with 0.2 on H (``hv`` applies H), then the modified
    (Levenberg–Marquardt) damping with ``mu`` = √λ. ``events`` counts the branches taken."""
    Hy = hv(y)
    sy, yHy = float(s @ y), float(y @ Hy)
    if not sy / yHy > 0.2:
        _count(events, "powell")
        theta = 0.8 * yHy / (yHy - sy)
        s = theta * s + (1 - theta) * Hy
    ss, sy = float(s @ s), float(s @ y)
    if not sy / ss > mu:
        _count(events, "lm")
        theta = (1 - mu) * ss / (ss - sy)
        y = theta * y + (1 - theta) * s
    return s, y


def _count(events, key):
    if events is not None:
        events[key] = events.get(key, 0) + 1


# ----- the optimizer's loop -----------------------------------------------------------------------------------------

class OfficialKBFGS:
    """The official K-BFGS (``limited=False``) or K-BFGS(L) loop for one model, step by step.

    ``loss_fn(z, t)`` is the mean loss; ``A0`` the initial A of each layer (:func:`mean_input_factor`)."""

    def __init__(self, params, activations, loss_fn, A0, lr=0.3, damping=0.3, limited=False, memory=100,
                 tau=1e-5, rho=0.9, a_decay=0.9, pair_decay=0.9, hg_initial=1.0):
        self.params = [(W.detach().clone(), b.detach().clone()) for W, b in params]
        self.activations, self.loss_fn = activations, loss_fn
        self.lr, self.eps = lr, math.sqrt(damping)
        self.limited, self.memory, self.tau, self.rho = limited, memory, tau, rho
        self.a_decay, self.pair_decay, self.hg_initial = a_decay, pair_decay, hg_initial
        self.A = [a.clone() for a in A0]
        self.momentum = [(torch.zeros_like(W), torch.zeros_like(b)) for W, b in self.params]
        self.s_avg = [torch.zeros(W.shape[0], dtype=W.dtype) for W, _ in self.params]
        self.y_avg = [torch.zeros(W.shape[0], dtype=W.dtype) for W, _ in self.params]
        self.Hg = [None] * len(self.params)
        self.Ha = [None] * len(self.params)
        self.pairs = [new_pairs() for _ in self.params]
        self.i = 0
        self.events: dict = {}  # damping branches and skipped H_g updates, for tests that must exercise them

    def _grads(self, params, X, t):
        leaves = [(W.clone().requires_grad_(), b.clone().requires_grad_()) for W, b in params]
        z, pre, inputs = forward(leaves, self.activations, X)
        for a in pre:
            a.retain_grad()
        loss = self.loss_fn(z, t)
        loss.backward()
        N = X.shape[0]
        return (loss.detach(), [(W.grad, b.grad) for W, b in leaves], [a.detach() for a in pre],
                [N * a.grad for a in pre], [h.detach() for h in inputs])

    def step(self, X, t):
        N = X.shape[0]
        loss, grads, pre, pre_grad, inputs = self._grads(self.params, X, t)
        # the loop: the L2-regularised gradient's running average
        for l, ((W, b), (gW, gb)) in enumerate(zip(self.params, grads)):
            mW, mb = self.momentum[l]
            self.momentum[l] = (self.rho * mW + (1 - self.rho) * (gW + self.tau * W),
                                self.rho * mb + (1 - self.rho) * (gb + self.tau * b))
        # step 1 of each layer: A, H_a's start, the direction
        directions, A_lm = [], []
        for l, h in enumerate(inputs):
            d_out, d_in = self.params[l][0].shape
            if self.i == 0 and not self.limited:
                self.Hg[l] = self.hg_initial * torch.eye(d_out, dtype=h.dtype)
            if self.i > 0:
                homo = torch.cat([h, torch.ones(N, 1, dtype=h.dtype)], dim=1)
                self.A[l] = self.a_decay * self.A[l] + (1 - self.a_decay) * (homo.T @ homo) / N
            A_lm.append(self.A[l] + self.eps * torch.eye(d_in + 1, dtype=h.dtype))
            if self.i == 0:
                self.Ha[l] = torch.linalg.inv(A_lm[l])
            M = torch.cat([self.momentum[l][0], self.momentum[l][1][:, None]], dim=1)
            D = lbfgs_hv(M, self.pairs[l]) if self.limited else self.Hg[l] @ M
            directions.append(D @ self.Ha[l])
        # the second forward and backward, at the parameters after the step, on the same mini-batch
        stepped = [(W - self.lr * D[:, :-1], b - self.lr * D[:, -1]) for (W, b), D in zip(self.params, directions)]
        _, _, pre_next, pre_grad_next, _ = self._grads(stepped, X, t)
        # step 2 of each layer: the pair, its running average, the damping, H_g and H_a
        for l in range(len(self.params)):
            s = pre[l].mean(0) - pre_next[l].mean(0)
            g_mean = pre_grad[l].mean(0)
            y = g_mean - pre_grad_next[l].mean(0)
            self.s_avg[l] = self.pair_decay * self.s_avg[l] + (1 - self.pair_decay) * s
            self.y_avg[l] = self.pair_decay * self.y_avg[l] + (1 - self.pair_decay) * y
            if self.limited:
                sd, yd = double_damping(self.s_avg[l], self.y_avg[l], lambda v, l=l: lbfgs_hv(v, self.pairs[l]),
                                        self.eps, self.events)
                self.pairs[l] = lbfgs_append(sd, yd, self.pairs[l], g_mean, self.hg_initial, self.memory,
                                             self.events)
            else:
                sd, yd = double_damping(self.s_avg[l], self.y_avg[l], lambda v, l=l: self.Hg[l] @ v, self.eps,
                                        self.events)
                self.Hg[l] = bfgs_formula(self.Hg[l], sd, yd, g_mean, self.events)
            mean_h = torch.cat([inputs[l].mean(0), torch.ones(1, dtype=X.dtype)])
            s_h = self.Ha[l] @ mean_h
            self.Ha[l] = bfgs_formula(self.Ha[l], s_h, A_lm[l] @ s_h, mean_h)
        self.params = stepped
        self.i += 1
        return loss

    def hg_matrix(self, l):
        """H_g of layer l as a matrix (K-BFGS(L): its L-BFGS inverse applied to I)."""
        d_out = self.params[l][0].shape[0]
        eye = torch.eye(d_out, dtype=self.params[l][0].dtype)
        return lbfgs_hv(eye, self.pairs[l]) if self.limited else self.Hg[l]
