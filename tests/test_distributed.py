"""Distributed runs on CPU with gloo: DDP-style replicated parameters (``process_group=``) and FSDP2 (``fully_shard``)
give the single-process numbers bit for bit for every optimizer, DCP checkpoints resume exactly on another number of
ranks and in another mode, the non-finite policy is global, and the work is split over the ranks."""

from __future__ import annotations

import shutil
import tempfile

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
from torch.distributed.tensor import DTensor

import whiten
import whiten.distributed
from dist_utils import full, launch, shard_like
from test_suite import NEEDS_MODEL, OPTIMIZERS

# K-FAC's statistics come from hooks on the model it steps; these runners compute the gradient on a separate
# replica, so its hooks would see nothing. tests/test_kfac.py runs K-FAC under DDP with real forwards.
ALL = [n for n in OPTIMIZERS if n not in NEEDS_MODEL]
VOCAB, WIDTH, HIDDEN = 11, 6, 10  # odd sizes: uneven and empty shards on 3 and 4 ranks
STEPS = 7


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc4 = nn.Linear(WIDTH, WIDTH, bias=False)  # same shape as fc3: a batched stack
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc2(F.gelu(self.norm(self.fc1(x))))
        x = x + self.fc4(F.gelu(self.fc3(x)))
        return self.head(x)


def make_net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def batch(t: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1000 + t))


def loss_of(model, idx):
    return F.cross_entropy(model(idx).float().reshape(-1, VOCAB), idx.roll(1, 1).reshape(-1))


def build(name, model, **kw):
    return OPTIMIZERS[name](whiten.param_groups(model), **kw)


class Runner:
    """One model and optimizer in a mode: "single" (no group), "ddp" (replicated, process_group=WORLD) or "fsdp"
    (fully_shard). Every mode is fed the full-batch gradient, computed the same way everywhere, so the optimizer
    is the only thing that can differ."""

    def __init__(self, name, mode, dtype=torch.float32, **kw):
        self.mode = mode
        self.model = make_net(dtype)
        self.ref = make_net(dtype)  # a plain replica the gradient is computed on
        group = dist.group.WORLD if mode == "ddp" else None
        if mode == "fsdp":
            fully_shard(self.model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        self.opt = build(name, self.model, process_group=group, **kw)

    def step(self, t, corrupt=False):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, q in self.ref.named_parameters():
                q.copy_(full(params[n]))
        self.ref.zero_grad()
        loss_of(self.ref, batch(t)).backward()
        for n, q in self.ref.named_parameters():
            g = q.grad.clone()
            if corrupt and n == "fc1.weight":
                g[-1, -1] = float("inf")  # the last rows: on the last rank with rows under FSDP2
            p = params[n]
            p.grad = shard_like(g, p)
        self.opt.step()

    def params(self):
        return {n: full(p).detach().clone() for n, p in self.model.named_parameters()}


def control(name, steps=STEPS, dtype=torch.float32, **kw):
    r = Runner(name, "single", dtype, **kw)
    for t in range(steps):
        r.step(t)
    return r.params()


def same(a: dict, b: dict) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


# ----- the same numbers as one process ------------------------------------------------------------------------------


def _equal_to_one_process(rank, world, mode, names, dtype):
    out = {}
    for name in names:
        r = Runner(name, mode, dtype)
        for t in range(STEPS):
            r.step(t)
        got = r.params()
        out[name] = (same(got, control(name, dtype=dtype)), dict(r.opt.counters),
                     r.opt.distributed_context().ranks_work())
    return out


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("ddp", 3), ("fsdp", 2), ("fsdp", 3), ("fsdp", 4)])
def test_bit_identical_to_one_process(mode, world):
    results = launch(_equal_to_one_process, world, mode, ALL, torch.float32)
    for name in ALL:
        for rank, res in enumerate(results):
            differ, counters, work = res[name]
            assert differ == [], f"{name}, {mode} on {world} ranks, rank {rank}: {differ} differ from one process"
            assert counters == results[0][name][1]  # counters agree across ranks
        assert sum(w > 0 for w in results[0][name][2]) == world  # every rank owns work


def _equal_to_one_process_with(rank, world, mode, cases):
    """``cases``: (name, options) or (name, options, the one-process run's options where they differ)."""
    out = []
    for name, kw, *control_kw in cases:
        r = Runner(name, mode, **kw)
        for t in range(STEPS):
            r.step(t)
        out.append(same(r.params(), control(name, **(control_kw[0] if control_kw else kw))))
    return out


