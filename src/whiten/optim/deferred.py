"""The non-finite check decided on the device and read one step later (``sync_free=True``): an ordinary step that
never waits for the device.

The default check reads every gradient's finiteness back to the host before any state changes: one host sync per
step, which on a GPU stalls the host until the backward pass has drained from the queue. With ``sync_free=True`` an
optimizer that supports it (``SYNC_FREE``) runs its ordinary steps without that read:

* the finiteness flags are computed on the device (a max-abs norm per gradient: finite exactly when every entry
  is, with no overflow of a sum);
* every write of the step, state and parameters, is masked by them (:func:`whiten.optim.update.commit`:
  ``torch.where(ok, new, old, out=old)``), so a step with a non-finite gradient leaves every tensor bit for bit as
  it was;
* the flags are copied to the host without waiting (pinned memory, an event), and read at the start of the next
  step (or when ``counters``, ``state_dict()`` or a pickle needs them), by which time the device has long computed
  them. A skipped step then puts back the Python side of the optimizer (step counts, group settings the step wrote,
  counters) as it was before that step, counts it in ``counters["skipped_steps"]`` and warns, or raises for
  ``nonfinite="raise"``: one step late, with the state already as before the bad step.

Steps that must decide on the host run as before, with the host read: the first step of a parameter (its state is
created), refresh steps (eigendecompositions), what else an optimizer's :meth:`DeferredCheck.needs_host_check`
names (PSGD-Kron's factor updates, K-FAC's and EKFAC's factor and scale steps, steps that consume sampled
gradients), the step after a second moment (``SECOND_MOMENT_KEY``) overflowed (the host path restarts it; the
moments are checked on the device after each step), and distributed steps (the ranks agree on the flag on the host).
The numbers are the default path's, bit for bit (tests/test_sync_free.py), except where the default path's ordinary
step reads a number of its own from the device, which the sync-free step computes there instead: K-FAC's and
EKFAC's KL clip ν and Prodigy's D, within rounding of the default path's (float64 device arithmetic, applied by
multiplies where the default path passes Python numbers).

Who has it (``SYNC_FREE``): SPlus, SOAP, Shampoo, PSGD-Kron, Muon, Scion, Conda, TNT, Sophia, Schedule-Free AdamW,
K-FAC, EKFAC and Prodigy. Not SpecGD (its SVD at every step: ``torch.linalg.svd`` checks its result on the host on
CUDA) nor M-FAC (its Cholesky's fallback, an eigendecomposition, does too); docs/performance.md says more.

What it costs: the masked writes compute each new value out of place and select it, one more kernel per written
tensor (docs/performance.md); with ``compiled=True`` the selects are fused into the step's kernels
(:mod:`whiten.optim.kernels`), and the launches no longer grow with the number of parameters.
"""

from __future__ import annotations

import torch

__all__ = ["DeferredCheck", "device_finite_flags", "read_flags"]


