"""Checkpoints of a distributed optimizer outside ``torch.distributed.checkpoint``: the whole state on every rank."""

from __future__ import annotations

from .collectives import broadcast_objects

__all__ = ["full_state_dict"]


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
        sd["state"].update(broadcast_objects([mine], owner, ctx.group)[0])
    sd["state"] = {i: e for i, e in sd["state"].items() if e}  # drop the empty marks of parameters owned elsewhere
    return sd
