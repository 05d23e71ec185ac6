"""Pure matrix kernels shared by the whitening optimizers.

Everything here works on stacks: a leading batch dimension over same-shape matrices, so one call serves every
matrix of a shape. No optimizer state, no param groups: inputs in, results out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["EighResult", "finite_flags", "robust_eigh_basis", "update_factors", "rotate", "unrotate",
           "newton_schulz", "MUON_COEFFICIENTS", "InverseRootResult", "matrix_inverse_root",
           "NSSchedule", "NS_SCHEDULES", "ns_schedule", "POLAR_EXPRESS_COEFFICIENTS", "CUBIC_COEFFICIENTS",
           "matrix_view", "orthogonalize", "PolarResult", "svd_polar"]


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
    keeps its previous basis. ``retried`` counts matrices that needed the float64 retry, ``recovered`` those of
    them that it recovered. ``values`` (when asked for) holds each matrix's eigenvalues, ascending, clamped at 0.
    """

    vectors: list
    ok: list[bool]
    retried: int
    recovered: int = 0
    values: list | None = None


def finite_flags(tensors: list[torch.Tensor], fused: bool | None = None) -> list[bool]:
    """Whether each tensor is entirely finite, at one reduction per tensor and one host sync per device.

    A finite sum means finite entries (NaN and ±inf propagate into it); only a non-finite sum, which overflow of huge
    finite values can also cause, pays for the exact elementwise check. Low-precision tensors are summed in float32.
    On an accelerator the sums are L1 norms from ``torch._foreach_norm``, a few fused kernels for the whole list:
    one kernel launch per tensor (about 10 µs each on the host) would cost more than the reductions themselves. On
    a CPU there is no launch to save and per-tensor sums are faster (``fused``: force one or the other).
    """
    sums: list = [None] * len(tensors)
    groups: dict = {}  # device -> dtype -> positions
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, {}).setdefault(t.dtype, []).append(i)
    for device, by_dtype in groups.items():
        use_fused = device.type != "cpu" if fused is None else fused
        order, reduced = [], []
        for dtype, idxs in by_dtype.items():
            order += idxs
            wide = torch.promote_types(dtype, torch.float32)
            if use_fused:
                reduced += torch._foreach_norm([tensors[i] for i in idxs], 1, dtype=wide)
            else:
                reduced += [tensors[i].sum(dtype=wide) for i in idxs]
        for i, ok in zip(order, torch.stack(reduced).isfinite().tolist()):
            sums[i] = ok
    return [ok or bool(torch.isfinite(t).all()) for ok, t in zip(sums, tensors)]


def _eigh(A: torch.Tensor, eps: float | None):
    try:
        shifted = A if eps is None else A + eps * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return torch.linalg.eigh(shifted)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None


def robust_eigh_basis(mats: list[torch.Tensor], eps: float | None, values: bool = False) -> EighResult:
    """Eigenvectors of ``A + eps·I`` for each symmetric matrix A in ``mats`` (same size, dtype and device), or of A
    itself for ``eps`` None (nothing is added, so not even the sign of a zero changes).

    The fallback ladder: eigh in A's dtype (one batched call on accelerators; matrix by matrix on the CPU, where
    LAPACK has no batched solver and torch's batched path measured ~20% slower); matrices whose result is missing or
    non-finite are retried in float64; a matrix that still fails, or whose input is not finite, is reported in
    ``ok`` so the caller keeps its previous basis.

    ``values=True`` also returns the eigenvalues, for positive semi-definite matrices such as Kronecker factors:
    they must be finite too, and are clamped at 0 (a negative one is round-off) in the precision the decomposition
    ran in, before a float64 retry's result is cast back.
    """
    n = len(mats)
    finite_in = finite_flags(mats)
    results: list = [None] * n
    if n > 1 and mats[0].device.type != "cpu" and all(finite_in):
        batched = _eigh(torch.stack(mats), eps)
        if batched is not None:
            results = list(zip(batched.eigenvalues.unbind(0), batched.eigenvectors.unbind(0)))
    else:
        results = [_eigh(a, eps) if fin else None for a, fin in zip(mats, finite_in)]
    ok = _finite_results(results, values)
    vectors = [r[1] if r is not None else None for r in results]
    eigenvalues = [r[0].clamp_min(0) if good else None for r, good in zip(results, ok)] if values else None
    retried = recovered = 0
    for i in range(n):
        if ok[i] or not finite_in[i]:
            continue
        retried += 1
        r = _eigh(mats[i].to(torch.float64), eps)
        if _finite_results([r], values)[0]:
            dtype = mats[i].dtype
            vectors[i], ok[i] = r[1].to(dtype), True
            if values:
                eigenvalues[i] = r[0].clamp_min(0).to(dtype)
            recovered += 1
        else:
            vectors[i] = None
    return EighResult(vectors=vectors, ok=ok, retried=retried, recovered=recovered, values=eigenvalues)


