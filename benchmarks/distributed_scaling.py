"""How whiten's distributed optimizers split the work: per rank, the planned work (the cost model the plan balances,
~FLOPs), the measured optimizer-step time, and the bytes received per step against the minimum the owner scheme
needs; load balance as max/mean over ranks.

    python benchmarks/distributed_scaling.py                       # GPT cpu shapes, DDP and FSDP2, 1/2/4 ranks
    python benchmarks/distributed_scaling.py --optimizers SPlus,Muon --worlds 2 --modes fsdp --steps 20
    python benchmarks/distributed_scaling.py --modes tp,fsdp_tp,hsdp --worlds 4   # past FSDP2
    python benchmarks/distributed_scaling.py --optimizers ScheduleFreeAdamW,Muon,SPlus --schemes local,owners --worlds 4
                                                                   # elementwise parameters local, or on owners
    python benchmarks/distributed_scaling.py --optimizers SPlus,SOAP,Muon --overlap ab --worlds 2,4
                                                                   # exchanges overlapped with the math, or not

Modes: ``ddp`` (replicated, ``process_group=``), ``fsdp`` (``fully_shard`` on a 1-D mesh), ``tp`` (tensor parallel
on a 1-D mesh: q, k, v, fc1 ColwiseParallel, o, fc2 RowwiseParallel, the rest plain), ``fsdp_tp`` (that TP plan on
the tp dim of a (2, world/2) mesh, then ``fully_shard`` on its dp dim), ``hsdp`` (``fully_shard`` on a (2, world/2)
mesh: Replicate x Shard(0)).

Gradients are synthetic (seeded, the same on every rank): only the optimizer step is timed. Processes are forked
gloo workers with one thread each, so on a machine with fewer cores than ranks the times show oversubscription,
not scaling; the planned work and the bytes do not depend on the machine.

Minimum bytes received per step by one rank (the owner scheme: each parameter's whole step on one rank):
a replicated parameter it does not own (sent by its owner); for each owned sharded parameter, every distinct block
of its gradient and value that the owner does not hold (replicas of a block are sent once); for each sharded
parameter owned elsewhere, its own block of the new value. An elementwise parameter (every parameter of
Schedule-Free AdamW, the AdamW path of Muon, SPlus's sign-descent vectors) has no owner: every rank steps its block,
so it needs no bytes. ``--schemes local,owners`` measures both: ``owners`` puts every parameter on an owner, as whiten
did before elementwise parameters stayed local. The bytes counted include the small all-reduce of flags (which
gradients are present, non-finite, overflowed) and of counters at each step; where the minimum is 0 the ratio is
not defined ("-").
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import whiten
from whiten.bench.models import GPT

FACTORIES = {
    "SPlus": lambda g, pg, r: whiten.SPlus(g, lr=0.1, inverse_every=r, process_group=pg),
    "SOAP": lambda g, pg, r: whiten.SOAP(g, precondition_frequency=r, process_group=pg),
    "Shampoo": lambda g, pg, r: whiten.Shampoo(g, precondition_frequency=r, process_group=pg),
    "Muon": lambda g, pg, r: whiten.Muon(g, process_group=pg),
    "PSGDKron": lambda g, pg, r: whiten.PSGDKron(g, preconditioner_update_probability=1.0, process_group=pg),
    "ScheduleFreeAdamW": lambda g, pg, r: whiten.ScheduleFreeAdamW(g, process_group=pg),
}


class ByteCounter:
    """Counts the bytes this rank receives through the collectives whiten's distributed layer uses."""

    def __init__(self):
        self.received = 0
        self._orig = {}

    def __enter__(self):
        rank = dist.get_rank()
        orig = self._orig = {k: getattr(dist, k) for k in ("broadcast", "all_to_all_single", "all_reduce")}

        def broadcast(tensor, src, group=None, **kw):
            if src != rank:
                self.received += tensor.numel() * tensor.element_size()
            return orig["broadcast"](tensor, src, group=group, **kw)

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            sizes = output_split_sizes or [output.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
            self.received += (sum(sizes) - sizes[dist.get_rank(group)]) * output.element_size()
            return orig["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            self.received += tensor.numel() * tensor.element_size()
            return orig["all_reduce"](tensor, op=op, group=group, **kw)

        dist.broadcast, dist.all_to_all_single, dist.all_reduce = broadcast, all_to_all_single, all_reduce
        return self

    def __exit__(self, *exc):
        for k, v in self._orig.items():
            setattr(dist, k, v)


def minimum_bytes(ctx) -> int:
    rank, total = ctx.rank, 0
    for p in ctx.params:
        if ctx.is_local(p):  # elementwise: stepped where it lies
            continue
        if p not in ctx.blocks:  # replicated
            total += 0 if ctx.owns(p) else p.numel() * p.element_size()
            continue
        elt = p.to_local().element_size()
        mine = math.prod(ctx.blocks[p][rank][1])
        if ctx.owns(p):
            distinct = {b for b in ctx.blocks[p] if math.prod(b[1])}
            held = ctx.blocks[p][rank] if mine else None
            total += 2 * sum(math.prod(size) for offset, size in distinct if (offset, size) != held) * elt
        else:
            total += mine * elt
    return total


TP_PLAN = {"q": "col", "k": "col", "v": "col", "fc1": "col", "o": "row", "fc2": "row"}


def lay_out(net, mode: str, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def tp(mesh):
        plan = {f"blocks.{i}.{n}": ColwiseParallel() if kind == "col" else RowwiseParallel()
                for i in range(len(net.blocks)) for n, kind in TP_PLAN.items()}
        parallelize_module(net, mesh, plan)

    if mode == "fsdp":
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    elif mode == "tp":
        tp(init_device_mesh("cpu", (world,)))
    elif mode == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        tp(mesh["tp"])
        fully_shard(net, mesh=mesh["dp"])
    elif mode == "hsdp":
        fully_shard(net, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))


def place(g, p):
    """Full gradient ``g`` laid out as parameter ``p`` (distribute_tensor does not take FSDP2's _StridedShard)."""
    from torch.distributed.tensor import DTensor

    from whiten.distributed import local_block

    if not isinstance(p, DTensor):
        return g
    mesh = p.device_mesh
    offset, shape = local_block(tuple(p.shape), tuple(mesh.shape), mesh.get_coordinate(), p.placements)
    local = g[tuple(slice(o, o + n) for o, n in zip(offset, shape))].contiguous()
    return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def model(args):
    torch.manual_seed(0)
    return GPT(vocab_size=args.vocab, ctx=args.ctx, width=args.width, depth=args.depth, heads=args.heads)


def worker(rank, world, store_path, args, mode, name, scheme, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        net = model(args)
        if world > 1 or mode == "fsdp":
            lay_out(net, mode, world)
        opt = FACTORIES[name](whiten.param_groups(net), dist.group.WORLD if mode == "ddp" else None, args.refresh)
        if scheme == "owners":  # every parameter on an owner, elementwise ones too
            opt.elementwise = lambda p, group: False
        params = [p for g in opt.param_groups for p in g["params"]]
        times = {True: [], False: []}  # by overlap_exchanges
        with ByteCounter() as counter:
            for t in range(args.warmup + args.steps):
                gen = torch.Generator().manual_seed(t)
                for p in params:
                    p.grad = place(torch.randn(p.shape, generator=gen) * 1e-2, p)
                if t == args.warmup:
                    counter.received = 0
                # "ab": overlap on and off in turn (on, off, off, on, ...: the refreshes every 10 steps fall on
                # both), in the same processes under the same load
                if args.overlap != "auto":
                    opt.overlap_exchanges = t % 4 in (0, 3) if args.overlap == "ab" else args.overlap == "on"
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                if t >= args.warmup:
                    times[opt.overlap_exchanges is not False].append(time.perf_counter() - t0)
        ctx = opt.distributed_context()
        work = ctx.ranks_work() if ctx else [1.0]
        timed = times[True] or times[False]
        queue.put((rank, pickle.dumps({"work": work[rank], "step_ms": statistics.median(timed) * 1e3,
                                       "mean_ms": statistics.mean(timed) * 1e3,
                                       "off_ms": statistics.median(times[False]) * 1e3 if times[False] else None,
                                       "bytes": counter.received / args.steps,
                                       "minimum": minimum_bytes(ctx) if ctx else 0})))
    finally:
        dist.destroy_process_group()


def measure(args, mode, name, world, scheme="local"):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    fd, store = tempfile.mkstemp(prefix="whiten-scaling-")
    os.close(fd)
    os.unlink(store)
    procs = [ctx.Process(target=worker, args=(r, world, store, args, mode, name, scheme, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for _ in range(world):
        rank, blob = queue.get(timeout=args.timeout)
        out[rank] = pickle.loads(blob)
    for p in procs:
        p.join(timeout=10)
    return [out[r] for r in range(world)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", default=",".join(FACTORIES))
    ap.add_argument("--modes", default="ddp,fsdp")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65, help="vocabulary (the embedding and head: AdamW's share)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--refresh", type=int, default=10, help="refresh interval (SPlus, SOAP, Shampoo)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (two refresh periods by default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--overlap", choices=("auto", "on", "off", "ab"), default="auto",
                    help="overlap the owners' exchanges with their math: the optimizer's default (auto: on for NCCL, "
                         "off for gloo), on, off, or both in turn, step by step (ab: the step ms column is overlap "
                         "on, one more column overlap off)")
    ap.add_argument("--schemes", default="local",
                    help="local (elementwise parameters stepped where they lie) and/or owners (every parameter on "
                         "an owner: the scheme before), comma-separated")
    args = ap.parse_args()
    print(f"GPT width {args.width}, depth {args.depth}, vocabulary {args.vocab}; {args.steps} timed steps, refresh every "
          f"{args.refresh}; torch {torch.__version__}, {os.cpu_count()} cores, 1 thread per rank\n")
    ab = args.overlap == "ab"
    print("| optimizer | mode | ranks | scheme | planned work max/mean | step ms per rank (median) | "
          + ("step ms per rank, overlap off | " if ab else "") + "step time max/mean | MB received per step per rank "
          "(max) | MB received per step, all ranks | bytes / minimum |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ab else ""))
    for name in args.optimizers.split(","):
        for mode in args.modes.split(","):
            for world in map(int, args.worlds.split(",")):
                for scheme in args.schemes.split(","):
                    res = measure(args, mode, name, world, scheme)
                    work = [r["work"] for r in res]
                    ms = [r["step_ms"] for r in res]
                    ratios = [r["bytes"] / r["minimum"] for r in res if r["minimum"]]
                    ratio = f"{max(ratios):.3f}" if world > 1 and ratios else "-"
                    off = ", ".join(f"{r['off_ms']:.0f}" for r in res) if ab else ""
                    print(f"| {name} | {mode} | {world} | {scheme} | {max(work) / (sum(work) / world):.3f} | "
                          f"{', '.join(f'{m:.0f}' for m in ms)} | " + (f"{off} | " if ab else "")
                          + f"{max(ms) / statistics.mean(ms):.2f} | "
                          f"{max(r['bytes'] for r in res) / 1e6:.3f} | {sum(r['bytes'] for r in res) / 1e6:.3f} | "
                          f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
