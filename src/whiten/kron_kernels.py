"""Pure kernels of PSGD-Kron (:class:`whiten.PSGDKron`): products with triangular Kronecker factors that skip their
zero half, the factors' fit to a probe pair, their balancing, the preconditioning itself and the RMS clip; and the
deterministic update-probability schedule.

Every tensor has a leading batch dim B (a stack of same-shape parameters), so one call serves a whole stack. No
optimizer state, no param groups: inputs in, results out (the functions whose names end in ``_`` change their first
argument in place).
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = ["UpdateProbabilitySchedule", "precond_update_prob_schedule", "update_due", "per_slice",
           "balance_factors_", "fit_factors_", "precondition", "clip_rms_", "TRI_BLOCK"]


# ----- update-probability schedule -------------------------------------------------------------------------------


class UpdateProbabilitySchedule:
    """``prob(n) = clamp(max_prob * exp(-decay * (n - flat_start)), min_prob, max_prob)``, ``n`` = steps taken.

    Evaluated in float32 tensors exactly as kron_torch evaluates it, so both pick the same update steps. A plain
    class (not a closure) so that it pickles with the optimizer.
    """

    def __init__(self, max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001,
                 flat_start: float = 500):
        self.max_prob, self.min_prob, self.decay, self.flat_start = max_prob, min_prob, decay, flat_start

    def __call__(self, n) -> torch.Tensor:
        f32 = torch.float32
        n = torch.as_tensor(n, dtype=f32)
        prob = torch.tensor(self.max_prob, dtype=f32) * torch.exp(
            -torch.tensor(self.decay, dtype=f32) * (n - torch.tensor(self.flat_start, dtype=f32)))
        return prob.clamp(min=torch.tensor(self.min_prob, dtype=f32), max=torch.tensor(self.max_prob, dtype=f32))

    def __repr__(self) -> str:
        return (f"UpdateProbabilitySchedule(max_prob={self.max_prob}, min_prob={self.min_prob}, "
                f"decay={self.decay}, flat_start={self.flat_start})")


def precond_update_prob_schedule(max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001,
                                 flat_start: float = 500) -> UpdateProbabilitySchedule:
    """The default schedule: 1.0 for ``flat_start`` steps, then an exponential anneal down to ``min_prob``
    (0.03, reached after about 4000 steps with the defaults)."""
    return UpdateProbabilitySchedule(max_prob, min_prob, decay, flat_start)


def _to_float32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even, as torch casts), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: torch's cast gives inf
        return math.copysign(math.inf, x)


def update_due(counter: int, prob) -> bool:
    """Whether the factors are updated now, ``counter`` steps after their last update, at probability ``prob``."""
    # The same comparison as kron_torch: an int32 tensor against 1/prob, which torch runs in float32 (or in the
    # schedule's tensor dtype) and rounds exactly as there. A Python number is compared in Python, rounded to float32
    # the same way: no tensor to build and read back at every step.
    if isinstance(prob, (int, float)) and not isinstance(prob, bool):
        return _to_float32(float(counter)) >= _to_float32(1 / prob)
    return bool(torch.tensor(counter, dtype=torch.int32) >= 1 / prob)


# ----- kernels: every tensor has a leading batch dim B (a stack of same-shape parameters) -------------------------
# A factor q is (B, d, d) upper triangular or (B, d) diagonal and acts on one mode k of X (B, *shape).


def _mode_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, pre, d_k, post) view of x: mode k in the middle, the modes before and after it flattened."""
    shape = x.shape[1:]
    return x.reshape(x.shape[0], math.prod(shape[:k]), shape[k], math.prod(shape[k + 1:]))


