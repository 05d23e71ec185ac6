"""``sync_free=True`` (whiten.optim.deferred): the non-finite check decided on the device, every write masked by it,
its result read one step later. The numbers, the skipped steps, the counters, the warnings and checkpoints are the
default path's, bit for bit; an ordinary step reads nothing back from the device."""

from __future__ import annotations

import copy
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import whiten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_syncs import counts  # noqa: E402

# every optimizer in three parameter dtypes, with bf16 state where it has the option, and its own options
DTYPES = {"float32": dict(), "float64": dict(dtype=torch.float64), "bfloat16 parameters": dict(dtype=torch.bfloat16)}
BF16_STATE = {"bf16 state": dict(state_dtype="bf16")}
CONFIGS = {
    "SPlus": {**DTYPES, **BF16_STATE, "4-bit bases": dict(basis_bits=4), "bf16 rotations": dict(rotation_dtype="bf16"),
              "fixed ema rate": dict(ema_rate=0.99), "no averaging": dict(ema_rate=None),
              "one matrix at a time": dict(batched=False)},
    "SOAP": {**DTYPES, **BF16_STATE, "8-bit bases": dict(basis_bits=8), "averaging": dict(ema_rate=0.99)},
    "Shampoo": {**DTYPES, **BF16_STATE, "unbatched, no grafting": dict(batched=False, grafting=None, lr=1e-4),
                "blocks of 8": dict(max_preconditioner_dim=8)},
    "PSGDKron": {**DTYPES, **BF16_STATE, "unbatched, uncached": dict(batched=False, cache_preconditioner=False)},
    "Muon": {**DTYPES, **BF16_STATE, "no Nesterov, decay": dict(nesterov=False, weight_decay=0.1)},
    "Scion": {**DTYPES, "unconstrained, decay": dict(unconstrained=True, weight_decay=0.1)},
    "Conda": {**DTYPES, **BF16_STATE, "decay": dict(weight_decay=0.1)},
    "TNT": {**DTYPES, **BF16_STATE},
    "Sophia": {**DTYPES, "averaging": dict(ema_rate=0.99)},
    "ScheduleFreeAdamW": {**DTYPES, "decay and warm-up": dict(weight_decay=0.1, warmup_steps=4)},
    "KFAC": {**DTYPES, **BF16_STATE, "no KL clip": dict(kl_clip=None),
             "decay, no momentum": dict(weight_decay=0.1, momentum=0.0)},
    "EKFAC": {**DTYPES, **BF16_STATE, "no KL clip": dict(kl_clip=None)},
    "Prodigy": {**DTYPES, "β1 = 0, coupled decay": dict(betas=(0.0, 0.99), weight_decay=0.1, decouple=False),
                "decay, bias correction, safeguard": dict(weight_decay=0.1, use_bias_correction=True,
                                                          safeguard_warmup=True, slice_p=3)},
}
SETTINGS = {"SPlus": dict(inverse_every=5), "SOAP": dict(precondition_frequency=5),
            "Shampoo": dict(precondition_frequency=5), "PSGDKron": dict(preconditioner_update_probability=0.3),
            "Muon": dict(), "Scion": dict(), "Conda": dict(update_proj_gap=5),
            "TNT": dict(lr=1e-3, update_freq=2, inverse_freq=5), "Sophia": dict(k=3), "ScheduleFreeAdamW": dict(lr=0.01),
            "KFAC": dict(lr=0.05, factor_every=3, inverse_every=6),
            "EKFAC": dict(lr=0.05, factor_every=3, inverse_every=6, scale_every=2), "Prodigy": dict(d0=1e-3)}
NEEDS_MODEL = {"KFAC", "EKFAC"}  # their statistics come from hooks on the model
CASES = [(name, config) for name, configs in CONFIGS.items() for config in configs]


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16),
                         nn.Linear(16, 16), nn.Linear(16, 10)).to(dtype)


def _run(sync_free: bool, bad: dict, steps: int = 23, dtype=torch.float32, name: str = "SPlus", huge=None, **kw):
    """``name`` on a small model for ``steps`` steps (SPlus refreshing every 5); ``bad``: {step: value} written
    into one entry of a matrix's gradient at that step (NaN, inf); ``huge``: the same into a bias's (a huge finite
    value). Returns the model, the optimizer, its counters and the non-finite warnings' texts."""
    huge = huge or {}
    net = _net(dtype)
    opt = _make(name, net, sync_free, **kw)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            idx = torch.randint(0, 10, (4, 3), generator=gen)
            opt.zero_grad()
            net(idx).float().square().mean().backward()
            if t in bad:
                net[3].weight.grad[1, 2] = bad[t]
            if t in huge:
                net[3].bias.grad[1] = huge[t]
            opt.step()
        counters = dict(opt.counters)
    return net, opt, counters, [str(w.message) for w in caught if "non-finite" in str(w.message)]


