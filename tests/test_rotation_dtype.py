"""``rotation_dtype`` of SPlus and SOAP: the per-step rotations into and out of the eigenbasis in bfloat16, with the
state (factors, bases, moments) kept in the state dtype."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from dist_utils import load_dcp, save_dcp
from state_checks import assert_same_state

VOCAB, WIDTH = 20, 16

OPTIMIZERS = {
    "SPlus": lambda params, **kw: whiten.SPlus(params, **{"lr": 0.05, "inverse_every": 5, "ema_rate": 0.9, **kw}),
    "SOAP": lambda params, **kw: whiten.SOAP(params, **{"lr": 0.01, "precondition_frequency": 3, **kw}),
}
SPELLINGS = [torch.bfloat16, "bf16", "bfloat16"]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH),
                          nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH),
                          nn.Linear(WIDTH, VOCAB, bias=False))
    return model.to(dtype)


def loss_of(model, t):
    g = torch.Generator().manual_seed(100 + t)
    idx = torch.randint(0, VOCAB, (8, 6), generator=g)
    target = (3 * idx + 1) % VOCAB  # a function of the token itself, so a model without attention can learn it
    return F.cross_entropy(model(idx).float().reshape(-1, VOCAB), target.reshape(-1))


def train(model, opt, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


# ----- the option ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [torch.float16, torch.float32, torch.float64, "fp16", "float32", "", 16, True,
                                 1.0, ["bf16"]])
def test_bad_rotation_dtype_is_refused_by_name(name, bad):
    with pytest.raises(ValueError, match=r"Invalid rotation_dtype: .*allowed: None, torch.bfloat16, 'bf16'"):
        OPTIMIZERS[name](make_model().parameters(), rotation_dtype=bad)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_rotation_dtype_in_a_group_and_in_a_checkpoint(name):
    model = make_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params[:2])
    with pytest.raises(ValueError, match="rotation_dtype"):
        opt.add_param_group({"params": params[2:], "rotation_dtype": torch.float16})
    assert len(opt.param_groups) == 1  # refused groups leave the optimizer as it was
    opt.add_param_group({"params": params[2:], "rotation_dtype": "bf16"})  # per group
    sd = opt.state_dict()
    sd["param_groups"][1]["rotation_dtype"] = "half"
    fresh = OPTIMIZERS[name](params[:2])
    fresh.add_param_group({"params": params[2:]})
    with pytest.raises(ValueError, match=r"group 1 of the checkpoint: Invalid rotation_dtype: 'half'"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_default_is_off_and_every_spelling_is_the_same_run(name):
    model = make_model()
    assert OPTIMIZERS[name](model.parameters()).param_groups[0]["rotation_dtype"] is None
    results = []
    for spelling in SPELLINGS:
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), rotation_dtype=spelling)
        train(model, opt, 0, 8)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_stays_in_the_state_dtype_and_has_the_same_keys(name):
    """No low-precision copy of anything is kept: the checkpoint is the same shape with the option on or off."""
    states = {}
    for rd in (None, torch.bfloat16):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), rotation_dtype=rd)
        train(model, opt, 0, 7)
        states[rd] = [opt.state[p] for p in model.parameters()]
    for off, on in zip(states[None], states[torch.bfloat16]):
        assert off.keys() == on.keys()
        for k, v in on.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, k


# ----- the numbers --------------------------------------------------------------------------------------------------

def _last_update(name, rd, m=48, n=96, steps=5):
    """The update of the last of ``steps`` steps on one (m, n) hidden matrix whose gradients do not depend on the
    parameter, so both dtypes see the same gradients, factors and bases (SOAP's moments differ by the rounding of
    the earlier rotated gradients)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(m, n) * 0.1)
    kw = dict(weight_decay=0.0) if name == "SOAP" else dict(weight_decay=0.0, ema_rate=None, inverse_every=3)
    opt = OPTIMIZERS[name]([{"params": [p], "role": "hidden"}], rotation_dtype=rd, **kw)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(m, m, generator=g), torch.randn(n, n, generator=g)  # correlated, so the basis matters
    for _ in range(steps):
        p.grad = A @ torch.randn(m, n, generator=g) @ B * 1e-2
        before = p.detach().clone()
        opt.step()
    return (p.detach() - before).double()


