"""The step of every whiten optimizer: construction and its checks, the non-finite-gradient policy, the
distributed step (one owner per parameter), recovery from overflow, and the hooks an optimizer fills in with its
math. The rest lives beside it: argument checks (``checks``), stacked state (``stacks``), checkpoints and copies
(``checkpoints``), the decay rule and the update tail (``update``)."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import distributed as wdist
from ..linalg import finite_flags
from .checkpoints import Checkpoints
from .checks import LR_MAX
from .compiled import eager_under_compile
from .kernels import compiled_mode
from .deferred import DeferredCheck
from . import update
from .stacks import StackedState

NONFINITE_POLICIES = ("skip", "raise")
EXPERTS = "experts"  # the role of (E, out, in) weights stepped as E matrices (see WhitenOptimizer.experts)
BASE_COUNTERS = ("skipped_steps", "eigh_retries", "eigh_failures", "factor_restarts")


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _unpack(packed: dict, e: int, count: int, state: dict) -> None:
    """Expert ``e``'s entries of an experts parameter's state into ``state``, in place where a tensor of that
    shape is there (its identity is kept: stacks of state are views)."""
    for k in list(state):
        if k not in packed:
            del state[k]
    for k, v in packed.items():
        if isinstance(v, torch.Tensor):
            mine = state.get(k)
            if isinstance(mine, torch.Tensor) and mine.shape == v.shape[1:] and mine.dtype == v.dtype:
                mine.copy_(v[e])
            else:
                state[k] = v[e].clone()
        elif isinstance(v, list) and len(v) == count:
            state[k] = v[e]
        else:
            state[k] = v


def _pack(states: list[dict], old: dict | None) -> dict:
    """The experts' state stacked: ``(E, *shape)`` per tensor entry (into the old stack where it fits), a list
    of E values for the others."""
    out = {}
    if not states[0]:
        return out
    for k, v in states[0].items():
        values = [s[k] for s in states]
        if isinstance(v, torch.Tensor):
            prev = (old or {}).get(k)
            if isinstance(prev, torch.Tensor) and prev.shape == (len(values), *v.shape) and prev.dtype == v.dtype:
                out[k] = torch.stack(values, out=prev)
            else:
                out[k] = torch.stack(values)
        else:  # a step count: one value where the experts agree (eval() reads it), else one per expert
            out[k] = v if all(x == v for x in values) else values
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _tensors(shapes: list[tuple], noun: str, most: int = 4) -> str:
    """``1 tensor of shape (3, 4)``, ``2 tensors of shapes (3, 4), (4,)``, ``9 tensors of shapes (3, 4), (4,),
    (4,), (5,) and 5 more``, ``0 tensors``."""
    if not shapes:
        return _count(0, noun)
    more = f" and {len(shapes) - most} more" if len(shapes) > most else ""
    return (f"{_count(len(shapes), noun)} of shape{'' if len(shapes) == 1 else 's'} "
            + ", ".join(str(s) for s in shapes[:most]) + more)


class WhitenOptimizer(DeferredCheck, Checkpoints, StackedState, torch.optim.Optimizer):
    """Base class: a torch.optim.Optimizer with whiten's checks, counters and state handling.

    Counters (``optimizer.counters``, saved in the state_dict's first param group, where
    ``torch.distributed.checkpoint`` keeps them): ``skipped_steps`` (steps skipped because a gradient was not
    finite), ``eigh_retries`` (matrices whose eigendecomposition needed the float64 retry), ``eigh_failures``
    (matrices whose basis could not be refreshed and was kept), ``factor_restarts`` (statistics that overflowed,
    e.g. after one huge finite gradient, and were restarted from zero; see :meth:`restart_nonfinite`).

    Distributed runs (see :mod:`whiten.distributed`): with ``process_group`` (DDP, replicated parameters) or with
    DTensor parameters (FSDP2, tensor parallel, FSDP2 x TP, HSDP, expert parallel: their meshes are used), each
    parameter's whole step runs on one owner rank and the new values are sent to the others; the numbers are those
    of one process.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # apply_step's default loops over _step_group(gi, group, params), each optimizer's own math
        if cls.apply_step is WhitenOptimizer.apply_step and not hasattr(cls, "_step_group"):
            raise TypeError(f"{cls.__name__} must define _step_group(gi, group, params) or override apply_step")
        # torch.compile(opt.step) runs the step eagerly, with the eager numbers (see whiten.optim.compiled)
        cls.step = eager_under_compile(cls.step)

    def __init__(self, params, defaults: dict, nonfinite: str = "skip", process_group=None, sync_free: bool = False,
                 compiled: bool = False):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (allowed: {', '.join(map(repr, NONFINITE_POLICIES))})")
        if not isinstance(sync_free, bool) or (sync_free and not self.SYNC_FREE):
            allowed = "True or False" if self.SYNC_FREE else f"False: {type(self).__name__} has no sync-free step yet"
            raise ValueError(f"Invalid sync_free: {sync_free!r} (allowed: {allowed})")
        self.sync_free = sync_free
        if not isinstance(compiled, bool):
            raise ValueError(f"Invalid compiled: {compiled!r} (allowed: True or False)")
        self.compiled = compiled  # the elementwise chains as compiled kernels (whiten.optim.kernels)
        if process_group is not None and not wdist.is_process_group(process_group):
            raise ValueError(f"Invalid process_group: {process_group!r} (allowed: None or a "
                             "torch.distributed.ProcessGroup, e.g. torch.distributed.group.WORLD)")
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.counters = self.new_counters()
        self.reset_stacks()
        self._dist = None  # (parameter identities, DistributedContext or None), rebuilt when parameters change
        # per group as last validated: (the group dict, [(id, shape) of each tensor]); see check_parameters
        self._checked: list[tuple[dict, list[tuple[int, tuple]]]] = []
        self._validated = weakref.WeakValueDictionary()  # id -> every tensor validated so far, while it lives
        self._checked_key = None  # the tensors' identities at the last check_parameters, None before the first step
        # experts parameter (or its full-size stand-in) -> [(matrix, its state dict)], one per expert: see experts
        self._experts = WeakIdKeyDictionary()
        super().__init__(params, defaults)

    EXTRA_COUNTERS: tuple[str, ...] = ()  # an optimizer's own counters, beside BASE_COUNTERS

    @property
    def counters(self) -> dict:
        """The counters (see the class's text). With ``sync_free`` reading them reads the last step's
        non-finite flags first (:meth:`resolve_pending`), so a skipped step is counted."""
        self.resolve_pending()
        return self._counters

    @counters.setter
    def counters(self, value: dict) -> None:
        self._counters = value

    def new_counters(self) -> dict:
        return {k: 0 for k in (*BASE_COUNTERS, *self.EXTRA_COUNTERS)}

    # ----- construction -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        with warnings.catch_warnings():  # torch only warns on duplicates; _check_group refuses them
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1)
            error = self.groups_error(self.param_groups, "")
            if error:
                raise ValueError(error)
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was before the call
            raise

    def _check_group(self, index: int) -> None:
        group = self.param_groups[index]
        seen: dict[int, int] = {}
        for i, p in enumerate(group["params"]):
            where = f"parameter {i} of group {index} (shape {tuple(p.shape)})"
            if id(p) in seen:  # it would be stepped twice per step
                raise ValueError(f"{type(self).__name__}: {where} is listed twice in its group (also as parameter "
                                 f"{seen[id(p)]}); pass each parameter once")
            seen[id(p)] = i
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters: {where}")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"{type(self).__name__} does not support sparse parameters: {where}")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters: {where} is {p.dtype}")
            wrapper = wdist.flattened_by(p)
            if wrapper is not None:
                raise ValueError(f"{type(self).__name__}: {where} comes from {wrapper}; {wdist.FLATTENED_HINT}")
            if group.get("role") == EXPERTS and p.ndim < 3:
                raise ValueError(f"{type(self).__name__}: {where} is in a group of role 'experts', which needs "
                                 "tensors of 3 or more dims (E, out, in): E matrices stepped one by one")
        self.validate_group(group)
        self._checked[index:index + 1] = [(group, [(id(p), tuple(p.shape)) for p in group["params"]])]
        self._validated.update((id(p), p) for p in group["params"])

    def check_parameters(self) -> None:
        """Checks the tensors in ``param_groups`` again, as at construction, where they may have changed since.

        Wrappers edit the groups of an optimizer built before them. accelerate puts a wrapped model's parameters
        (FSDP2's DTensors) in place of the old ones, and DeepSpeed without ZeRO, in bf16 or fp16, fp32 copies of
        them: one for one, with the same shapes; those are checked as at construction and stepped. DeepSpeed
        ZeRO-1/2 (and its bf16 optimizer) put one flat fp32 slice of each group in place of the group's parameters,
        ZeRO-1/2 then call ``step()`` once per group with ``param_groups`` holding that group alone, ZeRO-3 puts a
        flat slice marked ``ds_id`` in the group it steps, and FSDP1 wrapped around a model after the optimizer was
        built turns each parameter into a flat 1-D slice in place: stepped, those slices would be vectors, without
        a word. Refused: any tensor that FSDP1 or ZeRO-3 marked (:func:`whiten.distributed.flattened_by`), and
        tensors never validated that do not replace the validated ones one for one, group by group, with the same
        shapes (a new shape, another number of tensors in a group or of groups). Tensors validated before may move,
        go and come back (ZeRO-3 empties the groups between steps). :meth:`step` runs this at the first step and
        whenever the tensors change, before any state changes; ``load_state_dict`` keeps what was validated."""
        name = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                wrapper = wdist.flattened_by(p)
                if wrapper is not None:
                    raise ValueError(f"{name}.step(): parameter {i} of group {gi} (shape {tuple(p.shape)}) now comes "
                                     f"from {wrapper}; {wdist.FLATTENED_HINT}")
        mismatch = self._replaced_not_one_for_one()
        if mismatch is not None:
            raise ValueError(
                f"{name}.step(): the parameters were replaced after construction, not one for one by tensors of the "
                f"same shapes: {mismatch}. DeepSpeed ZeRO-1/2 (and its bf16 optimizer) does this: it hands the "
                f"optimizer flat fp32 slices, one per group, in place of the group's parameters; "
                f"{wdist.FLATTENED_HINT}. To add parameters, use add_param_group")
        for gi, group in enumerate(self.param_groups):
            record = self._checked[gi] if gi < len(self._checked) else None
            if record is None or [q for q, _ in record[1]] != [id(p) for p in group["params"]]:
                self._check_group(gi)  # changed: the checks of construction, then remembered as validated
            elif record[0] is not group:  # the same tensors in a new dict (load_state_dict makes new ones)
                self._checked[gi] = (group, record[1])
        del self._checked[len(self.param_groups):]

    def _replaced_not_one_for_one(self) -> str | None:
        """Where ``param_groups`` holds tensors never validated that do not replace the validated ones one for one
        with the same shapes, what changed; else None."""
        def new(p):
            return self._validated.get(id(p)) is not p

        groups = self.param_groups
        if not any(new(p) for g in groups for p in g["params"]):
            return None  # moved, removed or back again: no new tensor
        for gi, group in enumerate(groups):
            params = group["params"]
            if not any(map(new, params)):
                continue
            # the group as validated: the same dict (DeepSpeed passes its groups one at a time), else the same place
            k = next((k for k, (g, _) in enumerate(self._checked) if g is group), gi)
            old = [shape for _, shape in self._checked[k][1]] if k < len(self._checked) else []
            now = [tuple(p.shape) for p in params]
            if old != now:
                return f"group {k}'s {_tensors(old, 'parameter')} became {_tensors(now, 'tensor')}"
            if k != gi:
                return f"group {k} is now at place {gi}"
        if len(groups) != len(self._checked):
            return f"param_groups holds {_count(len(groups), 'group')} where {len(self._checked)} were validated"
        return None

    def validate_group(self, group: dict) -> None:  # overridden by each optimizer
        pass

    # ----- who steps what ------------------------------------------------------------------------------------
    def group_members(self, gi: int) -> list[torch.Tensor]:
        """The tensors this process steps for group ``gi``'s parameters: all of them on one process; in a
        distributed run the ones it owns (their full-size stand-ins while a step runs)."""
        params = self.param_groups[gi]["params"]
        # step() planned this step already: reuse its context rather than re-derive it for every group
        ctx = self._dist[1] if self._dist is not None else self.distributed_context()
        if ctx is not None:
            params = [ctx.view(p) for p in params if ctx.owns(p)]
        if self.param_groups[gi].get("role") == EXPERTS and self.STEPS_EXPERTS:  # while a step runs, each expert is a matrix
            params = [m for p in params for m in
                      ([m for m, _ in self._experts[p]] if p in self._experts else [p])]
        return params

    # ----- distribution ---------------------------------------------------------------------------------------
    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        """Relative cost of one parameter's optimizer work, for balancing owners over ranks: ``m·n·(m+n)`` for a
        matrix view (m, n) (factor products, rotations, Newton–Schulz), the element count otherwise; E times one
        expert's for the ``experts`` role."""
        if group.get("role") == EXPERTS and p.ndim >= 3 and self.STEPS_EXPERTS:
            return p.shape[0] * self.work_cost(_meta(p.shape[1:], p.dtype), {**group, "role": "hidden"})
        if p.ndim < 2:
            return float(p.numel())
        m = p.shape[0]
        n = p.numel() // max(m, 1)
        return float(m * n * (m + n) + p.numel())

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        """Whether this parameter's results are the same bits in any stack of same-shape parameters. CPU BLAS
        kernels round differently for a matrix that does not start on a 64-byte boundary, and element j of a stack
        starts at j times its size: sizes that are multiples of 16 elements (the (m, n) view and its m×m and n×n
        factors) keep every member aligned. Parameters that fail this are planned with the rest of their group
        on one rank, so a distributed run still batches them exactly as one process does.

        A stack of one is computed by gemm, a larger one by batched gemm, and MKL rounds products with a dimension
        of 1 (rank-1 updates, matrix times column vector) differently in the two: stacked kernels avoid them, and an
        override for stacks of other shapes than the (m, n) view must not call such a parameter invariant (see
        docs/distributed.md)."""
        if p.numel() == 0:
            return True
        if group.get("role") == EXPERTS and p.ndim >= 3 and self.STEPS_EXPERTS:  # stacked as separate matrices
            p = _meta(p.shape[1:], p.dtype)
        m = p.shape[0] if p.ndim else 1
        n = p.numel() // m
        return all(size % 16 == 0 for size in (m * n, m * m, n * n))

    def elementwise(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p``'s whole update is elementwise: each entry's new value and state depend on that entry alone
        (and on numbers every rank computes alike: the group's step count, lr, the global shape), whatever the
        shape of the block it is computed on. In a distributed run such a parameter has no owner: every rank steps
        the block it holds (a replicated one whole) and keeps its state as that block, a DTensor laid out as the
        parameter, so no gradient or value of it crosses the network. Elementwise arithmetic on a block gives the
        bits it gives on the whole tensor. Anything with a reduction across entries (a norm, a global sum, a factor)
        is not elementwise. Default False; optimizers declare it per parameter."""
        return False

    # Under DDP (replicated parameters) an elementwise parameter stepped locally costs no bytes, but every rank does
    # its whole update and keeps its whole state. False keeps replicated ones on owners (their state split over the
    # ranks, like ZeRO-1, and their new values broadcast); sharded ones (DTensors) are stepped locally either way.
    step_replicated_locally = True

    def steps_locally(self, p: torch.Tensor, group: dict) -> bool:
        """Whether a distributed run steps ``p`` where it lies, on every rank (no owner): :meth:`elementwise`, and,
        for a replicated (plain) parameter, ``step_replicated_locally``."""
        return self.elementwise(p, group) and (self.step_replicated_locally or wdist.is_dtensor(p))

    def owner_unit(self, p: torch.Tensor, group: dict, gi: int, position: int):
        """The key of the unit ``p`` belongs to in the owner plan: parameters with the same key get one owner.
        By default a parameter is a unit of its own (keyed by its ``position`` among all parameters) when it is
        :meth:`stack_invariant`; the others of group ``gi`` form one unit, so their stacks are those of one
        process. Optimizers override it to keep together what they precondition as one (K-FAC: a layer's weight
        and bias)."""
        return ("param", position) if self.stack_invariant(p, group) else ("group", gi)

    def distributed_context(self, key: tuple | None = None):
        """The :class:`whiten.distributed.DistributedContext` of this optimizer, or None on one process. ``key``:
        the identities of the tensors in ``param_groups`` when the caller has them (``step`` does). Building it is
        a collective where DTensor parameters live on several meshes (FSDP2 x TP's embedding on the dp sub-mesh):
        the first call after the parameters change must come on every rank (``step`` is one)."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(map(id, params)) if key is None else key
        if self._dist is not None and self._dist[0] == key:
            return self._dist[1]
        ctx = None
        group = wdist.process_group_of(params, self.process_group)
        if group is not None:
            ctx = wdist.DistributedContext(self, group)
        self._dist = (key, ctx)
        return ctx

    # ----- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        self.resolve_pending()  # a sync-free step's flags, read one step later
        self.check_can_step()
        key = tuple(id(p) for g in self.param_groups for p in g["params"])  # also the plan's key, below
        if key != self._checked_key:  # the first step, or tensors changed: checked before anything changes
            self.check_parameters()
            self._checked_key = key
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self.params_with_grad()
        ctx = self.distributed_context(key)
        self._member_keys = {}
        with compiled_mode(self.compiled):
            if ctx is None:
                if self.can_defer(work):
                    self.deferred_step(work)  # the check decided on the device, read at the next step
                elif self.grads_are_finite(work):  # checked before any state changes
                    with self.experts(work, work) as (everyone, owned):
                        self.before_step(everyone)
                        self.apply_step(owned)
                if self.sync_free and self.SECOND_MOMENT_KEY is not None:
                    self.check_moments_after_step()
            else:
                self._distributed_step(ctx, work)
        if not getattr(self, "_memory_checked", False) and self.state:
            self._memory_checked = True
            self.check_state_memory()
        return loss

    # a parameter whose state exceeds this multiple of its own memory (and STATE_WARN_MIN_BYTES) is warned about
    STATE_WARN_RATIO = 16
    STATE_WARN_MIN_BYTES = 64 * 2**20

    # options that reduce the state: {option: (state kinds it governs, what it does)}; all classes' together
    MEMORY_OPTIONS: dict = {}

    def memory_options(self) -> dict:
        out: dict = {}
        for klass in reversed(type(self).__mro__):
            out.update(klass.__dict__.get("MEMORY_OPTIONS", {}))
        return out

    def planned_state(self, p: torch.Tensor, group: dict) -> dict:
        """``{key: shape}`` of the tensors ``p`` will hold in state (for :meth:`memory_report` before the first
        step): :meth:`expected_state`'s, and what mixins add."""
        return {k: s for k, s in (self.expected_state_of(p, group) or {}).items() if s is not None}

    def memory_report(self, top: int = 3):
        """What this optimizer's state costs (:class:`whiten.optim.memory.MemoryReport`; ``print()`` it): before
        the first step the state each parameter will get, after it the state held; per role and kind of state
        (``factor``, ``basis``, ``momentum``, ...), the ``top`` parameters that hold the most, and the options of
        this optimizer that would reduce it. In a distributed run, this process's share (the parameters it owns,
        its blocks of the elementwise ones)."""
        from .memory import memory_report

        return memory_report(self, top)

    def check_state_memory(self) -> None:
        """Warn, once (after the first step that creates state), about parameters whose optimizer state exceeds
        ``STATE_WARN_RATIO`` times the parameter's memory and ``STATE_WARN_MIN_BYTES``: e.g. Shampoo's 1024-sided
        blocks on a long vector. Small matrices, whose factors are a few times their size, are not worth a
        warning."""
        worst = []
        for p, state in list(self.state.items()):
            if not isinstance(p, torch.Tensor) or not state:
                continue
            size = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
            own = p.numel() * p.element_size()
            if size > self.STATE_WARN_MIN_BYTES and size > self.STATE_WARN_RATIO * own:
                worst.append((size, own, tuple(p.shape)))
        if worst:
            size, own, shape = max(worst)
            warnings.warn(f"{type(self).__name__}: the state of {len(worst)} parameter(s) exceeds "
                          f"{self.STATE_WARN_RATIO}x their memory (largest: shape {shape}, {size / 2**20:.0f} MiB of "
                          f"state for {own / 2**20:.1f} MiB); see the optimizer's options that limit preconditioned "
                          "sizes (print(opt.memory_report()) names them)", RuntimeWarning, stacklevel=3)

    def _distributed_step(self, ctx, work) -> None:
        work_ids = {id(p) for _, params in work for p in params}
        # this rank's block of each elementwise parameter's gradient (a redistribute where it is placed otherwise)
        local_grads = {id(p): ctx.local_grad(p) for p in ctx.local if id(p) in work_ids}
        with self._local_state(ctx):
            # Each rank checks the gradients it holds: its owned ones (replicated) or its shards (sharded), and its
            # blocks of the elementwise ones, with their second moments (one host sync).
            mine = [p for _, params in work for p in params
                    if not ctx.is_local(p) and (p in ctx.blocks or ctx.owns(p))]
            local = [p for p in ctx.local if local_grads.get(id(p)) is not None]
            grads = [wdist.local_shard(p.grad) for p in mine] + [local_grads[id(p)] for p in local]
            # (an experts parameter's second moments are a DTensor of its experts' rows: not checked here)
            with_moments = [p for p in mine if ctx.owns(p) and p not in ctx.experts]
            flags, overflowed, local_overflowed = self._finite_with_local_moments(
                grads, with_moments, [ctx.view(p) for p in local])
            over = dict(zip(map(id, local), local_overflowed[0]))
            present, bad, over_any = ctx.agree([p for _, params in work for p in params], not all(flags),
                                               [over.get(id(p), False) for p in ctx.local])
            if bad:
                self._nonfinite(f"{type(self).__name__}: non-finite gradient on at least one rank", stacklevel=4)
                return
            # an elementwise parameter's overflowed moments: each rank restarts its entries, and every rank counts
            # each parameter once (as one process does), outside the owners' counters summed below
            self.restart_overflowed_moments(*local_overflowed[1:], count=sum(over_any))
            has = dict(zip(ctx.params, present))
            everyone = [(g, [p for p in g["params"] if has[p]]) for g in self.param_groups]
            chunks = self._overlapped(everyone)
            if chunks is None:
                ctx.gather_full([p for _, params in everyone for p in params], with_grad=True)
            # An empty entry marks a parameter another rank owns (DCP keys stay per owner). Set at every step, not
            # once: a new plan (add_param_group) must not leave a full state behind on its former owner.
            for p in ctx.params:
                if not ctx.owns(p):
                    self.state[p] = {}
            for p in ctx.local:  # a rank without a gradient of a sharded one present elsewhere steps zeros
                if has[p] and p in ctx.blocks:
                    view = ctx.view(p)
                    g = local_grads.get(id(p))
                    view.grad = torch.zeros_like(view) if g is None else g
            owned = [(g, [ctx.view(p) for p in params if ctx.owns(p)]) for g, params in everyone]
            owner_counters = [k for k in self.counters if k != "skipped_steps"]  # counted where the work runs
            before = {k: self.counters[k] for k in owner_counters}
            try:
                with self._owned_state(ctx):
                    self.restart_overflowed_moments(*overflowed)  # on the owner, inside the counters it reports
                    views = [(g, [ctx.view(p) if ctx.owns(p) else p for p in params]) for g, params in everyone]
                    with self.experts(views, owned, ctx) as (views, owned):
                        self.before_step(views)
                        if chunks is None:
                            self.apply_step(owned)
                        else:
                            published = self._overlapped_step(ctx, everyone, owned, chunks)
            finally:
                for p in ctx.local:
                    if p in ctx.blocks:
                        ctx.view(p).grad = None
        if chunks is None:
            ctx.publish([p for _, params in everyone for p in params])
        else:
            for started in published:
                ctx.finish_publish(started)
        for full in (*ctx.full.values(), *ctx.expert_full.values()):
            full.grad = None
        deltas = ctx.sum_values([self.counters[k] - before[k] for k in owner_counters])
        for k, d in zip(owner_counters, deltas):
            self.counters[k] = before[k] + int(d)

    # Overlap the owners' exchanges with their math, group by group (see _overlapped): True, False (one exchange
    # before and one after the whole step), or None: where the collectives run beside the math (NCCL, on their own
    # stream); on gloo they share the CPU with it, and 2-4 gloo ranks measured no gain (docs/distributed-scaling.md).
    # The numbers are the same either way. Default False until it is measured on NCCL: a default that no run has
    # timed on the backend it is meant for would be a guess.
    overlap_exchanges: bool | None = False

    def _overlapped(self, everyone) -> list[int] | None:
        """The groups (indices, in order) whose exchanges overlap the math of the others, or None. A group's
        gradients and values travel while the owners step the groups before it, and its new values while they step
        the groups after it; it needs the base's ``apply_step`` (one ``_step_group`` per group, each on its own),
        so optimizers whose step spans groups (global sums, random draws, layers) do not overlap, nor do runs with
        ``experts`` groups (their matrices are moved in and out around the whole step)."""
        overlap = self.overlap_exchanges
        if overlap is None:
            overlap = self._dist[1].collectives_beside_math if self._dist is not None and self._dist[1] else False
        if not overlap or type(self).apply_step is not WhitenOptimizer.apply_step:
            return None
        if any(g.get("role") == EXPERTS for g in self.param_groups):
            return None
        chunks = [gi for gi, (_, params) in enumerate(everyone) if params]
        return chunks if len(chunks) > 1 else None

    def _overlapped_step(self, ctx, everyone, owned, chunks) -> list:
        """The base's ``apply_step``, group by group: every group's blocks are sent to their owners at once
        (asynchronous collectives, in group order on every rank), each group is stepped as soon as its own have
        arrived, and its new values leave before the next group's math. Returns the publishes to finish."""
        gathers = [ctx.start_gather(everyone[gi][1], with_grad=True) for gi in chunks]
        published = []
        for gi, started in zip(chunks, gathers):
            ctx.finish_gather(started)
            group, params = owned[gi]
            if params:
                self._step_group(gi, group, params)
            published.append(ctx.start_publish(everyone[gi][1]))
        return published

    def _finite_with_local_moments(self, grads, owned, local_views):
        """:meth:`_finite_with_moments` for a distributed step: ``grads`` (this rank's), the second moments of the
        ``owned`` parameters and of the elementwise parameters' blocks (``local_views``), in one call. Returns the
        gradients' flags, the owned parameters' ``(second, first)`` overflowed moments, and for the elementwise
        ones ``(one flag per view, second, first)``."""
        key = self.SECOND_MOMENT_KEY
        states = []
        if key is not None:
            states = [(j, s) for j, p in enumerate([*owned, *local_views])
                      if isinstance((s := self.state.get(p) or {}).get(key), torch.Tensor)]
        flags = finite_flags(grads + [s[key] for _, s in states])
        bad = [(j, s) for (j, s), ok in zip(states, flags[len(grads):]) if not ok]
        n = len(owned)
        mine = [s for j, s in bad if j < n]
        theirs = [(j - n, s) for j, s in bad if j >= n]
        over = [False] * len(local_views)
        for j, _ in theirs:
            over[j] = True
        return (flags[:len(grads)], ([s[key] for s in mine], [s.get(self.FIRST_MOMENT_KEY) for s in mine]),
                (over, [s[key] for _, s in theirs], [s.get(self.FIRST_MOMENT_KEY) for _, s in theirs]))

    @contextlib.contextmanager
    def _local_state(self, ctx):
        """While the step runs, the state of a sharded elementwise parameter is its plain blocks, keyed by the
        alias of the parameter's block (:meth:`DistributedContext.view`); after it, DTensors laid out as the
        parameter again (no copies either way)."""
        moved = [(p, ctx.view(p)) for p in ctx.local if p in ctx.blocks]
        for p, view in moved:
            self.state[view] = {k: wdist.local_shard(v) if isinstance(v, torch.Tensor) else v
                                for k, v in self.state.pop(p, {}).items()}
        try:
            yield
        finally:
            for p, view in moved:
                self.state[p] = {k: ctx.as_parameter(p, v) if isinstance(v, torch.Tensor) and v.shape == view.shape
                                 else v for k, v in self.state.pop(view, {}).items()}

    @torch.no_grad()
    def owner_update(self, params: list[torch.Tensor], fn) -> None:
        """``fn(p, tensor, state)`` writes a new value of each parameter into ``tensor`` from its optimizer state;
        in a distributed run it runs on the owner, on the full tensor, and every rank gets the result (eval() and
        train() swaps); for an elementwise parameter every rank runs it on its block, with its blocks of the state.
        ``params`` must be the same list on every rank."""
        ctx = self.distributed_context()
        if ctx is None:
            for p in params:
                fn(p, p, self.state.get(p, {}))
            return
        ctx.gather_full(params, with_grad=False)
        for p in params:
            if p in ctx.experts:  # each owned expert's matrix, with its rows of the stacked state (views)
                count = p.shape[0]
                rows = {k: wdist.local_shard(v) if isinstance(v, torch.Tensor) else v
                        for k, v in self.state.get(p, {}).items() if k != "live"}
                for i, x in enumerate(ctx.owned_experts(p)):
                    fn(p, ctx.expert_full[x], {k: v[i] if isinstance(v, torch.Tensor) else
                                               v[x.index] if isinstance(v, list) and len(v) == count else v
                                               for k, v in rows.items()})
            elif ctx.is_local(p):  # every rank, on its block and its block of the state
                fn(p, ctx.view(p), {k: wdist.local_shard(v) if isinstance(v, torch.Tensor) else v
                                    for k, v in self.state.get(p, {}).items()})
            elif ctx.owns(p):
                fn(p, ctx.view(p), self.state.get(p, {}))
        ctx.publish(params)

    # False: the optimizer's math does not see matrices one by one (M-FAC's one vector of all parameters), and an
    # experts parameter is stepped as any other of its shape
    STEPS_EXPERTS = True

    def splits_experts(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p`` is stepped as its experts (role ``experts``, 3 or more dims): in a distributed run each
        expert is then a unit of the owner plan of its own."""
        return group.get("role") == EXPERTS and p.ndim >= 3 and self.STEPS_EXPERTS

    @contextlib.contextmanager
    def experts(self, everyone, owned, ctx=None):
        """While the step runs, each parameter of a group of role ``experts`` (E, out, in) is E matrices (out, in),
        each with its own state and gradient: the optimizer steps them as it steps E separate matrices, and the
        numbers are those (bit for bit). ``everyone``: (group, parameters) for :meth:`before_step` (values not
        needed); ``owned``: (group, parameters) this process steps. Yields both with the experts as matrices.

        The matrices and their state dicts live across steps (so stacks of state stay built); the parameter's
        state is the stack of its experts' (``(E, *shape)`` per tensor entry, a list of E for other entries), so
        checkpoints, eval()/train() swaps and DCP see one entry per parameter, as for any other parameter. Each step
        copies the values, gradients and state in and out: one more pass over the experts' state.

        In a distributed run (``ctx``) each rank steps the experts it owns (their matrices are the context's, the
        gradients gathered there), and the parameter's state is a DTensor over the group, ``Shard(0)``: each
        rank's rows are its experts' state (the plan gives each rank one ``torch.chunk`` piece of the experts), so
        the state dict keeps one entry per parameter with the global shape (E, ...), and DCP reshards it to any
        layout or to one process."""
        if not self.STEPS_EXPERTS:
            yield everyone, owned
            return
        stepped = {id(p) for _, params in owned for p in params}
        moved = []

        def split(work, with_values):
            out = []
            for group, params in work:
                if group.get("role") != EXPERTS:
                    out.append((group, params))
                    continue
                flat = []
                for p in params:
                    if ctx is not None and ctx.is_local_view(p):  # elementwise: the block whole, same numbers
                        flat.append(p)
                        continue
                    if ctx is not None and p in ctx.experts:
                        flat += split_distributed(p, with_values)
                        continue
                    if p.ndim < 3:
                        flat.append(p)
                        continue
                    entry = self._expert_matrices(p)
                    if with_values and id(p) in stepped:
                        packed = self.state.get(p) or {}
                        for e, (m, state) in enumerate(entry):
                            m.copy_(p[e])
                            m.grad = p.grad[e].clone()  # its own memory: aligned as a separate gradient
                            _unpack(packed, e, len(entry), state)
                            self.state[m] = state
                        moved.append((p, entry))
                    flat += [m for m, _ in entry]
                out.append((group, flat))
            return out

        def split_distributed(p, with_values):
            pieces = ctx.owned_experts(p)
            if not with_values:  # before_step: every expert in order, stand-ins where another rank owns it
                return [ctx.expert_view(x) for x in ctx.experts[p]]
            mats = [ctx.expert_full[x] for x in pieces]
            entry = self._experts.get(p)
            if entry is None or len(entry) != len(mats) or any(a[0] is not m for a, m in zip(entry, mats)):
                entry = self._experts[p] = [[m, {}] for m in mats]
            packed = {k: wdist.local_shard(v) if isinstance(v, torch.Tensor) else v
                      for k, v in (self.state.get(p) or {}).items()}
            for i, (m, state) in enumerate(entry):
                _unpack(packed, i, len(entry), state)
                self.state[m] = state
            moved.append((p, entry))
            return mats

        if not any(g.get("role") == EXPERTS for g, _ in everyone):
            yield everyone, owned
            return
        owned = split(owned, True)
        everyone = split(everyone, False)
        try:
            yield everyone, owned
        finally:
            for p, entry in moved:
                distributed = ctx is not None and p in ctx.experts
                for e, pair in enumerate(entry):
                    m = pair[0]
                    if not distributed:  # ctx.publish writes the parameter
                        p[e].copy_(m)
                    m.grad = None
                    pair[1] = self.state.pop(m, {})  # the optimizer may have put a new dict there
                if not distributed:
                    self.state[p] = _pack([state for _, state in entry], self.state.get(p))
                    continue
                old = {k: wdist.local_shard(v) if isinstance(v, torch.Tensor) else v
                       for k, v in (self.state.get(p) or {}).items()}
                local = _pack([state for _, state in entry], old)
                self.state[p] = {k: ctx.stacked(v, p.shape[0]) if isinstance(v, torch.Tensor) else v
                                 for k, v in local.items()}

    def _expert_matrices(self, p) -> list:
        entry = self._experts.get(p)
        shape = tuple(p.shape[1:])
        if (entry is None or len(entry) != p.shape[0] or tuple(entry[0][0].shape) != shape
                or entry[0][0].dtype != p.dtype):
            entry = [[torch.zeros(shape, dtype=p.dtype, device=p.device), {}] for _ in range(p.shape[0])]
            self._experts[p] = entry
        return entry

    def expected_state_of(self, p: torch.Tensor, group: dict) -> dict | None:
        """:meth:`expected_state`, for an ``experts`` parameter the stack of its experts' (``(E, *shape)``)."""
        if group.get("role") != EXPERTS or p.ndim < 3 or not self.STEPS_EXPERTS:
            return self.expected_state(p, group)
        one = self.expected_state(_meta(p.shape[1:], p.dtype), group)
        if one is None:
            return None
        return {k: None if s is None else (p.shape[0], *s) for k, s in one.items()}

    @contextlib.contextmanager
    def _owned_state(self, ctx):
        """While the step runs, the state of an owned sharded parameter is keyed by its full-size stand-in."""
        moved = [(p, full) for p, full in ctx.full.items()]
        for p, full in moved:
            self.state[full] = self.state.pop(p, {})
        try:
            yield
        finally:
            for p, full in moved:
                self.state[p] = self.state.pop(full, {})

    def check_can_step(self) -> None:
        """Raises where stepping now would corrupt the run: eval mode (averaging optimizers), or an lr that a
        scheduler or a user wrote into a group after construction and that the constructor would refuse."""
        for gi, group in enumerate(self.param_groups):
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not 0.0 <= lr <= LR_MAX:
                raise ValueError(f"{type(self).__name__}.step(): group {gi} has lr {lr!r} (allowed: [0, {LR_MAX:g}]); "
                                 "a scheduler or a write to param_groups set it")
        error = self.groups_error(self.param_groups, ".step()")
        if error:
            raise ValueError(error + " (a scheduler or a write to param_groups set it)")

    def before_step(self, work: list[tuple[dict, list[torch.Tensor]]]) -> None:
        """Called on every rank with every parameter that has a gradient (owned or not) before :meth:`apply_step`,
        for work that must be the same everywhere, such as drawing random numbers in one order."""

    def apply_step(self, work: list[tuple[dict, list[torch.Tensor]]]) -> None:
        """The update, given (group, parameters with a gradient) for every group; all gradients are finite."""
        for gi, (group, params) in enumerate(work):
            if params:
                self._step_group(gi, group, params)

    # ----- recovery from overflow ---------------------------------------------------------------------------------
    def restart_nonfinite(self, tensors: list[torch.Tensor]) -> list[bool]:
        """Zero, in place, each statistic of ``tensors`` (factors, second moments) that is not finite; returns
        which were restarted. One huge but finite gradient (1e20) overflows float32 factors to inf; an inf factor
        never decays, so without a restart every later refresh fails and the basis is frozen for good. Callers
        run this before each refresh and keep the previous basis/root for a restarted factor at that refresh:
        the statistic rebuilds from the next gradients and the following refresh is a normal one, so one spike
        costs at most one refresh period. Counted in ``counters["factor_restarts"]``; warns once per optimizer."""
        if not tensors:
            return []
        bad = [not ok for ok in finite_flags(tensors)]
        restarted = bad.count(True)
        if restarted:
            for t, b in zip(tensors, bad):
                if b:
                    t.zero_()
            self.counters["factor_restarts"] += restarted
            if not getattr(self, "_warned_restart", False):
                self._warned_restart = True
                warnings.warn(f"{type(self).__name__}: {restarted} preconditioner statistic(s) overflowed (a huge "
                              "finite gradient?) and were restarted from zero; the previous basis is kept until "
                              "the next refresh. Counted in counters['factor_restarts']; this warning is shown once.",
                              RuntimeWarning, stacklevel=3)
        return bad

    def scratch(self, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A reused buffer of ``like``'s shape (dtype, device) for a step's temporaries, never state: fresh
        multi-megabyte tensors per parameter and step cost page faults. Sized once for the largest parameter;
        ``slot`` picks another buffer when two temporaries live at once."""
        buf = self._buffer(like.numel(), like.dtype, like.device, slot, for_any_parameter=True)
        return buf[:like.numel()].view(like.shape)

    def _buffer(self, numel: int, dtype: torch.dtype, device, slot, for_any_parameter: bool = False) -> torch.Tensor:
        """The reused flat buffer of ``slot`` (dtype, device), of at least ``numel`` entries, made anew when it is
        smaller: of ``numel``, or (``for_any_parameter``) of the largest parameter's size if that is more."""
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (dtype, device, slot)
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            if for_any_parameter:
                numel = max([numel] + [q.numel() for g in self.param_groups for q in g["params"]])
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def foreach_new(self, op: str, tensors: list[torch.Tensor], *args, slot: int = 0, **kwargs) -> list[torch.Tensor]:
        """``torch._foreach_<op>(tensors, *args)`` (an arg that is a list or tuple gives each tensor its own entry):
        results that live for this step only. On an accelerator they are new tensors from one launch (its caching
        allocator reuses the memory); on a CPU, where there is no launch to save, ``torch.<op>(..., out=)`` tensor
        by tensor into views of a reused buffer (``slot``: another one for results that live at once), since fresh
        multi-megabyte tensors at every step cost page faults there (Prodigy's step, width 256: 21 ms against 14).
        The same numbers either way."""
        if not tensors:
            return []
        if tensors[0].device.type != "cpu" or not update.CPU_PATHS or len({t.dtype for t in tensors}) != 1:
            return list(getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs))
        buf = self._buffer(sum(t.numel() for t in tensors), tensors[0].dtype, tensors[0].device, ("foreach", slot))
        out, start = [], 0
        for t in tensors:
            out.append(buf[start:start + t.numel()].view(t.shape))
            start += t.numel()
        fn = getattr(torch, op)
        for i, (t, o) in enumerate(zip(tensors, out)):
            fn(t, *[a[i] if isinstance(a, (list, tuple)) else a for a in args], out=o, **kwargs)
        return out

    # the state keys of the Adam-style moments whose overflow restart_overflowed_moments repairs: the second
    # moments are checked in the gradients' pass (one reduction call, one host sync); None: the optimizer has none
    SECOND_MOMENT_KEY: str | None = None
    FIRST_MOMENT_KEY = "exp_avg"

    def _finite_with_moments(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> tuple[list, tuple]:
        """``finite_flags(grads)``, with the second moments of ``params`` (``SECOND_MOMENT_KEY``) checked in the
        same call. Returns the gradients' flags and ``(second, first)``: the overflowed second moments and their
        first moments (None where there is none), for :meth:`restart_overflowed_moments`."""
        key = self.SECOND_MOMENT_KEY
        states = [] if key is None else [
            s for p in params if isinstance((s := self.state.get(p) or {}).get(key), torch.Tensor)]
        flags = finite_flags(grads + [s[key] for s in states])
        bad = [s for s, ok in zip(states, flags[len(grads):]) if not ok]
        return flags[:len(grads)], ([s[key] for s in bad], [s.get(self.FIRST_MOMENT_KEY) for s in bad])

    def restart_overflowed_moments(self, second: list[torch.Tensor], first: list | None = None,
                                   count: int | None = None) -> None:
        """Adam-style second moments that overflowed to inf (a huge finite gradient squared): their non-finite
        entries restart at zero, with the same entries of the first moment (``first``: aligned with ``second``,
        None where there is none). The step finds them (:meth:`_finite_with_moments`) and calls this before any
        state changes: the spike's own step was a zero update (m / inf), and without the restart every later one
        would be too, for good (inf never decays), while the first moment's huge entry would meet a small
        denominator once v were finite again.
        Counted in ``counters["factor_restarts"]`` (``count`` of them, default ``len(second)``: an elementwise
        parameter's blocks restart on each rank, and count once); warns once per optimizer."""
        count = len(second) if count is None else count
        if not second and not count:
            return
        for i, v in enumerate(second):
            bad = ~torch.isfinite(v)
            v.masked_fill_(bad, 0.0)
            if first is not None and first[i] is not None:
                first[i].masked_fill_(bad, 0.0)
        self.counters["factor_restarts"] += count
        if not getattr(self, "_warned_moment_restart", False):  # apart from the factors' warning
            self._warned_moment_restart = True
            warnings.warn(f"{type(self).__name__}: the second moment of {count} parameter(s) overflowed (a "
                          "huge finite gradient?); the overflowed entries restart from zero. Counted in "
                          "counters['factor_restarts']; this warning is shown once.", RuntimeWarning, stacklevel=4)

    # ----- gradients ------------------------------------------------------------------------------------------
    def params_with_grad(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """(group, its parameters that have a gradient), rejecting sparse gradients by name."""
        out = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for i, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to update: a no-op
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: parameter {i} of group {gi} "
                        f"(shape {tuple(p.shape)}); use nn.Embedding(sparse=False)"
                    )
                params.append(p)
            out.append((group, params))
        return out

    def grads_are_finite(self, work: list[tuple[dict, list[torch.Tensor]]]) -> bool:
        """Check every gradient before any state changes; apply the non-finite policy. True: go ahead, after
        restarting the second moments that overflowed (checked in the same pass: one host sync, not two)."""
        grads = [p.grad for _, params in work for p in params]
        if not grads:
            return True
        flags, overflowed = self._finite_with_moments(grads, [p for _, params in work for p in params])
        if all(flags):
            self.restart_overflowed_moments(*overflowed)
            return True
        shapes = [(gi, tuple(p.shape)) for gi, (_, params) in enumerate(work) for p in params]
        bad = [where for where, ok in zip(shapes, flags) if not ok]
        self._nonfinite(f"{type(self).__name__}: non-finite gradient in {len(bad)} parameter(s) "
                        f"(first: group {bad[0][0]}, shape {bad[0][1]})", stacklevel=4)
        return False

    def _nonfinite(self, message: str, stacklevel: int) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.counters["skipped_steps"] += 1
        warnings.warn(message + "; step skipped, optimizer state untouched "
                      f"({self.counters['skipped_steps']} skipped so far)", RuntimeWarning, stacklevel=stacklevel)