def _assert_equal_to_one_process(mode: str, world: int, cases: list) -> None:
    """Each case run under ``mode`` on ``world`` ranks ends bit for bit as on one process (every rank)."""
    results = launch(_equal_to_one_process_with, world, mode, cases)
    for rank, res in enumerate(results):
        for (name, kw, *_), differ in zip(cases, res):
            assert differ == [], f"{name} {kw}, {mode} on {world} ranks, rank {rank}: {differ} differ"


# issue 23's state options (tests/test_state_options.py): bfloat16 momenta and bases, quantized bases
OPTION_CASES = [("SPlus", {"state_dtype": "bf16"}), ("SOAP", {"state_dtype": "bf16"}),
                ("SPlus", {"basis_bits": 8}), ("SOAP", {"basis_bits": 4}),
                ("Muon", {"state_dtype": "bf16"}), ("Conda", {"state_dtype": "bf16"}), ("TNT", {"state_dtype": "bf16"}),
                ("Shampoo", {"state_dtype": "bf16"}), ("PSGDKron", {"state_dtype": "bf16"})]
# K-FAC and EKFAC need their model's hooks: tests/test_state_options.py runs them with test_kfac.py's DDP and FSDP2
# workers (test_kfac_state_dtype_under_ddp_and_fsdp2_equals_one_process)


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 3)])
def test_state_options_bit_identical_to_one_process(mode, world):
    _assert_equal_to_one_process(mode, world, OPTION_CASES)


# sync_free=True: one process decides the non-finite check on the device (masked writes, read one step later); a
# distributed step decides it on the host, as before. The numbers are the same; where one process's sync-free
# step computes a number on the device that the default path computes in Python floats (Prodigy's D:
# tests/test_sync_free.py's ROUNDING), the distributed step is compared with one process's default path.
from test_sync_free import ROUNDING  # noqa: E402

SYNC_FREE_CASES = [(name, {"sync_free": True}, *([{}] if name in ROUNDING else [])) for name in ALL
                   if getattr(getattr(whiten, name, None), "SYNC_FREE", False)]


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 3)])
def test_sync_free_bit_identical_to_one_process(mode, world):
    assert len(SYNC_FREE_CASES) >= 9
    _assert_equal_to_one_process(mode, world, SYNC_FREE_CASES)


# compiled=True (whiten.optim.kernels): each owner runs the same kernels on its parameters (DDP) or its blocks of the
# elementwise ones (FSDP2), so a compiled distributed run is a compiled run on one process
COMPILED_CASES = [(name, {"compiled": True}) for name in ("SPlus", "SOAP", "Muon", "ScheduleFreeAdamW", "Conda",
                                                          "Prodigy", "Scion", "PSGDKron")]


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 3)])
def test_compiled_mode_bit_identical_to_one_process(mode, world):
    _assert_equal_to_one_process(mode, world, COMPILED_CASES)


def test_bf16_parameters_with_fp32_state_under_fsdp():
    names = ["SPlus", "Muon", "SOAP", "Conda", "Prodigy", "MFAC"]
    results = launch(_equal_to_one_process, 3, "fsdp", names, torch.bfloat16)
    for name in names:
        for res in results:
            assert res[name][0] == [], name


def _skip_branch_forward(model, idx, use_branch):
    x = model.emb(idx)
    x = x + model.fc2(F.gelu(model.norm(model.fc1(x))))
    if use_branch:
        x = x + model.fc4(F.gelu(model.fc3(x)))
    return model.head(x)


class Branchy(Net):
    use_branch = True

    def forward(self, idx):
        return _skip_branch_forward(self, idx, self.use_branch)


def _ddp_unused(rank, world, names):
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = Branchy()
        model.use_branch = rank == 0
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = build(name, model, process_group=dist.group.WORLD)
        for t in range(STEPS):
            idx = batch(t)[2 * rank:2 * rank + 2]
            opt.zero_grad()
            loss_of(ddp, idx).backward()
            opt.step()
        out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _halves_control(name):
    """One process given the mean of the two halves' gradients (zeros for what a half does not use)."""
    torch.manual_seed(0)
    halves = [Branchy(), Branchy()]
    halves[1].load_state_dict(halves[0].state_dict())
    halves[1].use_branch = False
    model = Branchy()
    model.load_state_dict(halves[0].state_dict())
    opt = build(name, model)
    for t in range(STEPS):
        grads = []
        for k, h in enumerate(halves):
            h.load_state_dict(model.state_dict())
            h.zero_grad()
            loss_of(h, batch(t)[2 * k:2 * k + 2]).backward()
            grads.append({n: q.grad for n, q in h.named_parameters()})
        for n, p in model.named_parameters():
            g0, g1 = grads[0][n], grads[1][n]
            p.grad = g0 / 2 + (g1 / 2 if g1 is not None else torch.zeros_like(g0))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ddp_unused_vs_control(rank, world, names):
    got = _ddp_unused(rank, world, names)
    # the control runs here too: one thread, as the workers (a LayerNorm gradient's sum depends on the threads)
    return {name: same(got[name], _halves_control(name)) for name in names}