def _bf16_rotation(X, QL, QR, out_of=False):
    """Q_Lᵀ X Q_R (or Q_L X Q_Rᵀ with ``out_of``) with every operand and product in bfloat16, as a stack of one."""
    X, QL, QR = (t.to(torch.bfloat16).unsqueeze(0) for t in (X, QL, QR))
    if out_of:
        return torch.bmm(torch.bmm(QL, X), QR.mT)[0]
    return torch.bmm(torch.bmm(QL.mT, X), QR)[0]


def _matrix_and_grads(m=24, n=40):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(m, n) * 0.1)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(m, m, generator=g) @ torch.randn(m, n, generator=g) * 1e-2 for _ in range(3)]
    return p, grads


def test_splus_step_rotates_in_bf16_and_nothing_else():
    """The second step (the basis comes from the first) against the update rule written out with bfloat16
    rotations; the float32 rule gives another result, so the test sees whether the option is applied."""
    lr, wd, beta1 = 0.1, 0.1, 0.9
    p, grads = _matrix_and_grads()
    opt = whiten.SPlus([{"params": [p], "role": "hidden"}], lr=lr, weight_decay=wd, ema_rate=None,
                       inverse_every=10, rotation_dtype=torch.bfloat16)
    p.grad = grads[0]
    opt.step()
    st = opt.state[p]
    theta, M = p.detach().clone(), st["momentum"].clone()
    QL, QR = st["basis_left"].clone(), st["basis_right"].clone()
    p.grad = grads[1]
    opt.step()
    M = torch.lerp(M, grads[1], 1 - beta1)
    s = lr * 2 / sum(p.shape)
    U = _bf16_rotation(_bf16_rotation(M, QL, QR).sign(), QL, QR, out_of=True).float()
    torch.testing.assert_close(p.detach(), theta * (1 - s * wd) - s * U, rtol=1e-6, atol=1e-7)
    U32 = QL @ (QL.T @ M @ QR).sign() @ QR.T
    assert not torch.allclose(p.detach(), theta * (1 - s * wd) - s * U32, rtol=1e-6, atol=1e-7)
    assert st["basis_left"].dtype == st["momentum"].dtype == torch.float32


