"""Wrappers that hand the optimizer flattened slices of the parameters instead of the parameters: FSDP1
(``FullyShardedDataParallel``, accelerate's default FSDP) and DeepSpeed ZeRO. A matrix optimizer would step each
slice as a vector, elementwise, with other numbers than one process and without a word: every optimizer refuses
them, at construction or at the first step, before any state or parameter changes, and says what to use instead.

FSDP1 and DeepSpeed (ZeRO stages 1, 2 and 3, fp32 and bf16, on the CPU accelerator) run for real here: gloo, 2
forked processes. The single-process tests below reproduce DeepSpeed's hand-over on the tensors it gives the
optimizer, so the rules are also checked where DeepSpeed is not installed: ZeRO-1/2 and its bf16 optimizer put one
flat fp32 slice of each group, a plain tensor, in place of the group's parameters (ZeRO-1/2 then call ``step()``
with one group at a time); ZeRO-3 partitions the parameters in place and marks them and its slices with ``ds_id``."""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
import time

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import whiten
from dist_utils import launch
from test_suite import ALL, NEEDS_MODEL, OPTIMIZERS, model_kw

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # FSDP1's deprecation notice


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def loss_of(model) -> torch.Tensor:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    return model(x).square().mean()


def build(name, model, params=None):
    return OPTIMIZERS[name](whiten.param_groups(model) if params is None else params, **model_kw(name, model))


def _fsdp1_at_construction(rank, world, names, use_orig_params):
    model = FSDP(make_mlp(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    messages = {}
    for name in names:
        with pytest.raises(ValueError) as e:
            build(name, model, params=list(model.parameters()))
        messages[name] = str(e.value)
    return messages


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_is_refused_at_construction(use_orig_params):
    for messages in launch(_fsdp1_at_construction, 2, ALL, use_orig_params, timeout=180):
        for name, message in messages.items():
            assert "FSDP1" in message and "fully_shard" in message, (name, message)
            assert "parameter 0 of group 0" in message, (name, message)


def _fsdp1_after_construction(rank, world, names):
    out = {}
    for name in names:
        plain = make_mlp()
        opt = build(name, plain)
        model = FSDP(plain, use_orig_params=True, device_id=torch.device("cpu"))  # the same tensors, now 1-D slices
        loss_of(model).backward()
        before = [p.detach().clone() for p in plain.parameters()]
        with pytest.raises(ValueError) as e:
            opt.step()
        out[name] = (str(e.value), all(torch.equal(a, p) for a, p in zip(before, plain.parameters())),
                     sum(len(s) for s in opt.state.values()))
    return out


def test_fsdp1_wrapped_after_construction_is_refused_at_the_first_step():
    for out in launch(_fsdp1_after_construction, 2, ALL, timeout=180):
        for name, (message, unchanged, state) in out.items():
            assert "now comes from FSDP1" in message, (name, message)
            assert unchanged and state == 0, name


def zero12_handover(opt, rank=0, world=2) -> list[torch.Tensor]:
    """What DeepSpeed ZeRO-1/2 (and its bf16 optimizer) do to a client optimizer: each group's parameters,
    flattened and padded to a multiple of the world size, split in equal slices; this rank's slice, a plain fp32
    tensor with a gradient, replaces the group's parameter list."""
    slices = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).float()
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % world)])
        part = flat.chunk(world)[rank].clone().detach()
        part.requires_grad = True
        part.grad = torch.randn_like(part)
        group["params"] = [part]
        slices.append(part)
    return slices


@pytest.mark.parametrize("name", ALL)
def test_deepspeed_zero12_flat_slices_are_refused_at_the_first_step(name):
    model = make_mlp()
    opt = build(name, model)
    slices = zero12_handover(opt)
    before = [s.detach().clone() for s in slices]
    with pytest.raises(ValueError, match="DeepSpeed ZeRO") as e:
        opt.step()
    assert "group 0's 1 parameter of shape (32, 16) became 1 tensor of shape (256,)" in str(e.value)
    assert "flat fp32 slices" in str(e.value) and "fully_shard" in str(e.value)
    assert all(torch.equal(a, s) for a, s in zip(before, slices)) and not opt.state
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):  # and again: nothing was accepted on the way
        opt.step()


