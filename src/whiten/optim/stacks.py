"""Same-shape state in stacks: batched kernels over many parameters' state at once, with the state still kept
per parameter (its entries are views of the stacks) for checkpoints."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

from .update import host_values

__all__ = ["bucket", "StackedState"]


def bucket(items: Iterable, key: Callable) -> dict:
    """``{key(item): [items]}``, in the order the items come."""
    out: dict = defaultdict(list)
    for item in items:
        out[key(item)].append(item)
    return out


def _rows(members: list[torch.Tensor], present: list[torch.Tensor]) -> list[int] | None:
    """The positions of ``present`` among ``members``, or None when they are all of them, in order."""
    if len(members) == len(present) and all(a is b for a, b in zip(members, present)):
        return None
    where = {id(q): j for j, q in enumerate(members)}
    return [where[id(p)] for p in present]


class StackedState:
    """Mixin of :class:`WhitenOptimizer`: stable stacks of state. ``_stacks`` holds, per bucket key, the members,
    the stacks and the views that are the members' state entries; ``stack_builds`` counts (re)builds (after the
    first steps, only when members change); ``_member_keys`` caches each group's members and keys for one step."""

    def reset_stacks(self) -> None:
        self._stacks: dict = {}
        self.stack_builds = 0
        self._member_keys: dict = {}  # group index -> [(member, bucket key)], valid for one step

    def bucket_stacks(self, gi: int, key, present: list[torch.Tensor], key_of: Callable,
                      shapes: dict[str, tuple[int, ...]]) -> tuple[dict, torch.Tensor | None]:
        """Stable stacks: :meth:`stacked_state` over every parameter of group ``gi`` with state whose bucket key
        (``key_of(p)``) is ``key``, with or without a gradient this step, so a missing gradient neither rebuilds
        the stacks nor keeps an old stack alive. Returns the stacks and the positions of ``present`` in them
        (None when they are all the members, in order), an index tensor on their device (:meth:`bucket_rows`:
        the same positions as Python ints)."""
        members = self._bucket_members(gi, key, key_of)
        stacks = self.stacked_state(key, members, shapes)
        rows = _rows(members, present)
        return stacks, None if rows is None else host_values(rows, torch.int64, present[0].device)

    def bucket_rows(self, gi: int, key, present: list[torch.Tensor], key_of: Callable) -> list[int] | None:
        """:meth:`bucket_stacks`' positions as Python ints (nothing read back from a device)."""
        return _rows(self._bucket_members(gi, key, key_of), present)

    def _bucket_members(self, gi: int, key, key_of: Callable) -> list[torch.Tensor]:
        keyed = self._member_keys.get(gi)  # the group's members and their keys, once per step
        if keyed is None:
            keyed = self._member_keys[gi] = [(q, key_of(q)) for q in self.group_members(gi) if self.state.get(q)]
        return [q for q, k in keyed if k == key]

    def stacked_state(self, key, params: list[torch.Tensor], shapes: dict[str, tuple[int, ...]],
                      names: list[dict[str, str]] | None = None) -> dict:
        """``{slot: (B, *shape) tensor}`` whose slices ARE ``self.state[p][slot]`` for ``params`` (in order).

        The first call for a set of parameters copies their state tensors into one stack per slot and makes every
        state entry a view of it, so later steps run batched kernels on the stack in place with no copies. When the
        members change or a state entry was replaced (``load_state_dict``), the stack is rebuilt the same way.
        State stays per parameter for checkpoints: the views serialize as ordinary tensors.

        ``names`` (one ``{slot: state key}`` per member) stacks entries whose keys differ between members, such as
        the blocks of one parameter in Shampoo; a parameter may then appear more than once. By default each slot is
        the state key of the same name.
        """
        if names is None:
            names = [{slot: slot for slot in shapes}] * len(params)
        entry = self._stacks.get(key)
        if entry is not None:
            members, stacks, views = entry
            if (len(members) == len(params)
                    and all(a is p and an == n for (a, an), p, n in zip(members, params, names))
                    and all(self.state[p][n[slot]] is views[slot][j]
                            for slot in shapes for j, (p, n) in enumerate(zip(params, names)))):
                return stacks
        self.stack_builds += 1
        stacks, views = {}, {}
        for slot, shape in shapes.items():
            originals = [self.state[p][n[slot]] for p, n in zip(params, names)]
            stacks[slot] = torch.stack([t.reshape(shape) for t in originals])
            views[slot] = [stacks[slot][j].view(t.shape) for j, t in enumerate(originals)]
            for p, n, v in zip(params, names, views[slot]):
                self.state[p][n[slot]] = v
        self._stacks[key] = (list(zip(params, names)), stacks, views)
        return stacks
