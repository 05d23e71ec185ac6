"""Checkpoints and copies of a whiten optimizer, written once: what ``state_dict()`` holds, what
``load_state_dict()`` refuses before anything changes and then loads, what a pickled or deep-copied optimizer keeps.

An optimizer declares what it adds and overrides none of ``state_dict``, ``check_state_dict``,
``load_state_dict``, ``__getstate__`` and ``__setstate__``:

* per-parameter state: its own initialiser, as it creates the state; :meth:`expected_state` (run on meta tensors,
  no memory) says what a checkpoint's entry must hold;
* optimizer-wide state (counters, random generators, M-FAC's Gram matrix): :meth:`global_state` returns
  ``{key: value}`` for the keys it names in ``GLOBAL_STATE_KEYS``. Each entry rides in the first param group,
  which ``torch.distributed.checkpoint`` keeps (it drops other top-level keys); :meth:`check_global_state`
  refuses a bad one before anything changes, :meth:`load_global_state` takes it after the load. Pickled copies go
  through the same two;
* settings kept as attributes rather than group keys: ``PICKLED`` maps each to its default (for copies pickled
  before it existed); what a copy must rebuild instead (hooks, caches, generators): :meth:`reset_transient`;
* rules across groups (Prodigy's shared settings): :meth:`groups_error`, checked on construction, at each step and
  on the groups a checkpoint would give;
* a mixin's own entries: :meth:`extend_state_dict`, :meth:`check_state_entry` and :meth:`after_load`
  (the averaging mixin's live weights and its average).

``GLOBAL_STATE_KEYS`` and ``PICKLED`` of all classes of an optimizer are taken together (each class names its own).
"""

from __future__ import annotations

import weakref

import torch

from .. import distributed as wdist
from .update import state_dtype

__all__ = ["Checkpoints"]


def _merged(cls, name: str, empty):
    out = type(empty)()
    for klass in reversed(cls.__mro__):
        value = klass.__dict__.get(name)
        if value:
            out = out + value if isinstance(out, tuple) else {**out, **value}
    return out