def test_real_ddp_with_a_rank_that_skips_parameters():
    """Rank 1 never uses fc3/fc4. DDP averages (g0 + 0)/2; one process given the mean of the two halves' gradients
    must match bit for bit (with 2 ranks the mean of two gradients is exact)."""
    results = launch(_ddp_unused_vs_control, 2, ALL)
    for name in ALL:
        for rank, differ in enumerate(results):
            assert differ[name] == [], f"{name}, rank {rank}: {differ[name]}"


# ----- the non-finite policy is global -------------------------------------------------------------------------------


def _nonfinite(rank, world, names):
    out = {}
    for name in names:
        r = Runner(name, "fsdp")
        for t in range(3):
            r.step(t)
        before = r.params()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            r.step(3, corrupt=True)
        skipped = r.opt.counters["skipped_steps"]
        unchanged = same(before, r.params()) == []
        raising = Runner(name, "fsdp", nonfinite="raise")
        try:
            raising.step(0, corrupt=True)
            raised = False
        except FloatingPointError:
            raised = True
        out[name] = (skipped, unchanged, raised)
    return out


def test_nonfinite_gradient_on_one_rank_skips_everywhere_under_fsdp():
    results = launch(_nonfinite, 3, ALL)
    for name in ALL:
        for rank, res in enumerate(results):
            assert res[name] == (1, True, True), f"{name}, rank {rank}: {res[name]}"


# ----- DCP checkpoints across world sizes and modes -------------------------------------------------------------------

SAVE_AT = 4


def _save(rank, world, mode, names, root):
    for name in names:
        r = Runner(name, mode)
        for t in range(SAVE_AT):
            r.step(t)
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.save(sd, checkpoint_id=f"{root}/{name}")
    return True


def _resumed(name, mode, root) -> Runner:
    """A fresh model and optimizer loaded from the DCP checkpoint and trained to the end."""
    r = Runner(name, mode)
    sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
    dcp.load(sd, checkpoint_id=f"{root}/{name}")
    set_model_state_dict(r.model, sd["model"])
    set_optimizer_state_dict(r.model, r.opt, sd["optim"])
    for t in range(SAVE_AT, STEPS):
        r.step(t)
    return r


def _resume(rank, world, mode, names, root):
    out = {}
    for name in names:
        r = _resumed(name, mode, root)
        out[name] = (same(r.params(), control(name)), dict(r.opt.counters))
    return out


def _resume_single(name, root):
    return _resumed(name, "single", root).params()


@pytest.fixture(scope="module")
def checkpoints():
    roots = {}
    for mode in ("fsdp", "ddp"):
        roots[mode] = tempfile.mkdtemp(prefix=f"whiten-dcp-{mode}-")
        launch(_save, 2, mode, ALL, roots[mode])
    yield roots
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("saved,mode,world", [("fsdp", "ddp", 1), ("fsdp", "fsdp", 3), ("fsdp", "ddp", 4),
                                              ("ddp", "fsdp", 4), ("ddp", "ddp", 3)])
def test_dcp_resume_on_another_world_size(checkpoints, saved, mode, world):
    results = launch(_resume, world, mode, ALL, checkpoints[saved])
    for name in ALL:
        for rank, res in enumerate(results):
            differ, counters = res[name]
            assert differ == [], f"{name}: saved {saved}@2, resumed {mode}@{world}, rank {rank}: {differ}"
            assert counters == results[0][name][1]


@pytest.mark.parametrize("saved", ["fsdp", "ddp"])
def test_dcp_resume_in_one_process(checkpoints, saved):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers that saved: some gradient sums depend on the thread count
    try:
        for name in ALL:
            assert same(_resume_single(name, checkpoints[saved]), control(name)) == [], name
    finally:
        torch.set_num_threads(threads)


def _save_in_eval(rank, world, mode, names, root):
    """As _save, but the checkpoint is taken in eval mode (a trainer saving after an evaluation)."""
    for name in names:
        r = Runner(name, mode)
        for t in range(SAVE_AT):
            r.step(t)
        if hasattr(r.opt, "eval"):  # those without an eval mode save as _save does
            r.opt.eval()
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.save(sd, checkpoint_id=f"{root}/{name}")
    return True


