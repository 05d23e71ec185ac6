"""The plan for one optimizer on one process group, and the exchanges of a distributed step: gradients and values
of sharded parameters to their owners before the step, new values from the owners after it."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from .collectives import any_true, broadcast_flat, collective_device, sum_values, world_and_rank
from .layout import SUPPORTED_LAYOUTS, is_dtensor, local_block, local_shard
from .plan import plan

__all__ = ["DistributedContext", "read_layout", "pick_sources", "block"]


def block(t: torch.Tensor, offset, size) -> torch.Tensor:
    """The view of ``t`` at ``offset`` of ``size`` (one entry per dim)."""
    for d, (o, n) in enumerate(zip(offset, size)):
        if o or n != t.shape[d]:
            t = t.narrow(d, o, n)
    return t


def read_layout(name: str, params: list[torch.Tensor], group, world: int) -> dict:
    """``{sharded parameter: [(offset, size) of the block each rank of group holds]}``, for every DTensor
    parameter, whatever its placements and mesh (:func:`whiten.distributed.layout.local_block`). Where each
    parameter's mesh holds exactly the group's ranks (FSDP2, TP, FSDP2 x TP and HSDP on one mesh), every rank reads
    every rank's block from the mesh. Parameters of one model may also live on different meshes (an embedding on
    the data-parallel sub-mesh beside TP blocks on the 2-D mesh): a rank knows only its own sub-mesh, so each rank
    reads its blocks and one ``all_gather_object`` shares them (every rank builds the context at the same step).
    Checks that the distinct blocks tile each full tensor (no gap, no overlap), so that the owner's assembled
    tensor is the parameter."""
    ranks = [dist.get_global_rank(group, r) for r in range(world)] if world > 1 else None
    dtensors = [p for p in params if is_dtensor(p)]
    gathered = not (ranks is None or all(sorted(p.device_mesh.mesh.flatten().tolist()) == sorted(ranks)
                                         for p in dtensors))
    if not gathered:
        # one pass per distinct (shape, placements, mesh): a model's layers repeat a few layouts
        layouts: dict = {}
        columns = []
        for p in params:
            if not is_dtensor(p):
                columns.append([None] * world)
                continue
            key = (tuple(p.shape), tuple(p.placements), id(p.device_mesh))
            if key not in layouts:
                mine = _block_at(name, p, None)  # checked against the local shard
                if ranks is None:
                    layouts[key] = [mine]
                else:
                    where = {g: i for i, g in enumerate(p.device_mesh.mesh.flatten().tolist())}
                    layouts[key] = [_block_at(name, p, where[g]) for g in ranks]
            columns.append(layouts[key])
        tables = [[column[r] for column in columns] for r in range(world)]
    else:
        tables = [None] * world
        mine = [(tuple(p.shape), _block_at(name, p, None) if is_dtensor(p) else None) for p in params]
        dist.all_gather_object(tables, mine, group=group)
        shapes = [tuple(p.shape) for p in params]
        for r, table in enumerate(tables):
            if [s for s, _ in table] != shapes:
                raise ValueError(f"{name}: rank {r} of the group holds other parameters ({len(table)}) than rank "
                                 f"{dist.get_rank(group)} ({len(shapes)}); every rank must hold the same ones")
        tables = [[b for _, b in table] for table in tables]
    out = {}
    for i, p in enumerate(params):
        kinds = {tables[r][i] is None for r in range(world)}
        if kinds == {True}:
            continue  # plain on every rank: replicated
        if len(kinds) > 1:
            raise ValueError(f"{name}: parameter {i} (shape {tuple(p.shape)}) is a DTensor on some ranks and a plain "
                             f"tensor on others; {SUPPORTED_LAYOUTS}")
        blocks = [tables[r][i] for r in range(world)]
        # one mesh that spans the group tiles the tensor by construction (torch.chunk pieces); blocks gathered
        # from several meshes are checked
        if gathered and not _tiles(tuple(p.shape), {b for b in blocks if math.prod(b[1])}):
            raise ValueError(f"{name}: the shards of a DTensor parameter of shape {tuple(p.shape)} placed as "
                             f"{tuple(p.placements)} do not tile it over the {world} ranks of the group (blocks "
                             f"{blocks}); its mesh's ranks must be in the group; {SUPPORTED_LAYOUTS}")
        out[p] = blocks
    return out


def _block_at(name: str, p, index: int | None) -> tuple:
    """The block of DTensor ``p`` that the rank at flat ``index`` of its mesh holds (None: this rank, whose local
    shard is checked against it)."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    where = f"a DTensor parameter of shape {tuple(p.shape)} placed as {placements} on a mesh of shape " \
            f"{tuple(mesh.shape)}"
    if index is None:
        coordinate = mesh.get_coordinate()
    else:
        coordinate, rest = [], index
        for n in reversed(mesh.shape):
            coordinate.insert(0, rest % n)
            rest //= n
    try:
        offset, size = local_block(tuple(p.shape), tuple(mesh.shape), coordinate, placements)
    except ValueError as e:
        raise ValueError(f"{name}: {where} uses {e}; {SUPPORTED_LAYOUTS}") from None
    if index is None and tuple(p.to_local().shape) != size:
        raise ValueError(f"{name}: {where} has a local shard of shape {tuple(p.to_local().shape)} where the "
                         f"placements give {size}; {SUPPORTED_LAYOUTS}")
    return offset, size


