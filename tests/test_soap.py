"""SOAP: parity with a float64 reference of the authors' rule, with pytorch-optimizer's SOAP, reductions to Adam,
the QR refresh's bookkeeping."""

from __future__ import annotations

import pytest
import pytorch_optimizer
import torch

import whiten
from soap_reference import ReferenceSOAP

# (shape, role): two same-shape hidden matrices (one stack), a square one, a vector (Adam, or SOAP with
# precondition_1d), an embedding whose vocabulary side exceeds max_precond_dim (one-sided), a head.
# The vector has 4 elements, no more than the 1 + precondition_frequency gradients in its factor at the first refresh:
# a longer one would still have a rank-deficient factor there, and the rule itself leaves part of that basis to
# rounding (test_rank_deficient_refresh_agrees_on_the_factor_range).
CASES = [((6, 4), "hidden"), ((6, 4), "hidden"), ((5, 5), "hidden"), ((4,), "vector"), ((30, 3), "embedding"),
         ((4, 9), "head")]
HYPER = dict(lr=0.01, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1, precondition_frequency=3, max_precond_dim=10)
F64 = torch.float64


def _setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    init = [torch.randn(s, dtype=dtype) for s, _ in CASES]
    params = [w.clone().requires_grad_() for w in init]
    groups = [{"params": [p], "role": r} for p, (_, r) in zip(params, CASES)]
    return init, params, groups


def _grads(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s, _ in CASES] for _ in range(steps)]


def _reference(shapes, roles, precondition_1d):
    return ReferenceSOAP(shapes, HYPER["lr"], HYPER["betas"], HYPER["betas"][1], HYPER["eps"], HYPER["weight_decay"],
                         HYPER["precondition_frequency"], HYPER["max_precond_dim"],
                         [r not in ("vector", "embedding") for r in roles], precondition_1d=precondition_1d)


def _factors(state) -> list:
    return [state[k] for k in ("factor_left", "factor_right") if k in state]


@pytest.mark.parametrize("batched, precondition_1d", [(True, False), (False, False), (True, True), (False, True)])
def test_parity_with_float64_reference(batched, precondition_1d):
    """The authors' rule, to 1e-12 after 20 steps, where it defines the bases: a basis from a rank-deficient factor
    has columns (eigh's or qr's, for the factor's null space) that the last bits of its input choose.
    - The first basis (eigh, step 1) comes from one gradient, rank-deficient for the (6, 4) left side, the (4, 9)
      right side and the vector: the reference updates its factors with whiten's arithmetic (one addmm), so the
      factors and the eigh inputs are the same bits (checked).
    - Every refresh (qr(F Q)) sees a full-rank factor (checked at the first one, which has the fewest gradients)."""
    init, params, groups = _setup()
    opt = whiten.SOAP(groups, batched=batched, precondition_1d=precondition_1d, **HYPER)
    ref = _reference([s for s, _ in CASES], [r for _, r in CASES], precondition_1d)
    theta = [w.clone() for w in init]
    for step, gs in enumerate(_grads(20), start=1):  # 6 QR refreshes
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        theta = ref.step(theta, gs)
        if step == 1:
            for p, st in zip(params, ref.states):
                mine, theirs = _factors(opt.state[p]), [F for F in st["GG"] if F is not None]
                assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
        if step == 1 + HYPER["precondition_frequency"]:
            for p in params:
                for F in _factors(opt.state[p]):
                    lam = torch.linalg.eigvalsh(F)
                    assert lam[0] > 1e-6 * lam[-1], (tuple(p.shape), lam.tolist())  # full rank: a defined basis
    for p, t in zip(params, theta):
        assert torch.allclose(p.detach(), t, atol=1e-12, rtol=0)
    assert ("factor_left" in opt.state[params[3]]) == precondition_1d  # the vector
    assert "factor_left" not in opt.state[params[4]] and "factor_right" in opt.state[params[4]]  # one-sided


def test_rank_deficient_refresh_agrees_on_the_factor_range():
    """Where the rule leaves a choice to rounding, whiten makes the rule's other choices. A 7-element vector's factor
    holds 1 + precondition_frequency = 4 gradients at its first refresh: qr(F Q) then has 3 columns in F's null
    space, R's diagonal is ~1e-17 there, and rounding alone picks them (on an AVX-512 Xeon with MKL, whiten's bmm and
    the reference's mm compute F Q 6e-17 apart, and those columns differ by 0.3; Adam's per-coordinate steps in them
    then differ by ~1e-2 after 20 steps). The first 4 columns (the factor's range, in the sorted order) and the
    subspace spanned by the other 3 are defined: those agree to 1e-12."""
    shape, rank = (7,), 1 + HYPER["precondition_frequency"]
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=F64)
    p = w.clone().requires_grad_()
    opt = whiten.SOAP([{"params": [p], "role": "vector"}], precondition_1d=True, **HYPER)
    ref = _reference([shape], ["vector"], precondition_1d=True)
    g = torch.Generator().manual_seed(1)
    theta = [w.clone()]
    for _ in range(rank):  # the first call builds the basis, the rank-th refreshes it
        grad = torch.randn(shape, generator=g, dtype=F64)
        p.grad = grad.clone()
        opt.step()
        theta = ref.step(theta, [grad])
    assert int(torch.linalg.matrix_rank(opt.state[p]["factor_left"])) == rank
    Q, Q_ref = opt.state[p]["basis_left"], ref.states[0]["Q"][0]
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q[:, :rank], Q_ref[:, :rank], rtol=0, atol=1e-12)
    null, null_ref = Q[:, rank:], Q_ref[:, rank:]
    torch.testing.assert_close(null @ null.T, null_ref @ null_ref.T, rtol=0, atol=1e-12)  # any basis of it
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"][:rank], ref.states[0]["v"][:rank], rtol=0, atol=1e-12)
    torch.testing.assert_close(p.detach(), theta[0], rtol=0, atol=1e-12)