def _make(name: str, net: nn.Module, sync_free: bool, **kw):
    model = {"model": net} if name in NEEDS_MODEL else {}
    return getattr(whiten, name)(whiten.param_groups(net), sync_free=sync_free, **{**SETTINGS[name], **model, **kw})


def _same(a, b, rtol: float | None = None) -> bool:
    """Equal values, tensors bit for bit (dtype included), through dicts, lists and tuples; with ``rtol``, floats
    and floating tensors within it (see :func:`_close`)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _close(a, b, rtol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, rtol) for x, y in zip(a, b))
    if rtol is not None and type(a) is float and type(b) is float and a != b:
        return abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float | None) -> bool:
    """Bit for bit (``rtol`` None), or of one dtype and within ``rtol`` of the larger tensor's largest entry."""
    if rtol is None or not a.is_floating_point():
        return a.dtype == b.dtype and torch.equal(a, b)
    a, b = a.double(), b.double()
    return a.dtype == b.dtype and bool((a - b).abs().max() <= rtol * max(a.abs().max(), b.abs().max())) \
        if a.numel() else a.shape == b.shape


def _assert_same_state(a: dict, b: dict, rtol: float | None = None) -> None:
    """The two state dicts are equal: their tensors bit for bit, or within ``rtol`` (see :func:`_close`), every
    other value exactly."""
    # (torch's load_state_dict adds "differentiable": False to each group)
    assert _same([{k: v for k, v in g.items() if k != "differentiable"} for g in a["param_groups"]],
                 [{k: v for k, v in g.items() if k != "differentiable"} for g in b["param_groups"]], rtol)
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys(), i
        for k, v in a["state"][i].items():
            w = b["state"][i][k]
            if isinstance(v, torch.Tensor):
                assert isinstance(w, torch.Tensor) and _close(v, w, rtol), (i, k)
            else:
                assert v == w, (i, k)


def _assert_same_run(net_a, opt_a, net_b, opt_b, rtol: float | None = None) -> None:
    """Two runs end equal: the parameters and the whole state dict (see :func:`_assert_same_state`)."""
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert _close(p.detach(), q.detach(), rtol)
    _assert_same_state(opt_a.state_dict(), opt_b.state_dict(), rtol)


# Sync-free steps that compute on the device a number the default path computes in Python floats: K-FAC's and
# EKFAC's KL clip ν (the same float64 ν, from the same sum, but applied by a multiply and then the momentum's add
# where the default path passes it as the add's Python alpha: one rounding more), Prodigy's D (float64 device
# arithmetic, its sums added in another order, and D applied by multiplies where the default path passes it as an
# alpha or value). Their numbers are the default path's within rounding; bit for bit where the number is not used
# (no KL clip); a skipped step still leaves every tensor bit for bit as it was (test_a_skipped_step_changes_no_tensor).
# {name: whether a config uses it}
ROUNDING = {"KFAC": lambda kw: bool(kw.get("kl_clip", 1e-3)), "EKFAC": lambda kw: bool(kw.get("kl_clip", 1e-3)),
            "Prodigy": lambda kw: True}


def _tolerance(name: str, kw: dict) -> float | None:
    """None (bit for bit), or the relative tolerance (of a tensor's largest entry) of a ROUNDING config after 23
    steps: float64 1e-12 (a rounding of 1e-16 or so a step; measured at most 4e-15, K-FAC's parameters); float32
    state 1e-4 (measured at most 3e-5: Prodigy with β1 = 0, whose step is D times the gradient over its running
    RMS, the rest 2e-6); bfloat16 parameters 2e-2 (a float32 ulp of difference can round a weight to the
    neighbouring bfloat16 number, 2^-8 away, and the later gradients follow)."""
    if name not in ROUNDING or not ROUNDING[name](kw):
        return None
    return {torch.float64: 1e-12, torch.bfloat16: 2e-2}.get(kw.get("dtype"), 1e-4)


# bad steps: ordinary ones (deferred), the first step, a refresh step (both on the host), two in a row; and a huge
# finite gradient whose square overflows a second moment (restarted at the next step, on the host)
BAD = {0: float("nan"), 3: float("nan"), 7: float("inf"), 8: float("-inf"), 10: float("nan"), 16: float("nan")}
HUGE = {12: 1e30}


