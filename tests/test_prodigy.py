"""Prodigy: bit-for-bit parity with prodigyopt 1.1.2 in float64 over its options, the estimate D readable, the
"Old Optimizer, New Norm" identity (no EMAs: sign descent with an adaptive step), the lr rule across groups, the
departures the docstring states, and one D for all ranks under DDP and FSDP2 (gloo)."""

from __future__ import annotations

import copy
import math

import prodigyopt
import pytest
import torch
import torch.distributed as dist
from torch import nn

import whiten
from dist_utils import full, launch, shard_like

SHAPES = [(5, 4), (4,), (3, 2), (7,)]


def _init(dtype=torch.float64, zero_last=False):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    if zero_last:
        init[-1].zero_()  # a parameter that starts at zero: the reference keeps p0 as a 0-dim zero
    return init


def _grads(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()  # the reference adds coupled decay into p.grad: give each its own copy
        opt.step()


def _groups(params, lrs=(1.0, 1.0), role="hidden", **extra):
    """Two groups; role "hidden" so whiten decays every parameter, as the reference does."""
    return [{"params": params[:2], "lr": lrs[0], "role": role, **extra},
            {"params": params[2:], "lr": lrs[1], "role": role, **extra}]


def _strip(groups):
    return [{k: v for k, v in g.items() if k != "role"} for g in groups]


OPTIONS = [
    {},
    dict(use_bias_correction=True, weight_decay=0.1, d_coef=2.0, growth_rate=1.05),
    dict(betas=(0.0, 0.99), decouple=False, weight_decay=0.1, safeguard_warmup=True, slice_p=3),
    dict(betas=(0.8, 0.9), beta3=0.5, d0=1e-3, eps=1e-6, weight_decay=0.05),
    dict(betas=(0.9, 0.999), decouple=False, weight_decay=0.3, use_bias_correction=True, slice_p=2),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("zero_last", [False, True])
def test_bit_for_bit_parity_with_prodigyopt_in_float64(options, zero_last):
    init = _init(zero_last=zero_last)
    grads = _grads(25)
    ref = [nn.Parameter(w.clone()) for w in init]
    ours = [nn.Parameter(w.clone()) for w in init]
    ref_opt = prodigyopt.Prodigy(_strip(_groups(ref)), **options)
    opt = whiten.Prodigy(_groups(ours), **options)
    for gs in grads:
        _run(ref_opt, ref, [gs])
        _run(opt, ours, [gs])
        assert opt.d == ref_opt.param_groups[0]["d"]  # the estimate, step by step
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k"):
        assert [g[key] for g in opt.param_groups] == [g[key] for g in ref_opt.param_groups], key
    assert opt.d > options.get("d0", 1e-6)  # it did adapt
    for a, b in zip(ours, ref):
        for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
            assert (key in opt.state[a]) == (key in ref_opt.state[b])
            if key in opt.state[a]:
                assert torch.equal(opt.state[a][key], ref_opt.state[b][key]), key


def test_a_group_at_lr_zero_matches_the_reference_where_it_is_frozen_there():
    """With β1 > 0 and no decay the reference leaves an lr=0 group in place too; the other group is identical."""
    init, grads = _init(), _grads(15)
    ref = [nn.Parameter(w.clone()) for w in init]
    ours = [nn.Parameter(w.clone()) for w in init]
    ref_opt = prodigyopt.Prodigy(_strip(_groups(ref, lrs=(0.5, 0.0))))
    opt = whiten.Prodigy(_groups(ours, lrs=(0.5, 0.0)))
    _run(ref_opt, ref, grads)
    _run(opt, ours, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert all(torch.equal(p, w) for p, w in zip(ours[2:], init[2:]))
    assert opt.d == ref_opt.param_groups[0]["d"]


def test_an_lr_zero_group_is_frozen_even_with_decay_and_no_momentum():
    """The stated departure: the reference still decays an lr=0 group and, with β1 = 0, steps it by g/eps."""
    init, grads = _init(), _grads(5)
    ours = [nn.Parameter(w.clone()) for w in init]
    opt = whiten.Prodigy(_groups(ours, lrs=(1.0, 0.0), weight_decay=0.1), betas=(0.0, 0.9))
    _run(opt, ours, grads)
    assert all(torch.equal(p, w) for p, w in zip(ours[2:], init[2:]))
    assert not torch.equal(ours[0], init[0])


def sign_descent_reference(init, grads, lr, d0):
    """Float64 sign descent whose step is lr·D, D = max(d0, max_k <g_k, x0 - x_k> / ||g_k||_1): Prodigy with
    β1 = β2 = β3 = 0 and ε → 0, written from the rule (ALGORITHMS.md §9)."""
    x0 = torch.cat([w.reshape(-1) for w in init])
    x, d = x0.clone(), d0
    for gs in grads:
        g = torch.cat([t.reshape(-1) for t in gs])
        d = max(d, torch.dot(g, x0 - x).item() / g.abs().sum().item())
        x = x - lr * d * torch.sign(g)
    return x, d


@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_without_emas_prodigy_is_sign_descent_with_an_adaptive_step(lr):
    init = _init()
    # gradients pulling towards a point far away, so the distance travelled, and D, keep growing
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) + 2.0 for s in SHAPES] for _ in range(40)]
    ours = [nn.Parameter(w.clone()) for w in init]
    opt = whiten.Prodigy([{"params": ours, "role": "hidden"}], lr=lr, betas=(0.0, 0.0), eps=1e-30)
    _run(opt, ours, grads)
    x, d = sign_descent_reference(init, grads, lr, 1e-6)
    got = torch.cat([p.detach().reshape(-1) for p in ours])
    assert d > 1e-3  # D adapted by orders of magnitude
    assert opt.d == pytest.approx(d, rel=1e-10, abs=0)
    assert torch.allclose(got, x, rtol=0, atol=1e-10 * x.abs().max().item())


