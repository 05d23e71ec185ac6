"""Pure matrix kernels shared by the whitening optimizers.

Everything here works on stacks: a leading batch dimension over same-shape matrices, so one call serves every
matrix of a shape. No optimizer state, no param groups: inputs in, results out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = ["EighResult", "finite_flags", "robust_eigh_basis", "update_factors", "rotate", "unrotate",
           "newton_schulz", "MUON_COEFFICIENTS", "InverseRootResult", "matrix_inverse_root"]


# Below this size a factor update is one matmul; above it, the symmetric product is split (see _syrk_update).
SYMMETRIC_SPLIT_MIN = 512


def _syrk_update(F: torch.Tensor, A: torch.Tensor, beta: float, alpha: float) -> None:
    """In place ``F = beta*F + alpha*A Aᵀ`` for symmetric F, computing only the upper triangle's blocks.

    A Aᵀ is symmetric, so the lower off-diagonal block is the transpose of the upper one: splitting the rows in
    two and recursing on the diagonal blocks costs ~(1/2 + 1/2^k) of the full product instead of all of it, with
    the same result up to rounding (torch has no syrk).
    """
    d = A.shape[0]
    if d < SYMMETRIC_SPLIT_MIN:
        F.addmm_(A, A.T, beta=beta, alpha=alpha)
        return
    h = d // 2
    top, bottom = A[:h], A[h:]
    _syrk_update(F[:h, :h], top, beta, alpha)
    F[:h, h:].addmm_(top, bottom.T, beta=beta, alpha=alpha)
    _syrk_update(F[h:, h:], bottom, beta, alpha)
    F[h:, :h].copy_(F[:h, h:].T)


def update_factors(L: torch.Tensor | None, R: torch.Tensor | None, G: torch.Tensor, beta: float) -> None:
    """In place: ``L = beta*L + (1-beta) G Gᵀ`` and ``R = beta*R + (1-beta) Gᵀ G`` for one (m, n) matrix G.

    A side given as None has no factor and is skipped.
    """
    if L is not None:
        _syrk_update(L, G, beta, 1.0 - beta)
    if R is not None:
        _syrk_update(R, G.T, beta, 1.0 - beta)


def rotate(X: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """``Q_Lᵀ X Q_R`` for stacks; a side given as None is left unrotated."""
    if QL is not None:
        X = torch.bmm(QL.mT, X)
    if QR is not None:
        X = torch.bmm(X, QR)
    return X


def unrotate(X: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """``Q_L X Q_Rᵀ`` for stacks; the inverse of :func:`rotate` for orthogonal Q."""
    if QL is not None:
        X = torch.bmm(QL, X)
    if QR is not None:
        X = torch.bmm(X, QR.mT)
    return X


@dataclass
class EighResult:
    """Eigenvectors of a list of symmetric matrices and what it took to get them.

    ``ok[i]`` is False where no basis could be computed for matrix i; ``vectors[i]`` is then None and the caller
    keeps its previous basis. ``retried`` counts matrices that needed the float64 retry.
    """

    vectors: list
    ok: list[bool]
    retried: int


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is entirely finite, at one reduction per tensor and one host sync per device.

    A finite sum means finite entries (NaN and ±inf propagate into it); only a non-finite sum, which overflow of huge
    finite values can also cause, pays for the exact elementwise check. Low-precision tensors are summed in float32.
    """
    sums: list = [None] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idxs in by_device.values():
        reduced = torch.stack([tensors[i].sum(dtype=torch.promote_types(tensors[i].dtype, torch.float32))
                               for i in idxs])
        for i, ok in zip(idxs, reduced.isfinite().tolist()):
            sums[i] = ok
    return [ok or bool(torch.isfinite(t).all()) for ok, t in zip(sums, tensors)]


def _eigh_vectors(A: torch.Tensor, eps: float) -> torch.Tensor | None:
    try:
        shifted = A + eps * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return torch.linalg.eigh(shifted).eigenvectors
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None


def robust_eigh_basis(mats: list[torch.Tensor], eps: float) -> EighResult:
    """Eigenvectors of ``A + eps·I`` for each symmetric matrix A in ``mats`` (same size, dtype and device).

    The fallback ladder: eigh in A's dtype (one batched call on accelerators; matrix by matrix on the CPU, where
    LAPACK has no batched solver and torch's batched path measured ~20% slower); matrices whose result is missing or
    non-finite are retried in float64; a matrix that still fails, or whose input is not finite, is reported in
    ``ok`` so the caller keeps its previous basis.
    """
    n = len(mats)
    finite_in = finite_flags(mats)
    vectors: list = [None] * n
    if n > 1 and mats[0].device.type != "cpu" and all(finite_in):
        batched = _eigh_vectors(torch.stack(mats), eps)
        if batched is not None:
            vectors = list(batched.unbind(0))
    else:
        vectors = [_eigh_vectors(a, eps) if fin else None for a, fin in zip(mats, finite_in)]
    present = [i for i, v in enumerate(vectors) if v is not None]
    ok = [False] * n
    for i, fin in zip(present, finite_flags([vectors[i] for i in present]) if present else []):
        ok[i] = fin
    retried = 0
    for i in range(n):
        if ok[i] or not finite_in[i]:
            continue
        retried += 1
        v = _eigh_vectors(mats[i].to(torch.float64), eps)
        if v is not None and bool(torch.isfinite(v).all()):
            vectors[i], ok[i] = v.to(mats[i].dtype), True
        else:
            vectors[i] = None
    return EighResult(vectors=vectors, ok=ok, retried=retried)


