"""What every whiten optimizer shares: argument checks, the non-finite-gradient policy, same-shape state kept in
stacks, state_dict hygiene and counters users can read."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import defaultdict
from typing import Callable, Iterable

import torch

from .. import distributed as wdist
from ..linalg import finite_flags, robust_eigh_basis, warn_eigh_failure
from ..roles import ROLES

NONFINITE_POLICIES = ("skip", "raise")


# Upper bounds: no run trains with a larger step or decay, and beyond ~1e38 the step sizes no longer fit the
# float32 scalars of in-place kernels (a float-conversion error mid-step); inf gives NaN parameters in one step.
LR_MAX = 1e6
WEIGHT_DECAY_MAX = 1e6


def check_range(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``low <= value <= high`` (open ends where asked). Infinity is never
    accepted: no hyperparameter of these optimizers works at inf (the step or the decay becomes NaN)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or math.isinf(value) or below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {lo}{low}, {high}{hi})")


def check_lr(name: str, value) -> None:
    check_range(name, value, 0.0, LR_MAX)


def check_weight_decay(value) -> None:
    check_range("weight_decay", value, 0.0, WEIGHT_DECAY_MAX)


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= {low})")


def check_ema_rate(value) -> None:
    """``ema_rate`` is None (no averaging), ``"auto"`` (whiten.averaging) or a rate in [0, 1)."""
    if value is not None and value != "auto":
        check_range("ema_rate", value, 0.0, 1.0, high_open=True)


def check_betas(name: str, betas, count: int = 2) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {name}: {betas!r} (allowed: a tuple of {count} numbers, each in [0, 1))")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, high_open=True)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (allowed: True or False)")


def check_role(value) -> None:
    if value is not None and value not in ROLES:
        raise ValueError(f"Invalid role: {value!r} (allowed: None or one of {', '.join(ROLES)})")


# What ``rotation_dtype`` (SPlus, SOAP) accepts: None (off) or bfloat16, spelled as a dtype or as a string.
ROTATION_DTYPES = {None: None, torch.bfloat16: torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def rotation_dtype(value) -> torch.dtype | None:
    """The dtype of the rotations into and out of the eigenbasis: None (the state dtype) or torch.bfloat16.
    Raises a ValueError naming ``rotation_dtype`` for anything else."""
    try:
        return ROTATION_DTYPES[value]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise ValueError(f"Invalid rotation_dtype: {value!r} (allowed: None, torch.bfloat16, 'bf16' or "
                         "'bfloat16')") from None


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 whatever the parameter's dtype, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def bucket(items: Iterable, key: Callable) -> dict:
    out: dict = defaultdict(list)
    for item in items:
        out[key(item)].append(item)
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


def _new_counters() -> dict:
    return {"skipped_steps": 0, "eigh_retries": 0, "eigh_failures": 0, "factor_restarts": 0}


class WhitenOptimizer(torch.optim.Optimizer):
    """Base class: a torch.optim.Optimizer with whiten's checks, counters and state handling.

    Counters (``optimizer.counters``, saved in the state_dict's first param group, where
    ``torch.distributed.checkpoint`` keeps them): ``skipped_steps`` (steps skipped because a gradient was not
    finite), ``eigh_retries`` (matrices whose eigendecomposition needed the float64 retry), ``eigh_failures``
    (matrices whose basis could not be refreshed and was kept), ``factor_restarts`` (statistics that overflowed,
    e.g. after one huge finite gradient, and were restarted from zero; see :meth:`restart_nonfinite`).

    Distributed runs (see :mod:`whiten.distributed`): with ``process_group`` (DDP, replicated parameters) or with
    DTensor parameters (FSDP2, their mesh is used), each parameter's whole step runs on one owner rank and the new
    values are sent to the others; the numbers are those of one process.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # apply_step's default loops over _step_group(gi, group, params), each optimizer's own math
        if cls.apply_step is WhitenOptimizer.apply_step and not hasattr(cls, "_step_group"):
            raise TypeError(f"{cls.__name__} must define _step_group(gi, group, params) or override apply_step")

    def __init__(self, params, defaults: dict, nonfinite: str = "skip", process_group=None):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (allowed: {', '.join(map(repr, NONFINITE_POLICIES))})")
        if process_group is not None and not isinstance(process_group, torch.distributed.ProcessGroup):
            raise ValueError(f"Invalid process_group: {process_group!r} (allowed: None or a "
                             "torch.distributed.ProcessGroup, e.g. torch.distributed.group.WORLD)")
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.counters = _new_counters()
        self._stacks: dict = {}
        self.stack_builds = 0  # how many times stacks were (re)built: after the first steps, only when members change
        self._dist = None  # (parameter identities, DistributedContext or None), rebuilt when parameters change
        # per group as last validated: (the group dict, [(id, shape) of each tensor]); see check_parameters
        self._checked: list[tuple[dict, list[tuple[int, tuple]]]] = []
        self._validated = weakref.WeakValueDictionary()  # id -> every tensor validated so far, while it lives
        self._checked_key = None  # the tensors' identities at the last check_parameters, None before the first step
        self._member_keys: dict = {}  # group index -> [(member, bucket key)], valid for one step
        super().__init__(params, defaults)

    # ----- construction -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        with warnings.catch_warnings():  # torch only warns on duplicates; _check_group refuses them
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1)
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

    # ----- stacked state ------------------------------------------------------------------------------------
    def group_members(self, gi: int) -> list[torch.Tensor]:
        """The tensors this process steps for group ``gi``'s parameters: all of them on one process; in a
        distributed run the ones it owns (their full-size stand-ins while a step runs)."""
        params = self.param_groups[gi]["params"]
        # step() planned this step already: reuse its context rather than re-derive it for every group
        ctx = self._dist[1] if self._dist is not None else self.distributed_context()
        if ctx is None:
            return params
        return [ctx.view(p) for p in params if ctx.owns(p)]

    def bucket_stacks(self, gi: int, key, present: list[torch.Tensor], key_of: Callable,
                      shapes: dict[str, tuple[int, ...]]) -> tuple[dict, torch.Tensor | None]:
        """Stable stacks: :meth:`stacked_state` over every parameter of group ``gi`` with state whose bucket key
        (``key_of(p)``) is ``key``, with or without a gradient this step, so a missing gradient neither rebuilds
        the stacks nor keeps an old stack alive. Returns the stacks and the positions of ``present`` in them
        (None when they are all the members, in order)."""
        keyed = self._member_keys.get(gi)  # the group's members and their keys, once per step
        if keyed is None:
            keyed = self._member_keys[gi] = [(q, key_of(q)) for q in self.group_members(gi) if self.state.get(q)]
        members = [q for q, k in keyed if k == key]
        stacks = self.stacked_state(key, members, shapes)
        if len(members) == len(present) and all(a is b for a, b in zip(members, present)):
            return stacks, None
        where = {id(q): j for j, q in enumerate(members)}
        return stacks, torch.tensor([where[id(p)] for p in present], device=present[0].device)

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

    # ----- distribution ---------------------------------------------------------------------------------------
    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        """Relative cost of one parameter's optimizer work, for balancing owners over ranks: ``m·n·(m+n)`` for a
        matrix view (m, n) (factor products, rotations, Newton–Schulz), the element count otherwise."""
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
        on one rank, so a distributed run still batches them exactly as one process does."""
        if p.numel() == 0:
            return True
        m = p.shape[0] if p.ndim else 1
        n = p.numel() // m
        return all(size % 16 == 0 for size in (m * n, m * m, n * n))

    def distributed_context(self):
        """The :class:`whiten.distributed.DistributedContext` of this optimizer, or None on one process."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(map(id, params))
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
        self.check_can_step()
        key = tuple(id(p) for g in self.param_groups for p in g["params"])
        if key != self._checked_key:  # the first step, or tensors changed: checked before anything changes
            self.check_parameters()
            self._checked_key = key
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self.params_with_grad()
        ctx = self.distributed_context()
        self._member_keys = {}
        if ctx is None:
            if self.grads_are_finite(work):  # checked before any state changes
                self.before_step(work)
                self.apply_step(work)
        else:
            self._distributed_step(ctx, work)
        if not getattr(self, "_memory_checked", False) and self.state:
            self._memory_checked = True
            self.check_state_memory()
        return loss

    # a parameter whose state exceeds this multiple of its own memory (and STATE_WARN_MIN_BYTES) is warned about
    STATE_WARN_RATIO = 16
    STATE_WARN_MIN_BYTES = 64 * 2**20

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
                          "sizes", RuntimeWarning, stacklevel=3)

    def _distributed_step(self, ctx, work) -> None:
        # Each rank checks the gradients it holds: its owned ones (replicated) or its shards (sharded).
        mine = [p for _, params in work for p in params if p in ctx.rows or ctx.owns(p)]
        flags, overflowed = self._finite_with_moments([wdist._local(p.grad) for p in mine],
                                                      [p for p in mine if ctx.owns(p)])
        local_bad = not all(flags)
        present, bad = ctx.agree([p for _, params in work for p in params], local_bad)
        if bad:
            self._nonfinite(f"{type(self).__name__}: non-finite gradient on at least one rank", stacklevel=4)
            return
        has = dict(zip(ctx.params, present))
        everyone = [(g, [p for p in g["params"] if has[p]]) for g in self.param_groups]
        ctx.gather_full([p for _, params in everyone for p in params], with_grad=True)
        # An empty entry marks a parameter another rank owns (DCP keys stay per owner). Set at every step, not once:
        # a new plan (add_param_group) must not leave a full state behind on its former owner.
        for p in ctx.params:
            if not ctx.owns(p):
                self.state[p] = {}
        owned = [(g, [ctx.view(p) for p in params if ctx.owns(p)]) for g, params in everyone]
        owner_counters = [k for k in self.counters if k != "skipped_steps"]  # counted where the work runs
        before = {k: self.counters[k] for k in owner_counters}
        with self._owned_state(ctx):
            self.restart_overflowed_moments(*overflowed)  # on the owner, inside the counters it reports
            self.before_step([(g, [ctx.view(p) if ctx.owns(p) else p for p in params]) for g, params in everyone])
            self.apply_step(owned)
        ctx.publish([p for _, params in everyone for p in params])
        for full in ctx.full.values():
            full.grad = None
        deltas = ctx.all_reduce([self.counters[k] - before[k] for k in owner_counters])
        for k, d in zip(owner_counters, deltas):
            self.counters[k] = before[k] + int(d)

    @torch.no_grad()
    def owner_update(self, params: list[torch.Tensor], fn) -> None:
        """``fn(p, tensor, state)`` writes a new value of each parameter into ``tensor`` from its optimizer state;
        in a distributed run it runs on the owner, on the full tensor, and every rank gets the result (eval() and
        train() swaps). ``params`` must be the same list on every rank."""
        ctx = self.distributed_context()
        if ctx is None:
            for p in params:
                fn(p, p, self.state.get(p, {}))
            return
        ctx.gather_full(params, with_grad=False)
        for p in params:
            if ctx.owns(p):
                fn(p, ctx.view(p), self.state.get(p, {}))
        ctx.publish(params)

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
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (like.dtype, like.device, slot)
        buf = buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            size = max([like.numel()] + [q.numel() for g in self.param_groups for q in g["params"]])
            buf = buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)

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

    def restart_overflowed_moments(self, second: list[torch.Tensor], first: list | None = None) -> None:
        """Adam-style second moments that overflowed to inf (a huge finite gradient squared): their non-finite
        entries restart at zero, with the same entries of the first moment (``first``: aligned with ``second``,
        None where there is none). The step finds them (:meth:`_finite_with_moments`) and calls this before any
        state changes: the spike's own step was a zero update (m / inf), and without the restart every later one
        would be too, for good (inf never decays), while the first moment's huge entry would meet a small
        denominator once v were finite again.
        Counted in ``counters["factor_restarts"]``; warns once per optimizer."""
        if not second:
            return
        for i, v in enumerate(second):
            bad = ~torch.isfinite(v)
            v.masked_fill_(bad, 0.0)
            if first is not None and first[i] is not None:
                first[i].masked_fill_(bad, 0.0)
        self.counters["factor_restarts"] += len(second)
        if not getattr(self, "_warned_moment_restart", False):  # apart from the factors' warning
            self._warned_moment_restart = True
            warnings.warn(f"{type(self).__name__}: the second moment of {len(second)} parameter(s) overflowed (a "
                          "huge finite gradient?); the overflowed entries restart from zero. Counted in "
                          "counters['factor_restarts']; this warning is shown once.", RuntimeWarning, stacklevel=4)

    # ----- Shampoo factors and their eigenbases ---------------------------------------------------------------
    @staticmethod
    def factor_state(state: dict, matrix: tuple[int, int], left: bool, right: bool, dtype, device) -> dict:
        """Add zero factors ``factor_left`` (m, m) / ``factor_right`` (n, n) and identity bases ``basis_*`` for the
        sides of an (m, n) matrix view that have a factor; returns ``state``."""
        for side, d, present in (("left", matrix[0], left), ("right", matrix[1], right)):
            if present:
                state[f"factor_{side}"] = torch.zeros(d, d, dtype=dtype, device=device)
                state[f"basis_{side}"] = torch.eye(d, dtype=dtype, device=device)
        return state

    def refresh_bases(self, states: list[dict], eps: float, descending: bool = False) -> None:
        """``basis_*`` = eigenvectors of ``factor_* + eps·I`` (ascending eigenvalues, or descending), grouped by
        (size, dtype, device) for robust_eigh_basis; a matrix whose eigendecomposition fails keeps its old basis and
        is counted."""
        pairs = [(s[f"factor_{side}"], s[f"basis_{side}"]) for s in states for side in ("left", "right")
                 if f"factor_{side}" in s]
        # an overflowed factor restarts from zero and keeps its basis this time (not an eigh failure)
        restarted = self.restart_nonfinite([f for f, _ in pairs])
        pairs = [fb for fb, r in zip(pairs, restarted) if not r]
        key = (lambda fb: (fb[0].shape, fb[0].dtype, fb[0].device)) if getattr(self, "batched", True) else id
        for group_pairs in bucket(pairs, key).values():
            result = robust_eigh_basis([f for f, _ in group_pairs], eps)
            self.counters["eigh_retries"] += result.retried
            for (_, basis), ok, vectors in zip(group_pairs, result.ok, result.vectors):
                if ok:
                    basis.copy_(vectors.flip(-1) if descending else vectors)
            failed = result.ok.count(False)
            if failed:
                self.counters["eigh_failures"] += failed
                warn_eigh_failure(type(self).__name__, failed)

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

    # ----- pickling and checkpoints ----------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, counters=dict(self.counters), batched=getattr(self, "batched", True))
        state.pop("_dist", None)  # communicators do not pickle; a copy plans its own
        state.pop("_checked", None)  # this process's tensors as validated
        state.pop("_validated", None)
        state.pop("_checked_key", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("counters", _new_counters())
        self.__dict__.setdefault("batched", True)
        self.__dict__.setdefault("process_group", None)
        self._stacks = {}  # rebuilt on the next step
        self.stack_builds = 0
        self._dist = None
        self._member_keys = {}
        if "_checked" not in self.__dict__:  # unpickled: its tensors as they came; load_state_dict keeps the record
            self._checked = [(g, [(id(p), tuple(p.shape)) for p in g["params"]]) for g in self.param_groups]
            self._validated = weakref.WeakValueDictionary((id(p), p) for g in self.param_groups for p in g["params"])
        self._checked_key = None

    def state_dict(self):
        """torch's state dict; the counters travel in the first param group, which DCP keeps. In a distributed
        run each rank's dict holds the full state of the parameters it owns and ``{}`` for the others."""
        sd = super().state_dict()
        sd["param_groups"][0]["whiten_counters"] = dict(self.counters)
        sd["param_groups"][0]["whiten_optimizer"] = type(self).__name__
        swaps = getattr(self, "swaps_weights", None)
        if swaps is not None:
            self._with_live_slots(sd, swaps)
        return sd

    def _with_live_slots(self, sd: dict, swaps) -> None:
        """An optimizer with an eval mode (parameter averaging, Schedule-Free) saves its mode and the live weights
        (``state["live"]`` in eval mode). DCP loads only the keys that the loading optimizer's own state dict has, and
        a fresh optimizer is in train mode: without the same keys in every state dict an eval-mode checkpoint came
        back as a train-mode one whose model held the average, and training went on from the average. So each
        swapping group always carries ``train_mode`` and each of its parameters a ``"live"`` entry: the saved live
        weights in eval mode, else a copy of the parameter (a parameter not swapped, or train mode).
        :meth:`load_state_dict` keeps them only for a group in eval mode. A copy, not the parameter itself: DCP loads
        in place, into the template's tensors, and a slot sharing the parameter's storage would take the model's
        weights or the live ones, whichever DCP wrote last."""
        index = 0
        for saved, group in zip(sd["param_groups"], self.param_groups):
            if swaps(group):
                saved["train_mode"] = group.get("train_mode", True)
                for i, p in enumerate(group["params"], start=index):
                    entry = sd["state"].get(i, {})
                    # a new dict: the optimizer's own state is left as it is
                    sd["state"][i] = {**entry, "live": entry["live"] if "live" in entry else p.detach().clone()}
            index += len(group["params"])

    # state entries with the parameter's shape, whatever the optimizer
    PARAMETER_SHAPED = ("momentum", "exp_avg", "exp_avg_sq", "ema", "z", "graft", "live")

    def check_state_dict(self, state_dict) -> None:
        """Refuse, before anything changes, a checkpoint of another optimizer or of another model, or one whose
        hyperparameters this optimizer would refuse: a ValueError that names what is wrong."""
        name = type(self).__name__
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: not an optimizer state dict (needs 'state' and 'param_groups')")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the checkpoint has {len(saved_groups)} param groups, this "
                             f"optimizer {len(self.param_groups)} (another model or another grouping)")
        saved_by = saved_groups[0].get("whiten_optimizer") if saved_groups else None
        if saved_by is not None and saved_by != name:
            raise ValueError(f"{name}.load_state_dict: the checkpoint is a {saved_by}'s, not a {name}'s")
        id_to_param = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: group {gi} has {len(saved['params'])} parameters in the "
                                 f"checkpoint and {len(group['params'])} here (another model?)")
            id_to_param.update(zip(saved["params"], group["params"]))
            candidate = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self.validate_group(candidate)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{name}.load_state_dict: group {gi} of the checkpoint: {e}") from None
        group_of = {pid: gi for gi, saved in enumerate(saved_groups) for pid in saved["params"]}
        for pid, entry in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                raise ValueError(f"{name}.load_state_dict: state for parameter {pid!r}, which no group lists")
            if not isinstance(entry, dict):
                raise ValueError(f"{name}.load_state_dict: state of parameter {pid!r} is not a dict")
            gi = group_of[pid]
            # an empty entry, or one with only live weights, marks a parameter another rank owned (distributed)
            owned_elsewhere = set(entry) <= {"live"}
            expected = None if owned_elsewhere else self.expected_state(p, {**self.param_groups[gi], **{
                k: v for k, v in saved_groups[gi].items() if k != "params"}})
            averaging = {**self.param_groups[gi], **saved_groups[gi]}.get("ema_rate") is not None
            if (not owned_elsewhere and averaging and hasattr(self, "update_averages") and "ema" not in entry
                    and isinstance(entry.get("step"), int) and entry["step"] > 0):
                # the average would restart from zero in the middle of the run
                raise ValueError(f"{name}.load_state_dict: state of parameter {pid!r} (shape {tuple(p.shape)}) "
                                 f"lacks 'ema', the average its group keeps (another optimizer's settings?)")
            for key, shape in (expected or {}).items():
                # a missing entry would silently stop the parameter's training (or fail mid-step)
                if key not in entry:
                    raise ValueError(f"{name}.load_state_dict: state of parameter {pid!r} (shape {tuple(p.shape)}) "
                                     f"lacks '{key}', which {name} keeps for it (another optimizer's settings?)")
                value = entry[key]
                if shape is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {pid!r} is {got}, "
                                     f"expected {shape} (another model or other settings?)")
            for key, value in entry.items():
                if key in self.PARAMETER_SHAPED and isinstance(value, torch.Tensor) and value.numel() != p.numel():
                    raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {pid!r} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(p.shape)} (another model?)")
                if (isinstance(value, torch.Tensor) and value.is_floating_point()
                        and not bool(wdist._local(value).isfinite().all())):  # a DTensor: this rank's shard
                    raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {pid!r} is not finite")

    def expected_state(self, p: torch.Tensor, group: dict) -> dict | None:
        """``{key: shape (None for a non-tensor)}`` of the state this optimizer creates for ``p`` in ``group``,
        which a checkpoint's non-empty entry must have; None: not checked. Optimizers build it by running their
        state initialiser on a meta tensor (no memory)."""
        return None

    @staticmethod
    def _shapes_of(state: dict) -> dict:
        return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}

    def load_state_dict(self, state_dict) -> None:
        self.check_state_dict(state_dict)
        groups = state_dict.get("param_groups") or [{}]
        counters = groups[0].get("whiten_counters", state_dict.get("whiten_counters", {}))  # top level: 0.1
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("whiten_counters", None)
            group.pop("whiten_optimizer", None)
        self._stacks = {}
        # torch casts floating-point state to the parameter's dtype; whiten keeps state in its own dtype (fp32
        # factors for bf16 parameters), so restore each saved tensor with its saved dtype. Cloning also keeps this
        # optimizer from sharing tensors with the dict it was loaded from.
        id_to_param = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(saved["params"], group["params"]))
        ctx = self.distributed_context()
        for pid, saved_state in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            if ctx is not None and not ctx.owns(p):
                # another rank owns it (a checkpoint from fewer ranks may carry its state); every rank keeps its
                # own copy of the live weights of an eval-mode checkpoint
                self.state[p] = {k: v.detach().to(device=p.device, copy=True)
                                 for k, v in saved_state.items() if k == "live"}
                continue
            # Floating state takes the dtype this optimizer creates for p (float32, float64 for float64
            # parameters), whatever it was saved in: an fp32 checkpoint loaded into a float64 model would
            # otherwise keep float32 state that later kernels mix with float64 (a mid-step failure).
            dtype = state_dtype(p)
            self.state[p] = {
                k: v.detach().to(device=p.device, dtype=(p.dtype if k == "live" else dtype)
                                 if v.is_floating_point() else None, copy=True)
                if isinstance(v, torch.Tensor) else v
                for k, v in saved_state.items()
            }
        if getattr(self, "swaps_weights", None) is not None:
            for group in self.param_groups:  # train mode: a saved "live" is only the slot state_dict() adds
                if group.get("train_mode", True):
                    for p in group["params"]:
                        if p in self.state:
                            self.state[p].pop("live", None)
                            if not self.state[p]:
                                del self.state[p]
        self.counters = _new_counters()
        self.counters.update({k: int(v) for k, v in counters.items()})