def _tiles(shape, blocks) -> bool:
    """Whether the distinct ``blocks`` cover ``shape`` exactly: sizes add up and no two overlap."""
    if sum(math.prod(size) for _, size in blocks) != math.prod(shape):
        return False
    blocks = sorted(blocks)
    for a, (oa, sa) in enumerate(blocks):
        for ob, sb in blocks[a + 1:]:
            if all(x < y + m and y < x + n for x, n, y, m in zip(oa, sa, ob, sb)):
                return False
    return True


def pick_sources(blocks: list, owner: int, index: int) -> list[tuple]:
    """``[(rank, offset, size)]``: one rank per distinct non-empty block, the owner where it holds the block (no
    bytes), else one of its holders, taken in turn by the parameter's ``index`` so replicas share the sending."""
    holders: dict = {}
    for r, b in enumerate(blocks):
        if math.prod(b[1]):
            holders.setdefault(b, []).append(r)
    out = []
    for b, ranks in holders.items():
        r = owner if owner in ranks else ranks[index % len(ranks)]
        out.append((r, *b))
    return out


class DistributedContext:
    """The plan for one optimizer on one process group: owners, the block of each sharded parameter every rank
    holds, where each owner takes each block from, full-size stand-ins for owned sharded parameters, and the
    collectives. Rebuilt when the parameters change; holds no training state."""

    def __init__(self, optimizer, group):
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.owner, self.costs = plan(optimizer, self.world)
        # sharded parameter -> (offset, size) of the block of the full tensor each rank of the group holds
        self.blocks: dict = read_layout(type(optimizer).__name__, self.params, group, self.world)
        # sharded parameter -> [(rank, offset, size)]: the rank each block goes to the owner from, one per distinct
        # non-empty block, the owner itself where it holds it (replicas: HSDP's Replicate, TP's replicated norms)
        self.sources: dict = {}
        for i, p in enumerate(self.params):
            if p in self.blocks:
                self.sources[p] = pick_sources(self.blocks[p], self.owner[p], i)
        self.full: dict = {}  # owned sharded parameter -> full-size plain tensor the step works on
        for p in self.params:
            if p in self.blocks and self.owner[p] == self.rank:
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
    @property
    def device(self) -> torch.device:
        """Where this group's collectives take their tensors."""
        return collective_device(self.group)

    def sum_values(self, values: list[float]) -> list[float]:
        """Python numbers summed over the ranks, in float64."""
        return sum_values(values, self.group)

    def agree(self, present: list[torch.Tensor], nonfinite_local: bool) -> tuple[list[bool], bool]:
        """One collective before a step: which parameters have a gradient (their owner's for replicated ones, any
        shard's for sharded ones) and whether any rank saw a non-finite gradient."""
        mask = [0.0] * (len(self.params) + 1)
        mine = set(map(id, present))
        for i, p in enumerate(self.params):
            if id(p) in mine and (p in self.blocks or self.owns(p)):
                mask[i] = 1.0
        mask[-1] = 1.0 if nonfinite_local else 0.0
        flags = any_true(mask, self.group)
        return flags[:-1], flags[-1]

    def _exchange(self, dtypes: list, outgoing: dict[int, list[torch.Tensor]],
                  incoming: dict[int, list[tuple]]) -> dict:
        """Send ``outgoing[r]`` (tensors, flattened) to rank r and receive ``incoming[r]`` (``(numel, dtype)``
        pieces) from rank r: one ``all_to_all_single`` per dtype in ``dtypes``, which must be the same list on every
        rank (it comes from the plan). Returns ``{r: [flat tensors]}`` in the order of ``incoming[r]``."""
        device = self.device
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
        """Bring the blocks of ``params`` (sharded ones; the same list on every rank) to their owners, who assemble
        the full value (and gradient) in their stand-ins. Replicated parameters need nothing."""
        sharded = [p for p in params if p in self.blocks]
        if not sharded:
            return
        locals_ = []
        for p in sharded:
            local = p.to_local()
            if with_grad:
                # torch keeps a gradient in its parameter's dtype; a rank without one sends zeros
                grad = self._local_grad(p) if p.grad is not None else torch.zeros_like(local)
                locals_.append([grad, local])
            else:
                locals_.append([local])
        assembled = self._to_owners(sharded, locals_)
        for p, parts in assembled.items():
            full = self.full[p]
            if with_grad:
                full.grad = parts[0]
            full.copy_(parts[-1])

    def _local_grad(self, p) -> torch.Tensor:
        """This rank's block of ``p``'s gradient, laid out as the parameter (a gradient placed otherwise, e.g.
        ``Partial``, is redistributed first: DTensor's own reduction)."""
        g = p.grad
        if is_dtensor(g) and tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
        return local_shard(g)

    def _to_owners(self, params: list, tensors: list[list[torch.Tensor]]) -> dict:
        """Send this rank's block of each tensor of ``tensors[i]`` (laid out as ``params[i]``, sharded, the same
        list on every rank) to the owner where the plan takes that block from this rank. Returns, on each owner,
        ``{parameter: [full tensors, one per entry of tensors[i]]}``."""
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p, ts in zip(params, tensors):
            o = self.owner[p]
            for r, _, size in self.sources[p]:
                if r == self.rank:
                    outgoing[o] += ts
                if o == self.rank:
                    incoming[r] += [(math.prod(size), t.dtype) for t in ts]
        received = self._exchange(sorted({t.dtype for ts in tensors for t in ts}, key=str), outgoing, incoming)
        cursor = {r: 0 for r in range(self.world)}
        out = {}
        for p, ts in zip(params, tensors):
            if self.owner[p] != self.rank:
                continue
            fulls = [torch.empty(p.shape, dtype=t.dtype, device=t.device) for t in ts]
            for r, offset, size in self.sources[p]:
                for full in fulls:
                    block(full, offset, size).copy_(received[r][cursor[r]].view(size))
                    cursor[r] += 1
            out[p] = fulls
        return out

    def gather_to_owners(self, params: list[torch.Tensor], shards: list[torch.Tensor]) -> dict:
        """Assemble, on each owner, full tensors from every rank's blocks: ``params`` are sharded parameters (the
        same list on every rank), ``shards[i]`` this rank's block of a tensor laid out as ``params[i]`` (same dtype
        on every rank). Returns ``{parameter: full tensor}`` for the parameters this rank owns."""
        return {p: fulls[0] for p, fulls in self._to_owners(params, [[s] for s in shards]).items()}

    def publish(self, params: list[torch.Tensor]) -> None:
        """Give every rank the new values of ``params`` (the same list on every rank) from their owners."""
        replicated = [p for p in params if p not in self.blocks]
        sharded = [p for p in params if p in self.blocks]
        for owner in range(self.world):
            mine = [p for p in replicated if self.owner[p] == owner]
            by_dtype: dict = defaultdict(list)
            for p in mine:
                by_dtype[p.dtype].append(p)
            for dtype, ps in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                flat = broadcast_flat([p.detach() for p in ps] if owner == self.rank else None,
                                      sum(p.numel() for p in ps), dtype, owner, self.group)
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
            if o == self.rank:  # each rank's block of the new value, replicas included
                for r, (offset, size) in enumerate(self.blocks[p]):
                    if math.prod(size):
                        outgoing[r].append(block(self.full[p], offset, size))
            if local.numel():
                incoming[o].append((local.numel(), local.dtype))
        received = self._exchange(sorted({p.dtype for p in sharded}, key=str), outgoing, incoming)
        cursor = {r: 0 for r in range(self.world)}
        for p in sharded:
            o = self.owner[p]
            local = p.to_local()
            if local.numel():
                local.copy_(received[o][cursor[o]].view(local.shape))
                cursor[o] += 1