def warn_eigh_failure(where: str, count: int) -> None:
    warnings.warn(
        f"{where}: eigendecomposition failed for {count} matrix(es) even in float64; keeping the previous "
        "eigenbasis for them (the update stays bounded). Persistent failures usually mean exploding gradients.",
        RuntimeWarning,
        stacklevel=3,
    )


# Keller Jordan's quintic: a steep slope at 0 so few steps suffice; singular values land in about [0.7, 1.2]
# rather than exactly 1, which does not hurt training.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int, coefficients=MUON_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> torch.Tensor:
    """Approximate orthogonalisation ``U Vᵀ`` of each matrix of a stack ``G`` (B, m, n) by ``steps`` iterations of
    ``X <- a X + (b A + c A²) X`` with ``A = X Xᵀ``, after scaling X to Frobenius norm ≤ 1 (``eps`` guards 0).

    Computed in ``dtype`` (default: G's) and returned in it. Tall matrices are transposed first so the Gram matrix is
    the smaller side's, as in torch.optim.Muon; the result for each matrix is the same as computing it alone.
    ``overwrite=True`` lets the iteration use G as its first buffer when G already has ``dtype`` (a caller that
    built G for this call saves a copy); G's contents are then undefined.
    """
    a, b, c = coefficients
    if dtype is not None and G.dtype != dtype:
        X, owned = G.to(dtype), True
    else:
        X, owned = G, overwrite
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp_min_(eps)
    X = X.div_(norm) if owned else X / norm
    if steps == 0:
        return X.mT if tall else X
    # Three buffers for the whole iteration instead of three new tensors per iteration.
    batch, rows, cols = X.shape
    A = torch.empty(batch, rows, rows, dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    Y = torch.empty(batch, rows, cols, dtype=X.dtype, device=X.device)
    for _ in range(steps):
        torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        torch.baddbmm(X, B, X, beta=a, out=Y)
        X, Y = Y, (X if X.is_contiguous() else torch.empty_like(Y))
    return X.mT if tall else X


@dataclass
class InverseRootResult:
    """``roots[i] = A_i^(-1/root)`` where ``ok[i]``; elsewhere ``roots[i]`` is meaningless and the caller keeps its
    previous root. ``retried`` counts matrices whose eigendecomposition needed the float64 retry."""

    roots: torch.Tensor
    ok: list[bool]
    retried: int


def _root_from_eigh(L: torch.Tensor, Q: torch.Tensor, root: float, eps: float) -> torch.Tensor:
    # Round-off can leave A + eps*I with eigenvalues below eps, even negative ones: shift the whole spectrum so the
    # smallest is eps (Distributed Shampoo's two-step perturbation, -lam_min then +eps).
    lam_min = L.amin(dim=-1, keepdim=True)
    L = torch.where(lam_min < eps, L - lam_min + eps, L)
    return (Q * L.pow(-1.0 / root).unsqueeze(-2)) @ Q.mT


def matrix_inverse_root(A: torch.Tensor, root: float, eps: float) -> InverseRootResult:
    """``(A_i + eps I)^(-1/root)`` for each symmetric matrix of a ``(B, d, d)`` stack, as Distributed Shampoo's
    default ``EigenConfig``: eigendecomposition of ``A + eps I``, eigenvalues shifted up to ``eps`` when the smallest
    is below it, ``Q diag(L^(-1/root)) Qᵀ``.

    The fallback ladder: eigh in A's dtype (one batched call on accelerators; matrix by matrix on the CPU, where
    LAPACK has no batched solver); a matrix whose eigh raises or returns non-finite values is retried in float64
    (its root is then formed in float64 and cast back); a matrix whose input is not finite, whose retry fails too, or
    whose root is not finite is reported in ``ok``. Never raises on bad values.
    """
    B, d = A.shape[0], A.shape[-1]
    finite_in = A.isfinite().flatten(1).all(1).tolist()
    A_r = A + eps * torch.eye(d, dtype=A.dtype, device=A.device)
    L = torch.ones(B, d, dtype=A.dtype, device=A.device)
    Q = torch.eye(d, dtype=A.dtype, device=A.device).expand(B, d, d).clone()
    done = [False] * B
    if A.device.type != "cpu" and B > 1 and all(finite_in):
        try:
            L, Q = torch.linalg.eigh(A_r)
            done = [True] * B
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            pass
    if not all(done):
        for i in range(B):
            if finite_in[i]:
                try:
                    L[i], Q[i] = torch.linalg.eigh(A_r[i])
                    done[i] = True
                except RuntimeError:
                    pass
    good = (L.isfinite().all(-1) & Q.isfinite().flatten(1).all(1)).tolist()
    ok = [a and b for a, b in zip(done, good)]
    X = _root_from_eigh(L, Q, root, eps)
    retried = 0
    for i in range(B):
        if ok[i] or not finite_in[i]:
            continue
        retried += 1
        try:
            L64, Q64 = torch.linalg.eigh(A_r[i].to(torch.float64))
        except RuntimeError:
            continue
        X[i] = _root_from_eigh(L64, Q64, root, eps).to(A.dtype)
        ok[i] = True
    ok = [a and b for a, b in zip(ok, X.isfinite().flatten(1).all(1).tolist())]
    return InverseRootResult(roots=X, ok=ok, retried=retried)
