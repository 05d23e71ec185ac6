"""Who steps what: every unit of parameters gets one owner rank, from a deterministic, cost-balanced plan that every
rank computes alike from the shapes and that is never stored."""

from __future__ import annotations

__all__ = ["plan", "plan_owners"]


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

    Parameters with the same :meth:`WhitenOptimizer.owner_unit` key form one unit with one owner, e.g. a group
    whose batched products must keep the stacks of one process, or a layer's weight and bias that K-FAC
    preconditions as one matrix. A unit's cost is the sum of its parameters' :meth:`WhitenOptimizer.work_cost`."""
    costs: dict = {}
    units: dict = {}  # unit key -> its parameters
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            costs[p] = float(optimizer.work_cost(p, g))
            units.setdefault(optimizer.owner_unit(p, g, gi, len(costs)), []).append(p)
    unit_list = list(units.values())
    owners = plan_owners([sum(costs[p] for p in u) for u in unit_list], world)
    return {p: r for u, r in zip(unit_list, owners) for p in u}, costs
