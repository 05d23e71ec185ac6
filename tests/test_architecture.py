"""docs/architecture.md's example optimizer, run as written: what the shared machinery gives an optimizer that writes
only its math (convergence, exact resume, bf16 parameters with float32 state, refused checkpoints, FSDP2 with the
numbers of one process)."""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import whiten
from dist_utils import full, launch, shard_like

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def sign_descent():
    """The class defined by the doc's one Python block."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/architecture.md should hold one Python block: the example optimizer"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    return namespace["SignDescent"]


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 11)).to(dtype)


def loss_of(model, t):
    idx = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(t))
    return nn.functional.cross_entropy(model(idx).float().reshape(-1, 11), idx.roll(1, 1).reshape(-1))


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def test_the_example_trains_and_resumes_exactly():
    SignDescent = sign_descent()
    model = make_model()
    opt = SignDescent(whiten.param_groups(model), lr=3e-3)
    first = loss_of(model, 0).item()
    train(model, opt, 60)
    assert loss_of(model, 0).item() < first
    twin = copy.deepcopy(model)
    twin_opt = SignDescent(whiten.param_groups(twin), lr=3e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 5, start=60)
    train(twin, twin_opt, 5, start=60)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_example_keeps_float32_state_for_bf16_and_refuses_other_checkpoints():
    SignDescent = sign_descent()
    model = make_model(torch.bfloat16)
    opt = SignDescent(whiten.param_groups(model), lr=3e-3)
    train(model, opt, 3)
    assert all(s["momentum"].dtype == torch.float32 for s in opt.state.values())
    other = whiten.SPlus(whiten.param_groups(make_model()), lr=0.1)
    with pytest.raises(ValueError, match="SPlus's, not a SignDescent's"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="momentum"):
        SignDescent(whiten.param_groups(model), momentum=1.0)


def _fsdp_equals_one_process(rank, world):
    SignDescent = sign_descent()
    single, sharded, ref = make_model(), make_model(), make_model()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    opts = [SignDescent(whiten.param_groups(m), lr=3e-3) for m in (single, sharded)]
    for t in range(5):
        ref.load_state_dict({n: full(p).detach() for n, p in sharded.state_dict().items()})
        ref.zero_grad()
        loss_of(ref, t).backward()
        grads = {n: q.grad for n, q in ref.named_parameters()}
        for m, o in zip((single, sharded), opts):
            for n, p in m.named_parameters():
                p.grad = shard_like(grads[n].clone(), p)
            o.step()
    return [n for (n, a), b in zip(single.named_parameters(), sharded.parameters()) if not torch.equal(a, full(b))]


def test_the_example_under_fsdp2_equals_one_process():
    assert launch(_fsdp_equals_one_process, 2, timeout=120) == [[], []]
    assert not dist.is_initialized()
