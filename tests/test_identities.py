"""The identities of "Old Optimizer, New Norm" (Bernstein & Newhouse, arXiv 2409.20325), made executable in float64
at tolerance 1e-10: with their exponential moving averages switched off, Adam is sign descent (steepest descent
under the max-of-max norm), and Shampoo is spectral descent, U Vᵀ of the gradient (steepest descent under the
spectral norm, up to the nuclear-norm factor), which is also SpecGD's step, Muon's with a convergent Newton–Schulz
run to convergence, and (in exact arithmetic) SPlus's. Each test states the settings, scalings and limits under which
its identity holds. (Prodigy's identity lives with Prodigy.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whiten

F64 = torch.float64
TOL = 1e-10


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def gradients(shape, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(steps)]


def steps_of(opt, w: nn.Parameter, grads) -> list[torch.Tensor]:
    """The update -Δw of each step, one gradient per step."""
    out = []
    for G in grads:
        before = w.detach().clone()
        w.grad = G.clone()
        opt.step()
        out.append(before - w.detach())
    return out


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


# ----- Adam without EMAs is sign descent ----------------------------------------------------------------------------

def test_adam_without_emas_is_sign_descent():
    """torch.optim.AdamW with betas=(0, 0) and weight_decay=0: m = g, v = g², both bias corrections are 1, and the
    step is lr·g/(|g| + ε) = lr·sign(g)·(1 - ε/(|g| + ε)). As ε → 0 this is lr·sign(g); at ε = 1e-300 the
    correction is below float64 resolution for any |g| > 1e-150, so the steps equal lr·sign(g) (and 0 where
    g = 0, where ε > 0 avoids 0/0). The same holds for the AdamW path of whiten.Muon (momentum = β1 = 0,
    adam_betas[1] = 0) and is, exactly, Scion's Sign LMO without normalization, momentum 0, unconstrained."""
    grads = gradients((6, 5))
    grads[1][2, 3] = 0.0
    expected = [0.01 * torch.sign(G) for G in grads]

    w = nn.Parameter(torch.randn(6, 5, dtype=F64))
    adam = torch.optim.AdamW([w], lr=0.01, betas=(0.0, 0.0), eps=1e-300, weight_decay=0.0)
    assert_all_close(steps_of(adam, w, grads), expected)

    w = nn.Parameter(torch.randn(6, 5, dtype=F64))
    muon_adam = whiten.Muon([{"params": [w], "role": "head"}], lr=0.01, adam_lr=0.01, momentum=0.0,
                            adam_betas=(0.0, 0.0), adam_eps=1e-300)
    assert_all_close(steps_of(muon_adam, w, grads), expected)

    w = nn.Parameter(torch.randn(6, 5, dtype=F64))
    scion = whiten.Scion([{"params": [w], "norm": "Sign", "norm_kwargs": {"normalized": False}}], lr=0.01,
                         momentum=0.0, unconstrained=True)
    assert_all_close(steps_of(scion, w, grads), expected)


# ----- Shampoo without accumulation is spectral descent, U Vᵀ -------------------------------------------------------

def shampoo(w, epsilon):
    """whiten.Shampoo with nothing accumulated: β1 = 0 (no momentum), β2 = 1e-300 (F = β2·F + (1-β2)·GGᵀ: the
    range (0, 1] that Distributed Shampoo accepts excludes 0, and 1e-300·F is below float64 resolution next to
    GGᵀ, so F = GGᵀ exactly), refreshed at every step from the first, no grafting, one block per matrix
    (max_preconditioner_dim = the larger side, so the two dims are not merged into a vector), exponent −1/4."""
    return whiten.Shampoo([w], lr=1.0, betas=(0.0, 1e-300), epsilon=epsilon, grafting=None,
                          precondition_frequency=1, start_preconditioning_step=1,
                          max_preconditioner_dim=max(w.shape))