def test_first_step_does_not_move_parameters():
    init, params, groups = _setup()
    opt = whiten.SOAP(groups, **HYPER)
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    opt.step()
    for p, w in zip(params, init):
        assert torch.equal(p.detach(), w)
    assert torch.count_nonzero(opt.state[params[0]]["factor_left"]) > 0


def test_close_to_pytorch_optimizer_soap():
    """pytorch-optimizer's SOAP follows the reference, whose QR refresh casts to float32 even for float64
    parameters; whiten keeps float64, so the two agree to float32 precision after the first refresh."""
    shapes = [(6, 4), (6, 4), (5, 5), (7,)]
    torch.manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [w.clone().requires_grad_() for w in init]
    theirs = [w.clone().requires_grad_() for w in init]
    opt = whiten.SOAP([{"params": ours, "role": "hidden"}], lr=0.01, weight_decay=0.1, precondition_frequency=3)
    peer = pytorch_optimizer.SOAP(theirs, lr=0.01, weight_decay=0.1, precondition_frequency=3)
    g = torch.Generator().manual_seed(5)
    for t in range(12):
        gs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for a, b, gi in zip(ours, theirs, gs):
            a.grad, b.grad = gi.clone(), gi.clone()
        opt.step()
        peer.step()
        tol = 1e-13 if t < 4 else 1e-6  # exact until the first QR refresh (Adam step 3)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=tol, rtol=0), t


def test_identity_basis_is_adam():
    """With no side small enough for a factor, the basis stays the identity and SOAP is Adam (after its first,
    skipped, step). eps=0: SOAP adds eps to sqrt(v) before the bias correction, torch's Adam after it."""
    torch.manual_seed(2)
    shapes = [(6, 4), (5,), (3, 2, 2)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [w.clone().requires_grad_() for w in init]
    ref = [w.clone().requires_grad_() for w in init]
    opt = whiten.SOAP(ours, lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0, max_precond_dim=1)
    adam = torch.optim.Adam(ref, lr=0.01, betas=(0.9, 0.99), eps=0.0)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(8)]
    for t, gs in enumerate(grads):
        for p, gi in zip(ours, gs):
            p.grad = gi.clone()
        opt.step()
        if t > 0:
            for p, gi in zip(ref, gs):
                p.grad = gi.clone()
            adam.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-14, rtol=0)
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in ours)


def test_refresh_permutes_second_moment_and_carries_momentum():
    """At a refresh v is permuted with the basis columns (sorted by the estimated eigenvalues) and m is carried into
    the new basis unchanged in parameter coordinates. Compared against a twin that skips the refresh."""
    torch.manual_seed(4)
    w = torch.randn(5, 4, dtype=torch.float64)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    refreshing = whiten.SOAP([a], precondition_frequency=2, weight_decay=0.0)
    frozen = whiten.SOAP([b], precondition_frequency=1000, weight_decay=0.0)
    g = torch.Generator().manual_seed(6)
    for t in range(3):  # eigh at call 1, Adam steps at calls 2-3, the refresh after call 3 (Adam step 2)
        scales = torch.tensor([5.0, 0.1, 2.0, 0.5, 1.0], dtype=torch.float64)
        grad = torch.randn(5, 4, generator=g, dtype=torch.float64) * (scales if t < 2 else 20 * scales.flip(0))[:, None]
        a.grad, b.grad = grad.clone(), grad.clone()
        refreshing.step()
        frozen.step()
    assert torch.equal(a, b)
    sa, sb = refreshing.state[a], frozen.state[b]
    orders = []
    for side in ("left", "right"):
        Q, F = sb[f"basis_{side}"], sb[f"factor_{side}"]
        assert torch.equal(F, sa[f"factor_{side}"])
        orders.append(torch.argsort(torch.diag(Q.T @ F @ Q), descending=True))
        new = sa[f"basis_{side}"]
        assert torch.allclose(new.T @ new, torch.eye(len(new), dtype=new.dtype), atol=1e-12)
    assert not torch.equal(orders[0], torch.arange(5))  # the last gradient reorders the left basis
    assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"][orders[0]][:, orders[1]])
    m_a = sa["basis_left"] @ sa["exp_avg"] @ sa["basis_right"].T
    m_b = sb["basis_left"] @ sb["exp_avg"] @ sb["basis_right"].T
    assert torch.allclose(m_a, m_b, atol=1e-12)


def test_bf16_parameters_keep_float32_state():
    init, params, groups = _setup(dtype=torch.bfloat16)
    opt = whiten.SOAP(groups, **HYPER)
    for gs in _grads(4, dtype=torch.bfloat16):
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["factor_left"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9,)), "betas"), (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(eps=-1.0), "eps"), (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(max_precond_dim=0), "max_precond_dim"), (dict(precondition_1d=1), "precondition_1d"),
    (dict(ema_rate=2.0), "ema_rate"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        whiten.SOAP([torch.zeros(3, 3, requires_grad=True)], **kwargs)
