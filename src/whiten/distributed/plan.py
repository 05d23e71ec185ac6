"""Who steps what: every unit of parameters gets one owner rank, from a deterministic, cost-balanced plan that every
rank computes alike from the shapes and that is never stored."""

from __future__ import annotations

__all__ = ["plan", "plan_owners", "Expert", "expert_owner"]


class Expert:
    """One expert of an ``experts`` parameter (E, out, in): the matrix ``param[index]``, a unit of its own in a
    distributed run (its owner is :func:`expert_owner`)."""

    __slots__ = ("param", "index")

    def __init__(self, param, index: int):
        self.param, self.index = param, index

    @property
    def shape(self):
        return self.param.shape[1:]

    @property
    def dtype(self):
        return self.param.dtype

    def numel(self) -> int:
        return self.param[0].numel() if self.param.shape[0] else 0

    def __repr__(self) -> str:
        return f"Expert({self.index} of {tuple(self.param.shape)})"


def expert_owner(index: int, count: int, world: int) -> int:
    """The rank that steps expert ``index`` of ``count``: the ``torch.chunk`` piece of the experts it falls in, so
    each rank's experts are one ``Shard(0)`` block of the stacked state (its optimizer state is a DTensor over the
    group, and DCP reshards it to any layout)."""
    return index // -(-count // world)


def plan_owners(costs: list[float], world: int, load: list[float] | None = None) -> list[int]:
    """The owner of each unit: greedy, largest cost first (ties by position), onto the least loaded rank (ties by
    rank), from ``load`` (work already placed; default none). Deterministic, so every rank computes the same
    plan."""
    load = list(load) if load is not None else [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def plan(optimizer, world: int) -> tuple[dict, dict]:
    """``({parameter: owner rank}, {parameter: cost})`` for ``optimizer`` over ``world`` ranks.

    Parameters with the same :meth:`WhitenOptimizer.owner_unit` key form one unit with one owner, e.g. a group
    whose batched products must keep the stacks of one process, or a layer's weight and bias that K-FAC
    preconditions as one matrix. A unit's cost is the sum of its parameters' :meth:`WhitenOptimizer.work_cost`.
    An ``experts`` parameter (:meth:`WhitenOptimizer.splits_experts`) is no unit: each of its experts is one
    (an :class:`Expert` key), placed first by :func:`expert_owner`; the other units fill in around them. A
    parameter whose whole update is elementwise (:meth:`WhitenOptimizer.steps_locally`) has no owner: every rank
    steps the block it holds, so it is in neither dict."""
    costs: dict = {}
    units: dict = {}  # unit key -> its parameters
    load = [0.0] * world
    owner: dict = {}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if optimizer.steps_locally(p, g):
                continue
            costs[p] = float(optimizer.work_cost(p, g))
            if optimizer.splits_experts(p, g):
                count = p.shape[0]
                for e in range(count):
                    piece = Expert(p, e)
                    costs[piece] = costs[p] / count
                    owner[piece] = expert_owner(e, count, world)
                    load[owner[piece]] += costs[piece]
                continue
            units.setdefault(optimizer.owner_unit(p, g, gi, len(costs)), []).append(p)
    unit_list = list(units.values())
    owners = plan_owners([sum(costs[p] for p in u) for u in unit_list], world, load)
    owner.update({p: r for u, r in zip(unit_list, owners) for p in u})
    return owner, costs