def device_finite_flags(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Whether each tensor is entirely finite, as a bool vector on the tensors' device, and the position in
    ``tensors`` of each flag (grouped by dtype). The max-abs norm is finite exactly when every entry is (NaN and
    ±inf propagate; no sum to overflow): one fused ``_foreach_norm`` per dtype, nothing read on the host."""
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    order, flags = [], []
    for idxs in by_dtype.values():
        order += idxs
        norms = torch._foreach_norm([tensors[i] for i in idxs], float("inf"))
        flags.append(torch.stack(norms).isfinite())
    return (flags[0] if len(flags) == 1 else torch.cat(flags)), order


def read_flags(host: torch.Tensor) -> list[bool]:
    """The host copy of a step's flags, as Python bools. The copy lives in host memory and its event has been
    waited for: no device sync (benchmarks/host_syncs.py counts these reads apart)."""
    return host.tolist()


class DeferredCheck:
    """Mixin of :class:`whiten.optim._base.WhitenOptimizer`: the ``sync_free`` step (see the module's text)."""

    # Whether this optimizer's ordinary step masks its writes under ``self._ok`` (and says, in
    # :meth:`needs_host_check`, which steps cannot).
    SYNC_FREE = False

    _ok: torch.Tensor | None = None  # while a sync-free step runs: its 0-d bool flag on the device

    def needs_host_check(self, work: list[tuple[dict, list[torch.Tensor]]]) -> bool:
        """Whether this step, every parameter of ``work`` having its state, must still decide on the host (a refresh
        due, ...): optimizers override it; by default no step does. (A parameter's first step always decides on the
        host: its state is created then.)"""
        return False

    def can_defer(self, work) -> bool:
        if not (self.sync_free and self.SYNC_FREE):
            return False
        if self.SECOND_MOMENT_KEY is not None and not self._moments_finite():
            return False  # overflowed second moments (or not known): the host path restarts them
        params = [p for _, ps in work for p in ps]
        if not params or len({p.grad.device for p in params}) != 1:
            return False
        if any(group.get("role") == "experts" for group, ps in work if ps):
            return False
        if any(not self.state.get(p) for p in params):
            return False  # its state is created
        return not self.needs_host_check(work)

    def deferred_step(self, work) -> None:
        """One ordinary step under the device-side flag, its Python side recorded to be put back if the flag
        (read at the next step) says a gradient was not finite."""
        params = [p for _, ps in work for p in ps]
        flags, order = device_finite_flags([p.grad for p in params])
        host, event = _to_host(flags)  # queued before the step's kernels: ready early
        snapshot = self._python_state(work)
        put_back = self.python_extras()
        self._ok = flags.all()
        try:
            with self.experts(work, work) as (everyone, owned):
                self.before_step(everyone)
                self.apply_step(owned)
        finally:
            self._ok = None
        undo = (self._changes(snapshot), put_back)
        shapes = [(gi, tuple(p.shape)) for gi, (_, ps) in enumerate(work) for p in ps]
        where = [shapes[i] for i in order]  # aligned with the flags
        self._pending_check = (host, event, undo, where)

    def resolve_pending(self) -> None:
        """Read the last sync-free step's flags (waiting, at most, for the device to have computed them); if a
        gradient was not finite, put the optimizer's Python side back as it was before that step and apply the
        non-finite policy (count and warn, or raise)."""
        pending = self.__dict__.get("_pending_check")
        if pending is None:
            return
        self._pending_check = None
        host, event, undo, where = pending
        flags = _read(host, event)
        if all(flags):
            return
        self._restore_python_state(undo)
        bad = [w for w, ok in zip(where, flags) if not ok]
        self._nonfinite(f"{type(self).__name__}: non-finite gradient in {len(bad)} parameter(s) (first: group "
                        f"{bad[0][0]}, shape {bad[0][1]}) at the last step (sync_free: read one step later)",
                        stacklevel=5)

    def check_moments_after_step(self) -> None:
        """With second moments (``SECOND_MOMENT_KEY``): whether all of them are finite after this step, computed on
        the device and copied to the host without waiting, for the next step's :meth:`can_defer`. The default
        check reads them with the gradients at the next step and restarts an overflowed one (a huge finite
        gradient squared); a sync-free step takes the host path then, and only then."""
        key = self.SECOND_MOMENT_KEY
        moments = [v for s in self.state.values() if isinstance(v := s.get(key), torch.Tensor)]
        if not moments or len({v.device for v in moments}) != 1:
            self._moments_after = None
            return
        flags, _ = device_finite_flags(moments)
        self._moments_after = _to_host(flags.all().reshape(1))

    def _moments_finite(self) -> bool:
        """Whether every second moment was finite after the last step (False when not known: after a load)."""
        known = self.__dict__.get("_moments_after")
        return known is not None and all(_read(*known))

    def _python_state(self, work) -> list[tuple[dict, dict, bool]]:
        """The dicts a step may change outside its tensors, each with a shallow copy: every group's settings (the
        averaging's largest lr, Schedule-Free's k, ...), each stepped parameter's state entry (step counts, keys it
        gains), the counters, and the optimizer's own attributes (of which only numbers and strings count: the
        Fisher schedule's clock, ...). Tensors are kept by reference: masked, they do not change on a skipped
        step."""
        dicts = [*self.param_groups, *(self.state[p] for _, ps in work for p in ps), self._counters]
        return [(d, dict(d), False) for d in dicts] + [(self.__dict__, dict(self.__dict__), True)]

    @staticmethod
    def _changes(snapshot) -> list[tuple[dict, object, object, object]]:
        """(dict, key, value before the step or _MISSING, value after it) for every entry the step changed (of a
        dict whose plain values only count: those)."""
        out = []
        for d, before, plain_only in snapshot:
            for k in set(before) | set(d):
                old, new = before.get(k, _MISSING), d.get(k, _MISSING)
                if plain_only and not ((old is _MISSING or _plain(old)) and _plain(new)
                                       and not str(k).startswith("_warned")):
                    continue
                if old is not new and not (_plain(old) and _plain(new) and old == new):
                    out.append((d, k, old, new))
        return out

    def python_extras(self):
        """Python state outside dicts that an ordinary step changes (a random generator), taken before a sync-free
        step: a callable that puts it back, or None (the default: there is none)."""
        return None

    def _restore_python_state(self, undo) -> None:
        """Undo a skipped step's changes: each entry it changed goes back to its value before the step, unless
        something else (a scheduler's lr, a user) wrote it since; the counters lose the step's increments."""
        changes, put_back = undo
        if put_back is not None:
            put_back()
        for d, k, old, new in changes:
            now = d.get(k, _MISSING)
            if d is self._counters and _plain(old) and _plain(new) and _plain(now):
                d[k] = now - (new - old)
            elif now is new or (_plain(now) and _plain(new) and now == new):
                if old is _MISSING:
                    del d[k]
                else:
                    d[k] = old


_MISSING = object()


def _to_host(flags: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A host copy of device flags, queued without waiting (pinned memory and an event on a GPU)."""
    if flags.device.type != "cuda":
        return flags.cpu(), None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _read(host: torch.Tensor, event) -> list[bool]:
    if event is not None:
        event.synchronize()  # the device has long passed it: the copy was queued a step ago
    return read_flags(host)


def _plain(v) -> bool:
    """A value compared by ``==`` (a number, a string, a tuple of them): not a tensor, not a container of state."""
    return isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(_plain(x) for x in v))
