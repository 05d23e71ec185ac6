"""Wrappers that hand the optimizer flattened slices of the parameters instead of the parameters: FSDP1
(``FullyShardedDataParallel``, accelerate's default FSDP) and DeepSpeed ZeRO. A matrix optimizer would step each
slice as a vector, elementwise, with other numbers than one process and without a word: every optimizer refuses
them, at construction or at the first step, before any state or parameter changes, and says what to use instead.

FSDP1 runs for real here (gloo, 2 processes). DeepSpeed does not (see docs/distributed.md), so its hand-over is
reproduced on the tensors it gives the optimizer: ZeRO-1/2 and its bf16 optimizer put one flat fp32 slice of each
group, a plain tensor, in place of the group's parameters and call ``step()`` (already inside
``deepspeed.initialize``); ZeRO-3 partitions the parameters in place and marks them with ``ds_id``."""

from __future__ import annotations

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
