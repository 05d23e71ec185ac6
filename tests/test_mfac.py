"""M-FAC: the step against the dense (λI + GᵀG/m)⁻¹ g oracle in float64 (window filling up and wrapping), against
the authors' naive Woodbury (HInvSlow) with their momentum and L2 decay, on CPU; checkpoints that resume exactly;
the memory stated and checked up front; parameters without a gradient; the window split over ranks (gloo)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import whiten
from dist_utils import full, launch, shard_like

SHAPES = [(5, 4), (4,), (3, 2)]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def _grads(steps, dtype=torch.float64, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [[(scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for s in SHAPES]
            for _ in range(steps)]


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("m,damp,scale", [(6, 1e-5, 1.0), (6, 1e-3, 1.0), (4, 1e-5, 1e-3), (40, 1e-5, 1.0)])
def test_each_step_is_the_dense_inverse_fisher_times_the_gradient(m, damp, scale):
    """u = (λI + GᵀG/m)⁻¹ g with G the last m gradients (zero rows before m steps), through the window's wrap;
    P = 30 parameters, so m = 40 makes GᵀG/m full rank."""
    params = _params()
    opt = whiten.MFAC([{"params": params[:2], "role": "hidden"}, {"params": params[2:], "role": "hidden"}],
                      lr=0.1, ngrads=m, damp=damp)
    P = sum(p.numel() for p in params)
    G = torch.zeros(m, P, dtype=torch.float64)
    for t, gs in enumerate(_grads(2 * m + 3, scale=scale)):
        before = _flat(params)
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        g = _flat(gs)
        G[t % m] = g
        u = torch.linalg.solve(damp * torch.eye(P, dtype=torch.float64) + G.T @ G / m, g)
        step = (before - _flat(params)) / 0.1
        assert torch.allclose(step, u, rtol=0, atol=1e-9 * u.abs().max().item()), t


class HInvSlow:
    """The authors' naive Woodbury reference (optim.py): H = (damp I + Σ g gᵀ / m)⁻¹ built one gradient at a time."""

    def __init__(self, grads, damp):
        m, d = grads.shape
        H = torch.diag(torch.full([d], 1.0 / damp, dtype=grads.dtype))
        for i in range(m):
            g = grads[i]
            Hg = H @ g
            H -= torch.outer(Hg, Hg) / (m + g.dot(Hg))
        self.H = H


def test_momentum_decay_and_group_lrs_as_the_reference():
    """MFAC.step of the reference: g = grad + wd·p (L2), window update, u = H g, v = μ v + (1-μ) u, p -= lr_group v."""
    m, damp, wd, mu, lrs = 5, 1e-4, 0.01, 0.9, (0.05, 0.02)
    params = _params()
    opt = whiten.MFAC([{"params": params[:2], "lr": lrs[0], "role": "hidden"},
                       {"params": params[2:], "lr": lrs[1], "role": "hidden"}],
                      momentum=mu, weight_decay=wd, ngrads=m, damp=damp)
    x = _flat(params)
    sizes = [p.numel() for p in params]
    lr_vec = torch.cat([torch.full((n,), lrs[0] if i < 2 else lrs[1], dtype=torch.float64)
                        for i, n in enumerate(sizes)])
    G = torch.zeros(m, x.numel(), dtype=torch.float64)
    v = torch.zeros_like(x)
    for t, gs in enumerate(_grads(12)):
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        g = _flat(gs) + wd * x
        G[t % m] = g
        u = HInvSlow(G, damp).H @ g
        v = mu * v + (1 - mu) * u
        x = x - lr_vec * v
        assert torch.allclose(_flat(params), x, rtol=0, atol=1e-9), t


