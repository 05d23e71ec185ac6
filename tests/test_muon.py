"""Muon: parity with torch.optim.Muon and torch.optim.AdamW, Newton–Schulz against the SVD, conv as a matrix,
routing by role, group splitting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import whiten
from whiten.linalg import MUON_COEFFICIENTS, newton_schulz


def _grads(shapes, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


SHAPES = [(8, 5), (5, 8), (8, 5), (6, 6)]


@pytest.mark.parametrize("scaling", ["original", "match_rms_adamw"])
def test_bitwise_parity_with_torch_muon_in_bf16(scaling):
    """With Newton–Schulz in bfloat16 (what torch.optim.Muon always uses) the two are identical, batched or not."""
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 6, torch.float32)
    ref = [w.clone().requires_grad_() for w in init]
    torch_opt = torch.optim.Muon(ref, lr=0.05, weight_decay=0.1, adjust_lr_fn=scaling)
    _run(torch_opt, ref, grads)
    for batched in (True, False):
        ours = [w.clone().requires_grad_() for w in init]
        opt = whiten.Muon([{"params": ours, "role": "hidden"}], lr=0.05, weight_decay=0.1, scaling=scaling,
                          ns_dtype=torch.bfloat16, batched=batched)
        _run(opt, ours, grads)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)


def reference_muon_step(W, B, G, lr, mu, wd, nesterov, steps):
    """Float64 Muon from the published rule (ALGORITHMS.md §3), one matrix."""
    B = mu * B + (1 - mu) * G
    U = (1 - mu) * G + mu * B if nesterov else B
    X = U.T if U.shape[0] > U.shape[1] else U
    X = X / max(X.norm().item(), 1e-7)
    a, b, c = MUON_COEFFICIENTS
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    O = X.T if U.shape[0] > U.shape[1] else X
    scale = math.sqrt(max(1.0, W.shape[0] / W.shape[1]))
    return W * (1 - lr * wd) - lr * scale * O, B


@pytest.mark.parametrize("nesterov", [True, False])
def test_float64_parity_with_reference(nesterov):
    torch.manual_seed(1)
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = _grads(SHAPES, 5, torch.float64)
    ours = [w.clone().requires_grad_() for w in init]
    opt = whiten.Muon([{"params": ours, "role": "hidden"}], lr=0.03, weight_decay=0.2, nesterov=nesterov)
    _run(opt, ours, grads)
    for i, w in enumerate(init):
        B = torch.zeros_like(w)
        for gs in grads:
            w, B = reference_muon_step(w, B, gs[i], 0.03, 0.95, 0.2, nesterov, 5)
        assert torch.allclose(ours[i].detach(), w, atol=1e-12, rtol=0)


def test_newton_schulz_approaches_the_polar_factor():
    torch.manual_seed(2)
    G = torch.randn(3, 12, 7, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    # The classic convergent quintic (15/8, -10/8, 3/8) reaches the polar factor itself.
    X = newton_schulz(G, 40, (15 / 8, -10 / 8, 3 / 8))
    assert (X - polar).abs().max() < 1e-8
    # Muon's quintic stops short on purpose: same singular vectors, singular values in about [0.7, 1.2].
    X = newton_schulz(G, 5)
    inner = U.mT @ X @ Vh.mT  # ≈ diagonal of the new singular values
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).abs().max() < 0.05
    assert diag.min() > 0.6 and diag.max() < 1.3


def test_newton_schulz_zero_matrix_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(2, 4, 3), 5), torch.zeros(2, 4, 3))


@pytest.mark.parametrize("shape", [(3, 12, 7), (3, 7, 12), (2, 5, 5)])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_newton_schulz_input_is_kept_unless_overwrite(shape, steps):
    torch.manual_seed(4)
    G = torch.randn(shape, dtype=torch.float64)
    kept = G.clone()
    X = newton_schulz(G, steps)
    assert torch.equal(G, kept)
    assert torch.equal(newton_schulz(G.clone(), steps, overwrite=True), X)
    in_fp32 = newton_schulz(G, steps, dtype=torch.float32)
    assert torch.equal(newton_schulz(G, steps, dtype=torch.float32, overwrite=True), in_fp32)
    assert torch.equal(G, kept)  # a dtype change copies whatever overwrite says
    # each matrix of the stack as if alone
    for i in range(shape[0]):
        assert torch.allclose(newton_schulz(G[i:i + 1], steps)[0], X[i], atol=1e-14, rtol=0)


def test_conv_weight_equals_the_2d_result():
    torch.manual_seed(3)
    w4 = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    grads = _grads([(6, 3, 2, 2)], 4, torch.float64)
    conv = w4.clone().requires_grad_()
    mat = w4.reshape(6, 12).clone().requires_grad_()
    opt_c = whiten.Muon([{"params": [conv], "role": "conv"}], lr=0.02)
    opt_m = whiten.Muon([{"params": [mat], "role": "hidden"}], lr=0.02)
    for gs in grads:
        conv.grad = gs[0].clone()
        mat.grad = gs[0].reshape(6, 12).clone()
        opt_c.step()
        opt_m.step()
    assert torch.equal(conv.detach().reshape(6, 12), mat.detach())


def test_non_hidden_roles_are_exactly_adamw():
    torch.manual_seed(4)
    shapes = [(10, 4), (4,), (7, 4)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = _grads(shapes, 6, torch.float64)
    ours = [w.clone().requires_grad_() for w in init]
    ref = [w.clone().requires_grad_() for w in init]
    opt = whiten.Muon([{"params": [ours[0]], "role": "embedding", "weight_decay": 0.0},
                       {"params": [ours[1]], "role": "vector", "weight_decay": 0.0},
                       {"params": [ours[2]], "role": "head", "weight_decay": 0.1}], adam_lr=0.01)
    # the AdamW groups share Muon's lr and step at lr × lr_scale = adam_lr
    assert [g["lr"] * g["lr_scale"] for g in opt.param_groups] == [0.01, 0.01, 0.01]
    torch_opt = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.0}, {"params": ref[2:]}], lr=0.01,
                                  betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-14, rtol=0)


def test_plain_parameters_split_into_muon_and_adamw_groups():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    opt = whiten.Muon(model.parameters(), lr=0.02, adam_lr=1e-3)
    assert len(opt.param_groups) == 2
    muon_group, adam_group = opt.param_groups
    assert all(p.ndim == 2 for p in muon_group["params"]) and muon_group["lr"] == 0.02
    assert all(p.ndim == 1 for p in adam_group["params"]) and adam_group["lr"] * adam_group["lr_scale"] == 1e-3
    # schedulers scale both paths
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    assert [g["lr"] * g["lr_scale"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4])
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()


def test_param_groups_roles_route_embeddings_and_heads_to_adamw():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20))
    opt = whiten.Muon(whiten.param_groups(model), lr=0.02, adam_lr=2e-3)
    lrs = {g["role"]: g["lr"] * g["lr_scale"] for g in opt.param_groups}
    assert lrs["hidden"] == 0.02 and lrs["embedding"] == 2e-3 and lrs["head"] == 2e-3
    model(torch.randint(0, 20, (3, 5))).sum().backward()
    opt.step()
    assert "momentum" in opt.state[model[1].weight] and "exp_avg" in opt.state[model[0].weight]


def test_grad_is_not_modified():
    p = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(6, 4)
    p.grad = g.clone()
    opt = whiten.Muon([p])
    opt.step()
    opt.step()
    assert torch.equal(p.grad, g)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(ns_steps=-1), "ns_steps"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"), (dict(scaling="rms"), "scaling"),
    (dict(adam_betas=(0.9,)), "adam_betas"), (dict(adam_lr=-1e-3), "adam_lr"), (dict(eps=0.0), "eps"),
    (dict(ns_dtype=torch.int32), "ns_dtype"), (dict(nesterov=1), "nesterov"), (dict(ema_rate=1.0), "ema_rate"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        whiten.Muon([torch.zeros(3, 3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [whiten.Muon, whiten.SpecGD])
def test_batch_dims_orthogonalises_each_expert_as_its_own_matrix(cls):
    """A mixture-of-experts weight (E, out, in) with batch_dims=1 steps as E separate (out, in) matrices would
    (each with the scale of (out, in)), in one batched call; without it, as one (E, out·in) matrix."""
    torch.manual_seed(0)
    experts = nn.Parameter(torch.randn(3, 6, 4, dtype=torch.float64))
    alone = [nn.Parameter(experts.detach()[e].clone()) for e in range(3)]
    kw = dict(lr=0.05, weight_decay=0.1) if cls is whiten.SpecGD else dict(lr=0.05, weight_decay=0.1,
                                                                            ns_dtype=torch.float64)
    a = cls([{"params": [experts], "role": "hidden", "batch_dims": 1}], **kw)
    b = cls([{"params": alone, "role": "hidden"}], **kw)
    flat = cls([{"params": [nn.Parameter(experts.detach().clone())], "role": "hidden"}], **kw)
    for g in _grads([(3, 6, 4)], 3, torch.float64):
        experts.grad = g[0]
        for e in range(3):
            alone[e].grad = g[0][e].clone()
        flat.param_groups[0]["params"][0].grad = g[0].clone()
        a.step()
        b.step()
        flat.step()
    for e in range(3):
        torch.testing.assert_close(experts.detach()[e], alone[e].detach(), rtol=0, atol=1e-14)
    assert not torch.allclose(flat.param_groups[0]["params"][0], experts, atol=1e-3)
    with pytest.raises(ValueError, match="batch_dims"):
        cls([{"params": [nn.Parameter(torch.randn(6, 4))], "role": "hidden", "batch_dims": 1}])


def test_a_checkpoint_from_before_batch_dims_loads():
    w = nn.Parameter(torch.randn(6, 4))
    opt = whiten.Muon([w])
    w.grad = torch.randn(6, 4)
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["batch_dims"]
    fresh = whiten.Muon([w])
    fresh.load_state_dict(sd)
    fresh.step()
    assert fresh.param_groups[0]["batch_dims"] == 0
