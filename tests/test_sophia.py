"""Sophia (SophiaG): parity with a float64 reference of the official rule (Liuhong99/Sophia: sophia.py's
update_hessian and step(bs), train_sophiag.py's schedule), the bs mapping, the zero-Hessian sign step, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten


class ReferenceSophiaG:
    """sophia.py's SophiaG in float64 on plain tensors: ``update_hessian`` folds p.grad² into the EMA; ``step(bs)``
    decays, updates exp_avg and takes the clipped step."""

    def __init__(self, params, lr, betas, rho, weight_decay):
        self.params = [p.detach().clone().double() for p in params]
        self.lr, self.betas, self.rho, self.wd = lr, betas, rho, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.hessian = [torch.zeros_like(p) for p in self.params]

    def update_hessian(self, grads):
        for h, g in zip(self.hessian, grads):
            h.mul_(self.betas[1]).addcmul_(g, g, value=1 - self.betas[1])

    def step(self, grads, bs):
        for p, g, m, h in zip(self.params, grads, self.exp_avg, self.hessian):
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.betas[0]).add_(g, alpha=1 - self.betas[0])
            ratio = (m.abs() / (self.rho * bs * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-self.lr)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 11)).double()

    def batch(t):
        g = torch.Generator().manual_seed(300 + t)
        idx = torch.randint(0, 11, (3, 5), generator=g)  # (batch, time): 15 sampled labels per step
        return idx, idx.roll(1, 1)

    return model, batch


@pytest.mark.parametrize("k", [1, 4])
def test_matches_the_float64_reference_of_the_official_rule(k):
    model, batch = model_and_data()
    hyper = dict(lr=0.02, betas=(0.9, 0.8), rho=0.05, weight_decay=0.2)
    ref = ReferenceSophiaG(model.parameters(), **hyper)
    # every parameter decayed, as the reference (whiten's roles would spare the embedding and biases)
    opt = whiten.Sophia([{"params": list(model.parameters()), "role": "hidden"}], k=k, fisher_seed=1, **hyper)
    captured = []
    original = opt.capture_fisher
    opt.capture_fisher = lambda gs, n: (captured.append(([g.clone() for g in gs], n)), original(gs, n))
    steps = 13
    for t in range(steps):
        idx, target = batch(t)
        logits = model(idx)
        sampled = opt.sample_fisher(logits)
        assert sampled == (t > 0 and t % k == 0)
        opt.zero_grad()
        F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1)).backward()
        opt.step()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        if sampled:
            # train_sophiag.py updates the Hessian after step iter_num when iter_num % k == k - 1, i.e. between
            # our steps t-1 and t: the same place whiten folds the gradient sampled at step t in
            s_grads, n = captured[-1]
            assert n == 15
            ref.update_hessian(s_grads)
        ref.step(grads, bs=15)  # bs: the tokens per step, = the labels the sampled loss averages over
    assert len(captured) == (steps - 1) // k
    for p, r in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    # state["hessian"] is bs × the reference's
    for p, h in zip(model.parameters(), ref.hessian):
        torch.testing.assert_close(opt.state[p]["hessian"], 15 * h, rtol=1e-12, atol=1e-16)


def test_the_reference_test_is_sensitive_to_the_hessian():
    """The comparison above is not satisfied by a Sophia that ignores the curvature: with the Hessian in use the
    ratios leave the clipping, so the parameters end elsewhere."""
    model, batch = model_and_data()
    ends = []
    for sample in (True, False):
        m = nn.Sequential(*[layer for layer in model]).double()
        m.load_state_dict(model.state_dict())
        opt = whiten.Sophia([{"params": list(m.parameters()), "role": "hidden"}], lr=0.02, betas=(0.9, 0.8),
                            rho=0.05, k=1)
        for t in range(6):
            idx, target = batch(t)
            logits = m(idx)
            if sample:
                opt.sample_fisher(logits)
            opt.zero_grad()
            F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1)).backward()
            opt.step()
        ends.append([p.detach().clone() for p in m.parameters()])
    assert any(not torch.allclose(a, b) for a, b in zip(*ends))


def test_without_curvature_it_takes_the_clipped_sign_step():
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    start = w.detach().clone()
    opt = whiten.Sophia([{"params": [w], "role": "hidden"}], lr=0.1, weight_decay=0.0)
    g = torch.randn(5, 3, dtype=torch.float64)
    g[0, 0] = 0.0
    w.grad = g
    opt.step()
    m = (1 - 0.965) * g
    expected = start - 0.1 * m.sign() * (m.abs() / 1e-15).clamp(max=1)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)
    assert w[0, 0] == start[0, 0]  # m = 0: no step


def test_sampling_schedule_is_the_references():
    opt = whiten.Sophia([torch.zeros(2, requires_grad=True)], k=3)
    due = []
    for t in range(8):
        due.append(opt.fisher_due())
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        opt.step()
    assert due == [False, False, False, True, False, False, True, False]


def test_arguments_are_checked():
    w = torch.zeros(3, requires_grad=True)
    for kwargs, match in [(dict(k=0), "k"), (dict(rho=-1.0), "rho"), (dict(betas=(0.9, 1.0)), "betas"),
                          (dict(lr=float("nan")), "lr"), (dict(weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            whiten.Sophia([w], **kwargs)