def per_slice(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-slice (B,) tensor shaped to broadcast against a (B, ...) tensor of ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


# Products with a (d, d) triangular factor skip its zero half: the factor is split into 2x2 blocks, one of them
# zero, recursively while the halves are at least TRI_BLOCK wide. That is 3/4 of the dense work per level for
# triangular x dense and 1/2 for triangular x triangular; Gram matrices x xᵀ likewise compute each off-diagonal
# block once (3/4). Below TRI_BLOCK one dense GEMM is faster than more, smaller calls. The results equal the dense
# products up to the summation order. Measured on the CPU only: on accelerators, where a dense product of this size
# is a single fast kernel and each extra call costs a launch, the dense product is kept until measured there.
TRI_BLOCK = 128


def _halve(x: torch.Tensor, d: int) -> int:
    """The split point of a d-wide product, or 0 to compute it dense."""
    return d // 2 if d // 2 >= TRI_BLOCK and x.device.type == "cpu" else 0


def _tri_mm(t: torch.Tensor, x: torch.Tensor, upper: bool) -> torch.Tensor:
    """t @ x for a stack t (B, d, d) of upper (or lower) triangular matrices and x (B, d, n)."""
    h = _halve(t, t.shape[-1])
    if not h:
        return t @ x
    x1, x2 = x[:, :h], x[:, h:]
    if upper:  # [t11 t12; 0 t22] [x1; x2] = [t11 x1 + t12 x2; t22 x2]
        top = _tri_mm(t[:, :h, :h], x1, True).baddbmm_(t[:, :h, h:], x2)
        bottom = _tri_mm(t[:, h:, h:], x2, True)
    else:  # [t11 0; t21 t22] [x1; x2] = [t11 x1; t21 x1 + t22 x2]
        top = _tri_mm(t[:, :h, :h], x1, False)
        bottom = _tri_mm(t[:, h:, h:], x2, False).baddbmm_(t[:, h:, :h], x1)
    return torch.cat([top, bottom], dim=1)


def _mm_tri(x: torch.Tensor, t: torch.Tensor, upper: bool) -> torch.Tensor:
    """x @ t for x (B, n, d) and a stack t (B, d, d) of upper (or lower) triangular matrices."""
    h = _halve(t, t.shape[-1])
    if not h:
        return x @ t
    x1, x2 = x[:, :, :h], x[:, :, h:]
    if upper:  # [x1 x2] [t11 t12; 0 t22] = [x1 t11, x1 t12 + x2 t22]
        left = _mm_tri(x1, t[:, :h, :h], True)
        right = _mm_tri(x2, t[:, h:, h:], True).baddbmm_(x1, t[:, :h, h:])
    else:  # [x1 x2] [t11 0; t21 t22] = [x1 t11 + x2 t21, x2 t22]
        left = _mm_tri(x1, t[:, :h, :h], False).baddbmm_(x2, t[:, h:, :h])
        right = _mm_tri(x2, t[:, h:, h:], False)
    return torch.cat([left, right], dim=2)


def _upper_times_upper(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for stacks of upper triangular (B, d, d) matrices (the result is upper triangular)."""
    h = _halve(a, a.shape[-1])
    if not h:
        return a @ b
    out = a.new_zeros(a.shape)
    out[:, :h, :h] = _upper_times_upper(a[:, :h, :h], b[:, :h, :h])
    out[:, h:, h:] = _upper_times_upper(a[:, h:, h:], b[:, h:, h:])
    out[:, :h, h:] = _tri_mm(a[:, :h, :h], b[:, :h, h:], True).add_(
        _mm_tri(a[:, :h, h:], b[:, h:, h:], True))  # a11 b12 + a12 b22
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x @ xᵀ for x (B, d, n), computing each off-diagonal block once."""
    h = _halve(x, x.shape[1])
    if not h:
        return x @ x.mT
    x1, x2 = x[:, :h], x[:, h:]
    out = x.new_empty(x.shape[0], x.shape[1], x.shape[1])
    out[:, :h, :h] = _gram(x1)
    out[:, h:, h:] = _gram(x2)
    corner = x1 @ x2.mT
    out[:, :h, h:] = corner
    out[:, h:, :h] = corner.mT
    return out


def _mode_mul(x: torch.Tensor, q: torch.Tensor, k: int, transpose: bool = False) -> torch.Tensor:
    """x ×_k q: ``y[.., a, ..] = sum_b q[a, b] x[.., b, ..]`` (q transposed if asked; elementwise if diagonal).
    q is upper triangular, so qᵀ is lower."""
    x4 = _mode_view(x, k)
    if q.ndim == 2:
        return (x4 * q[:, None, :, None]).reshape(x.shape)
    m = q.mT if transpose else q
    if x4.shape[1] == 1:
        y = _tri_mm(m, x4[:, 0], upper=not transpose)
    elif x4.shape[3] == 1:
        y = _mm_tri(x4[..., 0], m.mT, upper=transpose)
    else:
        y = m[:, None] @ x4
    return y.reshape(x.shape)


def _mode_solve(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """x ×_k q⁻ᵀ, by a triangular solve (never an explicit inverse)."""
    x4 = _mode_view(x, k)
    if q.ndim == 2:
        return (x4 / q[:, None, :, None]).reshape(x.shape)
    solve = torch.linalg.solve_triangular
    if x4.shape[3] == 1:  # mode k is last: rows times q⁻¹
        y = solve(q, x4[..., 0], upper=True, left=False)
    elif x4.shape[1] == 1:  # mode k is first: q⁻ᵀ times columns
        y = solve(q.mT, x4[:, 0], upper=False)
    else:
        y = solve(q.mT[:, None], x4, upper=False)
    return y.reshape(x.shape)


def _mode_gram(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, d_k, d_k): x contracted with itself over every mode but k."""
    x4 = _mode_view(x, k)
    if x4.shape[1] == 1:
        return _gram(x4[:, 0])
    if x4.shape[3] == 1:
        return _gram(x4[..., 0].mT)
    return torch.einsum("bpiq,bpjq->bij", x4, x4)


def _mode_sumsq(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, d_k): the diagonal of :func:`_mode_gram`."""
    return _mode_view(x, k).square().sum(dim=(1, 3))


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """(B,): a power of two within a factor 2 of each slice's max |x|. Dividing by a power of two is exact, so
    quantities computed from x/s are bit-for-bit those computed from x, rescaled, unless they would overflow."""
    amax = x.abs().amax(dim=tuple(range(1, x.ndim)))
    _, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), exponent - 1)


def _spectral_lower_bound(a: torch.Tensor, max_abs: torch.Tensor) -> torch.Tensor:
    """(B,): a cheap lower bound of ‖a‖₂ for symmetric PSD a (B, d, d): start from the column of largest norm and
    take one power-iteration step. ``max_abs`` (B,) is max |a| per slice, used to keep the products in range.

    Both products are xᵀa (= (a x)ᵀ for symmetric a): a row vector times a rounds alike in a stack of any size, while
    a x (a dimension of 1 last) is rounded differently by MKL's gemm, which torch calls for a stack of one, than by
    its batched gemm, which it calls for larger ones: a slice's bits would depend on how many share its stack."""
    a = a / max_abs[:, None, None]
    col = a.square().sum(dim=-2).argmax(dim=-1)
    x = a.gather(-1, col[:, None, None].expand(a.shape[0], a.shape[1], 1))[..., 0]
    x = (x[:, None, :] @ a)[:, 0]
    x = x / x.norm(dim=-1, keepdim=True)
    x = (x[:, None, :] @ a)[:, 0]
    return x.norm(dim=-1) * max_abs


def balance_factors_(qs: list[torch.Tensor]) -> None:
    """Rescale the factors of each slice to a common max |q| (their geometric mean); the product is unchanged."""
    norms = torch.stack([q.abs().amax(dim=tuple(range(1, q.ndim))) for q in qs])
    geometric_mean = norms.log().mean(dim=0).exp()
    for q, norm in zip(qs, norms):
        q.mul_(per_slice(geometric_mean / norm, q.ndim))


def fit_factors_(qs: list[torch.Tensor], g: torch.Tensor, v: torch.Tensor, precond_lr: float) -> None:
    """One PSGD step on the Kronecker factors from the probe pair (v, g + damping·v); g is damped IN PLACE.

    A = g ×_k Q_k for every k, B = v ×_k Q_k⁻ᵀ for every k; per mode k, with T1 = A_(k)A_(k)ᵀ, T2 = B_(k)B_(k)ᵀ:
    triangular Q_k -= lr·triu(T1 - T2)/lb‖T1 + T2‖₂ · Q_k; diagonal Q_k -= lr·(T1 - T2)·Q_k/max|T1 + T2|.
    """
    dtype, n = g.dtype, g.ndim
    tiny = torch.finfo(dtype).tiny
    mean_abs = g.abs().mean(dim=tuple(range(1, n)), keepdim=True)
    # damping noise of relative size sqrt(eps_fp32), as kron_torch: keeps the fit well posed for rank-deficient g
    # (a Python number, not a tensor copied to the device at every update: the square root of a float32 taken in
    # float64 and rounded to float32 is the float32 square root, so the product is the same)
    sqrt_eps = math.sqrt(torch.finfo(torch.float32).eps)
    g.add_(sqrt_eps * mean_abs * v)
    a, conj_b = g, v
    for k, q in enumerate(qs):
        a = _mode_mul(a, q, k)
        conj_b = _mode_solve(conj_b, q, k)
    # The step is invariant to scaling A and B together: bring both to max |.| ~ 1 by an exact power of two so
    # that their Gram matrices cannot overflow (a 1e30 gradient would make A Aᵀ inf in float32).
    scale = per_slice(torch.maximum(_pow2_scale(a), _pow2_scale(conj_b)), n)
    a, conj_b = a / scale, conj_b / scale
    # A slice whose g is exactly zero carries no information: its fit would only grow Q by ~precond_lr per update
    # without bound (kron_torch lets it), so it is left as it is.
    informative = mean_abs.reshape(-1) > 0
    for k, q in enumerate(qs):
        triangular = q.ndim == 3
        gram = _mode_gram if triangular else _mode_sumsq
        t1, t2 = gram(a, k), gram(conj_b, k)
        t1, t2 = t1 - t2, t1 + t2
        t1 *= precond_lr
        norm = t2.abs().amax(dim=tuple(range(1, t2.ndim)))
        if triangular:
            bound = torch.where(norm > 0, _spectral_lower_bound(t2, norm), norm).clamp(min=tiny)
            # triu through a mask: Tensor.triu can cost milliseconds on a busy CPU (a parallel loop per call)
            idx = torch.arange(t1.shape[-1], device=t1.device)
            upper = idx[:, None] <= idx
            step = _upper_times_upper(torch.where(upper, t1, 0.0) / bound[:, None, None], q)
        else:
            step = t1 * (q / norm.clamp(min=tiny)[:, None])
        q.copy_(torch.where(per_slice(informative, q.ndim), q - step, q))


def _mode_mul_dense(x: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """x ×_k a for a stack a (B, d_k, d_k) of dense matrices."""
    x4 = _mode_view(x, k)
    if x4.shape[1] == 1:
        y = a @ x4[:, 0]
    elif x4.shape[3] == 1:
        y = x4[..., 0] @ a.mT
    else:
        y = a[:, None] @ x4
    return y.reshape(x.shape)


def precondition(qs: list[torch.Tensor], m: torch.Tensor, grams: list | None = None) -> torch.Tensor:
    """P m with P = ⊗_k Q_kᵀQ_k, applied mode by mode: as Q_kᵀ(Q_k x), or as (Q_kᵀQ_k) x where ``grams[k]``
    holds that product."""
    x = m
    for k, q in enumerate(qs):
        if grams is not None and grams[k] is not None:
            x = _mode_mul_dense(x, grams[k], k)
        else:
            x = _mode_mul(_mode_mul(x, q, k), q, k, transpose=True)
    return x


def clip_rms_(x: torch.Tensor, max_rms: float) -> None:
    """Scale each slice down to RMS ≤ max_rms (RMS computed on an exactly rescaled copy, so it cannot overflow)."""
    s = _pow2_scale(x)
    rms = (x / per_slice(s, x.ndim)).square().mean(dim=tuple(range(1, x.ndim))).sqrt() * s
    x.mul_(per_slice(torch.clamp(max_rms / (rms + 1e-12), max=1.0), x.ndim))