def _finite_results(results: list, values: bool) -> list[bool]:
    """Whether each (eigenvalues, eigenvectors) pair is present and finite (the vectors only, unless ``values``)."""
    present = [i for i, r in enumerate(results) if r is not None]
    tensors = [t for i in present for t in ((results[i][0], results[i][1]) if values else (results[i][1],))]
    flags = finite_flags(tensors) if tensors else []
    per = 2 if values else 1
    ok = [False] * len(results)
    for j, i in enumerate(present):
        ok[i] = all(flags[per * j:per * (j + 1)])
    return ok


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

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932), Algorithm 1 of the paper (the same numbers as
# the authors' NoahAmsel/PolarExpress): the degree-5 polynomials that are optimal in the worst case at every
# iteration for singular values in [1e-3, 1] (with the paper's cushion 0.02). Iterations past the table repeat the
# last polynomial, (15x - 10x^3 + 3x^5)/8, which converges to 1 from (0, 1].
_POLAR_EXPRESS_PAPER = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety for half precision (its §4.4): every polynomial but the last is evaluated at x/1.01, i.e.
# (a/s, b/s^3, c/s^5), so a singular value pushed slightly above 1 by rounding is not amplified; and the input is
# divided by 1.01 times its Frobenius norm.
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_PAPER[:-1]) + (_POLAR_EXPRESS_PAPER[-1],)
# The convergent cubic X <- 1.5 X - 0.5 X Xᵀ X (Newton–Schulz proper): slow from small singular values (x1.5 per
# iteration) but converges to U Vᵀ; the reference that the fast schedules approximate.
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)


class NSSchedule(NamedTuple):
    """A Newton–Schulz schedule: iteration i applies ``coefficients[min(i, len - 1)]`` = (a, b, c), i.e.
    ``X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X``, after X was divided by ``normalization`` × its Frobenius norm."""

    coefficients: tuple[tuple[float, float, float], ...]
    normalization: float = 1.0


NS_SCHEDULES = {
    "jordan": NSSchedule((MUON_COEFFICIENTS,)),
    "polar_express": NSSchedule(POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY),
    "cubic": NSSchedule((CUBIC_COEFFICIENTS,)),
}


def _is_triple(x) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x))


def ns_schedule(spec, name: str = "coefficients") -> NSSchedule:
    """The :class:`NSSchedule` of ``spec``: a name of :data:`NS_SCHEDULES` (``"jordan"``, ``"polar_express"``,
    ``"cubic"``), one (a, b, c) used at every iteration, or a non-empty sequence of (a, b, c), one per iteration
    (the last repeats), or an :class:`NSSchedule`. Anything else is a ValueError naming ``name``."""
    if isinstance(spec, NSSchedule):
        return spec
    if isinstance(spec, str):
        if spec in NS_SCHEDULES:
            return NS_SCHEDULES[spec]
    elif _is_triple(spec):
        return NSSchedule((tuple(float(v) for v in spec),))
    elif isinstance(spec, (tuple, list)) and spec and all(_is_triple(t) for t in spec):
        return NSSchedule(tuple(tuple(float(v) for v in t) for t in spec))
    raise ValueError(f"Invalid {name}: {spec!r} (allowed: one of {', '.join(map(repr, NS_SCHEDULES))}, three finite "
                     "numbers (a, b, c), or a sequence of such triples, one per iteration)")