@pytest.mark.parametrize("name,config", CASES)
def test_sync_free_equals_the_default_path_bit_for_bit(name, config):
    kw = CONFIGS[name][config]
    # (TNT's step, Shampoo's without grafting and K-FAC's without the KL clip are not normalized: a 1e30 gradient
    # diverges the model, and both paths skip every later step)
    huge = {} if name == "TNT" or kw.get("grafting", "adam") is None or kw.get("kl_clip", 1) is None else HUGE
    net_a, opt_a, counters_a, warned_a = _run(False, BAD, name=name, huge=huge, **kw)
    net_b, opt_b, counters_b, warned_b = _run(True, BAD, name=name, huge=huge, **kw)
    _assert_same_run(net_a, opt_a, net_b, opt_b, _tolerance(name, kw))  # (None: bit for bit)
    assert counters_a == counters_b and counters_a["skipped_steps"] == len(BAD)
    assert len(warned_a) == len(warned_b) == len(BAD)
    if getattr(whiten, name).SECOND_MOMENT_KEY and kw.get("dtype") != torch.float64:
        assert counters_a["factor_restarts"] == 1  # the bias's overflowed second moment, restarted on both paths


def test_the_deferred_steps_are_the_ordinary_ones():
    net = _net()
    opt = whiten.SPlus(whiten.param_groups(net), inverse_every=5, sync_free=True)
    calls = []
    real = opt.deferred_step
    opt.deferred_step = lambda work: (calls.append(True), real(work))
    deferred = []
    for t in range(1, 13):
        opt.zero_grad()
        net(torch.randint(0, 10, (4, 3))).square().mean().backward()
        opt.step()
        if calls:
            deferred.append(t)
            calls.clear()
    # steps 1 (state created), 5 and 10 (refreshes) decide on the host; the others on the device
    assert deferred == [2, 3, 4, 6, 7, 8, 9, 11, 12]


def test_an_overflowed_second_moment_is_restarted_on_the_host():
    """Schedule-Free AdamW's second moments are checked on the device after each step; the step after one
    overflowed (a huge finite gradient) takes the host path, which restarts it, and the others stay deferred."""
    host_steps = []
    net = _net()
    opt = whiten.ScheduleFreeAdamW(whiten.param_groups(net), lr=0.01, sync_free=True)
    real = opt.grads_are_finite
    opt.grads_are_finite = lambda work: (host_steps.append(step), real(work))[1]
    for step in range(1, 9):
        opt.zero_grad()
        net(torch.randint(0, 10, (4, 3))).square().mean().backward()
        if step == 4:
            net[3].weight.grad[1, 2] = 1e30
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert host_steps == [1, 5]  # the state created; the restart
    assert opt.counters["factor_restarts"] == 1


@pytest.mark.parametrize("name", ["Sophia", "TNT"])
def test_sampled_curvature_and_skipped_steps_match_the_default_path(name):
    """With sample_fisher: the steps that consume sampled gradients decide on the host; a skipped sync-free step
    puts the sampling clock (fisher_steps) back, so the later samples are drawn at the same steps and seeds."""
    def run(sync_free):
        net = _net()
        opt = getattr(whiten, name)(whiten.param_groups(net), sync_free=sync_free, **SETTINGS[name])
        gen = torch.Generator().manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in range(20):
                idx = torch.randint(0, 10, (4, 3), generator=gen)
                opt.zero_grad()
                logits = net(idx)
                opt.sample_fisher(logits)
                logits.square().mean().backward()
                if t in (4, 7, 11):
                    net[3].weight.grad[0, 1] = float("nan")
                opt.step()
        return net, opt

    (net_a, opt_a), (net_b, opt_b) = run(False), run(True)
    _assert_same_run(net_a, opt_a, net_b, opt_b)
    assert opt_b.fisher_steps == 17 and opt_b.counters["skipped_steps"] == 3


def test_a_skipped_step_changes_no_tensor_and_is_counted_when_read():
    net = _net()
    opt = whiten.SPlus(whiten.param_groups(net), inverse_every=5, sync_free=True)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randint(0, 10, (4, 3))).square().mean().backward()
        opt.step()
    params = [p.detach().clone() for p in net.parameters()]
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in enumerate(opt.state.values())}
    opt.zero_grad()
    net(torch.randint(0, 10, (4, 3))).square().mean().backward()
    net[1].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        assert not caught  # nothing read yet
        for p, q in zip(net.parameters(), params):
            assert torch.equal(p, q)
        for i, s in enumerate(opt.state.values()):
            for k, v in state[i].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(s[k], v), k
        assert opt.counters["skipped_steps"] == 1  # the read
        assert len(caught) == 1 and "one step later" in str(caught[0].message)
    assert [s["step"] for s in opt.state.values()] == [2] * len(opt.state)  # put back