def test_soap_step_rotates_in_bf16_and_nothing_else():
    """SOAP's first Adam step (call 2) against the rule written out with bfloat16 rotations and float32 moments."""
    lr, wd, (b1, b2), eps = 0.01, 0.01, (0.95, 0.95), 1e-8
    p, grads = _matrix_and_grads()
    opt = whiten.SOAP([{"params": [p], "role": "hidden"}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                      precondition_frequency=10, rotation_dtype="bf16")
    p.grad = grads[0]
    opt.step()
    st = opt.state[p]
    theta, QL, QR = p.detach().clone(), st["basis_left"].clone(), st["basis_right"].clone()
    m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    p.grad = grads[1]
    opt.step()
    R = _bf16_rotation(grads[1], QL, QR).float()
    m = torch.lerp(m, R, 1 - b1)
    v = v * b2 + (1 - b2) * R * R
    torch.testing.assert_close(st["exp_avg"], m, rtol=1e-6, atol=1e-9)
    D = _bf16_rotation(m / (v.sqrt() + eps), QL, QR, out_of=True).float()
    step_size = lr * (1 - b2) ** 0.5 / (1 - b1)
    torch.testing.assert_close(p.detach(), (theta - step_size * D) * (1 - lr * wd), rtol=1e-6, atol=1e-8)
    R32 = QL.T @ grads[1] @ QR
    assert not torch.allclose(st["exp_avg"], (1 - b1) * R32, rtol=1e-6, atol=1e-9)
    assert st["exp_avg"].dtype == st["basis_left"].dtype == torch.float32


def test_soap_bf16_update_is_close_to_float32():
    """bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3): four roundings of the inputs and outputs of
    two rotations give a relative error of about 1%; measured 2.5% after 5 steps. Tolerance 5%."""
    a, b = _last_update("SOAP", None), _last_update("SOAP", torch.bfloat16)
    assert torch.isfinite(b).all()
    assert float((a - b).norm() / a.norm()) < 0.05


def test_splus_bf16_update_is_close_to_float32():
    """SPlus takes the sign of the rotated momentum: entries within bf16's rounding of zero can flip (measured 6% of
    the entries of the update after 5 steps), so the update is compared by direction: cosine 0.981 measured,
    tolerance 0.97. Every flip is of an entry whose rotated momentum is small; the norm is the same
    (``sign`` gives ±1 whatever the dtype)."""
    a, b = _last_update("SPlus", None), _last_update("SPlus", torch.bfloat16)
    assert torch.isfinite(b).all()
    assert float((a * b).sum() / (a.norm() * b.norm())) > 0.97
    assert float(b.norm() / a.norm()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bf16_trains_as_well_as_float32(name):
    losses = {}
    for rd in (None, torch.bfloat16):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), rotation_dtype=rd)
        first = float(loss_of(model, 0).detach())
        train(model, opt, 0, 60)
        with torch.no_grad():
            losses[rd] = float(sum(loss_of(model, 1000 + t) for t in range(4)) / 4)
    # measured: SPlus 3.04 -> 1.706 (fp32) / 1.704 (bf16); SOAP 3.04 -> 4.1e-4 / 3.9e-4
    assert losses[torch.bfloat16] < 0.7 * first
    assert abs(losses[torch.bfloat16] - losses[None]) < 0.01 * first


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["zero", "rank1", "huge", "tiny"])
def test_bf16_never_produces_nan(name, kind):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), rotation_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for t in range(8):
        for p in model.parameters():
            m = p.shape[0]
            n = p.numel() // m
            if kind == "zero":
                g = torch.zeros(m, n)
            elif kind == "rank1":
                g = torch.randn(m, 1, generator=gen) @ torch.randn(1, n, generator=gen)
            else:  # far beyond and far below bf16's usual values: the same exponent range as float32
                g = torch.randn(m, n, generator=gen) * (1e18 if kind == "huge" else 1e-30)
            p.grad = g.reshape(p.shape)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_batched_equals_per_parameter_with_bf16(name, dtype):
    results = []
    for batched in (True, False):
        model = make_model(dtype)
        opt = OPTIMIZERS[name](model.parameters(), batched=batched, rotation_dtype=torch.bfloat16)
        train(model, opt, 0, 7)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bf16_parameters_with_bf16_rotations():
    model = make_model()
    model[1].to(torch.bfloat16)
    model[1].register_forward_pre_hook(lambda m, a: (a[0].to(torch.bfloat16),))
    model[1].register_forward_hook(lambda m, a, out: out.float())
    for name in OPTIMIZERS:
        opt = OPTIMIZERS[name](model.parameters(), rotation_dtype="bf16")
        train(model, opt, 0, 6)
        assert model[1].weight.dtype == torch.bfloat16 and torch.isfinite(model[1].weight).all()
        assert opt.state[model[1].weight]["basis_left"].dtype == torch.float32


# ----- checkpoints --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", [torch.bfloat16, "bf16"])
@pytest.mark.parametrize("stop_at", [1, 5, 6, 9])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_exact_resume_with_bf16(name, stop_at, spelling):
    total = 14
    model = make_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model), rotation_dtype=spelling)
    train(model, opt, 0, total)

    model2 = make_model()
    opt2 = OPTIMIZERS[name](whiten.param_groups(model2), rotation_dtype=spelling)
    train(model2, opt2, 0, stop_at)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    del model2, opt2

    model3 = make_model(seed=1)
    opt3 = OPTIMIZERS[name](whiten.param_groups(model3))  # built with the option off: the checkpoint's setting wins
    saved = torch.load(io.BytesIO(buf.getvalue()))
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    assert all(g["rotation_dtype"] == spelling for g in opt3.param_groups)
    train(model3, opt3, stop_at, total)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), model3.parameters()):
        assert_same_state(opt.state[pa], opt3.state[pb])


@pytest.mark.parametrize("spelling", [torch.bfloat16, "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dcp_resume_with_bf16(name, spelling, tmp_path):
    """torch.distributed.checkpoint keeps the option (a dtype or a string) in the param groups."""
    model = make_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model), rotation_dtype=spelling)
    train(model, opt, 0, 7)
    save_dcp(model, opt, tmp_path)
    train(model, opt, 7, 12)

    model2 = make_model(seed=1)
    opt2 = OPTIMIZERS[name](whiten.param_groups(model2), rotation_dtype=spelling)
    load_dcp(model2, opt2, tmp_path)
    assert all(g["rotation_dtype"] == spelling for g in opt2.param_groups)
    train(model2, opt2, 7, 12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
