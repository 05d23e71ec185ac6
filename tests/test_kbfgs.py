"""whiten.KBFGS: parity with a float64 transcription of the official code (tests/kbfgs_reference.py), the closure
protocol and its fallback, exact resume, the layers and the fallback parameters, DDP and FSDP2 against one process."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from kbfgs_reference import OfficialKBFGS, mean_input_factor
from whiten import KBFGS
from whiten.optim.kbfgs import bfgs_update_, double_damping, lbfgs_append_, lbfgs_apply

VARIANTS = ["K-BFGS", "K-BFGS(L)"]


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


# ----- the official code's model: a small fully connected autoencoder ------------------------------------------------

SIZES = [8, 6, 3, 6, 8]
ACTIVATIONS = ["relu", "linear", "relu", "linear"]


def autoencoder(seed=0):
    torch.manual_seed(seed)
    mods = []
    for (a, b), act in zip(zip(SIZES[:-1], SIZES[1:]), ACTIVATIONS):
        mods.append(nn.Linear(a, b))
        if act == "relu":
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def bce_sum(z, t):
    """The official MNIST loss, ``logistic-regression-sum-loss``: BCE summed over the outputs, mean over examples."""
    return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]


DATA = torch.Generator().manual_seed(3)
IMAGES = torch.rand(64, 8, generator=DATA, dtype=torch.float64)


def batch(t):
    k = (16 * t) % 64
    return IMAGES[k:k + 16]


def closure_for(opt, model, X, target=None, loss_fn=bce_sum):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), X if target is None else target)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_official_code(variant, warm):
    """Twelve steps of whiten.KBFGS and of the transcribed official loop on the same mini-batches: the parameters,
    A, H_a and H_g agree to rounding, with every damping branch, skipped updates and (K-BFGS(L), memory 3) dropped
    pairs exercised. The official A starts at its mean over a pass of forwards: warm_start over the same batches, or
    (without it) the first step's batch."""
    model = autoencoder()
    lin = linears(model)
    params = [(m.weight.detach(), m.bias.detach()) for m in lin]
    warm_batches = [batch(t) for t in range(4)] if warm else [batch(0)]
    ref = OfficialKBFGS(params, ACTIVATIONS, bce_sum, mean_input_factor(params, ACTIVATIONS, warm_batches), lr=0.3,
                        damping=0.3, limited=variant != "K-BFGS", memory=3, tau=1e-2)
    # one group with role "hidden": every weight and bias decays, as the official τ
    opt = KBFGS([{"params": list(model.parameters()), "role": "hidden"}], model=model, lr=0.3, damping=0.3,
                weight_decay=1e-2, variant=variant, memory=3)
    if warm:
        with torch.no_grad(), opt.warm_start():
            for X in warm_batches:
                model(X)
    for t in range(12):
        X = batch(t)
        loss = opt.step(closure_for(opt, model, X))
        torch.testing.assert_close(loss.detach(), ref.step(X, X), rtol=1e-12, atol=0)
        for m, (W, b) in zip(lin, ref.params):
            torch.testing.assert_close(m.weight.detach(), W, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(m.bias.detach(), b, rtol=1e-9, atol=1e-12)
    for l, m in enumerate(lin):
        s = opt.state[m.weight]
        torch.testing.assert_close(s["factor_a"], ref.A[l], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s["inverse_a"], ref.Ha[l], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s["s_avg"], ref.s_avg[l], rtol=1e-9, atol=1e-12)
        Hg = (lbfgs_apply(s["pairs_s"], s["pairs_y"], 1.0, torch.eye(m.weight.shape[0])) if variant != "K-BFGS"
              else s["inverse_g"])
        torch.testing.assert_close(Hg, ref.hg_matrix(l), rtol=1e-8, atol=1e-10)
    assert ref.events.get("powell") and ref.events.get("lm"), ref.events
    if variant != "K-BFGS":
        assert ref.events.get("dropped"), ref.events


# ----- the kernels -----------------------------------------------------------------------------------------------

def test_lbfgs_apply_is_the_two_loop_recursion():
    """The compact form with empty slots equals Nocedal's two-loop recursion over the kept pairs."""
    torch.manual_seed(0)
    d, m = 7, 5
    S, Y = torch.zeros(m, d), torch.zeros(m, d)
    for _ in range(3):  # three pairs with sᵀy > 0 in a memory of five
        s = torch.randn(d)
        lbfgs_append_(S, Y, s, 2 * s + 0.1 * torch.randn(d), torch.ones(d))
    assert (S.abs().sum(1) > 0).tolist() == [False, False, True, True, True]
    V = torch.randn(d, 4)
    gamma = 0.7
    out = []
    for v in V.T:
        q, alphas = v.clone(), []
        for s, y in zip(reversed(S[2:]), reversed(Y[2:])):
            a = (s @ q) / (s @ y)
            q -= a * y
            alphas.append(a)
        r = gamma * q
        for (s, y), a in zip(zip(S[2:], Y[2:]), reversed(alphas)):
            r += s * (a - (y @ r) / (s @ y))
        out.append(r)
    torch.testing.assert_close(lbfgs_apply(S, Y, gamma, V), torch.stack(out, 1))
    assert torch.equal(lbfgs_apply(torch.zeros(m, d), torch.zeros(m, d), gamma, V), gamma * V)


def test_bfgs_update_satisfies_the_secant_equation_and_skips():
    torch.manual_seed(1)
    d = 5
    H = torch.eye(d)
    s, y = torch.randn(d), torch.randn(d)
    y = y if s @ y > 0 else -y
    bfgs_update_(H, s, y, torch.ones(d))
    torch.testing.assert_close(H @ y, s)
    before = H.clone()
    bfgs_update_(H, s, -y, torch.ones(d))  # sᵀy < 0: skipped
    bfgs_update_(H, s, y, torch.ones(d), allow=torch.tensor(False))
    bfgs_update_(H, s * 1e200, y * 1e200, torch.ones(d))  # overflows: skipped
    assert torch.equal(H, before)


def test_double_damping_makes_the_pair_positive_and_leaves_zeros_alone():
    s, y = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5])
    sd, yd = double_damping(s, y, y.clone(), mu=0.5)  # H = I
    assert sd @ yd >= 0.5 * (sd @ sd) - 1e-12
    z = torch.zeros(2)
    sd, yd = double_damping(z, z, z, mu=0.5)
    assert torch.equal(sd, z) and torch.equal(yd, z)


