"""TNT: parity with a float64 reference written from the paper's Algorithm 3 as the authors' code runs it
(renyiryry/tnt_neurips_2021, utils_shampoo.py), exactness against a dense Fisher where the Kronecker assumption
holds, conv reshapes, the no-curvature fallback (SGD with momentum), robustness and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from whiten.optim.tnt import precondition


# ----- the reference: Algorithm 3 as the authors' code runs it, float64, one parameter at a time ----------------------


def reference_tnt(theta0, grads, sampled, *, lr, momentum, damping, weight_decay, decay, weight, T1, T2, shape,
                  unfactored=()):
    """``theta0`` (tensor), ``grads[i]`` the ordinary gradient of step i, ``sampled[i]`` the sampled-label gradient
    of step i or None. Returns the parameter after every step. ``shape`` is the reshaped view (filter flattening
    etc.); a mode in ``unfactored`` stands for c·I (whiten's extension for modes over max_precond_dim).

    From ``shampoo_kron_matrices_per_variable`` (no warm start: H = contraction at the first update, then
    ``decay·H + max(1/(i+1), weight)·contraction``), ``shampoo_inversion_per_variable`` (same-trace, then
    ``(H̃ + εI).inverse()``; every T1 steps while i < T2, then every T2), ``shampoo_compute_direction_per_variable``
    (tensordot over dim 0 with each inverse), momentum ``m = ρ m + g`` and ``update_parameter`` (``w *= 1 - α·wd``,
    ``w += α·p``)."""
    theta = theta0.clone().double()
    k = len(shape)
    H = None
    inverses = [torch.eye(d, dtype=torch.float64) for d in shape]
    m = torch.zeros_like(theta)
    out = []
    for i, g in enumerate(grads):
        if i % T1 == 0 and sampled[i] is not None:
            G = sampled[i].double().reshape(shape)
            contractions = []
            for ii in range(k):
                axes = [a for a in range(k) if a != ii]
                contractions.append(torch.tensordot(G, G, dims=(axes, axes)))
            if H is None:
                H = contractions
            else:
                w = max(1.0 / (i + 1), weight)
                H = [decay * h + w * c for h, c in zip(H, contractions)]
        freq = T1 if i < T2 else T2
        if i % freq == 0 and H is not None:
            n = list(shape)
            c = (torch.trace(H[0]) / math.prod(n)) ** (1.0 / k)
            new = []
            for ii in range(k):
                others = math.prod(n[:ii] + n[ii + 1:])
                if ii in unfactored:
                    same_trace = c * torch.eye(n[ii], dtype=torch.float64)
                else:
                    same_trace = H[ii] / c ** (k - 1) / others
                new.append(torch.linalg.inv(same_trace + damping * torch.eye(n[ii], dtype=torch.float64)))
            inverses = new
        m = momentum * m + g.double()
        delta = m.reshape(shape)
        for inv in inverses:
            delta = torch.tensordot(delta, inv, dims=([0], [0]))
        theta = theta * (1 - lr * weight_decay) - lr * delta.reshape(theta.shape)
        out.append(theta.clone())
    return out


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def images(t, rows=8):
    g = torch.Generator().manual_seed(900 + t)
    return torch.randn(rows, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (rows,), generator=g)


def train_recorded(model, opt, steps, sample=True):
    """Train with sample_fisher; return per step the ordinary gradients and the captured sampled ones."""
    names = [n for n, _ in model.named_parameters()]
    grads, sampled = [], []
    original = opt.capture_fisher
    captured = {}

    def record(gs, n):
        captured.update({name: g.clone() for name, g in zip(names, gs) if g is not None})
        original(gs, n)

    opt.capture_fisher = record
    for t in range(steps):
        x, y = images(t)
        logits = model(x)
        if sample:
            opt.sample_fisher(logits)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        captured.clear()
        opt.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        sampled.append(dict(captured))
    return grads, sampled


HYPER = dict(lr=0.05, momentum=0.9, damping=0.01, weight_decay=0.3, factor_decay=0.9, factor_weight=0.1)


@pytest.mark.parametrize("conv_reshape,conv_shape", [("filter", (4, 3, 4)), ("kfac", (4, 12)), ("none", (4, 3, 2, 2))])
def test_matches_the_float64_reference_of_algorithm_3(conv_reshape, conv_shape):
    torch.manual_seed(0)
    model = ConvNet().double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # T1=2, T2=6: the inverse every T1 steps during the first T2 steps, then every T2; weight decay on every
    # parameter (role "hidden" for all) as the authors
    opt = whiten.TNT([{"params": list(model.parameters()), "role": "hidden"}], update_freq=2, inverse_freq=6,
                     conv_reshape=conv_reshape, fisher_seed=3, **HYPER)
    steps = 15
    grads, sampled = train_recorded(model, opt, steps)
    assert sum(bool(s) for s in sampled) == 8  # steps 0, 2, ..., 14
    shapes = {"conv.weight": conv_shape, "conv.bias": (4,), "fc.weight": (3, 64), "fc.bias": (3,)}
    for name, p in model.named_parameters():
        ref = reference_tnt(start[name], [g[name] for g in grads], [s.get(name) for s in sampled],
                            lr=HYPER["lr"], momentum=HYPER["momentum"], damping=HYPER["damping"],
                            weight_decay=HYPER["weight_decay"], decay=HYPER["factor_decay"],
                            weight=HYPER["factor_weight"], T1=2, T2=6, shape=shapes[name])
        torch.testing.assert_close(p.detach(), ref[-1], rtol=1e-10, atol=1e-12, msg=name)
    # the preconditioner did something: plain SGD with momentum ends elsewhere
    assert not torch.allclose(dict(model.named_parameters())["fc.weight"],
                              _sgd_momentum(start["fc.weight"], [g["fc.weight"] for g in grads]), atol=1e-3)


def _sgd_momentum(theta, grads, lr=HYPER["lr"], mu=HYPER["momentum"], wd=HYPER["weight_decay"]):
    m = torch.zeros_like(theta)
    for g in grads:
        m = mu * m + g
        theta = theta * (1 - lr * wd) - lr * m
    return theta


def test_unfactored_modes_stand_for_the_same_trace_identity():
    torch.manual_seed(1)
    model = ConvNet().double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # max_precond_dim 10: fc.weight's 64-long mode and nothing else is unfactored
    opt = whiten.TNT([{"params": list(model.parameters()), "role": "hidden"}], update_freq=1, inverse_freq=3,
                     max_precond_dim=10, **HYPER)
    grads, sampled = train_recorded(model, opt, 7)
    assert "factor_1" not in opt.state[model.fc.weight] and "factor_0" in opt.state[model.fc.weight]
    ref = reference_tnt(start["fc.weight"], [g["fc.weight"] for g in grads], [s.get("fc.weight") for s in sampled],
                        lr=HYPER["lr"], momentum=HYPER["momentum"], damping=HYPER["damping"],
                        weight_decay=HYPER["weight_decay"], decay=HYPER["factor_decay"],
                        weight=HYPER["factor_weight"], T1=1, T2=3, shape=(3, 64), unfactored=(1,))
    torch.testing.assert_close(model.fc.weight.detach(), ref[-1], rtol=1e-10, atol=1e-12)


# ----- exact against a dense Fisher where the Kronecker assumption holds ------------------------------------------------


def _nearest_kronecker(Fd, o, i):
    """Van Loan–Pitsianis: the best A ⊗ B (row-major kron, A o×o, B i×i) to a dense (o·i)² matrix, and the ratio
    of the second to the first singular value of the rearrangement (0: Fd is exactly a Kronecker product)."""
    R = Fd.reshape(o, i, o, i).permute(0, 2, 1, 3).reshape(o * o, i * i)
    U, S, Vh = torch.linalg.svd(R)
    A = (S[0].sqrt() * U[:, 0]).reshape(o, o)
    B = (S[0].sqrt() * Vh[0]).reshape(i, i)
    if A.trace() < 0:
        A, B = -A, -B
    return A, B, (S[1] / S[0]).item()


def _dense_run(inputs, steps=6, eps=0.01, lr=0.02):
    """TNT (T1 = T2 = 1) on one Linear layer without bias; returns TNT's directions and those of the dense oracle
    (EMA of vec(Ĝ) vec(Ĝ)ᵀ with TNT's weights, factored exactly, same-trace, damped per factor), and the
    Kronecker residuals of the dense matrices."""
    torch.manual_seed(2)
    layer = nn.Linear(5, 4, bias=False).double()
    opt = whiten.TNT([{"params": [layer.weight], "role": "hidden", "weight_decay": 0.0}], lr=lr, momentum=0.5,
                     damping=eps, update_freq=1, inverse_freq=1, fisher_seed=5)
    captured = []
    original = opt.capture_fisher
    opt.capture_fisher = lambda gs, n: (captured.append(gs[0].clone()), original(gs, n))
    dense, m = None, torch.zeros(4, 5, dtype=torch.float64)
    tnt_dirs, oracle_dirs, residuals = [], [], []
    for t in range(steps):
        before = layer.weight.detach().clone()
        logits = layer(inputs)
        opt.sample_fisher(logits)
        opt.zero_grad()
        y = torch.arange(inputs.shape[0]) % 4
        F.cross_entropy(logits, y).backward()
        g = layer.weight.grad.clone()
        opt.step()
        tnt_dirs.append((before - layer.weight.detach()) / lr)
        v = captured[-1].reshape(-1)
        outer = torch.outer(v, v)
        dense = outer if dense is None else 0.9 * dense + max(0.1, 1.0 / (t + 1)) * outer
        A, B, ratio = _nearest_kronecker(dense, 4, 5)
        residuals.append(ratio)
        s = math.sqrt((A.trace() / 4) / (B.trace() / 5))  # same trace: both factors with mean eigenvalue c
        A, B = A / s, B * s
        m = 0.5 * m + g
        P = torch.kron(A + eps * torch.eye(4, dtype=torch.float64), B + eps * torch.eye(5, dtype=torch.float64))
        oracle_dirs.append(torch.linalg.solve(P, m.reshape(-1)).reshape(4, 5))
    return tnt_dirs, oracle_dirs, residuals


def test_equals_the_dense_fisher_when_the_kronecker_assumption_is_exact():
    """One Linear layer (no bias) on ONE input x, repeated in the batch: every sampled gradient is v xᵀ with
    v = softmax(Wx) − mean of the sampled one-hots, so the dense sampled Fisher Σ w_t vec(Ĝ_t) vec(Ĝ_t)ᵀ =
    (Σ w_t v_t v_tᵀ) ⊗ x xᵀ is exactly a Kronecker product (the input side never changes; the expected Fisher
    (diag p − p pᵀ) ⊗ x xᵀ is one too). TNT's same-trace factors multiply back to exactly that matrix, so its
    step is the dense damped natural-gradient step ((A + εI) ⊗ (B + εI))⁻¹ m, to float64 rounding."""
    x = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tnt_dirs, oracle_dirs, residuals = _dense_run(x.expand(6, 5))
    assert max(residuals) < 1e-12
    for t, (a, b) in enumerate(zip(tnt_dirs, oracle_dirs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"step {t}")


def test_the_dense_comparison_can_fail_where_the_assumption_does_not_hold():
    """Different inputs in the batch: the dense sampled Fisher is no longer a Kronecker product and TNT's step
    is an approximation of the dense one."""
    inputs = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tnt_dirs, oracle_dirs, residuals = _dense_run(inputs)
    assert max(residuals[1:]) > 1e-3
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(tnt_dirs[1:], oracle_dirs[1:]))


# ----- behaviour ----------------------------------------------------------------------------------------------------------


def test_without_sampling_it_is_sgd_with_momentum():
    torch.manual_seed(3)
    model = ConvNet().double()
    twin = ConvNet().double()
    twin.load_state_dict(model.state_dict())
    opt = whiten.TNT([{"params": list(model.parameters()), "role": "hidden", "weight_decay": 0.0}], lr=0.05)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    for t in range(6):
        for m, o in ((model, opt), (twin, sgd)):
            x, y = images(t)
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_conv_kfac_reshape_equals_the_flattened_matrix():
    """A conv weight with conv_reshape='kfac' takes the step of the (out, in·kh·kw) matrix with the same gradients."""
    torch.manual_seed(4)
    conv = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    flat = conv.detach().reshape(4, 12).clone().requires_grad_(True)
    opts = [whiten.TNT([p], lr=0.05, update_freq=1, inverse_freq=2, conv_reshape="kfac") for p in (conv, flat)]
    for t in range(5):
        g = torch.randn(4, 12, dtype=torch.float64)
        s = torch.randn(4, 12, dtype=torch.float64)
        for p, opt in zip((conv, flat), opts):
            inject(opt, [s.reshape(p.shape)], 10)
            p.grad = g.reshape(p.shape).clone()
            opt.step()
    torch.testing.assert_close(conv.detach().reshape(4, 12), flat.detach(), rtol=1e-13, atol=1e-14)


def inject(opt, grads, n):
    """Hand ``grads`` (one per parameter, mean over n labels) to the next step as sample_fisher would."""
    opt._fisher_sums = [g * n for g in grads]
    opt._fisher_n, opt._fisher_calls = n, 1


def test_zero_and_huge_sampled_gradients_stay_finite():
    w = torch.randn(6, 4, requires_grad=True)
    opt = whiten.TNT([w], lr=1e-3, update_freq=1, inverse_freq=1)
    for scale in (0.0, 0.0, 1.0, 1e30, 1.0, 1.0):
        inject(opt, [torch.randn(6, 4) * scale], 4)
        w.grad = torch.randn(6, 4)
        opt.step()
        assert torch.isfinite(w).all()
    assert opt.counters["factor_restarts"] >= 1  # the 1e30 capture overflowed the float32 factors
    assert torch.isfinite(opt.state[w]["inverse_0"]).all()
    assert not torch.equal(opt.state[w]["inverse_0"], torch.eye(6))  # the later captures were used


@pytest.mark.parametrize("shape", [(6,), (6, 4), (3, 4, 5)])
def test_the_step_is_at_most_damping_to_the_minus_k_times_the_momentum(shape):
    """The docstring's account of TNT's lr scale: every inverse has eigenvalues in (0, 1/eps], so |Delta| <=
    eps^-k |m| (k modes), with near equality where the sampled curvature is small against eps (the benchmark's lm)
    and far below it where the curvature dominates."""
    torch.manual_seed(0)
    ratios = {}
    for scale in (1e-8, 1.0, 30.0):  # the sampled gradient's size: curvature far below, near, far above eps
        w = torch.randn(shape, requires_grad=True)
        opt = whiten.TNT([w], lr=1e-6, damping=0.01, update_freq=1, inverse_freq=1)
        for _ in range(12):  # more captures than the longest mode: full-rank factors
            inject(opt, [torch.randn(shape) * scale], 1)
            w.grad = torch.randn(shape)
            opt.step()
        s = opt.state[w]
        delta = precondition(s["momentum"], [s.get(f"inverse_{i}") for i in range(len(shape))], s["inverse_scale"])
        ratios[scale] = float(delta.norm() / s["momentum"].norm())
    bound = 0.01 ** -len(shape)
    assert all(r <= bound * (1 + 1e-5) for r in ratios.values())
    assert ratios[1e-8] > 0.99 * bound  # damping-dominated: TNT is SGD with momentum at lr * eps^-k
    assert ratios[30.0] < 1e-3 * bound


def test_arguments_are_checked():
    w = torch.zeros(3, 3, requires_grad=True)
    for kwargs, match in [(dict(conv_reshape="im2col"), "conv_reshape"), (dict(damping=0.0), "damping"),
                          (dict(update_freq=0), "update_freq"), (dict(inverse_freq=0), "inverse_freq"),
                          (dict(momentum=1.0), "momentum"), (dict(factor_weight=0.0), "factor_weight"),
                          (dict(max_precond_dim=0), "max_precond_dim"), (dict(lr=-1.0), "lr"),
                          (dict(fisher_seed=-2), "fisher_seed")]:
        with pytest.raises(ValueError, match=match):
            whiten.TNT([w], **kwargs)


def test_sampling_schedule_follows_update_freq():
    opt = whiten.TNT([torch.zeros(2, 2, requires_grad=True)], update_freq=3)
    due = []
    for t in range(7):
        due.append(opt.fisher_due())
        opt.param_groups[0]["params"][0].grad = torch.ones(2, 2)
        opt.step()
    assert due == [True, False, False, True, False, False, True]
