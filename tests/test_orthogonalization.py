"""Orthogonalization kernels: the named Newton–Schulz schedules (Keller Jordan's quintic, Polar Express, the
convergent cubic) against the SVD polar factor and against a float64 transcription of the Polar Express paper's
Algorithm 1; stacks over any leading dims and N-D weights as matrices; the exact SVD polar factor and its fallback
ladder; Muon picking a schedule by name."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import whiten
from whiten import linalg

F64 = torch.float64


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    return U @ Vh


def with_spectrum(m: int, n: int, cond: float, seed: int = 0, batch: tuple = ()) -> torch.Tensor:
    """A random (…, m, n) float64 matrix with singular values log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=F64)).Q
    S = torch.logspace(0, -math.log10(cond), r, dtype=F64)
    return (U * S) @ V.mT


# ----- the schedules ----------------------------------------------------------------------------------------------

# Algorithm 1 of Amsel, Persson, Musco, Gower, "The Polar Express" (arXiv 2505.16932), as printed in the paper.
PAPER_TABLE = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def paper_polar_express(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The paper's Algorithm 1 in float64 (the paper casts to bfloat16 "for speed"), one matrix."""
    coeffs = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PAPER_TABLE[:-1]] + [PAPER_TABLE[-1]]
    X = G.to(F64)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm() * 1.01 + 1e-7)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def test_named_schedules():
    assert linalg.NS_SCHEDULES["jordan"] == linalg.NSSchedule(((3.4445, -4.7750, 2.0315),), 1.0)
    assert linalg.NS_SCHEDULES["cubic"] == linalg.NSSchedule(((1.5, -0.5, 0.0),), 1.0)
    pe = linalg.NS_SCHEDULES["polar_express"]
    assert pe.normalization == 1.01 and len(pe.coefficients) == 8
    for (a, b, c), (pa, pb, pc) in zip(pe.coefficients[:-1], PAPER_TABLE[:-1]):
        assert (a, b, c) == (pa / 1.01, pb / 1.01**3, pc / 1.01**5)
    assert pe.coefficients[-1] == (1.875, -1.25, 0.375)  # unscaled: p(1) = 1, p'(1) = 0
    assert linalg.ns_schedule((1, 2, 3)) == linalg.NSSchedule(((1.0, 2.0, 3.0),))
    assert linalg.ns_schedule([(1, 2, 3), (4, 5, 6)]).coefficients == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_polar_express_scalar_composition_reaches_one_from_1e_minus_3():
    """What the paper's table is optimized for: the composed polynomial maps every singular value in [1e-3, 1]
    to 1, the worst error shrinking super-exponentially (8 iterations: below 1e-13), while Jordan's quintic
    plateaus near 0.3 and the cubic has barely started (x1.5 per iteration from 1e-3)."""
    x = torch.logspace(-3, 0, 4001, dtype=F64)
    worst = {}
    for name in ("polar_express", "jordan", "cubic"):
        s = linalg.NS_SCHEDULES[name]
        y = x / s.normalization
        for i in range(8):
            a, b, c = s.coefficients[min(i, len(s.coefficients) - 1)]
            y = a * y + b * y**3 + c * y**5
        worst[name] = (y - 1).abs().max().item()
    assert worst["polar_express"] < 1e-13
    assert 0.2 < worst["jordan"] < 0.4
    assert worst["cubic"] > 0.9


@pytest.mark.parametrize("shape", [(12, 12), (9, 20), (20, 9)])
@pytest.mark.parametrize("steps", [1, 3, 5, 8, 12])
def test_polar_express_equals_the_papers_algorithm_in_float64(shape, steps):
    """whiten divides by max(1.01 ||X||_F, eps) and the paper by 1.01 ||X||_F + 1e-7: with ||G||_F ~ 1e6 the two
    normalizations agree to 1e-13 relative, and then so do the iterations."""
    G = with_spectrum(*shape, cond=100.0) * 1e6
    ours = linalg.newton_schulz(G.unsqueeze(0), steps, "polar_express")[0]
    torch.testing.assert_close(ours, paper_polar_express(G, steps), rtol=0, atol=1e-11)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_convergent_schedules_reach_the_svd_polar_factor_and_jordans_plateaus(shape):
    G = with_spectrum(*shape, cond=1e3)
    P = polar(G)
    err = lambda X: ((X - P).norm() / math.sqrt(min(shape))).item()  # noqa: E731  (RMS over singular values)
    assert err(linalg.newton_schulz(G, 10, "polar_express")) < 1e-12
    assert err(linalg.newton_schulz(G, 60, "cubic")) < 1e-12
    assert err(linalg.newton_schulz(G, 5, "polar_express")) < err(linalg.newton_schulz(G, 5, "jordan"))
    assert 0.05 < err(linalg.newton_schulz(G, 40, "jordan")) < 0.5  # it does not converge