@pytest.mark.parametrize("name", ALL)
def test_deepspeed_zero3_partitioned_parameters_are_refused(name):
    model = make_mlp()
    for i, p in enumerate(model.parameters()):
        p.ds_id = i  # what ZeRO-3's partitioning marks every parameter with
    with pytest.raises(ValueError, match="parameter 0 of group 0 .* DeepSpeed ZeRO-3") as e:
        build(name, model)
    assert "FSDP2" in str(e.value)


def test_a_marked_tensor_put_into_a_group_later_is_caught():
    model = make_mlp()
    opt = whiten.SPlus(model.parameters(), lr=0.1)
    loss_of(model).backward()
    opt.step()
    q = nn.Parameter(model[0].weight.detach().clone())  # same shape, partitioned by ZeRO-3 after construction
    q.ds_id = 0
    q.grad = model[0].weight.grad.clone()
    opt.param_groups[0]["params"][0] = q
    with pytest.raises(ValueError, match=r"step\(\): parameter 0 of group 0 .* now comes from DeepSpeed ZeRO-3"):
        opt.step()


@pytest.mark.parametrize("name", [n for n in ALL if n not in NEEDS_MODEL])  # K-FAC's hooks are on the model
def test_parameters_replaced_by_same_shaped_ones_are_checked_and_stepped(name):
    """accelerate builds the optimizer before wrapping the model and then swaps in the wrapped model's parameters
    (same shapes): that is not a flattening, and the optimizer steps them as if built on them."""
    model, twin, ref = make_mlp(), make_mlp(), make_mlp()
    opt, control = build(name, model), build(name, ref)
    new = dict(zip(map(id, model.parameters()), twin.parameters()))
    for g in opt.param_groups:
        g["params"] = [new[id(p)] for p in g["params"]]
    for o, m in ((opt, twin), (control, ref)):
        for _ in range(3):
            o.zero_grad()
            loss_of(m).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), ref.parameters())), name
    bad = torch.zeros(opt.param_groups[0]["params"][0].shape, dtype=torch.int64)
    opt.param_groups[0]["params"][0] = bad  # a replacement must pass construction's checks too
    with pytest.raises(ValueError, match="needs floating-point parameters"):
        opt.step()


def test_a_group_that_shrinks_around_a_same_shaped_slice_is_refused():
    """ZeRO-1/2's slice of a group of vectors can have the shape of the group's first vector (two (16,) biases on 2
    ranks give one (16,) slice): the group lost a tensor, so it is refused all the same, before any state."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    vectors = [p for p in model.parameters() if p.ndim == 1]
    opt = whiten.SPlus([{"params": vectors, "weight_decay": 0.0},
                        {"params": [p for p in model.parameters() if p.ndim > 1]}], lr=0.1)
    zero12_handover(opt)
    assert opt.param_groups[0]["params"][0].shape == vectors[0].shape
    with pytest.raises(ValueError, match=r"group 0's 2 parameters of shapes \(16,\), \(16,\) became 1 tensor of "
                                         r"shape \(16,\)\. DeepSpeed ZeRO-1/2"):
        opt.step()
    assert not opt.state


def test_groups_handed_over_one_at_a_time_are_refused_at_the_first():
    """ZeRO-1/2 call ``step()`` once per group with ``param_groups`` holding that group alone: the first call is
    refused, and a later group at place 0 is compared with its own validated parameters, not group 0's."""
    model = make_mlp()
    opt = build("SPlus", model)
    groups = opt.param_groups
    zero12_handover(opt)
    for k, was in ((0, "1 parameter of shape (32, 16)"), (2, "2 parameters of shapes (32,), (8,)")):
        opt.param_groups = [groups[k]]
        with pytest.raises(ValueError) as e:
            opt.step()
        assert f"group {k}'s {was} became 1 tensor of shape (" in str(e.value), str(e.value)
    assert not opt.state


def test_load_state_dict_does_not_launder_flat_slices():
    """DeepSpeed resumes a ZeRO-1/2 checkpoint with the client optimizer's ``load_state_dict`` while its groups hold
    the slices: the slices are still compared with the parameters validated at construction."""
    model = make_mlp()
    opt = build("SPlus", model)
    zero12_handover(opt)
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-1/2"):
        opt.step()
    assert not opt.state