def _resume_after_eval(rank, world, mode, names, root):
    out = {}
    for name in names:
        r = Runner(name, mode)
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.load(sd, checkpoint_id=f"{root}/{name}")
        set_model_state_dict(r.model, sd["model"])
        set_optimizer_state_dict(r.model, r.opt, sd["optim"])
        if hasattr(r.opt, "train"):
            assert r.opt.in_eval_mode == any(g.get("ema_rate") is not None or "train_mode" in g
                                             for g in r.opt.param_groups)
            r.opt.train()  # the live weights come back from the checkpoint
        for t in range(SAVE_AT, STEPS):
            r.step(t)
        out[name] = same(r.params(), control(name))
    return out


@pytest.mark.parametrize("saved,mode,world", [("fsdp", "ddp", 3), ("ddp", "fsdp", 3), ("fsdp", "ddp", 1)])
def test_dcp_checkpoint_taken_in_eval_mode_resumes_on_another_world_size(saved, mode, world, tmp_path):
    """A fresh optimizer is in train mode, and DCP loads only the keys its state dict has: the mode and the live
    weights must be among them, on every rank, or training goes on from the average."""
    launch(_save_in_eval, 2, saved, ALL, str(tmp_path))
    results = launch(_resume_after_eval, world, mode, ALL, str(tmp_path))
    for name in ALL:
        for rank, differ in enumerate(results):
            assert differ[name] == [], f"{name}: saved in eval mode {saved}@2, resumed {mode}@{world}, rank {rank}"


@pytest.mark.parametrize("name", ALL)
def test_work_is_balanced_over_ranks(name):
    """The plan on the benchmark's GPT shapes (cpu profile: width 256, 4 blocks, vocabulary 65): max/mean planned
    work per rank ≤ 1.15 at 2 and 4 ranks, misaligned parameters kept together as they must be."""
    from whiten.bench.models import GPT  # the shapes come from the real model

    torch.manual_seed(0)
    opt = build(name, GPT(vocab_size=65, ctx=128, width=256, depth=4, heads=4))
    for world in (2, 4):
        owners, costs = whiten.distributed.plan(opt, world)
        if not costs:  # nothing to plan: every parameter is elementwise, stepped by every rank on its block
            assert all(opt.elementwise(p, g) for g in opt.param_groups for p in g["params"]), name
            continue
        load = [sum(c for p, c in costs.items() if owners[p] == r) for r in range(world)]
        assert max(load) / (sum(load) / world) <= 1.15, (world, load)


# ----- eval()/train() swaps ------------------------------------------------------------------------------------------

SWAPS = {"SPlus": {}, "ScheduleFreeAdamW": {}, "Muon": {"ema_rate": 0.9}, "Shampoo": {"ema_rate": 0.9}}


def _swaps(rank, world, mode):
    out = {}
    for name, kw in SWAPS.items():
        runs = {m: Runner(name, m, **kw) for m in (mode, "single")}
        for r in runs.values():
            for t in range(STEPS):
                r.step(t)
        for r in runs.values():
            r.opt.eval()
        averaged = same(runs[mode].params(), runs["single"].params())
        moved = same(runs[mode].params(), control(name, **kw))  # eval() did change the weights
        for r in runs.values():
            r.opt.train()
        live = same(runs[mode].params(), control(name, **kw))
        out[name] = (averaged, moved != [], live)
    return out


@pytest.mark.parametrize("mode,world", [("fsdp", 3), ("ddp", 2)])
def test_eval_and_train_swap_the_single_process_weights(mode, world):
    for rank, res in enumerate(launch(_swaps, world, mode)):
        for name in SWAPS:
            assert res[name] == ([], True, []), f"{name}, {mode}@{world}, rank {rank}: {res[name]}"


def _splus_constants(rank, world):
    model = make_net()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = whiten.SPlus(whiten.param_groups(model))
    local = {tuple(p.to_local().shape) for g in opt.param_groups for p in g["params"] if p.ndim == 2}
    return [g["nonstandard_constant"] for g in opt.param_groups], local


def test_splus_derives_its_constant_from_global_shapes_under_fsdp2():
    """SPlus's default nonstandard_constant comes from the hidden matrices' width: a DTensor's global shape, so
    every rank of an FSDP2 run derives the value of one process, whatever rows it holds."""
    single = [g["nonstandard_constant"] for g in whiten.SPlus(whiten.param_groups(make_net())).param_groups]
    assert single == [pytest.approx(1e-3 * 768 / WIDTH)] * len(single)
    results = launch(_splus_constants, 4, timeout=120)
    assert all(constants == single for constants, _ in results)
    assert any(shape[0] < WIDTH for _, local in results for shape in local)  # some rank holds fewer rows than d


