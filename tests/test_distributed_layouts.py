"""Layouts past FSDP2 on CPU with gloo: tensor parallel on a 1-D mesh (``parallelize_module`` with
ColwiseParallel/RowwiseParallel, Shard(0) and Shard(1), the embedding and norm left plain), FSDP2 x TP on a 2x2 mesh
(``fully_shard(mesh=mesh["dp"])`` on the TP-parallelized model: FSDP2's ``_StridedShard`` over TP's Shard(0), and the
embedding and norms on the dp sub-meshes, one per TP rank), HSDP (``fully_shard`` on the 2x2 mesh: Replicate x
Shard(0)) and expert parallel (3-D expert weights sharded over the ep dim of an ep x tp mesh, beside TP, HSDP and
FSDP2-on-a-sub-mesh placements, and a one-row matrix that leaves three ranks empty). Each is stepped with the
single-process numbers bit for bit, and DCP checkpoints saved under FSDP2 x TP resume exactly under FSDP2, DDP and one
process, and back.

Every layout is fed the full-batch gradient of one process, laid out as the parameter by torch's own offsets
(checked against the parameter's values), so the optimizer is the only thing that can differ: a real forward under
TP sums partial products in another order than one process and gives other gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import whiten
from dist_utils import full, launch
from test_distributed import ALL, VOCAB, WIDTH, Net, batch, build, same

STEPS = 5
EXPERTS = 3  # uneven over 2 ep ranks


class MoENet(Net):
    """Net with a mixture-of-experts layer: 3-D expert weights (E, out, in), every expert used (a dense mixture,
    enough for gradients), and a one-row router-like matrix."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(EXPERTS, WIDTH, WIDTH) * 0.3)
        self.router = nn.Linear(WIDTH, 1, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc2(F.gelu(self.norm(self.fc1(x))))
        x = x + self.fc4(F.gelu(self.fc3(x)))
        gate = torch.sigmoid(self.router(x))
        x = x + gate * torch.einsum("btd,eod->bto", x, self.experts) / EXPERTS
        return self.head(x)


class Wide(Net):
    """Net with a 7-row matrix: its TP shards (4 and 3 rows) cut over 3 dp ranks leave one empty."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(WIDTH, 7, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.extra(x).sum(-1, keepdim=True) * 0.1
        x = x + self.fc2(F.gelu(self.norm(self.fc1(x))))
        x = x + self.fc4(F.gelu(self.fc3(x)))
        return self.head(x)


def make(kind, dtype):
    torch.manual_seed(0)
    return {"ep": MoENet, "wide": Wide}.get(kind, Net)().to(dtype)


TP_PLAN = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel(), "fc3": ColwiseParallel(), "fc4": RowwiseParallel(),
           "head": ColwiseParallel()}


def _distribute(model, name, mesh, placements):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    p = getattr(module, attr)
    setattr(module, attr, nn.Parameter(distribute_tensor(p.data, mesh, placements)))


def lay_out(model, kind):
    """Make ``model``'s parameters DTensors of layout ``kind`` ("single": leave them)."""
    world = dist.get_world_size() if kind != "single" else 1
    if kind == "tp":  # 1-D mesh; emb, norm and the biases of rowwise layers stay plain (replicated)
        parallelize_module(model, init_device_mesh("cpu", (world,)), TP_PLAN)
    elif kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif kind in ("fsdp_tp", "wide"):
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        extra = {"extra": ColwiseParallel()} if kind == "wide" else {}
        parallelize_module(model, mesh["tp"], {**TP_PLAN, **extra})
        fully_shard(model, mesh=mesh["dp"])
    elif kind == "hsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    elif kind == "ep":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
        _distribute(model, "experts", mesh, [Shard(0), Shard(1)])  # experts over ep, each expert's rows over tp
        _distribute(model, "router.weight", mesh, [Shard(0), Shard(0)])  # one row: three empty shards
        _distribute(model, "fc1.weight", mesh["ep"], [Shard(0)])  # FSDP2-like on the ep sub-mesh (two meshes)
        _distribute(model, "fc2.weight", mesh["tp"], [Shard(1)])  # rowwise TP on the tp sub-mesh
        _distribute(model, "fc3.weight", mesh, [Replicate(), Shard(0)])  # HSDP-like
        _distribute(model, "fc4.weight", mesh, [Shard(1), Shard(0)])
        _distribute(model, "head.weight", mesh, [Shard(0), Shard(1)])
    elif kind != "single":
        raise ValueError(kind)


def chunk_block(shape, mesh_shape, coordinate, placements) -> tuple:
    """``(offset, size)`` of a rank's block, found by cutting a tensor of indices with ``torch.chunk`` (the test's
    own oracle): mesh dims left to right, except FSDP2's _StridedShard, which cuts each TP shard again and so comes
    after the TP dims to its right. torch's ``_compute_local_shape_and_global_offset`` is used for the others, but
    it places uneven _StridedShard blocks elsewhere than FSDP2 does (7 rows on a (3, 2) mesh: it gives the rank at
    (2, 0) one row, FSDP2 gives it none)."""
    idx = torch.arange(math.prod(shape)).view(shape)
    order = [i for i, pl in enumerate(placements) if type(pl).__name__ != "_StridedShard"]
    order += [i for i, pl in enumerate(placements) if type(pl).__name__ == "_StridedShard"]
    for i in order:
        pl = placements[i]
        if isinstance(pl, Replicate):
            continue
        pieces = idx.chunk(mesh_shape[i], dim=pl.dim) if idx.shape[pl.dim] else ()
        idx = pieces[coordinate[i]] if coordinate[i] < len(pieces) else idx.narrow(pl.dim, 0, 0)
    if idx.numel() == 0:
        return None, tuple(idx.shape)
    first = idx.reshape(-1)[0].item()
    offset = []
    for n in reversed(shape):
        offset.insert(0, first % n)
        first //= n
    return tuple(offset), tuple(idx.shape)


def place(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Full tensor ``g`` laid out as parameter ``p``: this rank's block by :func:`chunk_block` (distribute_tensor
    does not take FSDP2's _StridedShard)."""
    if not isinstance(p, DTensor):
        return g
    mesh = p.device_mesh
    offset, shape = chunk_block(tuple(p.shape), tuple(mesh.shape), mesh.get_coordinate(), p.placements)
    local = g[tuple(slice(o, o + n) for o, n in zip(offset, shape))].contiguous() if offset else \
        g.new_empty(shape)
    return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def loss_of(model, idx):
    return F.cross_entropy(model(idx).float().reshape(-1, VOCAB), idx.roll(1, 1).reshape(-1))


class Runner:
    """A model laid out as ``kind`` ("single", "ddp", "fsdp", "tp", "fsdp_tp", "hsdp", "ep") and its optimizer,
    fed one process's full-batch gradient."""

    def __init__(self, name, kind, dtype=torch.float32, model_kind=None, **kw):
        self.model = make(model_kind or kind, dtype)
        self.ref = make(model_kind or kind, dtype)
        lay_out(self.model, "single" if kind == "ddp" else kind)
        for n, p in self.model.named_parameters():  # torch's offsets give this rank's values: place() is right
            assert torch.equal(place(full(p), p).to_local() if isinstance(p, DTensor) else p,
                               p.to_local() if isinstance(p, DTensor) else p), n
        self.opt = build(name, self.model, process_group=dist.group.WORLD if kind == "ddp" else None, **kw)

    def step(self, t):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, q in self.ref.named_parameters():
                q.copy_(full(params[n]))
        self.ref.zero_grad()
        loss_of(self.ref, batch(t)).backward()
        for n, q in self.ref.named_parameters():
            params[n].grad = place(q.grad.clone(), params[n])
        self.opt.step()

    def params(self):
        return {n: full(p).detach().clone() for n, p in self.model.named_parameters()}


def control(name, kind, steps=STEPS, dtype=torch.float32):
    r = Runner(name, "single", dtype, model_kind=kind)
    for t in range(steps):
        r.step(t)
    return r.params()


def _equal_to_one_process(rank, world, kind, names, dtype):
    out = {}
    for name in names:
        r = Runner(name, kind, dtype)
        for t in range(STEPS):
            r.step(t)
        ctx = r.opt.distributed_context()
        out[name] = (same(r.params(), control(name, kind, dtype=dtype)), dict(r.opt.counters), ctx.ranks_work(),
                     ctx.world)
    return out


@pytest.mark.parametrize("kind,world", [("tp", 2), ("fsdp_tp", 4), ("hsdp", 4), ("ep", 4)])
def test_bit_identical_to_one_process(kind, world):
    results = launch(_equal_to_one_process, world, kind, ALL, torch.float32, timeout=400)
    for name in ALL:
        for rank, res in enumerate(results):
            differ, counters, work, group_world = res[name]
            assert differ == [], f"{name}, {kind} on {world} ranks, rank {rank}: {differ} differ from one process"
            assert counters == results[0][name][1]  # counters agree across ranks
            assert group_world == world  # planned over every rank of the job
        assert sum(w > 0 for w in results[0][name][2]) == world  # every rank owns work


def test_fsdp_tp_on_a_3x2_mesh_where_torchs_offsets_are_not_fsdp2s():
    """dp 3 x tp 2: FSDP2 cuts each TP shard of a 7-row matrix (4 and 3 rows) into 2, 2, 0 and 1, 1, 1, and fc1's
    (5 and 5) into 2, 2, 1; torch's _compute_local_shape_and_global_offset gives the rank at (2, 0) one row of the
    7 where FSDP2 gives it none. whiten follows FSDP2 (and the runner checks each rank's values)."""
    names = ["SPlus", "SOAP", "Muon", "PSGDKron"]
    for rank, res in enumerate(launch(_equal_to_one_process, 6, "wide", names, torch.float32, timeout=400)):
        for name in names:
            assert res[name][0] == [], f"{name}, fsdp_tp@6, rank {rank}: {res[name][0]}"


def _overlapped(rank, world, kind, names):
    out = {}
    for name in names:
        r = Runner(name, kind)
        r.opt.overlap_exchanges = True  # off by default
        for t in range(STEPS):
            r.step(t)
        out[name] = same(r.params(), control(name, kind))
    return out


@pytest.mark.parametrize("kind,world", [("fsdp_tp", 4), ("hsdp", 4)])
def test_overlapped_exchanges_give_one_process_numbers(kind, world):
    """The exchanges issued group by group, asynchronously (``overlap_exchanges=True``), on 2-D layouts."""
    names = ["SPlus", "SOAP", "Muon", "Conda", "TNT"]
    for rank, res in enumerate(launch(_overlapped, world, kind, names, timeout=400)):
        for name in names:
            assert res[name] == [], f"{name}, {kind}@{world} overlapped, rank {rank}: {res[name]}"


@pytest.mark.parametrize("kind,world", [("tp", 2), ("fsdp_tp", 4)])
def test_bf16_parameters(kind, world):
    names = ["SPlus", "Muon", "SOAP", "ScheduleFreeAdamW"]
    for rank, res in enumerate(launch(_equal_to_one_process, world, kind, names, torch.bfloat16, timeout=300)):
        for name in names:
            assert res[name][0] == [], f"{name}, bf16 {kind}@{world}, rank {rank}: {res[name][0]}"


# ----- eval()/train() swaps and the non-finite policy on a 2-D mesh ------------------------------------------------

SWAPS = {"SPlus": {}, "ScheduleFreeAdamW": {}, "Muon": {"ema_rate": 0.9}}


def _swaps_and_nonfinite(rank, world, kind):
    out = {}
    for name, kw in SWAPS.items():
        runs = {k: Runner(name, k, model_kind=kind, **kw) for k in (kind, "single")}
        for r in runs.values():
            for t in range(STEPS):
                r.step(t)
            r.opt.eval()
        averaged = same(runs[kind].params(), runs["single"].params())
        for r in runs.values():
            r.opt.train()
        live = same(runs[kind].params(), runs["single"].params())
        # a non-finite gradient in the last block of fc1 (on one rank only) skips the step on every rank
        r = runs[kind]
        before = r.params()
        p = dict(r.model.named_parameters())["fc1.weight"]
        for q in r.model.parameters():
            q.grad = torch.zeros_like(q)
        if p.to_local().numel() and rank == world - 1:
            p.grad.to_local()[-1, -1] = float("inf")
        with pytest.warns(RuntimeWarning, match="non-finite"):
            r.opt.step()
        out[name] = (averaged, live, r.opt.counters["skipped_steps"], same(before, r.params()))
    return out


def test_eval_train_swaps_and_a_nonfinite_gradient_under_fsdp_tp():
    for rank, res in enumerate(launch(_swaps_and_nonfinite, 4, "fsdp_tp", timeout=300)):
        for name in SWAPS:
            assert res[name] == ([], [], 1, []), f"{name}, fsdp_tp@4, rank {rank}: {res[name]}"


def test_eval_train_swaps_and_a_nonfinite_gradient_under_ep():
    """The averages of the experts, kept per expert owner, swapped in and out as on one process."""
    for rank, res in enumerate(launch(_swaps_and_nonfinite, 4, "ep", timeout=300)):
        for name in SWAPS:
            assert res[name] == ([], [], 1, []), f"{name}, ep@4, rank {rank}: {res[name]}"


# ----- real TP forward/backward with sequence parallel: gradients placed as Partial ----------------------------------


class NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16, bias=False)
        self.fc2 = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _sequence_parallel(rank, world, names):
    """SequenceParallel leaves the norm's gradients Partial(sum): the owner must step their sum. Compared with one
    process stepping the gradients DTensor gives (full_tensor), so the model's own rounding is taken out."""
    from torch.distributed.tensor.parallel import SequenceParallel

    out = {}
    for name in names:
        torch.manual_seed(0)
        model, single = NormMLP(), NormMLP()
        single.load_state_dict(model.state_dict())
        parallelize_module(model, init_device_mesh("cpu", (world,)),
                           {"norm": SequenceParallel(), "fc1": ColwiseParallel(input_layouts=Shard(1)),
                            "fc2": RowwiseParallel(output_layouts=Shard(1))})
        opt, ref = build(name, model), build(name, single)
        partial = False
        for t in range(STEPS):
            x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            model(x.chunk(world, dim=1)[rank]).pow(2).mean().backward()  # this rank's part of the sequence
            partial |= any(type(p.grad.placements[0]).__name__ == "Partial" for p in model.parameters())
            for (n, p), q in zip(model.named_parameters(), single.parameters()):
                q.grad = p.grad.full_tensor()
            opt.step()
            ref.step()
        out[name] = (partial, same({n: full(p) for n, p in model.named_parameters()}, dict(single.named_parameters())))
    return out


def test_real_sequence_parallel_training_steps_the_reduced_gradients():
    names = ["SPlus", "SOAP", "Muon", "ScheduleFreeAdamW"]
    for rank, res in enumerate(launch(_sequence_parallel, 2, names)):
        for name in names:
            assert res[name] == (True, []), f"{name}, rank {rank}: {res[name]}"


# ----- DCP checkpoints across layouts -------------------------------------------------------------------------------

SAVE_AT = 3
DCP_NAMES = ALL


def _save(rank, world, kind, names, root, model_kind=None):
    for name in names:
        r = Runner(name, kind, model_kind=model_kind)
        for t in range(SAVE_AT):
            r.step(t)
        dcp.save({"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)},
                 checkpoint_id=f"{root}/{name}")
    return True


def _resume(rank, world, kind, names, root, model_kind=None):
    out = {}
    for name in names:
        r = Runner(name, kind, model_kind=model_kind)
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.load(sd, checkpoint_id=f"{root}/{name}")
        set_model_state_dict(r.model, sd["model"])
        set_optimizer_state_dict(r.model, r.opt, sd["optim"])
        for t in range(SAVE_AT, STEPS):
            r.step(t)
        out[name] = (same(r.params(), control(name, model_kind or kind)), dict(r.opt.counters))
    return out


def test_dcp_saved_under_fsdp_tp_resumes_under_fsdp_ddp_and_one_process_and_back(tmp_path):
    saved = str(tmp_path / "fsdp_tp")
    launch(_save, 4, "fsdp_tp", DCP_NAMES, saved, timeout=300)
    for kind, world in [("fsdp", 2), ("ddp", 3), ("hsdp", 4)]:
        results = launch(_resume, world, kind, DCP_NAMES, saved, timeout=300)
        res_0 = results[0]
        for rank, res in enumerate(results):
            for name in DCP_NAMES:
                assert res[name][0] == [], f"{name}: saved fsdp_tp@4, resumed {kind}@{world}, rank {rank}"
                assert res[name][1] == res_0[name][1]  # counters agree across ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers that saved
    try:
        for name in DCP_NAMES:
            assert _resume(0, 1, "single", [name], saved)[name][0] == [], f"{name}: saved fsdp_tp@4, resumed single"
    finally:
        torch.set_num_threads(threads)
    back = str(tmp_path / "fsdp")
    launch(_save, 2, "fsdp", DCP_NAMES, back, timeout=300)
    for rank, res in enumerate(launch(_resume, 4, "fsdp_tp", DCP_NAMES, back, timeout=300)):
        for name in DCP_NAMES:
            assert res[name][0] == [], f"{name}: saved fsdp@2, resumed fsdp_tp@4, rank {rank}"


# ----- expert parallel: each rank steps its experts ------------------------------------------------------------------


def _experts_owned(rank, world, names):
    out = {}
    for name in names:
        r = Runner(name, "ep")
        for t in range(2):
            r.step(t)
        ctx = r.opt.distributed_context()
        p = r.model.experts
        state = {k: (type(v).__name__, tuple(v.shape), tuple(v.placements), tuple(v.to_local().shape))
                 for k, v in r.opt.state[p].items() if isinstance(v, torch.Tensor)}
        out[name] = dict(units=[x.index for x in ctx.experts.get(p, [])], mine=[x.index for x in ctx.owned_experts(p)],
                         whole=p in ctx.full or p in ctx.owner, stand_ins=[tuple(t.shape) for t in
                                                                          ctx.expert_full.values()], state=state)
    return out


EP_NAMES = ["SPlus", "SOAP", "Shampoo", "Muon", "PSGDKron", "Scion", "SpecGD", "Conda", "TNT"]


def test_ep_each_rank_owns_its_experts_math():
    """Under EP on 4 ranks, the experts parameter (3, 6, 6) is no unit of the plan: each of its experts is, rank r
    steps expert r (rank 3 none), on a (6, 6) matrix; no rank assembles the whole (3, 6, 6) tensor; its state is a
    DTensor (3, ...) Shard(0) over the 4 ranks whose rows on rank r are expert r's."""
    results = launch(_experts_owned, 4, EP_NAMES, timeout=300)
    for name in EP_NAMES:
        for rank, res in enumerate(results):
            res = res[name]
            assert res["units"] == [0, 1, 2], name
            assert res["mine"] == ([rank] if rank < 3 else []), (name, rank)
            assert not res["whole"], name
            assert res["stand_ins"] == ([(WIDTH, WIDTH)] if rank < 3 else []), (name, rank)
            if rank == 3:
                assert res["state"] == {}, name  # owned elsewhere: the empty mark
                continue
            assert res["state"], name
            for key, (kind, shape, placements, local) in res["state"].items():
                assert kind == "DTensor" and shape[0] == EXPERTS and placements == (Shard(0),), (name, key)
                assert local == (1, *shape[1:]), (name, key)


def _full_state_under_ep(rank, world, names):
    out = {}
    for name in names:
        r = Runner(name, "ep")
        for t in range(3):
            r.step(t)
        report = str(r.opt.memory_report())  # this rank's share, from its rows of the experts' state
        sd = whiten.distributed.full_state_dict(r.opt)  # every rank calls it
        one = Runner(name, "single", model_kind="ep")
        for t in range(3):
            one.step(t)
        i = [n for n, _ in r.model.named_parameters()].index("experts")
        mine, ref = sd["state"][i], one.opt.state_dict()["state"][i]
        out[name] = (sorted(mine) == sorted(ref) and all(
            torch.equal(v, ref[k]) if isinstance(v, torch.Tensor) else v == ref[k] for k, v in mine.items()),
            "experts" in report)
    return out


def test_full_state_dict_under_ep_is_one_process_state():
    """``full_state_dict`` assembles the experts' rows from their owners: the one-process entry, bit for bit."""
    names = ["SOAP", "Muon", "PSGDKron"]
    for rank, res in enumerate(launch(_full_state_under_ep, 4, names, timeout=300)):
        for name in names:
            assert res[name] == (True, rank < 3), (name, rank)


EP_DCP_NAMES = ["SPlus", "SOAP", "Shampoo", "Muon", "PSGDKron", "ScheduleFreeAdamW", "Scion", "TNT"]


def test_dcp_saved_under_ep_resumes_under_ep_fsdp_and_one_process_and_back(tmp_path):
    """Experts' state saved per expert owner (a DTensor per parameter) resumes exactly under EP, under real FSDP2
    on 2 ranks (experts 0-1 on rank 0, 2 on rank 1), under DDP on 3 and in one process; and one process's
    checkpoint (a plain (E, ...) tensor per entry) resumes under EP."""
    saved = str(tmp_path / "ep")
    launch(_save, 4, "ep", EP_DCP_NAMES, saved, timeout=300)
    for kind, world in [("ep", 4), ("fsdp", 2), ("ddp", 3)]:
        for rank, res in enumerate(launch(_resume, world, kind, EP_DCP_NAMES, saved, "ep", timeout=300)):
            for name in EP_DCP_NAMES:
                assert res[name][0] == [], f"{name}: saved ep@4, resumed {kind}@{world}, rank {rank}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers that saved
    try:
        for name in EP_DCP_NAMES:
            assert _resume(0, 1, "single", [name], saved, "ep")[name][0] == [], f"{name}: saved ep@4, resumed single"
            _save(0, 1, "single", [name], str(tmp_path / "single"), "ep")
    finally:
        torch.set_num_threads(threads)
    for rank, res in enumerate(launch(_resume, 4, "ep", EP_DCP_NAMES, str(tmp_path / "single"), timeout=300)):
        for name in EP_DCP_NAMES:
            assert res[name][0] == [], f"{name}: saved single, resumed ep@4, rank {rank}"


# ----- each rank's block, against torch's own offsets ---------------------------------------------------------------


def test_blocks_match_torch_chunk_and_tile_every_layout():
    """local_block against cuts of an index tensor by torch.chunk (and torch's _compute_local_shape_and_global_offset
    where it agrees with FSDP2: not uneven _StridedShard) at every coordinate, for Shard on any dim, Replicate, two
    mesh dims on one tensor dim, FSDP2's _StridedShard over TP, uneven and empty pieces; the distinct blocks tile
    the tensor."""
    import itertools

    from torch.distributed.tensor.placement_types import _StridedShard

    from whiten.distributed.context import _tiles
    from whiten.distributed.layout import local_block

    cases = 0
    for shape in [(7, 5), (3, 10), (1, 6), (5, 2, 3)]:
        for mesh_shape in [(2,), (3,), (4,), (2, 2), (2, 3), (3, 2)]:
            kinds = [Replicate()] + [Shard(d) for d in range(len(shape))]
            for placements in itertools.product(kinds, repeat=len(mesh_shape)):
                placements = list(placements)
                if len(mesh_shape) == 2 and placements[0] == placements[1] == Shard(0) and shape[0] > 1:
                    variants = [placements, [_StridedShard(0, split_factor=mesh_shape[1]), Shard(0)]]
                else:
                    variants = [placements]
                for pl in variants:
                    blocks = set()
                    for coordinate in itertools.product(*[range(n) for n in mesh_shape]):
                        mine = local_block(shape, mesh_shape, list(coordinate), pl)
                        offset, size = chunk_block(shape, mesh_shape, coordinate, pl)
                        assert mine[1] == size, (shape, mesh_shape, pl, coordinate)
                        if not isinstance(pl[0], _StridedShard):
                            theirs = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), pl)
                            assert tuple(theirs[0]) == size, (shape, mesh_shape, pl, coordinate)
                        if all(size):  # an empty block's offset is never used
                            assert mine[0] == offset, (shape, mesh_shape, pl, coordinate)
                            blocks.add(mine)
                    assert _tiles(shape, blocks), (shape, mesh_shape, pl)
                    cases += 1
    assert cases > 150
    assert not _tiles((4, 4), {((0, 0), (2, 4)), ((1, 0), (2, 4))})  # overlap
    assert not _tiles((4, 4), {((0, 0), (2, 4))})  # gap