def test_zero_gradients_leave_everything_but_the_state_init():
    """The reference returns before stepping while no gradient information exists (sum of |s| = 0)."""
    params = [nn.Parameter(w.clone()) for w in _init()]
    opt = whiten.Prodigy(_groups(params))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.d == 1e-6 and opt.param_groups[0]["k"] == 0
    assert all(opt.state[p]["step"] == 0 for p in params)


# ----- the lr rule and the shared settings ---------------------------------------------------------------------------


def test_different_lrs_across_groups_are_refused_with_the_rule():
    params = [nn.Parameter(w.clone()) for w in _init()]
    with pytest.raises(ValueError, match=r"group 1 has lr 0.5 but group 0 has lr 1.0.*same lr.*d_coef.*lr=0"):
        whiten.Prodigy(_groups(params, lrs=(1.0, 0.5)))
    with pytest.raises(ValueError, match=r"group 0 has lr 0.5 but group 1 has lr 1.0"):
        whiten.Prodigy(_groups(params, lrs=(0.5, 1.0)))
    opt = whiten.Prodigy(_groups(params, lrs=(1.0, 0.0)))  # 0 freezes a group: allowed
    with pytest.raises(ValueError, match="same lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": 2.0})
    assert len(opt.param_groups) == 2


def test_an_lr_written_into_one_group_is_refused_at_the_step_before_anything_changes():
    params = [nn.Parameter(w.clone()) for w in _init()]
    opt = whiten.Prodigy(_groups(params))
    _run(opt, params, _grads(2))
    before = [p.detach().clone() for p in params]
    d = opt.d
    opt.param_groups[1]["lr"] = 0.1
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    with pytest.raises(ValueError, match="group 1 has lr 0.1.*a scheduler or a write"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and opt.d == d


def test_a_scheduler_scaling_every_group_alike_is_fine():
    params = [nn.Parameter(w.clone()) for w in _init()]
    opt = whiten.Prodigy(_groups(params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for gs in _grads(5):
        _run(opt, params, [gs])
        sched.step()
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == 1.0 / 6


@pytest.mark.parametrize("key,value", [("betas", (0.5, 0.9)), ("d_coef", 2.0), ("d0", 1e-4), ("decouple", False)])
def test_settings_of_the_one_estimate_must_agree_across_groups(key, value):
    params = [nn.Parameter(w.clone()) for w in _init()]
    groups = _groups(params)
    groups[1][key] = value
    with pytest.raises(ValueError, match=f"group 1 has {key}=.*every group must have the same value"):
        whiten.Prodigy(groups)


def test_a_checkpoint_breaking_the_rule_is_refused_before_anything_changes():
    params = [nn.Parameter(w.clone()) for w in _init()]
    opt = whiten.Prodigy(_groups(params))
    _run(opt, params, _grads(3))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.25
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="load_state_dict: group 1 has lr 1.0 but group 0 has lr 0.25"
                                         "|load_state_dict: group 0 has lr 0.25"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == before["param_groups"][0]["lr"]


def test_bad_arguments_are_refused_by_name():
    p = [nn.Parameter(torch.randn(3))]
    for bad, match in [(dict(d0=0.0), "d0"), (dict(growth_rate=0.5), "growth_rate"), (dict(slice_p=0), "slice_p"),
                       (dict(eps=0.0), "eps"), (dict(beta3=1.0), "beta3"), (dict(d_coef=-1.0), "d_coef")]:
        with pytest.raises(ValueError, match=match):
            whiten.Prodigy(p, **bad)
    whiten.Prodigy(p, growth_rate=math.inf)  # the default: unrestricted


# ----- state and departures ------------------------------------------------------------------------------------------


def test_coupled_decay_leaves_p_grad_alone():
    params = [nn.Parameter(w.clone()) for w in _init()]
    opt = whiten.Prodigy(_groups(params), decouple=False, weight_decay=0.5)
    grads = _grads(2)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_bf16_parameters_keep_float32_state_and_need_a_larger_d0():
    """The docstring's caveat: from d0 = 1e-6 the steps are below bfloat16's resolution, x never leaves x0 and D
    never grows (prodigyopt, which steps in bfloat16 too, stays there as well); from d0 = 1e-2 it takes off."""
    init = _init(torch.float32)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g) + 2.0 for s in SHAPES] for _ in range(12)]
    d = {}
    for dtype, d0 in ((torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.bfloat16, 1e-2)):
        params = [nn.Parameter(w.to(dtype, copy=True)) for w in init]
        opt = whiten.Prodigy(_groups(params), d0=d0)
        _run(opt, params, [[t.to(dtype) for t in gs] for gs in grads])
        assert all(p.dtype == dtype for p in params)
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        d[dtype, d0] = opt.d
    assert d[torch.float32, 1e-6] > 1e-2
    assert d[torch.bfloat16, 1e-6] == 1e-6
    assert d[torch.bfloat16, 1e-2] > 1.0


