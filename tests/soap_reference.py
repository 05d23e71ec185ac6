"""A slow, literal float64 reference of SOAP as the authors' code computes it (ALGORITHMS.md §2), one parameter at a
time, with the reference's order of operations: m is rotated out of and back into the basis on every step.

Matrices only (and 1-D parameters as plain Adam); a side longer than ``max_dim`` has no factor.
"""

from __future__ import annotations

import torch


class ReferenceSOAP:
    def __init__(self, shapes, lr, betas, shampoo_beta, eps, weight_decay, freq, max_dim, decay_mask,
                 precondition_1d=False):
        self.lr, self.betas, self.beta_s, self.eps, self.wd = lr, betas, shampoo_beta, eps, weight_decay
        self.freq, self.max_dim, self.decay_mask, self.pre1d = freq, max_dim, decay_mask, precondition_1d
        self.states = [None] * len(shapes)

    def _sides(self, shape):
        if len(shape) == 1:
            return [shape[0] <= self.max_dim and self.pre1d]
        return [shape[0] <= self.max_dim, shape[1] <= self.max_dim]

    @staticmethod
    def _project(X, Q, back=False):
        X2 = X if X.ndim == 2 else X[:, None]
        QL, QR = Q[0], (Q[1] if len(Q) > 1 else None)
        if QL is not None:
            X2 = QL @ X2 if back else QL.T @ X2
        if QR is not None:
            X2 = X2 @ QR.T if back else X2 @ QR
        return X2.reshape(X.shape)

    def _update_factors(self, st, G):
        # beta*F + (1-beta)*G Gᵀ in one addmm, the arithmetic whiten uses: the first basis comes from the eigh of a
        # rank-1 factor, whose null-space eigenvectors depend on the last bit of the input.
        G2 = G if G.ndim == 2 else G[:, None]
        for k, A in enumerate((G2, G2.T)):
            if k < len(st["GG"]) and st["GG"][k] is not None:
                st["GG"][k] = torch.addmm(st["GG"][k], A, A.T, beta=self.beta_s, alpha=1 - self.beta_s)

    def step(self, params, grads):
        b1, b2 = self.betas
        out = []
        for i, (p, G) in enumerate(zip(params, grads)):
            p, G = p.double().clone(), G.double()
            st = self.states[i]
            if st is None:
                sides = self._sides(p.shape)
                dims = [p.shape[0], p.shape[1]] if p.ndim == 2 else [p.shape[0]]
                st = self.states[i] = {
                    "step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                    "GG": [torch.zeros(d, d, dtype=torch.float64) if s else None for d, s in zip(dims, sides)],
                    "Q": None}
                self._update_factors(st, G)
                st["Q"] = [None if F is None else
                           torch.linalg.eigh(F + 1e-30 * torch.eye(F.shape[0], dtype=F.dtype)).eigenvectors.flip(1)
                           for F in st["GG"]]
                out.append(p)
                continue
            Gp = self._project(G, st["Q"])
            st["step"] += 1
            t = st["step"]
            st["m"] = b1 * st["m"] + (1 - b1) * Gp
            st["v"] = b2 * st["v"] + (1 - b2) * Gp * Gp
            step_size = self.lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
            U = self._project(st["m"] / (st["v"].sqrt() + self.eps), st["Q"], back=True)
            p = p - step_size * U
            if self.decay_mask[i]:
                p = p - self.lr * self.wd * p
            # update_preconditioner
            st["m"] = self._project(st["m"], st["Q"], back=True)
            self._update_factors(st, G)
            if t % self.freq == 0:
                v = st["v"] if st["v"].ndim == 2 else st["v"][:, None]
                newQ = []
                for k, (F, Q) in enumerate(zip(st["GG"], st["Q"])):
                    if F is None:
                        newQ.append(None)
                        continue
                    est = torch.diag(Q.T @ F @ Q)
                    order = torch.argsort(est, descending=True)
                    v = v.index_select(k, order)
                    newQ.append(torch.linalg.qr(F @ Q[:, order]).Q)
                st["v"] = v.reshape(st["v"].shape)
                st["Q"] = newQ
            st["m"] = self._project(st["m"], st["Q"])
            out.append(p)
        return out