# ----- layouts that are refused, by name --------------------------------------------------------------------------


def _refused(rank, world):
    from torch.distributed.tensor import Partial

    mesh = init_device_mesh("cpu", (world,))
    model = Net()
    model.fc3.weight = nn.Parameter(DTensor.from_local(model.fc3.weight.data.clone(), mesh, [Partial()],
                                                       run_check=False))
    opt = whiten.SPlus(whiten.param_groups(model))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return None


def test_a_layout_that_is_not_blocks_is_refused_by_name():
    for message in launch(_refused, 2):
        assert message is not None and "Partial" in message and "Shard(d)" in message, message


def _sampling_under_tp(rank, world, name):
    model = make("tp", torch.float32)
    lay_out(model, "tp")
    opt = build(name, model)
    logits = model.head(model.emb(batch(0)))
    try:
        opt.sample_fisher(logits)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name", ["TNT", "Sophia"])
def test_sampled_curvature_under_tensor_parallel_is_refused(name):
    """TP ranks share their batch and labels: sampled gradients would be counted once per rank. Refused by name."""
    for res in launch(_sampling_under_tp, 2, name):
        assert res is not None and "placed as (Shard(dim=1),)" in res and "FSDP2 or DDP" in res, res


# ----- whiten-bench under tensor parallel ---------------------------------------------------------------------------


