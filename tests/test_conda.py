"""Conda: parity with a float64 reference written from the authors' code (conda_torch/conda.py and projector.py),
with pytorch_optimizer.Conda where the two agree (and where and why they do not), routing by role, checkpoints
that hold tensors only and resume exactly across a refresh, and a failed SVD that keeps the basis."""

from __future__ import annotations

import copy
import io
import math

import pytest
import pytorch_optimizer
import torch
from torch import nn

import whiten

SHAPES = [(6, 4), (3, 7), (5, 5), (5,)]
ROLES = ["hidden", "hidden", "hidden", "vector"]


class ReferenceConda:
    """The authors' step, transcribed in float64: the first moment in the parameter's basis, the basis from the
    SVD (float32 by default, as ``get_orthogonal_matrix``) of the updated momentum at 0-based steps 0, T, 2T, ...;
    ``project_with_cached_ortho`` for g and m (three one-sided products), ``project_back`` times ``scale``; the
    plain-Adam path for parameters the script leaves unprojected; decay ``p += -lr·wd·p`` after the step (here
    only where whiten's roles decay: not on vectors, the documented mask)."""

    def __init__(self, params, projected, decays, lr, betas, eps, weight_decay, gap, scale, svd_dtype=torch.float32,
                 correct_bias=True):
        self.params, self.projected, self.decays = params, projected, decays
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.gap, self.scale, self.svd_dtype, self.correct_bias = gap, scale, svd_dtype, correct_bias
        self.state = [dict(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), B=None) for p in params]

    def step(self, grads):
        beta1, beta2 = self.betas
        for p, g, st, proj, decay in zip(self.params, grads, self.state, self.projected, self.decays):
            st["m"].mul_(beta1).add_(g, alpha=1 - beta1)
            m = st["m"]
            if proj:
                right = g.shape[0] >= g.shape[1]
                if st["B"] is None or st["step"] % self.gap == 0:
                    U, _, Vh = torch.linalg.svd(m.to(self.svd_dtype), full_matrices=False)
                    st["B"] = (Vh if right else U).to(p.dtype)
                B = st["B"]
                g = g @ B.T if right else B.T @ g
                m = m @ B.T if right else B.T @ m
            st["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = st["v"].sqrt().add_(self.eps)
            st["step"] += 1
            step_size = self.lr
            if self.correct_bias:
                step_size = step_size * math.sqrt(1 - beta2 ** st["step"]) / (1 - beta1 ** st["step"])
            n = m / denom
            if proj:
                n = (n @ st["B"] if right else st["B"] @ n) * self.scale
            p.add_(n, alpha=-step_size)
            if self.wd > 0 and decay:
                p.add_(p, alpha=-self.lr * self.wd)


def _init(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a drift plus noise: momenta with distinct singular values, so the bases are well defined
    drift = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    return [[d + 0.5 * torch.randn(s, generator=g, dtype=dtype) for d, s in zip(drift, SHAPES)]
            for _ in range(steps)]


def _ours(params, **kw):
    return whiten.Conda([{"params": [p], "role": r} for p, r in zip(params, ROLES)], **kw)


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


SETTINGS = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, update_proj_gap=5, scale=0.25)


def _reference(params, svd_dtype=torch.float32, **kw):
    s = {**SETTINGS, **kw}
    return ReferenceConda(params, [r == "hidden" for r in ROLES], [r != "vector" for r in ROLES], s["lr"],
                          s["betas"], s["eps"], s["weight_decay"], s["update_proj_gap"], s["scale"], svd_dtype)


def test_float64_parity_with_the_reference_over_several_refreshes():
    """With the SVD in float64 too, whiten (first moment kept in the rotated basis, two products per step) equals
    the reference (three) to rounding, over 4 refresh periods."""
    init, grads = _init(), _grads(20)
    ref_params = [w.clone() for w in init]
    ref = _reference(ref_params, svd_dtype=torch.float64)
    ours = [nn.Parameter(w.clone()) for w in init]
    opt = _ours(ours, svd_dtype=None, **SETTINGS)
    for gs in grads:
        ref.step([g.clone() for g in gs])
        _run(opt, ours, [gs])
        for a, b in zip(ours, ref_params):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_the_reference_float32_svd_first_period_to_rounding_and_later_to_float32():
    """The default float32 SVD: identical input in the first period (rounding of the products only); later the
    momentum reaches the SVD through a rotation, and a float32 cast of a value one rounding away can flip a last
    bit, so the bases agree to float32 precision."""
    init, grads = _init(), _grads(20)
    ref_params = [w.clone() for w in init]
    ref = _reference(ref_params)
    ours = [nn.Parameter(w.clone()) for w in init]
    opt = _ours(ours, **SETTINGS)
    for t, gs in enumerate(grads):
        ref.step([g.clone() for g in gs])
        _run(opt, ours, [gs])
        tol = 1e-12 if t < SETTINGS["update_proj_gap"] else 1e-5
        for a, b in zip(ours, ref_params):
            assert torch.allclose(a, b, rtol=0, atol=tol), t
    for st, p in zip(ref.state, ours):
        if "basis_right" in opt.state[p] or "basis_left" in opt.state[p]:
            basis = opt.state[p].get("basis_right", opt.state[p].get("basis_left"))
            assert basis.dtype == torch.float64
            assert torch.allclose(basis.abs(), st["B"].abs(), atol=1e-4)


def test_parity_with_pytorch_optimizer_until_its_refresh_and_where_they_part():
    """pytorch_optimizer.Conda refreshes at its 1-based steps T, 2T, ... and the reference at 0-based steps T, 2T,
    ... (1-based T+1, ...): the two agree to rounding for steps 1..T, then part. whiten follows the reference."""
    T = 6
    init, grads = _init(), _grads(T + 3)
    po_params = [nn.Parameter(w.clone()) for w in init]
    groups = [{"params": po_params[:3]}, {"params": po_params[3:], "weight_decay": 0.0}]  # vectors: no decay
    po = pytorch_optimizer.Conda(groups, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, update_proj_gap=T,
                                 scale=0.25)
    ours = [nn.Parameter(w.clone()) for w in init]
    opt = _ours(ours, **{**SETTINGS, "update_proj_gap": T})
    ref_params = [w.clone() for w in init]
    ref = _reference(ref_params, update_proj_gap=T)
    for t, gs in enumerate(grads, start=1):
        _run(po, po_params, [gs])
        _run(opt, ours, [gs])
        ref.step([g.clone() for g in gs])
        gap = max((a - b).abs().max().item() for a, b in zip(ours, po_params))
        if t < T:
            assert gap < 1e-12, t
        elif t == T + 2:
            assert gap > 1e-6  # pytorch_optimizer refreshed at step T, whiten and the reference at T+1
        tol = 1e-12 if t <= T else 1e-5  # float32 SVDs of momenta one rounding apart (see the test above)
        assert all(torch.allclose(a, b, rtol=0, atol=tol) for a, b in zip(ours, ref_params)), t


def test_which_parameters_are_projected():
    """hidden and conv (as (out, in·k·k)) are rotated, the shorter side; embeddings, heads and vectors take the
    plain path, as in the authors' scripts."""
    params = {"hidden_tall": nn.Parameter(torch.randn(6, 4)), "hidden_wide": nn.Parameter(torch.randn(3, 7)),
              "conv": nn.Parameter(torch.randn(4, 2, 3, 3)), "embedding": nn.Parameter(torch.randn(10, 4)),
              "head": nn.Parameter(torch.randn(10, 4)), "vector": nn.Parameter(torch.randn(4))}
    roles = {"hidden_tall": "hidden", "hidden_wide": "hidden", "conv": "conv", "embedding": "embedding",
             "head": "head", "vector": "vector"}
    opt = whiten.Conda([{"params": [p], "role": roles[k]} for k, p in params.items()])
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    keys = {k: {n for n in opt.state[p] if n.startswith("basis")} for k, p in params.items()}
    assert keys == {"hidden_tall": {"basis_right"}, "hidden_wide": {"basis_left"}, "conv": {"basis_left"},
                    "embedding": set(), "head": set(), "vector": set()}
    assert opt.state[params["hidden_tall"]]["basis_right"].shape == (4, 4)
    assert opt.state[params["conv"]]["basis_left"].shape == (4, 4)  # (4, 18): the rows are the shorter side


def test_a_conv_weight_is_its_matrix_view():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    grads = [torch.randn(4, 2, 3, 3, dtype=torch.float64) for _ in range(7)]
    conv = nn.Parameter(w.clone())
    flat = nn.Parameter(w.reshape(4, 18).clone())
    a = whiten.Conda([{"params": [conv], "role": "conv"}], update_proj_gap=3, svd_dtype=None)
    b = whiten.Conda([{"params": [flat], "role": "hidden"}], update_proj_gap=3, svd_dtype=None)
    for g in grads:
        conv.grad, flat.grad = g.clone(), g.reshape(4, 18).clone()
        a.step()
        b.step()
    assert torch.equal(conv.reshape(4, 18), flat)


def test_state_is_tensors_and_resumes_exactly_across_a_refresh():
    init, grads = _init(torch.float32), _grads(12, torch.float32)
    full = [nn.Parameter(w.clone()) for w in init]
    _run(_ours(full, **SETTINGS), full, grads)
    first = [nn.Parameter(w.clone()) for w in init]
    opt = _ours(first, **SETTINGS)
    _run(opt, first, grads[:4])  # the next refresh (0-based step 5) comes after the resume
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # tensors and plain values only: no projector objects
    for entry in sd["state"].values():
        assert all(isinstance(v, (torch.Tensor, int)) for v in entry.values())
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = _ours(second, **SETTINGS)
    opt2.load_state_dict(sd)
    _run(opt2, second, grads[4:])
    assert all(torch.equal(a, b) for a, b in zip(second, full))


def test_a_failed_svd_keeps_the_basis_and_is_counted(monkeypatch):
    p = nn.Parameter(torch.randn(6, 4))
    opt = whiten.Conda([p], update_proj_gap=2)
    for _ in range(2):
        p.grad = torch.randn(6, 4)
        opt.step()
    basis = opt.state[p]["basis_right"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    p.grad = torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="keeping the previous"):
        opt.step()  # step 2: a refresh
    assert opt.counters["eigh_failures"] == 1
    assert torch.equal(opt.state[p]["basis_right"], basis)
    assert torch.isfinite(p).all()


def test_bad_arguments_are_refused_by_name():
    p = [nn.Parameter(torch.randn(3, 3))]
    for bad, match in [(dict(update_proj_gap=0), "update_proj_gap"), (dict(scale=-1.0), "scale"),
                       (dict(svd_dtype=torch.float16), "svd_dtype"), (dict(betas=(1.0, 0.9)), "betas")]:
        with pytest.raises(ValueError, match=match):
            whiten.Conda(p, **bad)


def test_defaults_are_the_authors():
    opt = whiten.Conda([nn.Parameter(torch.randn(3, 3))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["correct_bias"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0,
                                                                                      True)
    assert (g["update_proj_gap"], g["scale"], g["svd_dtype"]) == (2000, 0.25, torch.float32)
    copy.deepcopy(opt)
