"""The plan for one optimizer on one process group, and the exchanges of a distributed step: gradients and values
of sharded parameters to their owners before the step, new values from the owners after it."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from .collectives import any_true, broadcast_flat, collective_device, sum_values, world_and_rank
from .layout import is_dtensor, local_shard, shard_rows
from .plan import plan

__all__ = ["DistributedContext"]


class DistributedContext:
    """The plan for one optimizer on one process group: owners, shard layouts, full-size stand-ins for owned
    sharded parameters, and the collectives. Rebuilt when the parameters change; holds no training state."""

    def __init__(self, optimizer, group):
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.owner, self.costs = plan(optimizer, self.world)
        self.rows: dict = {}  # sharded parameter -> rows of each rank's shard
        for p in self.params:
            if is_dtensor(p):
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
            if id(p) in mine and (p in self.rows or self.owns(p)):
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
                grad = local_shard(p.grad) if p.grad is not None else torch.zeros_like(local)
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
            out[p] = torch.cat(parts).view(p.shape).to(local_shard(p).device)
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