def test_validated_parameters_may_leave_and_come_back():
    """ZeRO-3 empties the groups between steps, and a wrapper may drop an empty group: tensors validated before are
    not replacements."""
    model = make_mlp()
    opt = build("SPlus", model)
    saved = [list(g["params"]) for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = []
    opt.step()
    for g, params in zip(opt.param_groups, saved):
        g["params"] = params
    loss_of(model).backward()
    opt.step()
    assert len(opt.state) == sum(map(len, saved))


# ----- real DeepSpeed ----------------------------------------------------------------------------------------------

@pytest.fixture
def deepspeed_installed():
    """DeepSpeed is part of the test setup: a missing one fails these tests rather than skipping them. It is imported
    only in the workers (its import picks an accelerator), so this looks it up without importing it."""
    assert importlib.util.find_spec("deepspeed") is not None, "deepspeed is missing: run scripts/setup.sh"


needs_deepspeed = pytest.mark.usefixtures("deepspeed_installed")
WORLD = 2


def ds_config(stage: int, precision: str = "fp32") -> dict:
    """ZeRO ``stage`` (0: DeepSpeed's data parallelism without ZeRO). ``precision``: fp32; fp32-offload (the
    optimizer's slices on the CPU); bf16 (ZeRO's own bf16 path); bf16-fp32-grads (stage 1: DeepSpeed's
    BF16_Optimizer, which keeps fp32 gradients)."""
    config = {"train_batch_size": 2 * WORLD, "train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision.startswith("bf16")},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    if precision == "bf16-fp32-grads":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if precision == "fp32-offload":
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _full_params(deepspeed, engine, stage) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if stage == 3:  # partitioned: shape (0,) outside a forward pass
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def _deepspeed_case(deepspeed, rank, stage, precision, name, groups, checkpoints):
    """One engine: ``deepspeed.initialize`` with a whiten optimizer built before it, then one training step.
    Returns (the ValueError's message or None, parameters unchanged, optimizer state entries, parameters)."""
    if groups == "vectors first":  # a group of two (16,) biases: its slice on 2 ranks is (16,) too
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        opt = build(name, model, [{"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
                                  {"params": [p for p in model.parameters() if p.ndim > 1]}])
    else:
        model = make_mlp()
        opt = build(name, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, precision))
    if groups == "resumed":  # a DeepSpeed checkpoint loaded before the first step
        tag = f"zero{stage}-{precision}-{name}"
        engine.save_checkpoint(checkpoints, tag=tag)
        engine.load_checkpoint(checkpoints, tag=tag)
    before = _full_params(deepspeed, engine, stage)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x.to(next(engine.module.parameters()).dtype)).float().square().mean())
    message = None
    try:
        engine.step()
    except ValueError as e:
        message = str(e)
    after = _full_params(deepspeed, engine, stage)
    return message, all(torch.equal(a, b) for a, b in zip(before, after)), len(opt.state), after


def _deepspeed_worker(rank, world, cases, construction_names, checkpoints):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))  # deepspeed.initialize asks for LOCAL_RANK
    import deepspeed

    gc.freeze()  # DeepSpeed calls gc.collect() for every engine; the objects forked from pytest need no visits

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce for inference (C++, with ninja)
    # on its first init_distributed; training never uses it, and the tests need no compiler
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed takes over the gloo group launch() made
    out = {"seconds": {}}
    start = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):  # ZeRO-3 partitions parameters as they are made
        model = make_mlp()
    out["construction"] = {}
    for name in construction_names:
        try:
            build(name, model)
            out["construction"][name] = None
        except ValueError as e:
            out["construction"][name] = str(e)
    out["seconds"]["construction"] = time.perf_counter() - start
    for case in cases:
        start = time.perf_counter()
        try:
            out[case] = _deepspeed_case(deepspeed, rank, *case, checkpoints)
        except Exception as e:  # noqa: BLE001 - reported by the case's test
            out[case] = (f"unexpected {type(e).__name__}: {e}", None, None, None)
        out["seconds"][case] = time.perf_counter() - start
    return out