@pytest.mark.parametrize("n", [8, 16])
def test_shampoo_without_accumulation_steps_along_u_vt_on_square_full_rank_matrices(n):
    """For G = U Σ Vᵀ square and full rank, L = GGᵀ = U Σ² Uᵀ and R = GᵀG = V Σ² Vᵀ, so
    L^{-1/4} G R^{-1/4} = U Σ^{-1/2} Σ Σ^{-1/2} Vᵀ = U Vᵀ. Shampoo's ε enters as (L + εI)^{-1/4}: a relative error
    ε/σ_min², negligible at ε = 1e-30. SpecGD with momentum 0 and scale "none" takes the same step."""
    grads = gradients((n, n))
    expected = [polar(G) for G in grads]
    w = nn.Parameter(torch.zeros(n, n, dtype=F64))
    assert_all_close(steps_of(shampoo(w, 1e-30), w, grads), expected)
    w = nn.Parameter(torch.zeros(n, n, dtype=F64))
    specgd = whiten.SpecGD([w], lr=1.0, momentum=0.0, scale="none")
    assert_all_close(steps_of(specgd, w, grads), expected)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8)])
def test_shampoo_without_accumulation_on_rectangular_matrices_needs_a_small_but_not_tiny_epsilon(shape):
    """For m ≠ n the larger side's factor has rank min(m, n): its inverse root is ε^{-1/4} on its null space, where
    G has nothing in exact arithmetic but ~1e-16·‖G‖ of rounding. The error is then about ε/σ_min² (the bias on
    the range) + ε^{-1/4}·1e-16 (rounding amplified on the null space): 1e-8 at ε = 1e-30, 1e-12 at ε = 1e-12.
    So the identity holds in the limit ε → 0 taken no faster than the rounding allows; at ε = 1e-12 it holds to
    1e-10."""
    grads = gradients(shape)
    expected = [polar(G) for G in grads]
    w = nn.Parameter(torch.zeros(shape, dtype=F64))
    assert_all_close(steps_of(shampoo(w, 1e-12), w, grads), expected)
    w = nn.Parameter(torch.zeros(shape, dtype=F64))
    tiny = steps_of(shampoo(w, 1e-30), w, grads)
    assert max((a - b).abs().max().item() for a, b in zip(tiny, expected)) > 1e-10  # the amplified rounding