def test_raise_policy_raises_at_the_next_read_with_the_state_as_before():
    net = _net()
    opt = whiten.SPlus(whiten.param_groups(net), inverse_every=5, sync_free=True, nonfinite="raise")
    for t in range(3):
        opt.zero_grad()
        net(torch.randint(0, 10, (4, 3))).square().mean().backward()
        if t == 2:
            net[1].weight.grad[0, 0] = float("inf")
            params = [p.detach().clone() for p in net.parameters()]
        opt.step()
    with pytest.raises(FloatingPointError, match="one step later"):
        opt.step()
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    assert [s["step"] for s in opt.state.values()] == [2] * len(opt.state)


def test_a_scheduler_lr_written_after_a_skipped_step_is_kept():
    """The skipped step's Python side is put back at the next step; an lr a scheduler wrote in between stays."""
    def run(sync_free):
        net = _net()
        opt = whiten.SPlus(whiten.param_groups(net), inverse_every=5, sync_free=sync_free)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for t in range(9):
            opt.zero_grad()
            net(torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(t))).square().mean().backward()
            if t in (3, 6):
                net[1].weight.grad[0, 0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            sched.step()
        return net, opt

    (net_a, opt_a), (net_b, opt_b) = run(False), run(True)
    _assert_same_run(net_a, opt_a, net_b, opt_b)


# a deferred (ordinary) step of each, where the resume tests put their bad gradient
DEFERRED_STEP = {"SPlus": 6, "KFAC": 7, "EKFAC": 7, "Prodigy": 6}


@pytest.mark.parametrize("name", DEFERRED_STEP)
def test_checkpoints_and_copies_resolve_the_last_step(name):
    """state_dict(), pickling and deepcopy read a pending skipped step first: a resumed run is the uninterrupted
    one, bit for bit (Prodigy's within rounding: a loaded optimizer's first step decides on the host, since its
    second moments' finiteness is not known, and the host step computes D in Python floats)."""
    bad = DEFERRED_STEP[name]
    rtol = _tolerance(name, {}) if getattr(whiten, name).SECOND_MOMENT_KEY else None
    whole_net, whole, _, _ = _run(True, {bad: float("nan")}, steps=14, name=name)

    net = _net()
    opt = _make(name, net, True)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(14):
            idx = torch.randint(0, 10, (4, 3), generator=gen)
            opt.zero_grad()
            net(idx).float().square().mean().backward()
            if t == bad:
                net[3].weight.grad[1, 2] = float("nan")
            opt.step()
            if t == bad:  # the bad step is pending: checkpoint and copy now
                assert opt.__dict__.get("_pending_check") is not None
                sd = copy.deepcopy(opt.state_dict())
                assert sd["param_groups"][0]["whiten_counters"]["skipped_steps"] == 1
                pickled = pickle.loads(pickle.dumps(opt))
                assert pickled.counters["skipped_steps"] == 1
                copied = copy.deepcopy(opt)
                assert copied.counters["skipped_steps"] == 1
                net2 = copy.deepcopy(net)
                opt = _make(name, net2, True)
                opt.load_state_dict(sd)
                net = net2
    for p, q in zip(whole_net.parameters(), net.parameters()):
        assert _close(p.detach(), q.detach(), rtol)
    _assert_same_state(whole.state_dict(), opt.state_dict(), rtol)


@pytest.mark.parametrize("name", [n for n in DEFERRED_STEP if n != "SPlus"])
def test_a_skipped_step_changes_no_tensor(name):
    """The skip contract where the sync-free numbers are the default path's within rounding: a deferred step with a
    non-finite gradient leaves every tensor (parameters, state) bit for bit as it was, is counted and warned at
    the next read, and its Python side (step counts, clocks, group entries) is put back."""
    net = _net()
    opt = _make(name, net, True)
    gen = torch.Generator().manual_seed(1)

    def backward():
        opt.zero_grad()
        net(torch.randint(0, 10, (4, 3), generator=gen)).square().mean().backward()

    for _ in range(DEFERRED_STEP[name]):
        backward()
        opt.step()
    params = [p.detach().clone() for p in net.parameters()]
    before = copy.deepcopy(opt.state_dict())
    backward()
    net[3].weight.grad[1, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        assert opt.__dict__.get("_pending_check") is not None and not caught  # deferred, nothing read yet
        for p, q in zip(net.parameters(), params):
            assert torch.equal(p, q)
        assert opt.counters["skipped_steps"] == 1  # the read
        assert len(caught) == 1 and "one step later" in str(caught[0].message)
    after = opt.state_dict()
    before["param_groups"][0]["whiten_counters"]["skipped_steps"] = 1
    _assert_same_state(before, after)  # every tensor bit for bit, every other entry as before the step


# Newton–Schulz's overflow test of the norm reads it on a CPU only (an accelerator recomputes the norm in float64
# instead; whiten.linalg.newton_schulz): not a device sync, but counted here
CPU_ONLY_READS = {"Muon": 1, "Scion": 1}
# the default path's own data-dependent reads on an ordinary step, which a sync-free step computes on the device
# instead: K-FAC's and EKFAC's KL clip ν, Prodigy's sums for D
DEFAULT_READS = {"KFAC": 1, "EKFAC": 1, "Prodigy": 1}
# lagged reads of host memory besides the step's flags and the second moments' flag: Prodigy's (whether the step's
# statistics were all zero, whether D was held at its limit)
LAGGED_READS = {"Prodigy": 1}


@pytest.mark.parametrize("name", CONFIGS)
def test_an_ordinary_step_reads_nothing_from_the_device(name):
    # the step's flags, the second moments' flag, and the optimizer's own
    lagged = 1 + (getattr(whiten, name).SECOND_MOMENT_KEY is not None) + LAGGED_READS.get(name, 0)
    cpu = CPU_ONLY_READS.get(name, 0)
    for blocks in (4, 16):
        c = counts(name, blocks, accelerator=True, sync_free=True)
        assert c.syncs == cpu and c.lagged == lagged, c  # the last step's flags, from host memory
    # the default: the check's read (and its own)
    assert counts(name, 4, accelerator=True).syncs == 1 + cpu + DEFAULT_READS.get(name, 0)


def test_a_bucket_with_a_member_without_gradient_reads_nothing():
    """SPlus's factors of a partial bucket are updated at positions it knows in Python (a tensor of positions read
    back would be a sync on a GPU)."""
    from host_syncs import Count

    net = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(3)])
    opt = whiten.SPlus(whiten.param_groups(net), inverse_every=100, sync_free=True)
    x = torch.randn(4, 8)
    for t in range(4):
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        if t >= 2:
            net[1].weight.grad = None  # a member of the bucket without a gradient this step
        if t < 3:
            opt.step()
    with Count() as c:
        opt.step()
    assert c.reads == 0 and c.lagged == 1