def test_default_is_jordan_bit_for_bit():
    G = torch.randn(3, 16, 24)
    ref = linalg.newton_schulz(G, 5)
    assert torch.equal(linalg.newton_schulz(G, 5, "jordan"), ref)
    assert torch.equal(linalg.newton_schulz(G, 5, linalg.MUON_COEFFICIENTS), ref)
    assert torch.equal(linalg.newton_schulz(G, 5, [linalg.MUON_COEFFICIENTS]), ref)


def test_cubic_skips_the_quintic_term_exactly():
    G = with_spectrum(10, 14, cond=10.0).unsqueeze(0)
    assert torch.allclose(linalg.newton_schulz(G, 7, "cubic"), linalg.newton_schulz(G, 7, (1.5, -0.5, 1e-300)),
                          rtol=0, atol=1e-15)


def test_per_iteration_schedule_repeats_its_last_triple():
    G = with_spectrum(8, 11, cond=10.0)
    seq = [(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)]
    X = G / G.norm()
    for a, b, c in [seq[0], seq[1], seq[1], seq[1]]:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(linalg.newton_schulz(G, 4, seq), X, rtol=0, atol=1e-14)


@pytest.mark.parametrize("bad", ["muon", "", (1.0, 2.0), (1.0, 2.0, math.inf), [], [(1, 2, 3), (1, 2)], 3.0,
                                 (True, 1.0, 1.0)])
def test_bad_schedules_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="Invalid coefficients"):
        linalg.ns_schedule(bad)
    with pytest.raises(ValueError, match="Invalid ns_coefficients"):
        whiten.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_coefficients=bad)


# ----- stacks and N-D weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["jordan", "polar_express", "cubic"])
def test_any_leading_dims_equal_one_matrix_at_a_time(name):
    G = with_spectrum(6, 10, cond=10.0, batch=(2, 3))
    out = linalg.newton_schulz(G, 6, name)
    assert out.shape == G.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], linalg.newton_schulz(G[i, j], 6, name), rtol=0, atol=1e-14)
    single = linalg.newton_schulz(G[0, 0], 6, name)
    assert single.shape == (6, 10)


def test_orthogonalize_conv_and_expert_stacks():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=g, dtype=F64)
    out = linalg.orthogonalize(conv, 12, "polar_express")
    assert out.shape == conv.shape
    torch.testing.assert_close(out.reshape(8, 27), polar(conv.reshape(8, 27)), rtol=0, atol=1e-10)
    experts = torch.randn(4, 6, 10, generator=g, dtype=F64)
    out = linalg.orthogonalize(experts, 12, "polar_express", batch_dims=1)
    for e in range(4):
        torch.testing.assert_close(out[e], polar(experts[e]), rtol=0, atol=1e-10)
    conv_experts = torch.randn(2, 5, 2, 3, generator=g, dtype=F64)  # (E, out, in, k)
    out = linalg.orthogonalize(conv_experts, 12, "polar_express", batch_dims=1)
    torch.testing.assert_close(out[1].reshape(5, 6), polar(conv_experts[1].reshape(5, 6)), rtol=0, atol=1e-10)
    assert linalg.matrix_view((7, 3, 2, 2)) == ((), 7, 12)
    with pytest.raises(ValueError, match="not a stack of matrices"):
        linalg.matrix_view((4, 5), batch_dims=1)


# ----- the exact polar factor ---------------------------------------------------------------------------------------

def test_svd_polar_full_rank_rank_deficient_and_zero():
    G = with_spectrum(7, 5, cond=50.0, batch=(1,))
    r = linalg.svd_polar(G)
    torch.testing.assert_close(r.factor[0], polar(G[0]), rtol=0, atol=1e-13)
    torch.testing.assert_close(r.nuclear[0], torch.linalg.svdvals(G[0]).sum(), rtol=1e-14, atol=0)
    u, v = torch.randn(6, 2, dtype=F64), torch.randn(2, 9, dtype=F64)
    low = (u @ v).unsqueeze(0)  # rank 2
    F = linalg.svd_polar(low).factor[0]
    U, S, Vh = torch.linalg.svd(low[0], full_matrices=False)
    torch.testing.assert_close(F, U[:, :2] @ Vh[:2], rtol=0, atol=1e-12)  # the partial isometry
    assert torch.linalg.matrix_rank(F).item() == 2
    zero = linalg.svd_polar(torch.zeros(2, 4, 3))
    assert torch.equal(zero.factor, torch.zeros(2, 4, 3)) and torch.equal(zero.nuclear, torch.zeros(2))