# (ZeRO stage, precision, optimizer, groups): every optimizer under ZeRO-1, -2 and -3 and under ZeRO-2 in bf16;
# DeepSpeed's BF16_Optimizer (ZeRO-1, bf16 with fp32 gradients), ZeRO-3 in bf16 and both with the optimizer offloaded
# to the CPU; a group of vectors whose slice has the shape of its first vector; a DeepSpeed checkpoint loaded before
# the first step (DeepSpeed puts its state back with the optimizer's load_state_dict, its groups holding the slices)
REFUSED = ([(stage, "fp32", name, "param_groups") for stage in (1, 2, 3) for name in ALL]
           + [(2, "bf16", name, "param_groups") for name in ALL]
           + [(1, "bf16-fp32-grads", name, "param_groups") for name in ("SPlus", "Prodigy", "KFAC")]
           + [(3, "bf16", "SPlus", "param_groups"), (2, "fp32-offload", "SPlus", "param_groups"),
              (3, "fp32-offload", "SPlus", "param_groups")]
           + [(stage, "fp32", name, "vectors first") for stage, name in ((1, "SPlus"), (2, "SPlus"), (2, "Prodigy"))]
           + [(stage, "fp32", "SPlus", "resumed") for stage in (1, 2, 3)]
           + [(1, "bf16-fp32-grads", "SPlus", "resumed")])
STEPPED = [(0, precision, name, "param_groups") for precision in ("fp32", "bf16") for name in ("SPlus", "Muon")]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """Every case on one launch of 2 processes: DeepSpeed's import and first engine cost seconds, later engines
    hundredths."""
    start = time.perf_counter()
    results = launch(_deepspeed_worker, WORLD, REFUSED + STEPPED, ALL, str(tmp_path_factory.mktemp("deepspeed")),
                     timeout=300)
    print(f"DeepSpeed cases: {time.perf_counter() - start:.1f} s")
    return results


def _case_id(case) -> str:
    stage, precision, name, groups = case
    return f"zero{stage}-{precision}-{name}-{groups.replace(' ', '-')}"


@needs_deepspeed
@pytest.mark.parametrize("case", REFUSED, ids=_case_id)
def test_deepspeed_zero_is_refused_at_the_first_step(deepspeed_runs, case):
    stage, precision, name, groups = case
    for rank, out in enumerate(deepspeed_runs):
        message, unchanged, state, _ = out[case]
        assert message is not None and "DeepSpeed ZeRO" in message, (rank, message)
        assert "FSDP2" in message and "fully_shard" in message and "DDP" in message, (rank, message)
        assert unchanged and state == 0, (rank, unchanged, state)
        if stage == 3:
            assert f"{name}.step(): parameter 0 of group 0" in message, (rank, message)
            assert "now comes from DeepSpeed ZeRO-3" in message, (rank, message)
        elif groups == "vectors first":
            assert "group 0's 2 parameters of shapes (16,), (16,) became 1 tensor of shape (16,)" in message, message
        else:
            assert "group 0's 1 parameter of shape (32, 16) became 1 tensor of shape (256,)" in message, message
            assert "hands the optimizer flat fp32 slices" in message, message


@needs_deepspeed
def test_deepspeed_zero3_partitioned_parameters_are_refused_at_construction(deepspeed_runs):
    for out in deepspeed_runs:
        for name, message in out["construction"].items():
            assert message is not None and "DeepSpeed ZeRO-3" in message and "FSDP2" in message, (name, message)


@needs_deepspeed
@pytest.mark.parametrize("case", STEPPED, ids=_case_id)
def test_deepspeed_without_zero_is_stepped(deepspeed_runs, case):
    """DeepSpeed's data parallelism without ZeRO hands the optimizer the parameters (fp32) or fp32 copies of them
    of the same shapes (bf16): not flattened, stepped, the same on every rank."""
    (m0, unchanged0, state0, after0), (m1, _, state1, after1) = (out[case] for out in deepspeed_runs)
    assert m0 is None and m1 is None, (m0, m1)
    assert not unchanged0 and state0 == state1 == 4
    assert all(torch.equal(a, b) for a, b in zip(after0, after1))
