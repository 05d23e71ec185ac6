"""opt.memory_report(): the state each optimizer plans before the first step is the state it holds after it, per
role and kind, for every optimizer; a distributed run's reports add up to one process's; the options named are the
ones that govern the state present; whiten-bench records the state of each run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from dist_utils import launch
from test_suite import ALL, NEEDS_MODEL, OPTIMIZERS, model_kw
from whiten.optim.memory import state_kind

VOCAB, WIDTH = 40, 8


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.LayerNorm(2 * WIDTH),
                         nn.Linear(2 * WIDTH, WIDTH), nn.Linear(WIDTH, VOCAB, bias=False))


def step(model, opt, t=0):
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(t))
    opt.zero_grad()
    F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.roll(1, 1).reshape(-1)).backward()
    opt.step()


def build(name, model):
    return OPTIMIZERS[name](whiten.param_groups(model), **model_kw(name, model))


@pytest.mark.parametrize("name", ALL)
def test_the_planned_state_is_the_state_held_after_the_first_step(name):
    model = make_model()
    opt = build(name, model)
    planned = opt.memory_report()
    assert planned.planned and planned.state_bytes > 0 and planned.parameter_bytes == 4 * sum(
        p.numel() for p in model.parameters())
    step(model, opt)
    held = opt.memory_report()
    assert not held.planned
    assert sorted(planned.rows) == sorted(held.rows), name
    assert held.state_bytes == planned.state_bytes + held.global_bytes - planned.global_bytes
    text = str(held)
    assert name in text and "held" in text and f"{held.ratio:.1f}x" in text


def test_the_ratio_and_what_governs_it_on_a_vocabulary_model():
    """The issue's measurement: SPlus on a GPT-like model with an 8192-token vocabulary keeps ~50x its parameters,
    nearly all of it the embedding's and head's 8192-sided factors and bases, which max_dim governs."""
    model = nn.Sequential(nn.Embedding(8192, 256), nn.Linear(256, 256), nn.Linear(256, 8192, bias=False))
    report = whiten.SPlus(whiten.param_groups(model)).memory_report()
    assert 50 < report.ratio < 70  # 65x: two 8192x8192 factors and bases against 4.2M parameters
    assert report.by_kind()["factor"] + report.by_kind()["basis"] > 0.95 * report.state_bytes
    assert report.largest[0][1] == (8192, 256) and report.largest[0][2] in ("embedding", "head")
    options = {option: size for option, size, _ in report.options}
    assert options["max_dim"] == report.by_kind()["factor"] + report.by_kind()["basis"]
    assert options["ema_rate=None"] == report.by_kind()["ema"]
    smaller = whiten.SPlus(whiten.param_groups(model), max_dim=1024).memory_report()
    assert smaller.ratio < 5  # the 8192 sides lose their factor and basis, the 256 sides keep theirs
    assert {(role, kind): size for role, kind, _, size in smaller.rows}[("embedding", "factor")] == 256 * 256 * 4


def test_state_kinds_drop_sides_and_block_indices():
    assert [state_kind(k) for k in ("factor_left", "basis_right", "factor_0_1", "root_12_0", "exp_avg_sq",
                                    "factor_a", "inverse_1")] == [
        "factor", "basis", "factor", "root", "exp_avg_sq", "factor_a", "inverse"]


def _reports(rank, world, names):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name in names:
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = build(name, model)
        step(model, opt)
        out[name] = opt.memory_report().by_role()
    return out


def test_under_fsdp2_the_ranks_reports_add_up_to_one_process():
    names = ["SPlus", "Muon", "PSGDKron"]
    singles = {}
    for name in names:
        model = make_model()
        opt = build(name, model)
        step(model, opt)
        singles[name] = opt.memory_report().by_role()
    ranks = launch(_reports, 2, names, timeout=120)
    for name in names:
        summed = {}
        for by_role in ranks:
            for role, size in by_role[name].items():
                summed[role] = summed.get(role, 0) + size
        assert summed == singles[name], name
        assert all(by_role[name] != singles[name] for by_role in ranks)  # each rank holds a share


def test_whiten_bench_records_the_state_of_each_run():
    from whiten.bench.run import state_bytes

    model = make_model()
    adamw = torch.optim.AdamW(model.parameters())
    step(model, adamw)
    moments = 2 * 4 * sum(p.numel() for p in model.parameters())  # exp_avg and exp_avg_sq, float32
    assert moments <= state_bytes(adamw) <= moments + 8 * len(adamw.state)  # and a step count per parameter
    opt = build("SPlus", model)
    step(model, opt)
    assert state_bytes(opt) == opt.memory_report().state_bytes


@pytest.mark.parametrize("name", [n for n in ALL if n not in NEEDS_MODEL][:1])
def test_a_report_changes_nothing(name):
    model = make_model()
    opt = build(name, model)
    step(model, opt)
    before = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
              for p, s in opt.state.items()}
    opt.memory_report()
    for p, s in opt.state.items():
        assert all(torch.equal(v, before[id(p)][k]) if isinstance(v, torch.Tensor) else v == before[id(p)][k]
                   for k, v in s.items())
