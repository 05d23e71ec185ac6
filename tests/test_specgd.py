"""SpecGD: the exact U Vᵀ step against a float64 reference for every scale, momentum and Nesterov; the AdamW path is
Muon's; rank-deficient and zero directions; conv weights and matrices stored transposed; the SVD fallback ladder
through the optimizer; argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import whiten

F64 = torch.float64


def reference_direction(B: torch.Tensor, scale: str) -> torch.Tensor:
    """s · U Vᵀ of the published rule, from a float64 SVD (full-rank inputs)."""
    U, S, Vh = torch.linalg.svd(B, full_matrices=False)
    m, n = B.shape
    s = {"muon": math.sqrt(max(1.0, m / n)), "rms": math.sqrt(m / n), "nuclear": S.sum().item(), "none": 1.0}[scale]
    return s * (U @ Vh)


@pytest.mark.parametrize("scale", ["muon", "rms", "nuclear", "none"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, True), (0.9, True), (0.9, False)])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_step_equals_the_published_rule_in_float64(scale, momentum, nesterov, shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=F64)
    g = torch.Generator().manual_seed(1)
    gs = [torch.randn(shape, generator=g, dtype=F64) for _ in range(4)]
    w = nn.Parameter(w0.clone())
    opt = whiten.SpecGD([w], lr=0.03, momentum=momentum, nesterov=nesterov, scale=scale, weight_decay=0.1)
    ref, B = w0.clone(), torch.zeros(shape, dtype=F64)
    for G in gs:
        B = momentum * B + (1 - momentum) * G
        direction = (1 - momentum) * G + momentum * B if nesterov else B
        ref = ref * (1 - 0.03 * 0.1) - 0.03 * reference_direction(direction, scale)
        w.grad = G
        opt.step()
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)


def test_the_rest_is_stepped_exactly_as_muons_adamw():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 10))
    twin = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 10))
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=0.02, adam_lr=0.01, weight_decay=0.1)
    a, b = whiten.SpecGD(whiten.param_groups(model), **kw), whiten.Muon(whiten.param_groups(twin), **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same gradients for both (the hidden matrices' steps differ)
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if name != "1.weight":  # the hidden matrix: SVD vs Newton–Schulz
            assert torch.equal(p, q), name
    assert not torch.equal(model[1].weight, twin[1].weight)


def test_rank_deficient_and_zero_directions():
    w = nn.Parameter(torch.zeros(6, 9, dtype=F64))
    opt = whiten.SpecGD([w], lr=1.0, momentum=0.0, scale="none")
    u, v = torch.randn(6, 2, dtype=F64), torch.randn(2, 9, dtype=F64)
    w.grad = u @ v
    opt.step()
    U, _, Vh = torch.linalg.svd(u @ v, full_matrices=False)
    torch.testing.assert_close(-w.detach(), U[:, :2] @ Vh[:2], rtol=0, atol=1e-12)  # the partial isometry
    before = w.detach().clone()
    w.grad = torch.zeros(6, 9, dtype=F64)
    opt.step()
    assert torch.equal(w, before)


def test_conv_weight_is_the_flattened_matrix_and_transposed_storage_swaps_the_scale():
    torch.manual_seed(0)
    conv, flat = nn.Parameter(torch.randn(8, 3, 2, 2, dtype=F64)), None
    flat = nn.Parameter(conv.detach().reshape(8, 12).clone())
    a = whiten.SpecGD([{"params": [conv], "role": "conv"}], lr=0.1, momentum=0.0, scale="rms")
    b = whiten.SpecGD([{"params": [flat], "role": "hidden"}], lr=0.1, momentum=0.0, scale="rms")
    g = torch.randn(8, 3, 2, 2, dtype=F64)
    conv.grad, flat.grad = g, g.reshape(8, 12)
    a.step()
    b.step()
    torch.testing.assert_close(conv.detach().reshape(8, 12), flat.detach(), rtol=0, atol=1e-14)
    stored = nn.Parameter(torch.zeros(12, 8, dtype=F64))  # (in, out), as Hugging Face's Conv1D
    c = whiten.SpecGD([{"params": [stored], "role": "hidden", "transposed": True}], lr=1.0, momentum=0.0,
                      scale="rms")
    stored.grad = g.reshape(8, 12).T.clone()
    c.step()
    torch.testing.assert_close(-stored.detach().T, reference_direction(g.reshape(8, 12), "rms"), rtol=0, atol=1e-12)


def test_svd_failures_are_retried_counted_and_survive_a_checkpoint(monkeypatch):
    real = torch.linalg.svd
    w = nn.Parameter(torch.randn(6, 6))
    opt = whiten.SpecGD([w], lr=0.1, momentum=0.0, scale="none")

    def fails_in_float32(A, *args, **kwargs):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge (simulated)")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    G = torch.randn(6, 6)
    expected = w.detach().double() - 0.1 * reference_direction(G.double(), "none")
    w.grad = G
    opt.step()
    assert opt.counters["svd_retries"] == 1 and opt.counters["svd_fallbacks"] == 0
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-6)

    def always_fails(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge (simulated)")

    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    with pytest.warns(RuntimeWarning, match="Polar Express"):
        opt.step()
    assert opt.counters["svd_fallbacks"] == 1 and torch.isfinite(w).all()
    fresh = whiten.SpecGD([w])
    fresh.load_state_dict(opt.state_dict())
    assert (fresh.counters["svd_retries"], fresh.counters["svd_fallbacks"]) == (2, 1)
    older = opt.state_dict()
    del older["param_groups"][0]["whiten_counters"]["svd_fallbacks"]  # a checkpoint from before the counter
    fresh.load_state_dict(older)
    assert fresh.counters["svd_fallbacks"] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale="spectral"), "Invalid scale"), (dict(svd_dtype=torch.bfloat16), "svd_dtype"),
    (dict(momentum=1.0), "momentum"), (dict(nesterov=1), "nesterov"), (dict(adam_lr=-1.0), "adam_lr"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        whiten.SpecGD([nn.Parameter(torch.randn(4, 3))], **kwargs)


def test_groups_carry_no_newton_schulz_options():
    opt = whiten.SpecGD([nn.Parameter(torch.randn(4, 3))])
    assert not any(k.startswith("ns_") for k in opt.param_groups[0])
    assert opt.param_groups[0]["scale"] == "muon"