# ----- real FSDP2 training with evaluation swaps, and the benchmark under a process group ----------------------------


def _real_fsdp(rank, world, names):
    """fully_shard forward/backward on the same full batch on every rank (2 ranks: (g + g)/2 = g exactly), with an
    averaged-weights evaluation every 3 steps, against one process doing the same."""
    out = {}
    for name in names:
        models = {}
        for mode in ("fsdp", "single"):
            model = make_net()
            if mode == "fsdp":
                fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            opt = build(name, model, **SWAPS.get(name, {}))
            for t in range(STEPS):
                opt.zero_grad()
                loss_of(model, batch(t)).backward()
                opt.step()
                if t % 3 == 2 and hasattr(opt, "eval"):
                    opt.eval()
                    with torch.no_grad():
                        loss_of(model, batch(100 + t))
                    if hasattr(model, "reshard"):
                        model.reshard()  # FSDP2 keeps the root gathered after a forward without backward
                    opt.train()
            models[mode] = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        out[name] = same(models["fsdp"], models["single"])
    return out


def test_real_fsdp2_training_with_evaluation_swaps():
    for rank, res in enumerate(launch(_real_fsdp, 2, ALL)):
        for name in ALL:
            assert res[name] == [], f"{name}, rank {rank}: {res[name]}"