def test_every_sync_free_optimizer_is_tested_here():
    from test_suite import OPTIMIZERS

    assert {n for n in OPTIMIZERS if getattr(getattr(whiten, n, None), "SYNC_FREE", False)} == set(CONFIGS)


def test_sync_free_is_checked():
    net = _net()
    with pytest.raises(ValueError, match="Invalid sync_free: 'yes'"):
        whiten.SPlus(net.parameters(), sync_free="yes")
    with pytest.raises(ValueError, match="Invalid sync_free: True .*SpecGD has no sync-free step"):
        whiten.optim._base.WhitenOptimizer.__init__(whiten.SpecGD.__new__(whiten.SpecGD), list(net.parameters()), {},
                                                    sync_free=True)


def test_prodigy_steps_with_zero_statistics_are_put_back_one_step_later():
    """Prodigy returns before its update where every statistic is zero (no gradient information yet: D, the step
    counts and k unchanged, the moments decayed). A sync-free step decides that on the device and its Python side
    (step counts, k) is put back when read, one step later: the default path's state."""
    def run(sync_free):
        net = _net(torch.float64)
        opt = _make("Prodigy", net, sync_free)
        out = []
        for t in range(8):
            opt.zero_grad()
            loss = net(torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(t))).square().mean()
            (loss * (0.0 if t < 4 else 1.0)).backward()  # zero gradients for the first four steps
            opt.step()
            if t in (3, 7):
                out.append(copy.deepcopy(opt.state_dict()))
        return out

    (zero_a, end_a), (zero_b, end_b) = run(False), run(True)
    assert zero_a["param_groups"][0]["k"] == 0 and {s["step"] for s in zero_a["state"].values()} == {0}
    _assert_same_state(zero_a, zero_b)  # bit for bit: nothing of D computed yet
    _assert_same_state(end_a, end_b, _tolerance("Prodigy", dict(dtype=torch.float64)))
    assert end_b["param_groups"][0]["k"] == 4
