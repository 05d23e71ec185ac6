"""Checkpoints of a distributed optimizer outside ``torch.distributed.checkpoint``: the whole state on every rank."""

from __future__ import annotations

import torch

from .collectives import broadcast_objects
from .context import block
from .layout import local_shard

__all__ = ["full_state_dict"]


def full_state_dict(optimizer) -> dict:
    """The whole ``state_dict()`` of a distributed whiten optimizer, the same on every rank, in the layout of one
    process: a collective, so every rank must call it. For scripts that save with ``torch.save`` on rank 0
    (nanoGPT-style DDP); a plain ``optimizer.state_dict()`` there holds only rank 0's parameters. Loading it on any
    number of ranks works: each rank keeps the entries of the parameters it owns (of an elementwise parameter,
    its block)."""
    sd = optimizer.state_dict()
    ctx = optimizer.distributed_context()
    if ctx is None:
        return sd
    index = {p: i for i, p in enumerate(ctx.params)}  # state_dict numbers parameters in group order
    # a sharded elementwise parameter's state is a DTensor whose block on each rank is that rank's: assembled here
    # from the blocks whiten reads from the layout (a replicated one's is whole on every rank already)
    blocks = [p for p in ctx.local if p in ctx.blocks]
    assembled: dict = {}
    # an experts parameter's state is a DTensor whose rows on each rank are its experts' (in rank order)
    split = [p for p in ctx.params if p in ctx.experts]
    rows: dict = {index[p]: [] for p in split}
    for owner in range(ctx.world):
        mine = None
        if owner == ctx.rank:
            mine = ({index[p]: sd["state"][index[p]] for p in ctx.params
                     if p in ctx.owner and ctx.owner[p] == owner and index[p] in sd["state"]},
                    {index[p]: {k: local_shard(v) if isinstance(v, torch.Tensor) else v
                                for k, v in sd["state"][index[p]].items() if k != "live"}
                     for p in split if ctx.owned_experts(p) and sd["state"].get(index[p])},
                    {index[p]: {k: local_shard(v) for k, v in sd["state"][index[p]].items()
                                if k != "live" and isinstance(v, torch.Tensor)}
                     for p in blocks if sd["state"].get(index[p])})
        whole, parts, pieces = broadcast_objects([mine], owner, ctx.group)[0]
        sd["state"].update(whole)
        for i, entry in parts.items():
            rows[i].append(entry)
        for p in blocks:
            entry = pieces.get(index[p], {})
            offset, size = ctx.blocks[p][owner]
            for k, v in entry.items():
                if k not in assembled.setdefault(index[p], {}):
                    assembled[index[p]][k] = torch.empty(tuple(p.shape), dtype=v.dtype, device=v.device)
                block(assembled[index[p]][k], offset, size).copy_(v.view(size))
    for i, entry in assembled.items():  # the whole tensors in place of the DTensors, other entries as they are
        sd["state"][i] = {**sd["state"].get(i, {}), **entry}
    for i, entries in rows.items():
        live = {k: v for k, v in sd["state"].get(i, {}).items() if k == "live"}
        sd["state"][i] = {k: torch.cat([e[k] for e in entries]) if isinstance(v, torch.Tensor) else v
                          for k, v in entries[0].items()} if entries else {}
        sd["state"][i].update(live)
    sd["state"] = {i: e for i, e in sd["state"].items() if e}  # drop the empty marks of parameters owned elsewhere
    return sd