def test_works_on_cpu_with_float32_and_a_default_damping():
    """The authors' LU without pivoting fails on the CPU; here the float32 window with λ = 1e-5 steps and matches
    the float64 run to float32 precision."""
    runs = []
    for dtype in (torch.float32, torch.float64):
        params = _params(dtype)
        opt = whiten.MFAC(params, lr=1e-3, ngrads=8)
        for gs in _grads(12, dtype):
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
        runs.append(_flat(params).double())
    assert torch.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_a_parameter_without_a_gradient_adds_zeros_and_does_not_move():
    params = _params()
    opt = whiten.MFAC([{"params": params, "role": "hidden"}], lr=0.1, ngrads=4, damp=1e-3)
    gs = _grads(2)
    for p, g in zip(params, gs[0]):
        p.grad = g
    opt.step()
    params[1].grad = None
    before = _flat(params)
    for p, g in zip([params[0], params[2]], [gs[1][0], gs[1][2]]):
        p.grad = g
    opt.step()
    # the oracle with zeros in the missing parameter's columns of the new row
    G = torch.zeros(4, 30, dtype=torch.float64)
    G[0] = _flat(gs[0])
    G[1] = _flat([gs[1][0], torch.zeros(4, dtype=torch.float64), gs[1][2]])
    u = torch.linalg.solve(1e-3 * torch.eye(30, dtype=torch.float64) + G.T @ G / 4, G[1])
    step = (before - _flat(params)) / 0.1
    assert torch.equal(opt.state[params[1]]["grads"][1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(step[20:24], torch.zeros(4, dtype=torch.float64))  # not moved, though u is not 0 there
    assert u[20:24].abs().max() > 1e-3
    keep = torch.cat([torch.arange(20), torch.arange(24, 30)])
    assert torch.allclose(step[keep], u[keep], rtol=0, atol=1e-9 * u.abs().max().item())


def test_checkpoints_resume_exactly_across_the_wrap_and_survive_pickle():
    grads = _grads(14, torch.float32)
    full = _params(torch.float32)
    opt = whiten.MFAC(full, lr=0.01, ngrads=5, momentum=0.5, damp=1e-3)
    for gs in grads:
        for p, g in zip(full, gs):
            p.grad = g.clone()
        opt.step()
    first = _params(torch.float32)
    opt1 = whiten.MFAC(first, lr=0.01, ngrads=5, momentum=0.5, damp=1e-3)
    for gs in grads[:7]:
        for p, g in zip(first, gs):
            p.grad = g.clone()
        opt1.step()
    sd = copy.deepcopy(opt1.state_dict())
    assert sd["param_groups"][0]["mfac"]["count"] == 7 and sd["param_groups"][0]["mfac"]["gram"].shape == (5, 5)
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = whiten.MFAC(second, lr=0.01, ngrads=5, momentum=0.5, damp=1e-3)
    opt2.load_state_dict(sd)
    opt3 = copy.deepcopy(opt2)  # pickling keeps K and the window's position
    third = opt3.param_groups[0]["params"]
    for gs in grads[7:]:
        for p, q, g in zip(second, third, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt2.step()
        opt3.step()
    assert all(torch.equal(a, b) for a, b in zip(second, full))
    assert all(torch.equal(a, b) for a, b in zip(third, full))


def test_a_checkpoint_of_another_window_length_or_without_k_is_refused():
    params = _params()
    opt = whiten.MFAC(params, ngrads=4)
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    other = whiten.MFAC(_params(), ngrads=6)
    with pytest.raises(ValueError, match="grads"):
        other.load_state_dict(sd)
    bad = copy.deepcopy(sd)
    del bad["param_groups"][0]["mfac"]
    with pytest.raises(ValueError, match="no 'mfac' entry"):
        whiten.MFAC(_params(), ngrads=4).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["mfac"]["gram"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="K is not finite"):
        whiten.MFAC(_params(), ngrads=4).load_state_dict(bad)


def test_the_window_that_does_not_fit_is_refused_up_front():
    params = _params(torch.float32)  # 30 parameters: 30 x 1024 x 4 bytes = 122880 bytes
    with pytest.raises(ValueError, match=r"ngrads=1024 gradients needs 0.00 GiB.*more than max_memory.*Lower ngrads"):
        whiten.MFAC(params, max_memory=100_000)
    opt = whiten.MFAC(params[:1], max_memory=100_000)  # 20 parameters: 81920 bytes
    assert opt.window_bytes() == 20 * 1024 * 4
    with pytest.raises(ValueError, match="max_memory"):
        opt.add_param_group({"params": params[1:]})
    assert len(opt.param_groups) == 1
    # the default limit, the device's free memory: 2^36 parameters (an expanded view, no memory) do not fit
    huge = nn.Parameter(torch.zeros(1).expand(2**36))
    with pytest.raises(ValueError, match="more than the free memory of cpu"):
        whiten.MFAC([huge])


def test_bad_arguments_are_refused_by_name():
    p = _params()
    for bad, match in [(dict(ngrads=0), "ngrads"), (dict(damp=0.0), "damp"), (dict(momentum=1.0), "momentum"),
                       (dict(max_memory=-1), "max_memory")]:
        with pytest.raises(ValueError, match=match):
            whiten.MFAC(p, **bad)


# ----- distributed: the window split by parameter --------------------------------------------------------------------


def _split_window(rank, world, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 5), nn.Linear(5, 5, bias=False))
    single = copy.deepcopy(model)
    kw = dict(lr=0.05, ngrads=4, damp=1e-3, momentum=0.5, weight_decay=0.01)
    if mode == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = whiten.MFAC(whiten.param_groups(model), **kw)
    else:
        opt = whiten.MFAC(whiten.param_groups(model), process_group=dist.group.WORLD, **kw)
    ref = whiten.MFAC(whiten.param_groups(single), **kw)
    for t in range(7):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(t))
        single.zero_grad()
        single(x).square().mean().backward()
        grads = {n: q.grad.clone() for n, q in single.named_parameters()}
        ref.step()
        for n, p in model.named_parameters():
            g = grads[n]
            p.grad = shard_like(g, p)
        opt.step()
    params = {n: full(p).detach() for n, p in model.named_parameters()}
    same = all(torch.equal(params[n], q) for n, q in single.named_parameters())
    windows = sum(s["grads"].numel() for s in opt.state.values() if "grads" in s)
    return same, torch.equal(opt._gram, ref._gram), windows, opt.window_bytes()


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("ddp", 3), ("fsdp", 3)])
def test_the_window_is_split_over_ranks_and_the_numbers_are_one_process(mode, world):
    results = launch(_split_window, world, mode)
    total = 4 * sum(n for n in (6 * 9, 9, 9, 9, 9 * 5, 5, 5 * 5))
    assert sum(r[2] for r in results) == total  # every column of the window lives on exactly one rank
    for rank, (same, same_k, windows, nbytes) in enumerate(results):
        assert same and same_k, rank  # bit for bit, and K equal on every rank
        assert 0 < windows < total and nbytes == 4 * windows