def test_the_estimate_resumes_exactly_from_a_state_dict():
    init, grads = _init(), _grads(10)
    full = [nn.Parameter(w.clone()) for w in init]
    _run(whiten.Prodigy(_groups(full)), full, grads)
    first = [nn.Parameter(w.clone()) for w in init]
    opt = whiten.Prodigy(_groups(first))
    _run(opt, first, grads[:5])
    sd = copy.deepcopy(opt.state_dict())
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = whiten.Prodigy(_groups(second))
    opt2.load_state_dict(sd)
    assert opt2.d == opt.d
    _run(opt2, second, grads[5:])
    assert all(torch.equal(a, b) for a, b in zip(second, full))


def _repeated_gradient(seed=0):
    """The issue's case: 12 blocks of Linear(32, 32) + LayerNorm(32), one backward, then the same gradient stepped
    again and again (a loss with no finite minimum along it: D grows geometrically)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32)) for _ in range(12)])
    model(torch.randn(16, 32)).square().mean().backward()
    return model


def _ds(opt, steps):
    ds = []
    for _ in range(steps):
        try:
            opt.step()
        except RuntimeError as e:
            return ds, e
        ds.append(opt.param_groups[0]["d"])
    return ds, None


def test_d_is_held_finite_where_the_reference_overflows():
    """prodigyopt raises from inside its step once D²·lr/d0 passes float32's range (D ≈ 1.8e16, step 56); whiten is
    the reference bit for bit until D reaches its limit √(√max_float32 · d0 / lr) ≈ 4.3e6 and is held there,
    counted at every step that binds and warned about once, every parameter and state entry finite."""
    ref_model, model = _repeated_gradient(), _repeated_gradient()
    ref_ds, error = _ds(prodigyopt.Prodigy(ref_model.parameters()), 100)
    assert isinstance(error, RuntimeError) and "overflow" in str(error) and len(ref_ds) == 56
    assert ref_ds[-1] > 1e16

    opt = whiten.Prodigy(model.parameters())
    limit = math.sqrt(math.sqrt(torch.finfo(torch.float32).max) * 1e-6)
    with pytest.warns(RuntimeWarning, match="D reached 4.29e\\+06") as caught:
        ds, error = _ds(opt, 100)
    assert error is None and len([w for w in caught if "D reached" in str(w.message)]) == 1
    held = [i for i, d in enumerate(ref_ds) if d > limit]
    assert held and ds[:held[0]] == ref_ds[:held[0]]  # the reference's estimate, step by step, below the limit
    assert ds[held[0]:] == [limit] * (100 - held[0])
    assert opt.param_groups[0]["d_capped"] == 100 - held[0] and opt.d == limit
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert all(math.isfinite(opt.param_groups[0][k]) for k in ("d_max", "d_numerator", "d_denom", "d_hat"))


@pytest.mark.parametrize("options", [dict(weight_decay=0.01), dict(weight_decay=0.1, use_bias_correction=True, d0=10.0),
                                     dict(betas=(0.0, 0.99), safeguard_warmup=True, slice_p=3)])
def test_d_stays_where_decoupled_decay_and_every_option_keep_the_step_finite(options):
    """With decoupled decay, x -= λ·D·lr·x multiplies x by more than 1 in size once λ·D·lr > 2 (the parameters
    then overflow within a few steps, in the reference too): D is held at λ·D·lr·b ≤ 1."""
    model = _repeated_gradient()
    opt = whiten.Prodigy(model.parameters(), **options)
    with pytest.warns(RuntimeWarning, match="D reached"):
        ds, error = _ds(opt, 120)
    assert error is None and opt.param_groups[0]["d_capped"] > 0
    if "weight_decay" in options:
        k = opt.param_groups[0]["k"] - 1  # the bias correction of the last step
        beta1, beta2 = opt.param_groups[0]["betas"]
        b = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if options.get("use_bias_correction") else 1.0
        assert opt.d * options["weight_decay"] * b <= 1.0 + 1e-12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_the_held_count_resumes_and_old_checkpoints_load():
    model = _repeated_gradient()
    opt = whiten.Prodigy(model.parameters())
    with pytest.warns(RuntimeWarning, match="D reached"):
        _ds(opt, 40)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["d_capped"] == opt.param_groups[0]["d_capped"] > 0
    again = whiten.Prodigy(model.parameters())
    again.load_state_dict(sd)
    assert [g["d_capped"] for g in again.param_groups] == [g["d_capped"] for g in opt.param_groups]
    for group in sd["param_groups"]:  # a checkpoint from before the count existed
        del group["d_capped"]
    old = whiten.Prodigy(model.parameters())
    old.load_state_dict(sd)
    with pytest.warns(RuntimeWarning, match="D reached"):
        old.step()
    assert old.param_groups[0]["d_capped"] == 1
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["d_capped"] = -1
    with pytest.raises(ValueError, match="d_capped"):
        old.load_state_dict(bad)


# ----- distributed: one D everywhere ---------------------------------------------------------------------------------


def _distributed_d(rank, world, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 5), nn.Linear(5, 5, bias=False))
    single = copy.deepcopy(model)
    if mode == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = whiten.Prodigy(whiten.param_groups(model), weight_decay=0.01)
    else:
        opt = whiten.Prodigy(whiten.param_groups(model), weight_decay=0.01, process_group=dist.group.WORLD)
    # the reference on one process, with the same groups (param_groups gives the vector role weight_decay=0)
    ref = prodigyopt.Prodigy(_strip(whiten.param_groups(single)), weight_decay=0.01)
    ds = []
    for t in range(6):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(t))
        single.zero_grad()
        single(x).square().mean().backward()
        grads = {n: q.grad.clone() for n, q in single.named_parameters()}
        ref.step()
        for n, p in model.named_parameters():
            g = grads[n]
            p.grad = shard_like(g, p)
        opt.step()
        ds.append((opt.d, ref.param_groups[0]["d"]))
    params = {n: full(p).detach() for n, p in model.named_parameters()}
    same = all(torch.equal(params[n], q) for n, q in single.named_parameters())
    owners = opt.distributed_context().ranks_work()
    return ds, owners, same


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("ddp", 3), ("fsdp", 3)])
def test_one_estimate_on_every_rank_equal_to_one_process(mode, world):
    results = launch(_distributed_d, world, mode)
    for rank, (ds, owners, same) in enumerate(results):
        assert sum(w > 0 for w in owners) == world  # the parameters really are split
        for d_rank, d_reference in ds:
            assert d_rank == d_reference  # bit for bit: prodigyopt's D on one process
        assert same  # and its parameters
        assert ds == results[0][0]
    assert results[0][0][-1][0] > 1e-6