def _bench_run(rank, world, mode, root):
    from whiten.bench.parallel import Parallel
    from whiten.bench.run import RunConfig, run
    from whiten.bench.tasks import make_task

    task = make_task("lm", "tiny")
    cfg = RunConfig(task="lm", profile="tiny", optimizer="splus", lr=0.1, seed=0, steps=12, evals=4)
    summary = run(cfg, task, root, parallel=Parallel(world=world, rank=rank, mode=mode))
    return summary["final_val_loss"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_benchmark_runs_over_a_process_group(mode, tmp_path):
    import json

    losses = launch(_bench_run, 2, mode, str(tmp_path))
    assert losses[0] == losses[1]  # every rank evaluated the same weights
    run_dir = tmp_path / "lm" / "tiny" / "init" / "splus" / "lr0.1-seed0"
    env = json.loads((run_dir / "config.json").read_text())["environment"]
    assert (env["world_size"], env["parallel"], env["backend"]) == (2, mode, "gloo")
    assert json.loads((run_dir / "done.json").read_text())["final_val_loss"] == losses[0]


def _full_state(rank, world, names, root):
    out = {}
    for name in names:
        r = Runner(name, "ddp")
        for t in range(SAVE_AT):
            r.step(t)
        full_sd = whiten.distributed.full_state_dict(r.opt)  # every rank calls it
        if rank == 0:
            torch.save({"model": r.model.state_dict(), "opt": full_sd}, f"{root}/{name}.pt")
        dist.barrier()
        # rank 0's file resumes one process and every rank of a 3-rank-style reload (here: this group) exactly
        saved = torch.load(f"{root}/{name}.pt")
        again = Runner(name, "ddp")
        again.model.load_state_dict(saved["model"])
        again.opt.load_state_dict(saved["opt"])
        single = Runner(name, "single")
        single.model.load_state_dict(saved["model"])
        single.opt.load_state_dict(saved["opt"])
        for t in range(SAVE_AT, STEPS):
            again.step(t)
            single.step(t)
        out[name] = (same(again.params(), control(name)), same(single.params(), control(name)),
                     len(full_sd["state"]) == len(list(r.model.parameters())))
    return out


def test_full_state_dict_saves_with_torch_save_on_rank_0(tmp_path):
    for rank, res in enumerate(launch(_full_state, 2, ALL, str(tmp_path))):
        for name in ALL:
            assert res[name] == ([], [], True), f"{name}, rank {rank}: {res[name]}"


# ----- elementwise parameters stay where they lie ----------------------------------------------------------------------

# optimizers with elementwise parameters: all of Schedule-Free AdamW's and Sophia's, the AdamW path of Muon and SpecGD
# (embedding, head, vectors), SPlus's sign-descent vectors
ELEMENTWISE = ["ScheduleFreeAdamW", "Sophia", "Muon", "SpecGD", "SPlus"]


def owner_scheme(opt):
    """``opt`` stepping every parameter on one owner, as before elementwise parameters stayed local: the layout
    whiten's checkpoints had then."""
    opt.elementwise = lambda p, group: False
    return opt


class Exchanged:
    """Bytes this rank receives through the exchanges of the owner scheme (all-to-all, broadcast): the flags and
    counters all-reduced at every step are not counted."""

    def __enter__(self):
        self.bytes, self._orig = 0, (dist.all_to_all_single, dist.broadcast)
        rank = dist.get_rank()

        def all_to_all_single(out, inp, out_sizes=None, in_sizes=None, group=None, **kw):
            sizes = out_sizes or [out.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
            self.bytes += (sum(sizes) - sizes[dist.get_rank(group)]) * out.element_size()
            return self._orig[0](out, inp, out_sizes, in_sizes, group=group, **kw)

        def broadcast(tensor, src, group=None, **kw):
            self.bytes += 0 if src == rank else tensor.numel() * tensor.element_size()
            return self._orig[1](tensor, src, group=group, **kw)

        dist.all_to_all_single, dist.broadcast = all_to_all_single, broadcast
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single, dist.broadcast = self._orig


def _local_steps(rank, world, mode, names):
    out = {}
    for name in names:
        runs = {}
        for scheme in ("local", "owners"):
            r = Runner(name, mode)
            if scheme == "owners":
                owner_scheme(r.opt)
            r.step(0)
            with Exchanged() as seen:
                for t in range(1, STEPS):
                    r.step(t)
            runs[scheme] = (r, seen.bytes)
        r, local_bytes = runs["local"]
        ctx = r.opt.distributed_context()
        names_of = {p: n for n, p in r.model.named_parameters()}
        state = {}
        for p in ctx.local:
            entry = {k: v for k, v in r.opt.state[p].items() if isinstance(v, torch.Tensor)}
            state[names_of[p]] = [(type(v).__name__, tuple(v.placements) == tuple(p.placements)
                                   if isinstance(v, DTensor) else None, tuple(whiten.distributed.local_shard(v).shape),
                                   tuple(whiten.distributed.local_shard(p).shape)) for v in entry.values()]
        report = r.opt.memory_report()
        mine = sum(whiten.distributed.local_shard(v).numel() * v.element_size() for p in r.opt.state
                   for v in r.opt.state[p].values() if isinstance(v, torch.Tensor) and (ctx.owns(p)))
        out[name] = dict(local=sorted(names_of[p] for p in ctx.local), bytes=(local_bytes, runs["owners"][1]),
                         same=(same(r.params(), control(name)), same(runs["owners"][0].params(), control(name))),
                         state=state, report=(report.state_bytes, mine))
    return out


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 3)])
def test_elementwise_parameters_are_stepped_where_they_lie(mode, world):
    """No gradient or value of an elementwise parameter crosses the network: Schedule-Free AdamW and Sophia exchange
    nothing, the others less than the owner scheme; each rank's state of such a parameter is its block (a DTensor
    laid out as the parameter under FSDP2, the whole tensor on every rank under DDP), which memory_report counts; the
    numbers are one process's either way."""
    adamw_path = ["emb.weight", "fc1.bias", "fc2.bias", "head.weight", "norm.bias", "norm.weight"]
    every = sorted(n for n, _ in make_net().named_parameters())
    expected = {"ScheduleFreeAdamW": every, "Sophia": every, "Muon": adamw_path,
                "SpecGD": adamw_path, "SPlus": ["fc1.bias", "fc2.bias", "norm.bias", "norm.weight"]}
    results = launch(_local_steps, world, mode, ELEMENTWISE)
    for name in ELEMENTWISE:
        for rank, res in enumerate(results):
            res = res[name]
            assert res["local"] == expected[name], (name, res["local"])
            assert res["same"] == ([], []), (name, mode, rank, res["same"])
            local_bytes, owner_bytes = res["bytes"]
            assert local_bytes <= owner_bytes, (name, mode, rank, res["bytes"])
            if name in ("ScheduleFreeAdamW", "Sophia"):
                assert local_bytes == 0, (name, mode, rank, res["bytes"])
            for n, entries in res["state"].items():
                for kind, placed, shape, block in entries:
                    assert shape == block, (name, n, entries)  # each rank keeps its block of the state
                    assert kind == ("DTensor" if mode == "fsdp" else "Tensor") and placed in (True, None), (name, n)
            assert res["report"][0] == res["report"][1], (name, rank, res["report"])
        total = [sum(res[name]["bytes"][i] for res in results) for i in (0, 1)]
        assert total[0] < total[1], (name, mode, total)  # fewer bytes over the group


