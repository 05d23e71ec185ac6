"""Kernels: factor updates, rotations, and the eigendecomposition fallback ladder."""

import math

import pytest
import torch

from whiten import linalg


def test_update_factors_and_rotations_match_definitions():
    torch.manual_seed(0)
    G = torch.randn(5, 3, dtype=torch.float64)
    L, R = torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    linalg.update_factors(L, R, G, 0.9)
    torch.testing.assert_close(L, 0.9 * torch.eye(5, dtype=torch.float64) + 0.1 * G @ G.T)
    torch.testing.assert_close(R, 0.9 * torch.eye(3, dtype=torch.float64) + 0.1 * G.T @ G)
    QL = torch.linalg.qr(torch.randn(2, 5, 5, dtype=torch.float64)).Q
    QR = torch.linalg.qr(torch.randn(2, 3, 3, dtype=torch.float64)).Q
    X = torch.randn(2, 5, 3, dtype=torch.float64)
    Y = linalg.rotate(X, QL, QR)
    torch.testing.assert_close(Y[1], QL[1].T @ X[1] @ QR[1])
    torch.testing.assert_close(linalg.unrotate(Y, QL, QR), X)
    torch.testing.assert_close(linalg.rotate(X, None, QR), X @ QR)


def test_eigh_basis_diagonalizes():
    torch.manual_seed(0)
    mats = [(lambda g: g @ g.T)(torch.randn(6, 9)) for _ in range(3)]
    result = linalg.robust_eigh_basis(mats, 1e-30)
    assert result.ok == [True, True, True] and result.retried == 0
    for A, Q in zip(mats, result.vectors):
        D = Q.T @ A @ Q
        assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-4 * A.abs().max()


def test_nonfinite_input_is_reported_not_retried():
    good = torch.eye(4)
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    result = linalg.robust_eigh_basis([good, bad, torch.zeros(4, 4)], 1e-30)
    assert result.ok == [True, False, True] and result.vectors[1] is None and result.retried == 0


def test_failure_in_float32_is_retried_in_float64(monkeypatch):
    real = torch.linalg.eigh

    def flaky(A, *args, **kwargs):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge (simulated)")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    mats = [torch.diag(torch.tensor([3.0, 1.0, 2.0])), torch.eye(3)]
    result = linalg.robust_eigh_basis(mats, 1e-30)
    assert result.ok == [True, True] and result.retried == 2
    assert result.vectors[0].dtype == torch.float32


def test_failure_everywhere_keeps_previous_basis_in_splus(monkeypatch):
    import whiten

    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = whiten.SPlus([w], inverse_every=1)

    def broken(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge (simulated)")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    w.grad = torch.randn(4, 4)
    with pytest.warns(RuntimeWarning, match="keeping the previous eigenbasis"):
        opt.step()
    assert torch.equal(opt.state[w]["basis_left"], torch.eye(4))
    assert opt.counters == {"skipped_steps": 0, "eigh_retries": 2, "eigh_failures": 2, "factor_restarts": 0}
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("m, n", [(700, 40), (40, 1100), (520, 520)])
def test_large_factor_updates_use_the_symmetric_split_and_match(m, n):
    assert max(m, n) >= linalg.SYMMETRIC_SPLIT_MIN
    torch.manual_seed(0)
    G = torch.randn(m, n, dtype=torch.float64)
    sym = lambda a: (a @ a.T + (a @ a.T).T) / 2  # exactly symmetric, as the optimizer's factors are
    L0, R0 = sym(torch.randn(m, 3, dtype=torch.float64)), sym(torch.randn(n, 3, dtype=torch.float64))
    L, R = L0.clone(), R0.clone()
    linalg.update_factors(L, R, G, 0.95)
    torch.testing.assert_close(L, 0.95 * L0 + 0.05 * G @ G.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R, 0.95 * R0 + 0.05 * G.T @ G, rtol=1e-12, atol=1e-12)
    for F in (L, R):  # the split mirrors the upper off-diagonal block into the lower one
        h = F.shape[0] // 2
        if F.shape[0] >= linalg.SYMMETRIC_SPLIT_MIN:
            assert torch.equal(F[h:, :h], F[:h, h:].T)


@pytest.mark.parametrize("fused", [False, True])
def test_finite_flags_per_tensor_and_fused(fused):
    """Both ways of reducing (per-tensor sums on a CPU, fused L1 norms on an accelerator) flag NaN and ±inf, pass
    finite tensors whose sum overflows (the exact check), and keep the order across dtypes."""
    from whiten.linalg import finite_flags

    tensors = [torch.randn(3, 4), torch.tensor([1.0, math.nan]), torch.tensor([-math.inf]).bfloat16(),
               torch.full((4,), 3e38), torch.randn(5).bfloat16(), torch.zeros(0), torch.tensor(2.0),
               torch.randn(2, 2, dtype=torch.float64), torch.tensor([math.inf], dtype=torch.float64)]
    assert finite_flags(tensors, fused=fused) == [True, False, False, True, True, True, True, True, False]
    assert finite_flags([], fused=fused) == []