def test_spectral_descent_with_the_nuclear_norm_is_steepest_descent_under_the_spectral_norm():
    """argmin_Δ ⟨G, Δ⟩ + ‖Δ‖₂²/(2η) = −η‖G‖_* U Vᵀ: SpecGD's scale "nuclear". Checked against the definition:
    the step attains the minimum, and random perturbations of it do not do better."""
    G = gradients((7, 5))[0]
    w = nn.Parameter(torch.zeros(7, 5, dtype=F64))
    eta = 0.3
    step = -steps_of(whiten.SpecGD([w], lr=eta, momentum=0.0, scale="nuclear"), w, [G])[0]
    objective = lambda D: (G * D).sum() + torch.linalg.matrix_norm(D, ord=2) ** 2 / (2 * eta)  # noqa: E731
    nuclear = torch.linalg.svdvals(G).sum()
    torch.testing.assert_close(step, -eta * nuclear * polar(G), rtol=0, atol=TOL)
    torch.testing.assert_close(objective(step), -eta * nuclear**2 / 2, rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        assert objective(step + 1e-3 * torch.randn(7, 5, generator=g, dtype=F64)) >= objective(step)


# ----- Muon with a convergent Newton–Schulz is SpecGD ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 8), (12, 7), (7, 12)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_muon_with_the_convergent_cubic_run_to_convergence_is_specgd(shape, momentum):
    """The cubic X ← 1.5X − 0.5XXᵀX maps each singular value of the Frobenius-normalized direction (all in (0, 1])
    towards 1 (x1.5 per iteration from small ones, then quadratically), so after enough iterations Newton–Schulz
    is U Vᵀ: about log(‖G‖_F/σ_min)/log(1.5) + 6 iterations; 100 covers condition numbers far above these random
    matrices' (eps 1e-300: the Frobenius guard never binds). With the same momentum, Nesterov and scale ("none",
    and Muon's √max(1, m/n) as SpecGD's "muon"), Muon and SpecGD then take the same steps (full-rank
    directions; a rank-deficient one: next test)."""
    grads = gradients(shape)
    for muon_scale, specgd_scale in (("none", "none"), ("original", "muon")):
        w1 = nn.Parameter(torch.zeros(shape, dtype=F64))
        w2 = nn.Parameter(torch.zeros(shape, dtype=F64))
        muon = whiten.Muon([w1], lr=0.1, momentum=momentum, ns_coefficients="cubic", ns_steps=100, ns_dtype=F64,
                           scaling=muon_scale, eps=1e-300)
        specgd = whiten.SpecGD([w2], lr=0.1, momentum=momentum, scale=specgd_scale)
        assert_all_close(steps_of(muon, w1, grads), steps_of(specgd, w2, grads))
    # and Keller Jordan's quintic, which does not converge, does not give U Vᵀ
    w1 = nn.Parameter(torch.zeros(shape, dtype=F64))
    jordan = steps_of(whiten.Muon([w1], lr=1.0, momentum=0.0, ns_steps=100, ns_dtype=F64, scaling="none"), w1,
                      grads[:1])
    assert (jordan[0] - polar(grads[0])).abs().max().item() > 0.05


def test_muon_with_the_convergent_cubic_on_a_rank_deficient_direction_holds_for_a_window_of_iterations():
    """On a rank-2 direction SpecGD steps along the partial isometry U₂V₂ᵀ (its zero singular values get no step).
    The cubic maps exact zeros to zero, but in floating point those singular values are ~1e-16 of rounding, which
    it multiplies by 1.5 per iteration: they reach 1e-10 after about 35 iterations and 1 after about 90. So the
    identity holds between the iterations the non-zero singular values need (here ~15) and those at which the
    rounding grows to the tolerance: at 30 iterations to 1e-10, and at 150 not at all (the rounding directions have
    become singular vectors with singular value 1)."""
    u, v = gradients((9, 2))[0], gradients((2, 6), seed=1)[0]
    G = u @ v
    w2 = nn.Parameter(torch.zeros(9, 6, dtype=F64))
    exact = steps_of(whiten.SpecGD([w2], lr=1.0, momentum=0.0, scale="none"), w2, [G])
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert_all_close(exact, [U[:, :2] @ Vh[:2]])
    for steps, holds in ((30, True), (150, False)):
        w1 = nn.Parameter(torch.zeros(9, 6, dtype=F64))
        muon = whiten.Muon([w1], lr=1.0, momentum=0.0, ns_coefficients="cubic", ns_steps=steps, ns_dtype=F64,
                           scaling="none", eps=1e-300)
        error = (steps_of(muon, w1, [G])[0] - exact[0]).abs().max().item()
        assert (error < TOL) == holds, (steps, error)


# ----- SPlus without EMAs -------------------------------------------------------------------------------------------

def splus(w):
    """SPlus with β1 = β2 = 0 (M = G, L = GGᵀ, R = GᵀG), refreshed at every step (the refresh runs after the
    update), no decay, no average, eps 0; the step is lr·2/(m+n)·U_splus, so lr = (m+n)/2 leaves U_splus."""
    m, n = w.shape
    return whiten.SPlus([{"params": [w], "role": "hidden"}], lr=(m + n) / 2, betas=(0.0, 0.0), inverse_every=1,
                        weight_decay=0.0, ema_rate=None, eps=0.0)


def test_splus_without_emas_first_step_is_sign_descent():
    """At step 1 the basis is the identity: SPlus's step is lr·2/(m+n)·sign(G), Adam's EMA-off step up to that
    scaling (whatever the shape)."""
    for shape in ((6, 6), (7, 4)):
        G = gradients(shape)[0]
        w = nn.Parameter(torch.zeros(shape, dtype=F64))
        assert_all_close(steps_of(splus(w), w, [G]), [torch.sign(G)])


def test_splus_without_emas_is_u_vt_where_its_eigenbasis_is_exact():
    """The exact statement. With β = (0, 0) and a refresh after every step, SPlus's step t + 1 rotates by the
    eigenbases Q_L, Q_R of G_t Gᵀ_t and Gᵀ_t G_t. If G_{t+1} = G_t = U Σ Vᵀ, square, full rank and with distinct
    singular values, then Q_L = U P S_1 and Q_R = V P S_2 (the same ascending order P, arbitrary signs S_1, S_2),
    Q_Lᵀ G Q_R = S_1 Pᵀ Σ P S_2 is diagonal with non-zero entries, and Q_L sign(Q_Lᵀ G Q_R) Q_Rᵀ = U Vᵀ: the step
    is lr·2/(m+n)·U Vᵀ in exact arithmetic.

    In floating point it holds where the eigensolver is exact: here a G whose singular vectors are signed
    permutations (eigh of a diagonal matrix returns unit vectors exactly), so the float step is U Vᵀ to the last
    bit. For a generic G see the next test."""
    perm_rows = torch.eye(6, dtype=F64)[[3, 0, 5, 1, 4, 2]] * torch.tensor([1.0, -1, 1, 1, -1, 1], dtype=F64)
    perm_cols = torch.eye(6, dtype=F64)[[2, 4, 0, 5, 3, 1]]
    G = perm_rows @ torch.diag(torch.tensor([3.0, 1.5, 2.0, 5.0, 0.7, 1.1], dtype=F64)) @ perm_cols
    w = nn.Parameter(torch.zeros(6, 6, dtype=F64))
    got = steps_of(splus(w), w, [G, G])
    assert_all_close(got[1:], [polar(G)])


def test_splus_without_emas_on_a_generic_matrix_is_u_vt_only_in_exact_arithmetic():
    """For a generic G the same argument holds for SPlus's own basis up to rounding: Q_Lᵀ G Q_R is diagonal to
    ~1e-15·‖G‖, and Q_L sign(diag(Q_Lᵀ G Q_R)) Q_Rᵀ = U Vᵀ to 1e-10. But sign() cannot tell that the off-diagonal
    entries are rounding: it maps each to ±1, so the floating-point step of SPlus is NOT U Vᵀ (its entries are
    O(1) away). The identity is a statement about exact arithmetic here, not one SPlus's float steps satisfy;
    with the momentum and factor EMAs on (β > 0) the rotated momentum is not diagonal in the first place."""
    G = gradients((6, 6))[0]
    w = nn.Parameter(torch.zeros(6, 6, dtype=F64))
    opt = splus(w)
    got = steps_of(opt, w, [G, G])
    QL, QR = opt.state[w]["basis_left"], opt.state[w]["basis_right"]  # refreshed from G after each step
    D = QL.T @ G @ QR
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-13 * G.abs().max() and torch.diagonal(D).abs().min() > 0.1
    torch.testing.assert_close(QL @ torch.diag(torch.sign(torch.diagonal(D))) @ QR.T, polar(G), rtol=0, atol=TOL)
    assert (got[1] - polar(G)).abs().max().item() > 0.1
    # what SPlus computes: the sign of every entry of the rotated gradient, rotated back. Which sign a rounding-level
    # off-diagonal entry takes depends on the order of the BLAS kernel's sums (it differs between CPUs), so the test
    # checks the structure rather than one machine's signs: rotated back, the step is -1, 0 or 1 everywhere (0 where
    # the rounding noise happened to be exactly zero), with the signs of D on the diagonal.
    S = QL.T @ got[1] @ QR
    torch.testing.assert_close(S, S.round(), rtol=0, atol=TOL)
    assert S.round().abs().max() == 1
    torch.testing.assert_close(torch.diagonal(S), torch.sign(torch.diagonal(D)), rtol=0, atol=TOL)


def test_the_spectral_step_has_unit_spectral_norm_and_the_sign_step_unit_max_norm():
    """The dual pictures: U Vᵀ is the maximizer of ⟨G, T⟩ over ‖T‖₂ ≤ 1 (value ‖G‖_*), sign(G) over ‖T‖_∞ ≤ 1
    (value ‖G‖₁); checked for the steps the optimizers above take."""
    G = gradients((7, 5))[0]
    w = nn.Parameter(torch.zeros(7, 5, dtype=F64))
    spectral = steps_of(whiten.SpecGD([w], lr=1.0, momentum=0.0, scale="none"), w, [G])[0]
    torch.testing.assert_close(torch.linalg.matrix_norm(spectral, ord=2), torch.tensor(1.0, dtype=F64),
                               rtol=0, atol=TOL)
    torch.testing.assert_close((G * spectral).sum(), torch.linalg.svdvals(G).sum(), rtol=0, atol=TOL)
    w = nn.Parameter(torch.zeros(7, 5, dtype=F64))
    sign = steps_of(torch.optim.AdamW([w], lr=1.0, betas=(0.0, 0.0), eps=1e-300, weight_decay=0.0), w, [G])[0]
    assert sign.abs().max().item() == 1.0
    torch.testing.assert_close((G * sign).sum(), G.abs().sum(), rtol=0, atol=TOL)