def _old_checkpoint(rank, world, mode, names, root, owners):
    for name in names:
        r = Runner(name, mode)
        if owners:
            owner_scheme(r.opt)
        for t in range(SAVE_AT):
            r.step(t)
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.save(sd, checkpoint_id=f"{root}/{name}")
    return True


def _resume_scheme(rank, world, mode, names, root, owners):
    out = {}
    for name in names:
        r = Runner(name, mode)
        if owners:
            owner_scheme(r.opt)
        sd = {"model": get_model_state_dict(r.model), "optim": get_optimizer_state_dict(r.model, r.opt)}
        dcp.load(sd, checkpoint_id=f"{root}/{name}")
        set_model_state_dict(r.model, sd["model"])
        set_optimizer_state_dict(r.model, r.opt, sd["optim"])
        for t in range(SAVE_AT, STEPS):
            r.step(t)
        out[name] = same(r.params(), control(name))
    return out


@pytest.mark.parametrize("saved,saved_scheme,mode,world,scheme", [
    ("fsdp", "owners", "fsdp", 3, "local"), ("fsdp", "owners", "ddp", 1, "local"), ("ddp", "owners", "fsdp", 2, "local"),
    ("fsdp", "local", "ddp", 2, "owners")])
def test_dcp_checkpoints_of_the_owner_scheme_and_of_local_steps_load_in_each_other(saved, saved_scheme, mode, world,
                                                                                      scheme, tmp_path):
    """A DCP checkpoint written when every parameter had an owner (whiten before elementwise parameters stayed
    local: full state on the owner, ``{}`` elsewhere) resumes exactly with local steps, on other layouts; and
    back: DCP reshards by the saved blocks either way."""
    launch(_old_checkpoint, 2, saved, ELEMENTWISE, str(tmp_path), saved_scheme == "owners")
    for rank, res in enumerate(launch(_resume_scheme, world, mode, ELEMENTWISE, str(tmp_path), scheme == "owners")):
        for name in ELEMENTWISE:
            assert res[name] == [], (name, saved, saved_scheme, mode, world, rank)


def _full_state_fsdp(rank, world, names, root):
    out = {}
    for name in names:
        r = Runner(name, "fsdp")
        for t in range(SAVE_AT):
            r.step(t)
        full_sd = whiten.distributed.full_state_dict(r.opt)
        single = Runner(name, "single")
        for t in range(SAVE_AT):
            single.step(t)
        # ("live", the slot state_dict() adds for eval mode, is a copy of the parameter: a DTensor here)
        mine = {i: {k: v for k, v in e.items() if k != "live"} for i, e in single.opt.state_dict()["state"].items()}
        full_sd["state"] = {i: {k: v for k, v in e.items() if k != "live"} for i, e in full_sd["state"].items()}
        equal = sorted(mine) == sorted(full_sd["state"]) and all(
            set(mine[i]) == set(full_sd["state"][i]) and all(
                torch.equal(v, full_sd["state"][i][k]) if isinstance(v, torch.Tensor) else v == full_sd["state"][i][k]
                for k, v in mine[i].items()) for i in mine)
        again = Runner(name, "fsdp")
        with torch.no_grad():
            for q, p in zip(again.model.parameters(), r.model.parameters()):
                q.copy_(p)
        again.opt.load_state_dict(full_sd)
        for t in range(SAVE_AT, STEPS):
            again.step(t)
        out[name] = (equal, same(again.params(), control(name)))
    return out


def test_full_state_dict_assembles_the_blocks_of_elementwise_parameters():
    """Under FSDP2 on 3 ranks an elementwise parameter's state is a DTensor on every rank: full_state_dict gives one
    process's state dict, tensor for tensor, and loading it cuts each rank's block again (then training goes on
    exactly)."""
    for rank, res in enumerate(launch(_full_state_fsdp, 3, ELEMENTWISE, None)):
        for name in ELEMENTWISE:
            assert res[name] == (True, []), (name, rank, res[name])


def _huge_gradient(rank, world, mode):
    def run(m):
        r = Runner("ScheduleFreeAdamW", m)
        for t in range(STEPS):
            if t == 3:  # a huge finite gradient in both halves of fc1.weight: v overflows in every rank's block
                params = dict(r.model.named_parameters())
                with torch.no_grad():
                    for n, q in r.ref.named_parameters():
                        q.copy_(full(params[n]))
                r.ref.zero_grad()
                loss_of(r.ref, batch(t)).backward()
                for n, q in r.ref.named_parameters():
                    g = q.grad.clone()
                    if n == "fc1.weight":
                        g[0, 0] = g[-1, -1] = 1e30
                    params[n].grad = shard_like(g, params[n])
                r.opt.step()
            else:
                r.step(t)
        return r

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, one = run(mode), run("single")
    return same(got.params(), one.params()), got.opt.counters["factor_restarts"], one.opt.counters["factor_restarts"]