def newton_schulz(G: torch.Tensor, steps: int, coefficients=MUON_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> torch.Tensor:
    """Approximate orthogonalisation ``U Vᵀ`` of each matrix of ``G`` (..., m, n) (a stack over any leading dims,
    e.g. the experts of a mixture of experts; a single (m, n) matrix too) by ``steps`` iterations of
    ``X <- a X + (b A + c A²) X`` with ``A = X Xᵀ``, after scaling X to Frobenius norm ≤ 1 (``eps`` guards 0).

    ``coefficients`` is a schedule by name (``"jordan"``: Keller Jordan's quintic, the default as a triple;
    ``"polar_express"``: the per-iteration polynomials of Polar Express, with the paper's 1.01 safety scaling;
    ``"cubic"``: the convergent (1.5, -0.5, 0)), one triple, or a sequence of triples (see :func:`ns_schedule`).
    Computed in ``dtype`` (default: G's) and returned in it. Tall matrices are transposed first so the Gram matrix is
    the smaller side's, as in torch.optim.Muon; the result for each matrix is the same as computing it alone.
    ``overwrite=True`` lets the iteration use G as its first buffer when G already has ``dtype`` (a caller that
    built G for this call saves a copy); G's contents are then undefined.
    """
    schedule = ns_schedule(coefficients)
    lead, (rows_in, cols_in) = G.shape[:-2], G.shape[-2:]
    if G.ndim != 3:
        G = G.reshape(-1, rows_in, cols_in)
    if dtype is not None and G.dtype != dtype:
        X, owned = G.to(dtype), True
    else:
        X, owned = G, overwrite
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    # Finite entries above ~1e19 overflow the float32 sum of squares: the norm is inf, X / inf is zero, and the caller
    # would step by nothing until its momentum decays. There the norm is taken again with a float64 sum; a finite
    # norm is kept as it was, bit for bit. On a CPU only when needed; on an accelerator always (a test would be a
    # host sync), one more pass over X.
    finite = norm.isfinite()
    if X.device.type != "cpu" or not bool(finite.all()):
        norm = torch.where(finite, norm, torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True,
                                                                  dtype=torch.float64).to(norm.dtype))
    if schedule.normalization != 1.0:
        norm.mul_(schedule.normalization)
    norm.clamp_min_(eps)
    X = X.div_(norm) if owned else X / norm
    if steps > 0:
        # Three buffers for the whole iteration instead of three new tensors per iteration.
        batch, rows, cols = X.shape
        A = torch.empty(batch, rows, rows, dtype=X.dtype, device=X.device)
        B = torch.empty_like(A)
        Y = torch.empty(batch, rows, cols, dtype=X.dtype, device=X.device)
        last = len(schedule.coefficients) - 1
        for i in range(steps):
            a, b, c = schedule.coefficients[min(i, last)]
            torch.bmm(X, X.mT, out=A)
            if c == 0.0:  # a cubic: no A² to form
                torch.baddbmm(X, A, X, beta=a, alpha=b, out=Y)
            else:
                torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
                torch.baddbmm(X, B, X, beta=a, out=Y)
            X, Y = Y, (X if X.is_contiguous() else torch.empty_like(Y))
    X = X.mT if tall else X
    return X.reshape(*lead, rows_in, cols_in) if len(lead) != 1 else X


def matrix_view(shape: tuple[int, ...], batch_dims: int = 0) -> tuple[tuple[int, ...], int, int]:
    """``(stack dims, m, n)``: how a tensor of ``shape`` is seen as a stack of matrices. The first ``batch_dims``
    dims index the stack (same-shape experts), the next is the rows (the output side: ``d_out`` of a Linear or a
    conv), and the rest are flattened into the columns (``d_in·k·k`` of a conv weight)."""
    if len(shape) < batch_dims + 2:
        raise ValueError(f"a tensor of shape {tuple(shape)} with batch_dims={batch_dims} is not a stack of matrices "
                         f"(needs at least {batch_dims + 2} dims)")
    lead, rest = tuple(shape[:batch_dims]), shape[batch_dims:]
    return lead, rest[0], math.prod(rest[1:])