def _bench_run(rank, world, mode, root):
    from whiten.bench.parallel import Parallel
    from whiten.bench.run import RunConfig, run
    from whiten.bench.tasks import make_task

    task = make_task("lm", "tiny")
    cfg = RunConfig(task="lm", profile="tiny", optimizer="splus", lr=0.1, seed=0, steps=6, evals=2)
    summary = run(cfg, task, root, parallel=Parallel(world=world, rank=rank, mode=mode))
    return summary["final_val_loss"]


@pytest.mark.parametrize("mode,world", [("tp", 2), ("fsdp+tp", 4)])
def test_benchmark_runs_the_lm_task_under_tensor_parallel(mode, world, tmp_path):
    import json

    losses = launch(_bench_run, world, mode, str(tmp_path), timeout=300)
    assert len(set(losses)) == 1  # every rank evaluated the same weights
    run_dir = tmp_path / "lm" / "tiny" / "init" / "splus" / "lr0.1-seed0"
    env = json.loads((run_dir / "config.json").read_text())["environment"]
    assert (env["world_size"], env["parallel"]) == (world, mode)
    single = tmp_path / "single"
    # the same training up to the rounding of TP's split products (1.3e-3 apart here)
    assert abs(launch(_bench_run, 1, "none", str(single))[0] - losses[0]) < 0.01