@pytest.mark.parametrize("mode,world", [("fsdp", 2), ("ddp", 2)])
def test_an_overflowed_second_moment_of_an_elementwise_parameter_counts_once(mode, world):
    for rank, (differ, got, one) in enumerate(launch(_huge_gradient, world, mode)):
        assert differ == [] and got == one == 1, (mode, rank, differ, got, one)


def _uneven_replicated(rank, world):
    r = Runner("ScheduleFreeAdamW", "ddp")
    r.step(0)
    r.model.norm.weight.grad = torch.ones_like(r.model.norm.weight) if rank == 0 else None
    for n, p in r.model.named_parameters():
        if n != "norm.weight":
            p.grad = torch.zeros_like(p)
    try:
        r.opt.step()
    except RuntimeError as e:
        return str(e)
    return None


def test_a_replicated_elementwise_parameter_needs_its_gradient_on_every_rank():
    for message in launch(_uneven_replicated, 2):
        assert message is not None and "gradient on some ranks" in message


# ----- the owners' exchanges overlap their math, group by group ---------------------------------------------------------


def _overlapping(rank, world, mode, names):
    out = {}
    for name in names:
        results = {}
        for overlap in (True, False, None):
            r = Runner(name, mode)
            r.opt.overlap_exchanges = overlap
            issued = []
            orig = dist.all_to_all_single, dist.broadcast

            def all_to_all_single(*a, async_op=False, **kw):
                issued.append(("all_to_all", async_op))
                return orig[0](*a, async_op=async_op, **kw)

            def broadcast(*a, async_op=False, **kw):
                issued.append(("broadcast", async_op))
                return orig[1](*a, async_op=async_op, **kw)

            dist.all_to_all_single, dist.broadcast = all_to_all_single, broadcast
            try:
                for t in range(STEPS):
                    r.step(t)
            finally:
                dist.all_to_all_single, dist.broadcast = orig
            results[overlap] = (same(r.params(), control(name)), sorted(set(issued)), dict(r.opt.counters))
        out[name] = results
    return out


@pytest.mark.parametrize("mode,world", [("fsdp", 3), ("ddp", 2)])
def test_exchanges_overlap_the_owners_math_with_the_same_numbers(mode, world):
    """With ``overlap_exchanges=True`` optimizers stepped group by group (the base's apply_step) issue each group's
    exchanges asynchronously, so a group's blocks travel while the owners step the others; the numbers are one
    process's with and without it. The default (None) overlaps only on NCCL: not here, on gloo."""
    names = ["SPlus", "SOAP", "Muon", "Conda"]
    for rank, res in enumerate(launch(_overlapping, world, mode, names)):
        for name in names:
            on, off = res[name][True], res[name][False]
            assert on[0] == [] and off[0] == [], (name, mode, rank, on[0], off[0])
            assert on[2] == off[2]
            kind = "all_to_all" if mode == "fsdp" else "broadcast"
            assert (kind, True) in on[1] and (kind, False) not in on[1], (name, on[1])
            assert (kind, False) in off[1] and (kind, True) not in off[1], (name, off[1])
            assert res[name][None] == off, (name, res[name][None])


def _replicated_on_owners(rank, world, mode):
    r = Runner("ScheduleFreeAdamW", mode)
    r.opt.step_replicated_locally = False
    r.step(0)
    with Exchanged() as seen:
        for t in range(1, STEPS):
            r.step(t)
    ctx = r.opt.distributed_context()
    held = sum(bool(r.opt.state[p]) for p in ctx.params)
    return same(r.params(), control("ScheduleFreeAdamW")), seen.bytes, len(ctx.local), held, len(ctx.params)


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 2)])
def test_replicated_elementwise_parameters_can_stay_on_owners(mode, world):
    """``step_replicated_locally = False``: under DDP elementwise parameters go back to owners (state split over the
    ranks, values broadcast); sharded ones are stepped where they lie either way."""
    results = launch(_replicated_on_owners, world, mode)
    for rank, (differ, sent, local, held, count) in enumerate(results):
        assert differ == [], (mode, rank, differ)
        if mode == "ddp":
            assert local == 0 and sent > 0 and 0 < held < count, (rank, sent, local, held)
        else:
            assert local == count and sent == 0, (rank, sent, local)
    if mode == "ddp":
        assert sum(r[3] for r in results) == results[0][4]  # each parameter's state on one rank