class Checkpoints:
    """Mixin of :class:`WhitenOptimizer` (see the module's docstring)."""

    GLOBAL_STATE_KEYS: tuple[str, ...] = ("whiten_counters", "whiten_optimizer")
    PICKLED: dict = {"nonfinite": "skip", "batched": True, "sync_free": False, "compiled": False}
    # state entries with the parameter's shape, whatever the optimizer
    PARAMETER_SHAPED = ("momentum", "exp_avg", "exp_avg_sq", "ema", "z", "graft", "live")

    # ----- what an optimizer declares -----------------------------------------------------------------------------
    def global_state(self) -> dict:
        """``{key: value}`` of the optimizer-wide state, one entry per key of ``GLOBAL_STATE_KEYS``."""
        return {"whiten_counters": dict(self.counters), "whiten_optimizer": type(self).__name__}

    def check_global_state(self, saved: dict, state_dict: dict) -> None:
        """Raise a ValueError for a saved entry this optimizer cannot load (``saved[key]`` is None where the
        checkpoint has none)."""

    def load_global_state(self, saved: dict) -> None:
        counters = saved.get("whiten_counters") or {}
        self.counters = self.new_counters()
        self.counters.update({k: int(v) for k, v in counters.items()})

    def reset_transient(self) -> None:
        """Rebuild what is not pickled or must not outlive a load: called on a copy after its pickled attributes
        are set and before its optimizer-wide state is loaded, and by ``load_state_dict``."""
        self.__dict__.setdefault("process_group", None)  # communicators do not pickle: a copy runs on one process
        self.reset_stacks()  # rebuilt on the next step
        self._dist = None  # a copy plans its own
        if "_checked" not in self.__dict__:  # unpickled: its tensors as they came; load_state_dict keeps the record
            self._checked = [(g, [(id(p), tuple(p.shape)) for p in g["params"]]) for g in self.param_groups]
            self._validated = weakref.WeakValueDictionary((id(p), p) for g in self.param_groups for p in g["params"])
        self._checked_key = None

    def groups_error(self, groups: list[dict], where: str) -> str | None:
        """A rule across ``groups`` that they break, as a message (``where``: the call, e.g. ``".step()"``)."""
        return None

    def extend_state_dict(self, sd: dict) -> None:
        """Add a mixin's own entries to a state dict that :meth:`state_dict` built."""

    def check_state_entry(self, pid, p: torch.Tensor, entry: dict, group: dict) -> None:
        """Raise a ValueError where a checkpoint's entry for ``p`` (an owned, non-empty one) lacks what a mixin
        needs; ``group``: the group's settings as the checkpoint would leave them."""

    def after_load(self) -> None:
        """Called at the end of :meth:`load_state_dict`."""

    # ----- the protocol -------------------------------------------------------------------------------------------
    @classmethod
    def global_state_keys(cls) -> tuple[str, ...]:
        return _merged(cls, "GLOBAL_STATE_KEYS", ())

    @classmethod
    def pickled_attributes(cls) -> dict:
        return _merged(cls, "PICKLED", {})

    def saved_global_state(self, state_dict) -> dict:
        """``{key: saved value or None}`` for this optimizer's global keys, from the first param group (or the top
        level, where whiten 0.1 kept them)."""
        groups = state_dict.get("param_groups") or [{}]
        first = groups[0] if groups and isinstance(groups[0], dict) else {}
        return {k: first.get(k, state_dict.get(k)) for k in self.global_state_keys()}

    def __getstate__(self):
        self.resolve_pending()  # a sync-free step's flags: its Python side is final before it is copied
        state = super().__getstate__()  # torch keeps defaults, state and param_groups only
        state.update({k: getattr(self, k, default) for k, default in self.pickled_attributes().items()})
        state["whiten_global_state"] = self.global_state()
        return state

    def __setstate__(self, state):
        saved = state.pop("whiten_global_state", None)
        unpickling = "defaults" in state  # torch's load_state_dict calls this too, with the state and groups only
        super().__setstate__(state)
        for key, default in self.pickled_attributes().items():
            self.__dict__.setdefault(key, default)
        self.reset_transient()
        if unpickling:
            if saved is None:  # pickled before this protocol: only the counters were kept apart
                saved = {"whiten_counters": state.get("counters")}
            self.load_global_state(saved)

    def state_dict(self):
        """torch's state dict, with the optimizer-wide state in the first param group. In a distributed run each
        rank's dict holds the full state of the parameters it owns and ``{}`` for the others."""
        self.resolve_pending()  # a sync-free step's flags: a skipped step's counts are put back first
        sd = super().state_dict()
        sd["param_groups"][0].update(self.global_state())
        self.extend_state_dict(sd)
        return sd

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
            candidate = {**group, **self.BEFORE_OPTIONS, **{k: v for k, v in saved.items() if k != "params"}}
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
            expected = None if owned_elsewhere else self.expected_state_of(p, {
                **self.param_groups[gi], **self.BEFORE_OPTIONS,
                **{k: v for k, v in saved_groups[gi].items() if k != "params"}})
            if not owned_elsewhere:
                self.check_state_entry(pid, p, entry, {**self.param_groups[gi], **saved_groups[gi]})
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
                        and not bool(wdist.local_shard(value).isfinite().all())):  # a DTensor: this rank's shard
                    raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {pid!r} is not finite")
        self.check_global_state(self.saved_global_state(state_dict), state_dict)
        merged = [{**g, **{k: v for k, v in s.items() if k != "params"}} for g, s in zip(self.param_groups, saved_groups)]
        error = self.groups_error(merged, ".load_state_dict")
        if error:
            raise ValueError(error)

    def initial_state(self, p: torch.Tensor, group: dict) -> dict | None:
        """The state this optimizer's initialiser creates for ``p`` in ``group``, ``p`` a meta tensor (no memory):
        what :meth:`expected_state` and :meth:`stored_dtypes` read by default. None: an optimizer that gives those
        itself."""
        return None

    def _initial_on_meta(self, p: torch.Tensor, group: dict) -> dict | None:
        return self.initial_state(torch.empty(p.shape, dtype=p.dtype, device="meta"), group)

    def expected_state(self, p: torch.Tensor, group: dict) -> dict | None:
        """``{key: shape (None for a non-tensor)}`` of the state this optimizer creates for ``p`` in ``group``,
        which a checkpoint's non-empty entry must have; None: not checked. By default from :meth:`initial_state`."""
        state = self._initial_on_meta(p, group)
        return None if state is None else self._shapes_of(state)

    # {option: value} a checkpoint from before the option resumes with instead of the default: the behaviour its state
    # was built by (SPlus's, SOAP's and TNT's max_factor_ratio: None, every side below the size limit has a factor)
    BEFORE_OPTIONS: dict = {}

    def stored_dtypes(self, p: torch.Tensor, group: dict) -> dict:
        """``{key: dtype}`` of the state tensors ``p`` keeps in another dtype than :func:`state_dtype` (the
        ``state_dtype`` option's bfloat16 momenta and bases): what :meth:`load_state_dict` restores them in and what
        ``memory_report`` counts before the first step. By default from :meth:`initial_state` (empty without it)."""
        state = self._initial_on_meta(p, group)
        return {} if state is None else self._dtypes_of(state, p)

    @staticmethod
    def _dtypes_of(state: dict, p: torch.Tensor) -> dict:
        full = state_dtype(p)
        return {k: v.dtype for k, v in state.items() if isinstance(v, torch.Tensor) and v.dtype != full}

    @staticmethod
    def _shapes_of(state: dict) -> dict:
        return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}

    @staticmethod
    def _laid_out_as(ctx, p: torch.Tensor, v):
        """A loaded state entry of an elementwise parameter ``p`` (every rank keeps its block) laid out as ``p``: a
        full tensor (``full_state_dict``, a one-process checkpoint) is cut to this rank's block, a DTensor placed
        otherwise is gathered first (a collective: every rank loads the same checkpoint)."""
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
            return v
        same = (wdist.is_dtensor(v) and wdist.is_dtensor(p) and v.device_mesh == p.device_mesh
                and tuple(v.placements) == tuple(p.placements))
        if same:
            return v
        if wdist.is_dtensor(v):
            v = v.full_tensor()
        return ctx.as_parameter(p, ctx.block_of(p, v).clone())

    def load_state_dict(self, state_dict) -> None:
        """Checks ``state_dict`` (:meth:`check_state_dict`: nothing changes if it is refused), then loads it: the
        parameters' state in the dtypes this optimizer keeps, the optimizer-wide state, the groups' settings (a
        setting the checkpoint predates takes this optimizer's default)."""
        self.resolve_pending()  # the last step's policy applies (a warning, or raise) before its state is replaced
        self._moments_after = None  # the loaded second moments are checked on the host at the next step
        self.check_state_dict(state_dict)
        global_state = self.saved_global_state(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in self.global_state_keys():
                group.pop(key, None)
            for key, value in self.defaults.items():  # a checkpoint from before an option
                group.setdefault(key, self.BEFORE_OPTIONS.get(key, value))
        self.reset_stacks()
        # torch casts floating-point state to the parameter's dtype; whiten keeps state in its own dtype (fp32
        # factors for bf16 parameters), so restore each saved tensor with its saved dtype. Cloning also keeps this
        # optimizer from sharing tensors with the dict it was loaded from.
        id_to_param, group_of = {}, {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(saved["params"], group["params"]))
            group_of.update((pid, group) for pid in saved["params"])
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
            # The state_dtype option's entries (bfloat16 momenta, bases) take that dtype instead.
            dtype = state_dtype(p)
            stored = self.stored_dtypes(p, group_of[pid])
            self.state[p] = {
                k: v.detach().to(device=p.device, dtype=(p.dtype if k == "live" else stored.get(k, dtype))
                                 if v.is_floating_point() else None, copy=True)
                if isinstance(v, torch.Tensor) else v
                for k, v in saved_state.items()
            }
            if ctx is not None and ctx.is_local(p):
                self.state[p] = {k: v if k == "live" else self._laid_out_as(ctx, p, v)
                                 for k, v in self.state[p].items()}
        self.load_global_state(global_state)
        self.after_load()
