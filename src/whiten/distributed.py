"""Running a whiten optimizer on several processes: DDP (replicated parameters) and FSDP2 (``fully_shard``, DTensor
parameters sharded along dim 0), with the numbers of a single process.

The unit of work is a parameter. Every parameter has one owner rank, chosen by a deterministic, cost-balanced plan
(greedy, largest first, on :meth:`WhitenOptimizer.work_cost`), recomputed from the shapes whenever it is needed and
never stored. The owner keeps the parameter's whole optimizer state, full size, and runs exactly the single-process
step for it: the factor statistics, the refreshes (eigh, QR, inverse roots, Newton–Schulz) and the elementwise
work. The new values then go back to the other ranks:

* replicated parameters (DDP; the gradients are already averaged): each owner broadcasts its updated parameters,
  one flat buffer per owner and dtype;
* sharded parameters (FSDP2): before the step, one ``all_to_all_single`` per dtype (exact sizes, no padding) brings every shard of an
  owned parameter's gradient and value to its owner, which assembles the full tensors; after the step a second one
  sends each rank its rows of the new value.

Why whole parameters rather than only the refreshes: a whitening step's per-step matrix work (factor updates,
rotations, Newton–Schulz) costs as much as its refreshes, so splitting only the refreshes would leave every rank
doing most of the work; and the owner holding the full state is what lets it run the single-device math with no
extra communication of momenta or factors. The state of the optimizer is then split over the ranks (1/N each),
like ZeRO-1.

Checkpoints: each rank's ``state_dict()`` holds the full state of the parameters it owns and an empty entry for the
others, so ``torch.distributed.checkpoint`` saves every entry once and, on load, each rank reads the entries of the
parameters it owns under the new world size. Anything global (counters, random generators) is identical on every
rank and travels in ``param_groups``.

The non-finite check is global: all ranks skip (or raise) together, and counters agree across ranks.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = ["plan", "plan_owners", "shard_rows", "DistributedContext", "full_state_dict", "flattened_by",
           "FLATTENED_HINT"]


# What to use instead of a wrapper that hands the optimizer flattened slices (FSDP1, DeepSpeed ZeRO).
FLATTENED_HINT = ("whiten would step such a slice as a vector (elementwise, not whitened) and give other numbers "
                  "than one process. Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version=2; "
                  "Lightning: ModelParallelStrategy) or DDP, whose parameters whiten steps with the single-device "
                  "numbers (docs/distributed.md)")


def flattened_by(p: torch.Tensor) -> str | None:
    """The wrapper that turned ``p`` into a flattened slice of parameters, or None.

    FSDP1 (``FullyShardedDataParallel``) marks every tensor it flattens with ``_fsdp_flattened``: its
    ``FlatParameter`` (``use_orig_params=False``) and the original parameters, which between forward passes are
    1-D views into this rank's slice of it (``use_orig_params=True``). DeepSpeed ZeRO-3 marks with ``ds_id`` both
    the parameters it partitions in place (shape ``(0,)`` outside a forward pass) and the flat fp32 slice of a
    group that it puts in the optimizer's group for each ``step()`` call (``ds_id`` a string such as ``'0_3'``,
    the first and last parameter ids it holds). (ZeRO-1/2 and DeepSpeed's bf16 optimizer put unmarked flat fp32
    slices into the optimizer's groups; those are caught because they do not replace the group's parameters one
    for one, see :meth:`WhitenOptimizer.check_parameters`.)"""
    if getattr(p, "_fsdp_flattened", False):
        return "FSDP1 (FullyShardedDataParallel), which hands the optimizer flat 1-D slices of its parameters"
    if hasattr(p, "ds_id"):
        return "DeepSpeed ZeRO-3, which partitions the parameters and hands the optimizer flat 1-D slices of them"
    return None


def plan_owners(costs: list[float], world: int) -> list[int]:
    """The owner of each unit: greedy, largest cost first (ties by position), onto the least loaded rank (ties by
    rank). Deterministic, so every rank computes the same plan."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def plan(optimizer, world: int) -> tuple[dict, dict]:
    """``({parameter: owner rank}, {parameter: cost})`` for ``optimizer`` over ``world`` ranks.

    A parameter is a unit of its own when its batched matrix products give the same bits in any stack
    (:meth:`WhitenOptimizer.stack_invariant`); the others of a group form one unit, so their stacks are those of
    one process and the run stays bit-identical to it."""
    costs: dict = {}
    units: dict = {}  # unit key -> its parameters
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            costs[p] = float(optimizer.work_cost(p, g))
            key = ("param", len(costs)) if optimizer.stack_invariant(p, g) else ("group", gi)
            units.setdefault(key, []).append(p)
    unit_list = list(units.values())
    owners = plan_owners([sum(costs[p] for p in u) for u in unit_list], world)
    return {p: r for u, r in zip(unit_list, owners) for p in u}, costs


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard under ``Shard(0)`` as FSDP2 lays them out: ``torch.chunk`` sizes, empty shards
    at the end where the rows run out."""
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor


def _is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def collective_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def process_group_of(params: list[torch.Tensor], process_group):
    """The group a run spans: the one given, else the mesh of DTensor parameters, else None (one process)."""
    if process_group is not None:
        return process_group
    meshes = {id(p.device_mesh): p.device_mesh for p in params if _is_dtensor(p)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("parameters are sharded over more than one device mesh; pass process_group= explicitly")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"parameters are sharded over a {mesh.ndim}-D device mesh; whiten supports 1-D meshes "
                         "(FSDP2 fully_shard); pass process_group= for the data-parallel dimension")
    return mesh.get_group()


class DistributedContext:
    """The plan for one optimizer on one process group: owners, shard layouts, full-size stand-ins for owned
    sharded parameters, and the collectives. Rebuilt when the parameters change; holds no training state."""

    def __init__(self, optimizer, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.owner, self.costs = plan(optimizer, self.world)
        self.rows: dict = {}  # sharded parameter -> rows of each rank's shard
        for p in self.params:
            if _is_dtensor(p):
                placements = tuple(p.placements)
                if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim != 0:
                    raise ValueError(f"{type(optimizer).__name__}: a DTensor parameter of shape {tuple(p.shape)} is "
                                     f"placed as {placements}; whiten supports Shard(0) (FSDP2's fully_shard)")
                rows = shard_rows(p.shape[0], self.world)
                if p.to_local().shape[0] != rows[self.rank]:
                    raise ValueError(f"{type(optimizer).__name__}: a shard of shape {tuple(p.to_local().shape)} "
                                     f"does not follow FSDP2's Shard(0) layout {rows}")
                self.rows[p] = rows
        self.full: dict = {}  # owned sharded parameter -> full-size plain tensor the step works on
        for p in self.params:
            if p in self.rows and self.owner[p] == self.rank:
                local = p.to_local()
                self.full[p] = torch.empty(p.shape, dtype=local.dtype, device=local.device)

    # ----- who does what ------------------------------------------------------------------------------------------
    def owns(self, p) -> bool:
        return self.owner[p] == self.rank

    def view(self, p):
        """What the optimizer's math works on for an owned parameter: the parameter, or its full stand-in."""
        return self.full.get(p, p)

    def ranks_work(self) -> list[float]:
        load = [0.0] * self.world
        for p, r in self.owner.items():
            load[r] += self.costs[p]
        return load

    # ----- collectives ---------------------------------------------------------------------------------------------
    def all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def _device(self) -> torch.device:
        return collective_device(self.group)

    def agree(self, present: list[torch.Tensor], nonfinite_local: bool) -> tuple[list[bool], bool]:
        """One collective before a step: which parameters have a gradient (their owner's for replicated ones, any
        shard's for sharded ones) and whether any rank saw a non-finite gradient."""
        mask = [0.0] * (len(self.params) + 1)
        mine = set(map(id, present))
        for i, p in enumerate(self.params):
            if id(p) in mine and (p in self.rows or self.owns(p)):
                mask[i] = 1.0
        mask[-1] = 1.0 if nonfinite_local else 0.0
        t = torch.tensor(mask, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        flags = (t > 0).tolist()
        return flags[:-1], flags[-1]

    def _exchange(self, dtypes: list, outgoing: dict[int, list[torch.Tensor]],
                  incoming: dict[int, list[tuple]]) -> dict:
        """Send ``outgoing[r]`` (tensors, flattened) to rank r and receive ``incoming[r]`` (``(numel, dtype)``
        pieces) from rank r: one ``all_to_all_single`` per dtype in ``dtypes``, which must be the same list on every
        rank (it comes from the plan). Returns ``{r: [flat tensors]}`` in the order of ``incoming[r]``."""
        device = self._device()
        received: dict = {r: [None] * len(incoming.get(r, [])) for r in range(self.world)}
        for dtype in dtypes:
            send_parts, send_sizes = [], []
            for r in range(self.world):
                parts = [t.reshape(-1) for t in outgoing.get(r, []) if t.dtype == dtype]
                send_parts += parts
                send_sizes.append(sum(t.numel() for t in parts))
            recv_sizes = [sum(n for n, dt in incoming.get(r, []) if dt == dtype) for r in range(self.world)]
            if send_parts:
                send = torch.cat([t.to(device) for t in send_parts])
            else:
                send = torch.empty(0, dtype=dtype, device=device)
            recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
            dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
            offset = 0
            for r in range(self.world):
                for j, (n, dt) in enumerate(incoming.get(r, [])):
                    if dt == dtype:
                        received[r][j] = recv[offset:offset + n]
                        offset += n
        return received

    def gather_full(self, params: list[torch.Tensor], with_grad: bool) -> None:
        """Bring the shards of ``params`` (sharded ones; the same list on every rank) to their owners, who assemble
        the full value (and gradient) in their stand-ins. Replicated parameters need nothing."""
        sharded = [p for p in params if p in self.rows]
        if not sharded:
            return
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p in sharded:
            local = p.to_local()
            o = self.owner[p]
            tail = local.shape[1:].numel()
            if with_grad:
                # torch keeps a gradient in its parameter's dtype; a rank without one sends zeros
                grad = _local(p.grad) if p.grad is not None else torch.zeros_like(local)
                outgoing[o].append(grad)
            outgoing[o].append(local)
            if o == self.rank:
                for r, n in enumerate(self.rows[p]):
                    if with_grad:
                        incoming[r].append((n * tail, local.dtype))
                    incoming[r].append((n * tail, local.dtype))
        received = self._exchange(sorted({p.dtype for p in sharded}, key=str), outgoing, incoming)
        cursor = {r: 0 for r in range(self.world)}
        for p in sharded:
            if self.owner[p] != self.rank:
                continue
            full = self.full[p]
            grad_parts, value_parts = [], []
            for r in range(self.world):
                if with_grad:
                    grad_parts.append(received[r][cursor[r]])
                    cursor[r] += 1
                value_parts.append(received[r][cursor[r]])
                cursor[r] += 1
            full.copy_(torch.cat(value_parts).view(full.shape))
            if with_grad:
                full.grad = torch.cat(grad_parts).view(full.shape)

    def gather_to_owners(self, params: list[torch.Tensor], shards: list[torch.Tensor]) -> dict:
        """Assemble, on each owner, full tensors from every rank's rows: ``params`` are sharded parameters (the same
        list on every rank), ``shards[i]`` this rank's rows of a tensor laid out as ``params[i]`` (same dtype on
        every rank). Returns ``{parameter: full tensor}`` for the parameters this rank owns."""
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p, shard in zip(params, shards):
            o = self.owner[p]
            outgoing[o].append(shard)
            if o == self.rank:
                tail = p.shape[1:].numel()
                for r, n in enumerate(self.rows[p]):
                    incoming[r].append((n * tail, shard.dtype))
        received = self._exchange(sorted({s.dtype for s in shards}, key=str), outgoing, incoming)
        cursor = {r: 0 for r in range(self.world)}
        out = {}
        for p in params:
            if self.owner[p] != self.rank:
                continue
            parts = []
            for r in range(self.world):
                parts.append(received[r][cursor[r]])
                cursor[r] += 1
            out[p] = torch.cat(parts).view(p.shape).to(_local(p).device)
        return out

    def publish(self, params: list[torch.Tensor]) -> None:
        """Give every rank the new values of ``params`` (the same list on every rank) from their owners."""
        replicated = [p for p in params if p not in self.rows]
        sharded = [p for p in params if p in self.rows]
        for owner in range(self.world):
            mine = [p for p in replicated if self.owner[p] == owner]
            by_dtype: dict = defaultdict(list)
            for p in mine:
                by_dtype[p.dtype].append(p)
            for dtype, ps in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                if owner == self.rank:
                    flat = torch.cat([p.detach().reshape(-1) for p in ps])
                else:
                    flat = torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
                dist.broadcast(flat, src=dist.get_global_rank(self.group, owner), group=self.group)
                if owner != self.rank:
                    offset = 0
                    for p in ps:
                        p.detach().copy_(flat[offset:offset + p.numel()].view(p.shape))
                        offset += p.numel()
        if not sharded:
            return
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p in sharded:
            local = p.to_local()
            o = self.owner[p]
            if o == self.rank:  # each rank's rows of the new value
                for r, rows in enumerate(self.full[p].split(self.rows[p])):
                    outgoing[r].append(rows)
            incoming[o].append((local.numel(), local.dtype))
        received = self._exchange(sorted({p.dtype for p in sharded}, key=str), outgoing, incoming)
        cursor = {r: 0 for r in range(self.world)}
        for p in sharded:
            o = self.owner[p]
            local = p.to_local()
            local.copy_(received[o][cursor[o]].view(local.shape))
            cursor[o] += 1


def full_state_dict(optimizer) -> dict:
    """The whole ``state_dict()`` of a distributed whiten optimizer, the same on every rank, in the layout of one
    process: a collective, so every rank must call it. For scripts that save with ``torch.save`` on rank 0
    (nanoGPT-style DDP); a plain ``optimizer.state_dict()`` there holds only rank 0's parameters. Loading it on any
    number of ranks works: each rank keeps the entries of the parameters it owns."""
    sd = optimizer.state_dict()
    ctx = optimizer.distributed_context()
    if ctx is None:
        return sd
    index = {p: i for i, p in enumerate(ctx.params)}  # state_dict numbers parameters in group order
    for owner in range(ctx.world):
        mine = {index[p]: sd["state"][index[p]] for p in ctx.params
                if ctx.owner[p] == owner and index[p] in sd["state"]} if owner == ctx.rank else None
        box = [mine]
        dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.group, owner), group=ctx.group)
        sd["state"].update(box[0])
    sd["state"] = {i: e for i, e in sd["state"].items() if e}  # drop the empty marks of parameters owned elsewhere
    return sd
