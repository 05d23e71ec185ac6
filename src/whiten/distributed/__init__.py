"""Running a whiten optimizer on several processes: DDP (replicated parameters), FSDP2 (``fully_shard``, DTensor
parameters sharded along dim 0) and any other DTensor layout (tensor parallel, FSDP2 x TP on a 2-D mesh, HSDP,
expert parallel, parameters on several meshes), with the numbers of a single process.

The unit of work is a parameter. Every parameter has one owner rank, chosen by a deterministic, cost-balanced plan
(greedy, largest first, on :meth:`WhitenOptimizer.work_cost`), recomputed from the shapes whenever it is needed and
never stored. The owner keeps the parameter's whole optimizer state, full size, and runs exactly the single-process
step for it: the factor statistics, the refreshes (eigh, QR, inverse roots, Newton–Schulz) and the elementwise
work. The new values then go back to the other ranks:

* replicated parameters (DDP; the gradients are already averaged): each owner broadcasts its updated parameters,
  one flat buffer per owner and dtype;
* sharded parameters (DTensors): each rank holds a block of the full tensor (FSDP2: rows; TP: rows or columns;
  2-D meshes: both; :func:`.layout.local_block`). Before the step, one ``all_to_all_single`` per dtype (exact
  sizes, no padding) brings each distinct block of an owned parameter's gradient and value to its owner once (from
  the owner itself where it holds it; replicas are not sent twice), and the owner assembles the full tensors;
  after the step a second one sends every rank that holds a block its block of the new value.

A parameter whose whole update is elementwise (:meth:`WhitenOptimizer.elementwise`: Schedule-Free AdamW's and
Sophia's, the AdamW path of Muon and SpecGD, SPlus's sign-descent vectors) has no owner: every rank steps the block it holds (a
replicated one whole) with its block of the gradient, and keeps its block of the state, a DTensor laid out as the
parameter (the whole tensor under DDP). Nothing of it is exchanged; elementwise arithmetic on a block gives the bits
of the whole tensor.

Why whole parameters rather than only the refreshes: a whitening step's per-step matrix work (factor updates,
rotations, Newton–Schulz) costs as much as its refreshes, so splitting only the refreshes would leave every rank
doing most of the work; and the owner holding the full state is what lets it run the single-device math with no
extra communication of momenta or factors. The state of the optimizer is then split over the ranks (1/N each),
like ZeRO-1.

Checkpoints: each rank's ``state_dict()`` holds the full state of the parameters it owns, its blocks of the
elementwise ones' (DTensors) and an empty entry for the others, so ``torch.distributed.checkpoint`` saves every entry once and, on load, each rank reads the entries of the
parameters it owns under the new world size. Anything global (counters, random generators) is identical on every
rank and travels in ``param_groups``.

The non-finite check is global: all ranks skip (or raise) together, and counters agree across ranks.

Where each part lives: :mod:`.layout` (DTensor or plain, the group a run spans, each rank's block under any
placement, the wrappers that are refused), :mod:`.plan` (the owner of each unit), :mod:`.context` (the plan of one
optimizer, the blocks each rank holds and the exchanges of a step), :mod:`.collectives` (every collective the
optimizers use: they never call ``torch.distributed`` themselves), :mod:`.checkpoint` (the whole state on every
rank).
"""

from .checkpoint import full_state_dict
from .collectives import (all_reduce_flat, any_true, broadcast_flat, broadcast_objects, collective_device,
                          default_group, is_process_group, sum_values, world_and_rank)
from .context import DistributedContext
from .layout import (FLATTENED_HINT, flattened_by, is_dtensor, local_block, local_shard, process_group_of,
                     shard_rows)
from .plan import plan, plan_owners

__all__ = ["plan", "plan_owners", "shard_rows", "local_block", "DistributedContext", "full_state_dict",
           "flattened_by", "FLATTENED_HINT", "is_dtensor", "local_shard", "process_group_of", "collective_device",
           "default_group", "is_process_group", "world_and_rank", "all_reduce_flat", "any_true", "sum_values",
           "broadcast_flat", "broadcast_objects"]