def test_svd_polar_survives_huge_finite_values_and_half_precision():
    G = torch.randn(2, 6, 4) * 1e30  # squares overflow float32
    r = linalg.svd_polar(G)
    assert torch.isfinite(r.factor).all() and torch.isfinite(r.nuclear).all()
    torch.testing.assert_close(r.factor[1].double(), polar(G[1]), rtol=0, atol=1e-5)
    h = linalg.svd_polar(G.bfloat16() / 1e30)
    assert h.factor.dtype == torch.float32


def test_svd_polar_fallback_ladder(monkeypatch):
    real = torch.linalg.svd
    G = with_spectrum(6, 6, cond=10.0, batch=(2,)).float()
    expected = [polar(G[i]) for i in range(2)]
    nuclear = torch.linalg.svdvals(G[1].double()).sum()

    def fails_in_float32(A, *args, **kwargs):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge (simulated)")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    r = linalg.svd_polar(G)
    assert (r.retried, r.fallbacks) == (2, 0) and r.factor.dtype == torch.float32
    torch.testing.assert_close(r.factor[0].double(), expected[0], rtol=0, atol=1e-6)

    def always_fails(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge (simulated)")

    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    r = linalg.svd_polar(G)
    assert (r.retried, r.fallbacks) == (2, 2)
    torch.testing.assert_close(r.factor[1].double(), expected[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(r.nuclear[1].double(), nuclear, rtol=1e-5, atol=0)


# ----- Muon by name -----------------------------------------------------------------------------------------------

def _muon_run(**kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=F64))
    opt = whiten.Muon([w], lr=0.05, momentum=0.0, ns_dtype=F64, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        w.grad = torch.randn(12, 8, generator=g, dtype=F64) * 1e6
        opt.step()
    return w.detach()


def test_muon_default_schedule_is_jordan_and_polar_express_follows_the_paper():
    default = _muon_run()
    assert torch.equal(default, _muon_run(ns_coefficients="jordan"))
    assert torch.equal(default, _muon_run(ns_coefficients=linalg.MUON_COEFFICIENTS))
    assert whiten.Muon([torch.nn.Parameter(torch.randn(2, 2))]).param_groups[0]["ns_coefficients"] == "jordan"
    # Muon with Polar Express and momentum 0: W -= lr * sqrt(max(1, m/n)) * PolarExpress(G)
    torch.manual_seed(0)
    w = torch.randn(12, 8, dtype=F64)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        G = torch.randn(12, 8, generator=g, dtype=F64) * 1e6
        w = w - 0.05 * math.sqrt(12 / 8) * paper_polar_express(G, 5)
    torch.testing.assert_close(_muon_run(ns_coefficients="polar_express"), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_survives_finite_entries_whose_norm_overflows(dtype):
    # Entries of 1e30 (or a matrix of 1e36s) overflow the float32 Frobenius norm to inf; dividing by it would zero
    # the step. The result must be that of the same matrix scaled down, and a normal matrix in the same stack must
    # be untouched bit for bit.
    torch.manual_seed(0)
    G = torch.randn(3, 16, 24)
    big = G.clone()
    big[0] *= 1e30
    big[1] = 1e36
    out = linalg.newton_schulz(big.to(dtype), 5)
    assert torch.isfinite(out).all()
    ref0 = linalg.newton_schulz(G[0].to(dtype), 5)
    ref1 = linalg.newton_schulz(torch.ones(16, 24, dtype=dtype), 5)
    atol = 1e-5 if dtype == torch.float32 else 5e-2  # bfloat16 rounds the scaled matrix differently
    torch.testing.assert_close(out[0].float(), ref0.float(), atol=atol, rtol=0)
    torch.testing.assert_close(out[1].float(), ref1.float(), atol=atol, rtol=0)
    assert torch.equal(out[2], linalg.newton_schulz(G[2].to(dtype), 5))


def test_muon_keeps_stepping_after_a_huge_finite_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    opt = whiten.Muon(whiten.param_groups(model), lr=0.01)
    hidden = model[1].weight
    for t in range(8):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (1e30 if t == 2 else 1.0)
        before = hidden.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the AdamW path's overflowed second moment restarts
            opt.step()
        assert torch.isfinite(hidden).all()
        assert not torch.equal(before, hidden), f"step {t} left the hidden matrix unchanged"

