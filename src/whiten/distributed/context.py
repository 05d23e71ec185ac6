"""The plan for one optimizer on one process group, and the exchanges of a distributed step: gradients and values
of sharded parameters to their owners before the step, new values from the owners after it."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from .collectives import any_true, broadcast_flat, collective_device, sum_values, world_and_rank
from .layout import SUPPORTED_LAYOUTS, is_dtensor, local_block, local_shard
from .plan import Expert, plan

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


def _expert_block(parent: tuple, index: int) -> tuple:
    """The block of expert ``index``'s matrix that a rank holding ``parent`` (offset, size) of the experts
    parameter holds: its trailing dims, or an empty block where the rank holds none of that expert."""
    (o, *offset), (n, *size) = parent
    if o <= index < o + n and math.prod(size):
        return tuple(offset), tuple(size)
    return tuple(0 for _ in offset), tuple(0 for _ in size)


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
        # parameters whose whole update is elementwise: no owner, every rank steps the block it holds (a replicated
        # one whole, redundantly) and keeps its state as that block, so nothing of theirs crosses the network
        self.local = [p for gi, g in enumerate(optimizer.param_groups) for p in g["params"]
                      if optimizer.steps_locally(p, g)]
        self._local_ids = {id(p) for p in self.local}
        self._views: dict = {}  # sharded elementwise parameter -> the plain alias of its local shard
        # sharded parameter -> (offset, size) of the block of the full tensor each rank of the group holds
        self.blocks: dict = read_layout(type(optimizer).__name__, self.params, group, self.world)
        # sharded parameter -> [(rank, offset, size)]: the rank each block goes to the owner from, one per distinct
        # non-empty block, the owner itself where it holds it (replicas: HSDP's Replicate, TP's replicated norms)
        self.sources: dict = {}
        for i, p in enumerate(self.params):
            if p in self.blocks and p in self.owner:  # not an experts or elementwise parameter
                self.sources[p] = pick_sources(self.blocks[p], self.owner[p], i)
        self.full: dict = {}  # owned sharded parameter -> full-size plain tensor the step works on
        for p in self.params:
            if p in self.blocks and self.owner.get(p) == self.rank:
                local = p.to_local()
                self.full[p] = torch.empty(p.shape, dtype=local.dtype, device=local.device)
        # experts parameter -> its experts (units of their own), each owned expert -> the matrix its step works on
        self.experts: dict = defaultdict(list)
        for x in self.owner:
            if isinstance(x, Expert):
                self.experts[x.param].append(x)
        self.experts = dict(self.experts)
        self.expert_full: dict = {}
        for i, p in enumerate(self.params):
            for x in self.experts.get(p, []):
                if p in self.blocks:
                    self.blocks[x] = [_expert_block(b, x.index) for b in self.blocks[p]]
                    self.sources[x] = pick_sources(self.blocks[x], self.owner[x], i + x.index)
                if self.owner[x] == self.rank:
                    local = local_shard(p)
                    self.expert_full[x] = torch.empty(x.shape, dtype=local.dtype, device=local.device)
        self._mesh = None

    # ----- who does what ------------------------------------------------------------------------------------------
    def is_local(self, p) -> bool:
        """Whether ``p`` is stepped where it lies: every rank steps its block, no owner (elementwise updates)."""
        return id(p) in self._local_ids

    def is_local_view(self, t) -> bool:
        """Whether ``t`` is what the step sees of an elementwise parameter: the parameter itself (replicated) or
        the alias of its block (sharded)."""
        return id(t) in self._local_ids or any(v is t for v in self._views.values())

    def owns(self, p) -> bool:
        """Whether this rank steps ``p`` (an experts parameter: at least one of its experts; an elementwise
        parameter: every rank, its own block)."""
        if id(p) in self._local_ids:
            return True
        if p in self.experts:
            return any(self.owner[x] == self.rank for x in self.experts[p])
        return self.owner[p] == self.rank

    def owned_experts(self, p) -> list:
        """The experts of ``p`` this rank steps, in order: one ``torch.chunk`` piece of them (see ``expert_owner``)."""
        return [x for x in self.experts.get(p, []) if self.owner[x] == self.rank]

    @property
    def mesh(self):
        """A 1-D device mesh over the group: the experts' stacked state is a DTensor ``Shard(0)`` on it."""
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.group, self.device.type)
        return self._mesh

    def expert_view(self, x):
        """What the step sees for expert ``x``: its matrix where this rank owns it, else a stand-in without memory
        (for :meth:`WhitenOptimizer.before_step`, which needs every expert in order on every rank)."""
        if x in self.expert_full:
            return self.expert_full[x]
        stand_ins = self.__dict__.setdefault("_stand_ins", {})
        if x not in stand_ins:  # one element, expanded: the shape, dtype and device, no memory
            local = local_shard(x.param)
            stand_ins[x] = torch.zeros((), dtype=local.dtype, device=local.device).expand(tuple(x.shape))
        return stand_ins[x]

    def stacked(self, local: torch.Tensor, count: int):
        """The DTensor (``Shard(0)`` over the group) whose rows on this rank are ``local``: the stacked state of its
        ``count`` experts' owned rows."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (count, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def expand(self, params: list) -> list:
        """``params`` with each experts parameter replaced by its experts, without the elementwise ones (they stay
        where they are): the units the exchanges move."""
        return [x for p in params if id(p) not in self._local_ids for x in self.experts.get(p, [p])]

    def _full_of(self, x):
        return self.expert_full[x] if isinstance(x, Expert) else self.full[x]

    def _value(self, x):
        """The value of a replicated unit: the parameter, or its expert's matrix."""
        return x.param.detach()[x.index] if isinstance(x, Expert) else x.detach()

    def _local(self, x):
        """This rank's block of a sharded unit's value (a view: writing it writes the parameter)."""
        if not isinstance(x, Expert):
            return x.to_local()
        return self._expert_rows(x, x.param.to_local())

    def _expert_rows(self, x, local):
        (o, *_), (n, *_) = self.blocks[x.param][self.rank]
        if o <= x.index < o + n:
            return local[x.index - o]
        return local.new_zeros(self.blocks[x][self.rank][1])

    def view(self, p):
        """What the optimizer's math works on for an owned parameter: the parameter, its full stand-in, or (a
        sharded elementwise parameter) the plain alias of this rank's block."""
        if id(p) in self._local_ids and p in self.blocks:
            return self.local_view(p)
        return self.full.get(p, p)

    def local_view(self, p) -> torch.Tensor:
        """A plain tensor that aliases this rank's block of the sharded parameter ``p`` (writing it writes the
        parameter); the same object while the block's storage stays, so state keyed by it keeps its stacks."""
        local = p.to_local()
        view = self._views.get(p)
        if (view is None or view.data_ptr() != local.data_ptr() or view.shape != local.shape
                or view.stride() != local.stride()):
            view = self._views[p] = local.detach()
        return view

    def local_grad(self, p) -> torch.Tensor | None:
        """This rank's block of ``p``'s gradient (None where it has none)."""
        if p.grad is None:
            return None
        return self._local_grad(p) if p in self.blocks else p.grad

    def as_parameter(self, p, local: torch.Tensor):
        """A state tensor of elementwise parameter ``p`` laid out as ``p``: for a sharded ``p`` the DTensor on its
        mesh, with its placements, whose block on this rank is ``local`` (no copy), so DCP saves each block once and
        reshards it to any layout; a replicated ``p``'s is ``local`` itself (every rank holds it whole)."""
        if p not in self.blocks:
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def block_of(self, p, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of a full tensor ``t`` laid out as parameter ``p``."""
        if p not in self.blocks:
            return t
        offset, size = self.blocks[p][self.rank]
        return block(t, offset, size)

    def ranks_work(self) -> list[float]:
        """The work of each rank: the owners' planned work (experts counted one by one), and each rank's blocks of
        the elementwise parameters (their element counts)."""
        load = [0.0] * self.world
        for p, r in self.owner.items():
            load[r] += self.costs[p]
        for p in self.local:
            for r in range(self.world):
                load[r] += float(math.prod(self.blocks[p][r][1]) if p in self.blocks else p.numel())
        return load

    # ----- collectives ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where this group's collectives take their tensors."""
        return collective_device(self.group)

    @property
    def collectives_beside_math(self) -> bool:
        """Whether an asynchronous collective of this group runs beside the math rather than on the CPU it needs
        (NCCL: on a stream of its own): where overlapping the exchanges with the math can pay."""
        return self.device.type == "cuda"

    def sum_values(self, values: list[float]) -> list[float]:
        """Python numbers summed over the ranks, in float64."""
        return sum_values(values, self.group)

    def agree(self, present: list[torch.Tensor], nonfinite_local: bool,
              overflowed: list[bool] | None = None) -> tuple[list[bool], bool, list[bool]]:
        """One collective before a step: which parameters have a gradient (their owner's for replicated ones, any
        shard's for sharded ones and for replicated elementwise ones, which must then have one on every rank),
        whether any rank saw a non-finite gradient, and which elementwise parameters (``overflowed``: one flag per
        parameter of ``self.local``) have an overflowed second moment on any rank: each counts once, as on one
        process."""
        overflowed = list(overflowed or [False] * len(self.local))
        replicated = [p for p in self.local if p not in self.blocks]
        n, m = len(self.params), len(replicated)
        mine = set(map(id, present))
        mask = [0.0] * (n + m + len(overflowed) + 1)
        for i, p in enumerate(self.params):
            if id(p) in mine and (p in self.blocks or self.owns(p)):
                mask[i] = 1.0
        for j, p in enumerate(replicated):  # lacks a gradient here
            mask[n + j] = 0.0 if id(p) in mine else 1.0
        for j, bad in enumerate(overflowed):
            mask[n + m + j] = 1.0 if bad else 0.0
        mask[-1] = 1.0 if nonfinite_local else 0.0
        flags = any_true(mask, self.group)
        has = dict(zip(map(id, self.params), flags[:n]))
        for j, p in enumerate(replicated):
            if has[id(p)] and flags[n + j]:
                raise RuntimeError(
                    f"a replicated parameter of shape {tuple(p.shape)} has a gradient on some ranks of the group and "
                    "not on others: every rank steps it where it lies (its update is elementwise), so every rank "
                    "needs the same gradient (DDP gives every rank the averaged one)")
        return flags[:n], flags[-1], flags[n + m:n + m + len(overflowed)]

    def _exchange(self, dtypes: list, outgoing: dict[int, list[torch.Tensor]],
                  incoming: dict[int, list[tuple]]) -> dict:
        """Send ``outgoing[r]`` (tensors, flattened) to rank r and receive ``incoming[r]`` (``(numel, dtype)``
        pieces) from rank r: one ``all_to_all_single`` per dtype in ``dtypes``, which must be the same list on every
        rank (it comes from the plan). Returns ``{r: [flat tensors]}`` in the order of ``incoming[r]``."""
        return self._finish_exchange(self._start_exchange(dtypes, outgoing, incoming, async_op=False))

    def _start_exchange(self, dtypes: list, outgoing: dict, incoming: dict, async_op: bool = True):
        """:meth:`_exchange`'s collectives, issued (``async_op``: not waited for); :meth:`_finish_exchange` waits
        and cuts what arrived. The buffers sent are copies: the tensors given may change meanwhile."""
        device = self.device
        pending = []
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
            work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group, async_op=async_op)
            pending.append((dtype, recv, send, work))  # the send buffer lives until the wait
        return incoming, pending

    def _finish_exchange(self, started) -> dict:
        incoming, pending = started
        received: dict = {r: [None] * len(incoming.get(r, [])) for r in range(self.world)}
        for dtype, recv, _, work in pending:
            if work is not None:
                work.wait()
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
        self.finish_gather(self.start_gather(params, with_grad, async_op=False))

    def start_gather(self, params: list[torch.Tensor], with_grad: bool, async_op: bool = True):
        """:meth:`gather_full` issued: the blocks are copied into the buffers sent now, the stand-ins are written by
        :meth:`finish_gather` (the same list of calls, in the same order, on every rank)."""
        units = self.expand(params)
        for x in units:  # an owned expert of a replicated parameter: its own matrix, as on one process
            if isinstance(x, Expert) and x.param not in self.blocks and self.owner[x] == self.rank:
                full = self.expert_full[x]
                full.copy_(x.param.detach()[x.index])
                if with_grad:
                    full.grad = x.param.grad[x.index].clone()
        sharded = [x for x in units if x in self.blocks]
        if not sharded:
            return None
        locals_ = []
        for x in sharded:
            local = self._local(x)
            parent = x.param if isinstance(x, Expert) else x
            if with_grad:
                # torch keeps a gradient in its parameter's dtype; a rank without one sends zeros
                if parent.grad is None:
                    grad = torch.zeros_like(local)
                elif isinstance(x, Expert):
                    grad = self._expert_rows(x, self._local_grad(parent))
                else:
                    grad = self._local_grad(parent)
                locals_.append([grad, local])
            else:
                locals_.append([local])
        return with_grad, self._start_to_owners(sharded, locals_, async_op)

    def finish_gather(self, started) -> None:
        if started is None:
            return
        with_grad, pending = started
        for x, parts in self._finish_to_owners(pending).items():
            full = self._full_of(x)
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
        return self._finish_to_owners(self._start_to_owners(params, tensors, async_op=False))

    def _start_to_owners(self, params: list, tensors: list[list[torch.Tensor]], async_op: bool = True):
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p, ts in zip(params, tensors):
            o = self.owner[p]
            for r, _, size in self.sources[p]:
                if r == self.rank:
                    outgoing[o] += ts
                if o == self.rank:
                    incoming[r] += [(math.prod(size), t.dtype) for t in ts]
        dtypes = sorted({t.dtype for ts in tensors for t in ts}, key=str)
        shapes = [[(t.dtype, t.device) for t in ts] for ts in tensors]
        return params, shapes, self._start_exchange(dtypes, outgoing, incoming, async_op)

    def _finish_to_owners(self, started) -> dict:
        params, shapes, pending = started
        received = self._finish_exchange(pending)
        cursor = {r: 0 for r in range(self.world)}
        out = {}
        for p, kinds in zip(params, shapes):
            if self.owner[p] != self.rank:
                continue
            fulls = [torch.empty(p.shape, dtype=dtype, device=device) for dtype, device in kinds]
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
        self.finish_publish(self.start_publish(params, async_op=False))

    def start_publish(self, params: list[torch.Tensor], async_op: bool = True):
        """:meth:`publish` issued: the owners' new values are copied into the buffers sent now, the other ranks'
        parameters are written by :meth:`finish_publish` (the same list of calls, in the same order, on every
        rank)."""
        units = self.expand(params)
        replicated = [x for x in units if x not in self.blocks]
        sharded = [x for x in units if x in self.blocks]
        for x in replicated:
            if isinstance(x, Expert) and self.owner[x] == self.rank:
                self._value(x).copy_(self.expert_full[x])
        broadcasts = []
        for owner in range(self.world):
            mine = [p for p in replicated if self.owner[p] == owner]
            by_dtype: dict = defaultdict(list)
            for p in mine:
                by_dtype[p.dtype].append(p)
            for dtype, ps in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                parts = [self._value(p) for p in ps] if owner == self.rank else None
                numel = sum(p.numel() for p in ps)
                if async_op:
                    flat, work = broadcast_flat(parts, numel, dtype, owner, self.group, async_op=True)
                else:
                    flat, work = broadcast_flat(parts, numel, dtype, owner, self.group), None
                broadcasts.append((owner, ps, flat, work))
        if not sharded:
            return broadcasts, sharded, None
        outgoing: dict = defaultdict(list)
        incoming: dict = defaultdict(list)
        for p in sharded:
            local = self._local(p)
            o = self.owner[p]
            if o == self.rank:  # each rank's block of the new value, replicas included
                for r, (offset, size) in enumerate(self.blocks[p]):
                    if math.prod(size):
                        outgoing[r].append(block(self._full_of(p), offset, size))
            if local.numel():
                incoming[o].append((local.numel(), local.dtype))
        started = self._start_exchange(sorted({p.dtype for p in sharded}, key=str), outgoing, incoming, async_op)
        return broadcasts, sharded, started

    def finish_publish(self, started) -> None:
        broadcasts, sharded, pending = started
        for owner, ps, flat, work in broadcasts:
            if work is not None:
                work.wait()
            if owner != self.rank:
                offset = 0
                for p in ps:
                    self._value(p).copy_(flat[offset:offset + p.numel()].view(p.shape))
                    offset += p.numel()
        if pending is None:
            return
        received = self._finish_exchange(pending)
        cursor = {r: 0 for r in range(self.world)}
        for p in sharded:
            o = self.owner[p]
            local = self._local(p)
            if local.numel():
                local.copy_(received[o][cursor[o]].view(local.shape))
                cursor[o] += 1