def orthogonalize(G: torch.Tensor, steps: int = 5, coefficients="jordan", *, batch_dims: int = 0,
                  eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`newton_schulz` of an N-D weight or a stack of them, as matrices (see :func:`matrix_view`): a conv
    weight (out, in, kh, kw) is orthogonalised as (out, in·kh·kw), a stack of experts (E, out, in) with
    ``batch_dims=1`` as E matrices in one batched call. Returns G's shape, in ``dtype`` (default G's)."""
    lead, m, n = matrix_view(G.shape, batch_dims)
    X = G.reshape(*lead, m, n) if lead else G.reshape(1, m, n)
    return newton_schulz(X, steps, coefficients, eps, dtype).reshape(G.shape)


@dataclass
class PolarResult:
    """``factor[i] = U_i V_iᵀ`` for each matrix of a (B, m, n) stack, from its reduced SVD ``U Σ Vᵀ`` restricted to
    the numerically non-zero singular values (σ > σ_max · max(m, n) · machine epsilon, the rank tolerance of
    ``torch.linalg.matrix_rank``), so a rank-deficient matrix gets its partial isometry and a zero matrix 0;
    ``nuclear[i]`` = Σ σ (the nuclear norm). ``retried`` counts matrices whose SVD needed float64; ``fallbacks``
    those whose SVD failed even then, which got Polar Express Newton–Schulz in float64 instead (the factor of a
    finite matrix, to about 1e-6)."""

    factor: torch.Tensor
    nuclear: torch.Tensor
    retried: int
    fallbacks: int


FALLBACK_NS_STEPS = 16  # Polar Express in float64: converged from singular values down to ~1e-3 of the largest


def _svd(X: torch.Tensor):
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None
    if not bool(torch.isfinite(S).all() & torch.isfinite(U).all() & torch.isfinite(Vh).all()):  # one host read
        return None
    return U, S, Vh


def _factor_from_svd(U, S, Vh, m: int, n: int) -> torch.Tensor:
    tol = S.amax(dim=-1, keepdim=True) * (max(m, n) * torch.finfo(S.dtype).eps)
    keep = (S > tol).to(U.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def svd_polar(G: torch.Tensor, dtype: torch.dtype | None = None) -> PolarResult:
    """The exact polar factor of each matrix of a (B, m, n) stack (see :class:`PolarResult`), from
    ``torch.linalg.svd`` in ``dtype`` (default G's dtype, with float16/bfloat16 promoted to float32, which LAPACK
    needs). Each matrix is first divided by its largest entry, so huge finite values (a gradient spike) do not
    overflow the SVD; U Vᵀ does not depend on that scale and Σ is scaled back for the nuclear norm.

    The fallback ladder: one batched SVD; if it raises or returns non-finite values, matrix by matrix; a matrix whose
    SVD still fails is retried in float64; one that fails there too gets :func:`newton_schulz` with the Polar
    Express schedule in float64. Inputs must be finite (the optimizers check gradients before any step)."""
    if dtype is None:
        dtype = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32
    X = G.to(dtype)
    batch, m, n = X.shape
    scale = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(scale > 0, scale, torch.ones_like(scale))
    factor = torch.empty(batch, m, n, dtype=dtype, device=X.device)
    nuclear = torch.empty(batch, dtype=dtype, device=X.device)
    retried = fallbacks = 0
    out = _svd(X) if batch > 0 else None
    if out is not None:
        U, S, Vh = out
        factor = _factor_from_svd(U, S, Vh, m, n)
        nuclear = S.sum(dim=-1)
    else:
        for i in range(batch):
            one = _svd(X[i])
            if one is None:
                retried += 1
                one = _svd(X[i].to(torch.float64))
            if one is None:
                fallbacks += 1
                Y = newton_schulz(X[i].to(torch.float64), FALLBACK_NS_STEPS, "polar_express", eps=1e-300)
                factor[i] = Y.to(dtype)
                nuclear[i] = (Y * X[i].to(torch.float64)).sum().to(dtype)  # <U Vᵀ, X> = Σ σ
                continue
            U, S, Vh = one
            factor[i] = _factor_from_svd(U, S, Vh, m, n).to(dtype)
            nuclear[i] = S.sum().to(dtype)
    return PolarResult(factor=factor, nuclear=nuclear * scale.reshape(batch), retried=retried, fallbacks=fallbacks)


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