# ----- the closure protocol --------------------------------------------------------------------------------------

def test_step_evaluates_the_closure_before_and_after_the_step():
    model = autoencoder()
    opt = KBFGS(model.parameters(), model=model, lr=0.1)
    X = batch(0)
    losses, params = [], []

    def closure():
        params.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = bce_sum(model(X), X)
        loss.backward()
        losses.append(loss.detach())
        return loss

    returned = opt.step(closure)
    assert len(losses) == 2 and torch.equal(returned.detach(), losses[0])
    assert all(torch.equal(a, b) for a, b in zip(params[0], [p.detach() for p in autoencoder().parameters()]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(params[1], model.parameters()))  # after the step
    w = linears(model)[0].weight
    assert opt.state[w]["a_updates"] == 1 and opt.state[w]["s_avg"].abs().sum() > 0


def test_step_without_a_closure_warns_once_and_keeps_hg():
    model = autoencoder()
    opt = KBFGS(model.parameters(), model=model, lr=0.1)
    w = linears(model)[0].weight
    for t in range(3):
        opt.zero_grad()
        bce_sum(model(batch(t)), batch(t)).backward()
        if t == 0:
            with pytest.warns(RuntimeWarning, match="without a closure"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step()
    s = opt.state[w]
    assert torch.equal(s["inverse_g"], torch.eye(w.shape[0])) and s["a_updates"] == 3
    assert not torch.equal(s["inverse_a"], torch.zeros_like(s["inverse_a"]))
    opt.step(closure_for(opt, model, batch(3)))  # a closure later updates H_g
    assert not torch.equal(s["inverse_g"], torch.eye(w.shape[0]))


def test_a_nonfinite_gradient_skips_both_evaluations_after_the_first():
    model = autoencoder()
    opt = KBFGS(model.parameters(), model=model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        (bce_sum(model(batch(0)), batch(0)) * float("nan")).backward()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert len(calls) == 1 and opt.counters["skipped_steps"] == 1 and not opt.state


def test_a_model_without_layers_is_evaluated_once():
    model = nn.Sequential(nn.LayerNorm(4))
    opt = KBFGS(model.parameters(), model=model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        model(torch.randn(3, 4)).square().sum().backward()

    opt.step(closure)
    assert len(calls) == 1 and opt.fallback_parameters() == list(model.parameters())


# ----- state and checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_resume(variant):
    def run(model, opt, start, stop):
        for t in range(start, stop):
            opt.step(closure_for(opt, model, batch(t)))

    model = autoencoder()
    opt = KBFGS(whiten.param_groups(model), model=model, lr=0.2, variant=variant, memory=4)
    run(model, opt, 0, 5)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, 5, 10)
    resumed = autoencoder(seed=5)
    opt2 = KBFGS(whiten.param_groups(resumed), model=resumed, lr=0.2, variant=variant, memory=4)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, 5, 10)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_checkpoint_of_the_other_variant_is_refused():
    model = autoencoder()
    opt = KBFGS(model.parameters(), model=model)
    opt.step(closure_for(opt, model, batch(0)))
    other = KBFGS(model.parameters(), model=model, variant="K-BFGS(L)")
    with pytest.raises(ValueError, match="lacks 'pairs_s'"):
        other.load_state_dict(opt.state_dict())


def test_arguments_are_checked():
    model = autoencoder()
    for bad in (dict(variant="L-BFGS"), dict(memory=0), dict(damping=1.0), dict(damping=0.0), dict(lr=-1.0),
                dict(pair_momentum=1.0), dict(factor_decay=-0.1), dict(hg_init=0.0), dict(loss_average="tokens")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KBFGS(model.parameters(), model=model, **bad)
    with pytest.raises(TypeError, match="model"):
        KBFGS(model.parameters(), model=None)
    with pytest.raises(ValueError, match="not a parameter of model"):
        KBFGS([nn.Parameter(torch.zeros(2))], model=model)


# ----- layers and the fallback -------------------------------------------------------------------------------------

class Tagger(nn.Module):
    """An embedding, a LayerNorm and a free tensor (fallback) around two Linear layers (K-BFGS)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 6)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 6))
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, idx):
        return self.head(self.norm(torch.relu(self.fc(self.emb(idx) + self.pos))))


def tagger_batch(t, n=4):
    g = torch.Generator().manual_seed(100 + t)
    idx = torch.randint(0, 11, (n, 5), generator=g)
    return idx, idx.roll(1, 1)


def ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))


def test_layers_and_the_fallback_rule():
    model = Tagger()
    opt = KBFGS(whiten.param_groups(model), model=model, lr=0.1, momentum=0.5, weight_decay=0.0)
    assert [layer.name for layer in opt.plan().layers] == ["fc", "head"]
    fallback = opt.fallback_parameters()
    assert {id(p) for p in fallback} == {id(model.emb.weight), id(model.pos), id(model.norm.weight),
                                         id(model.norm.bias)}
    before = model.pos.detach().clone()
    idx, y = tagger_batch(0)
    opt.step(closure_for(opt, model, idx, y, ce))
    # the fallback: m = (1 - rho) g at the first step, p -= lr m; the gradient is the first evaluation's
    check = Tagger()
    ce(check(idx), y).backward()
    torch.testing.assert_close(model.pos.detach(), before - 0.1 * 0.5 * check.pos.grad)
    assert opt.state[model.fc.weight]["inverse_a"].shape == (7, 7)
    assert opt.state[model.head.weight]["inverse_a"].shape == (6, 6)


class ConvNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fits_a_fixed_batch(kind, variant):
    """The K-BFGS layers train (every parameter here is a layer's): the loss on a fixed batch labelled by a
    teacher falls below a fifth of its start in 40 steps."""
    make = mlp if kind == "mlp" else ConvNet
    model = make()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 6, generator=g) if kind == "mlp" else torch.randn(32, 2, 4, 4, generator=g)
    with torch.no_grad():
        y = make(seed=7)(x).argmax(1)
    opt = KBFGS(model.parameters(), model=model, lr=0.3, variant=variant)
    assert opt.fallback_parameters() == []
    first = F.cross_entropy(model(x), y).item()
    for _ in range(40):
        opt.step(closure_for(opt, model, x, y, F.cross_entropy))
    assert F.cross_entropy(model(x), y).item() < 0.2 * first


def test_copies_carry_their_own_hooks():
    model = autoencoder()
    opt = KBFGS(model.parameters(), model=model, lr=0.1)
    opt.step(closure_for(opt, model, batch(0)))
    twin = copy.deepcopy(opt)
    assert twin.model is not model and twin.hooks_registered
    opt.step(closure_for(opt, model, batch(1)))
    twin.step(closure_for(twin, twin.model, batch(1)))
    for p, q in zip(model.parameters(), twin.model.parameters()):
        assert torch.equal(p, q)


# ----- DDP and FSDP2: the numbers of one process on the full batch ---------------------------------------------------

DDP_STEPS, DDP_SAVE = 6, 3


def ddp_batch(t):
    idx, y = tagger_batch(t, 8)
    return idx, y


def _ddp_worker(rank, world, variant):
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    model = Tagger()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = KBFGS(whiten.param_groups(model), model=model, lr=0.2, variant=variant, memory=3,
                process_group=dist.group.WORLD)
    rows = slice(4 * rank, 4 * rank + 4)

    def run(start, stop):
        for t in range(start, stop):
            idx, y = ddp_batch(t)
            opt.step(closure_for(opt, ddp, idx[rows], y[rows], ce))

    run(0, DDP_SAVE)
    saved = copy.deepcopy((model.state_dict(), whiten.distributed.full_state_dict(opt)))
    run(DDP_SAVE, DDP_STEPS)
    owned = sum(1 for p in model.parameters() if opt.state.get(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, saved, owned


def one_process(variant, start=0, resume=None):
    model = Tagger()
    opt = KBFGS(whiten.param_groups(model), model=model, lr=0.2, variant=variant, memory=3)
    if resume is not None:
        model.load_state_dict(resume[0])
        opt.load_state_dict(resume[1])
    for t in range(start, DDP_STEPS):
        idx, y = ddp_batch(t)
        opt.step(closure_for(opt, model, idx, y, ce))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_equals_one_process_on_the_full_batch(variant):
    """2 gloo ranks, DDP, half the batch each, step(closure) on both: every rank ends with one process's parameters
    on the full batch, the layers were split over the ranks, and rank 0's full_state_dict resumes one process."""
    from dist_utils import launch

    results = launch(_ddp_worker, 2, variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = one_process(variant)
        resumed = one_process(variant, start=DDP_SAVE, resume=results[0][1])
    finally:
        torch.set_num_threads(threads)
    for n in expected:
        assert torch.equal(results[0][0][n], results[1][0][n]), n  # the ranks agree bit for bit
    for rank, (params, _, owned) in enumerate(results):
        assert 0 < owned < len(params)
        for n in expected:
            torch.testing.assert_close(params[n], expected[n], rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {n}")
    for n in expected:
        torch.testing.assert_close(resumed[n], expected[n], rtol=1e-9, atol=1e-12, msg=n)


def _fsdp_worker(rank, world, variant):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_default_dtype(torch.float64)
    model = Tagger()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = KBFGS(whiten.param_groups(model), model=model, lr=0.2, variant=variant, memory=3)
    rows = slice(4 * rank, 4 * rank + 4)
    for t in range(DDP_STEPS):
        idx, y = ddp_batch(t)
        opt.step(closure_for(opt, model, idx[rows], y[rows], ce))
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_equals_one_process_on_the_full_batch(variant):
    """fully_shard (DTensor parameters): the mesh is used by itself; the second evaluation runs through FSDP's
    own forward and backward."""
    from dist_utils import launch

    results = launch(_fsdp_worker, 2, variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = one_process(variant)
    finally:
        torch.set_num_threads(threads)
    for rank, params in enumerate(results):
        for n in expected:
            torch.testing.assert_close(params[n], expected[n], rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {n}")


# ----- the benchmark's registry --------------------------------------------------------------------------------------

def test_the_registry_entries_build_with_the_model():
    from whiten.bench import registry
    from whiten.bench.tasks import make_task

    torch.set_default_dtype(torch.float32)  # the benchmark's models
    for name, variant in (("kbfgs", "K-BFGS"), ("kbfgs-l", "K-BFGS(L)")):
        spec = registry.get_spec(name)
        assert spec.lr_grid[0] < spec.default_lr < spec.lr_grid[-1]
        opt = registry.build_optimizer(spec, make_task("lm", "tiny").build_model(0), spec.default_lr, 32)
        assert isinstance(opt, KBFGS) and opt.variant == variant and opt.plan().layers and opt.needs_closure
        assert not hasattr(opt, "sample_fisher")
    assert math.isfinite(spec.default_lr)
