r"""Curvature from the model itself: gradients of labels sampled from the model's predictive distribution.

Optimizers of the Fisher family (TNT, Sophia's Gauss–Newton–Bartlett estimator, K-FAC's true Fisher) need, every
few steps, the gradient of the loss on labels drawn from the model's own predictions
:math:`y \sim p_\theta(y \mid x)` rather than on the data's labels. Its outer products estimate the Fisher
information (:math:`E_y[\hat g \hat g^\top]`), whatever the true labels are. They all expose one call,
``opt.sample_fisher(logits)``, made after the forward and before the ordinary backward; the training loop
otherwise stays AdamW's::

    for x, y in loader:
        logits = model(x)
        opt.sample_fisher(logits)          # an extra backward on the steps that need it; a no-op otherwise
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        opt.zero_grad()                    # p.grad is never touched by sample_fisher: zeroing here is fine
        loss.backward()
        opt.step()

**The contract** (:class:`FisherMixin`, which such optimizers inherit):

- ``sample_fisher(logits, kind="ce") -> bool``. When :meth:`FisherMixin.fisher_due` is False (the optimizer does
  not need curvature at this step) it returns False and costs nothing. Otherwise it draws labels, forms the MEAN
  loss over the ``n`` sampled labels, runs ``torch.autograd.grad(loss, params, retain_graph=True,
  allow_unused=True)`` (so the graph survives for the ordinary backward and ``p.grad`` is never read or written),
  keeps the gradients (summed, weighted by ``n``) until the next ``step()`` and returns True.

  - ``kind="ce"`` (default): classification. The last dim of ``logits`` holds the classes, any leading dims are
    examples (a language model's (batch, time, vocab) logits give batch·time labels);
    :math:`y \sim \mathrm{Categorical}(\mathrm{softmax}(z))` and the loss is the mean cross-entropy.
  - ``kind="mse"``: regression with the squared error ``F.mse_loss`` (mean over elements). Each output element is
    a label :math:`y \sim \mathcal N(z, 1/2)`, the Gaussian whose negative log-likelihood is the squared error
    up to a constant, so the estimate is the Gauss–Newton matrix of ``mse_loss`` (:math:`2 J^\top J` per element,
    as for cross-entropy's Fisher). ``n`` = the number of elements.

- **When.** ``fisher_due()`` asks the optimizer's own schedule (:meth:`FisherMixin.fisher_schedule`, e.g. every
  ``T1`` steps for TNT, every ``k`` for Sophia) at the number of steps the optimizer has taken (``fisher_steps``,
  which a step skipped for a non-finite gradient does not advance). Several calls before one ``step()``
  (gradient accumulation) are combined into the mean over all their labels.
- **Where the gradients go.** At the next ``step()`` (before any state changes, in ``before_step``) the kept
  gradients become the mean over all sampled labels and are handed to :meth:`FisherMixin.capture_fisher`
  ``(grads, n)`` — ``grads`` aligned with :meth:`FisherMixin.fisher_params` (None where a parameter got no
  gradient), ``n`` the total number of labels. Capturing at the step rather than in ``sample_fisher`` is what
  lets micro-batches and ranks be combined first. The default keeps them for the step (:meth:`fisher_grad`) and
  drops them after it; optimizers may override it. A step with a non-finite gradient drops them unused. Sampled
  gradients that are not finite follow the optimizer's ``nonfinite`` policy (``"raise"``: FloatingPointError;
  ``"skip"``: no curvature this time, a warning, counted in ``opt.fisher_skipped``).
- **Non-finite logits** (a diverged forward: no distribution to sample from). ``sample_fisher`` checks the logits
  before it draws labels (one host sync per call that is due). If any entry is not finite, the call follows the
  optimizer's ``nonfinite`` policy, as ``step()`` does for a non-finite gradient: ``"raise"``: FloatingPointError;
  ``"skip"`` (default): no labels are drawn, no backward runs and nothing is kept from this call (the other calls
  of the step, under gradient accumulation, still count); it returns False, warns and adds 1 to
  ``opt.fisher_skipped``. With several ranks, every rank decides the same (see Distributed below), so every rank
  raises, or skips the call, warns and counts, together, and no rank is left waiting in a collective.
- **Module hooks.** While the extra backward runs, ``opt.sampling_fisher`` is True and ``opt.fisher_batch_n`` is
  the number of labels of that call, so an optimizer with its own module hooks (K-FAC) can send the output
  gradients of that backward to its sampled-Fisher statistic rather than to the ordinary one.
- **Randomness and exact resume.** The labels of a call come from a ``torch.Generator`` on the logits' device
  seeded with a hash of (``fisher_seed``, ``fisher_steps``, stream), stream = ``call · world + rank`` (``call``
  counts the calls since the last step): a counter-based stream, so there is no generator state to save, only
  integers. Nothing else is random and the global RNG is never used. ``state_dict()["param_groups"][0]["fisher"]``
  (where torch.distributed.checkpoint keeps it) holds ``seed``, ``steps`` and ``skipped``: a resumed run samples
  the same labels as the uninterrupted one, and every rank holds the same entry.
- **Distributed (DDP).** The kept gradients are summed over the optimizer's ``process_group`` (or over the default
  group when ``torch.distributed`` is initialised with several ranks and no group was given: under DDP every rank
  steps the same replicated parameters) and divided by the total label count, so every rank captures the same
  mean, as DDP averages ``p.grad``. Ranks draw independent labels (the rank is part of the stream: labels shared
  between ranks would correlate the examples of different ranks and bias the outer products), and the numbers are
  those of one process that takes the ranks' batches as micro-batches in the order of the streams (rank r's call
  c is one process's call ``c·world + r``). Call it on every rank, as often on each: every call that is due
  all-reduces one flag (whether the logits are finite, so that all ranks skip a call that is not finite on one
  of them), and the ranks that sampled meet in one all-reduce at the step.
- **Distributed (FSDP2,** ``fully_shard``, **DTensor parameters).** The forward used FSDP's gathered copies of the
  weights, so the only way to a sharded parameter's gradient is FSDP's own backward: ``sample_fisher`` runs
  ``backward(retain_graph=True)`` on the sampled loss, after setting aside every ``p.grad`` of the optimizer and
  putting it back after (FSDP all-gathers each unit's weights again and reduce-scatters the sampled gradients).
  One all-reduce of the label counts first scales each rank's loss so that FSDP's average over ranks is the mean
  over all labels (unequal and empty local batches included: a rank without labels still joins the backward's
  collectives); it carries the ranks' non-finite-logits flags too, so a call skipped on one rank is skipped on all
  and no rank waits in FSDP's backward alone. At the step one ``all_to_all_single`` brings each parameter's rows
  to its owner (whiten's plan), which captures the full mean gradient (an elementwise parameter, e.g. Sophia's,
  has no owner: each rank captures its rows); the numbers are again those of one process. It is a collective: call it on every rank, with FSDP's gradient sync on (the default). With
  ``set_requires_gradient_sync(False)`` FSDP adds the sampled gradients to its unsynced ones: ``sample_fisher``
  then raises, since that step's gradients are wrong, and it must not be called on a synced micro-batch after
  unsynced ones either (the same mixing happens, and cannot be seen from the optimizer). Parameters of the model
  that are not this optimizer's also get the sampled gradients added to their ``p.grad`` by FSDP: give them their
  own optimizer's ``zero_grad`` after ``sample_fisher``, as in the loop above.

**Without sample_fisher** (a loop that only calls ``backward``) an optimizer never gets curvature; each one says
what it does then (TNT: the identity preconditioner, i.e. SGD with momentum; Sophia: its clipping with a zero
Hessian, a sign step, as the reference before its first Hessian update).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .distributed import (all_reduce_flat, any_true, default_group, is_dtensor, local_shard, process_group_of,
                          world_and_rank)

__all__ = ["FISHER_KINDS", "FisherMixin"]

FISHER_KINDS = ("ce", "mse")
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 rounds): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def sample_labels(logits: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Labels drawn from the predictive distribution of ``logits`` (detached), with a generator seeded by ``seed``
    on the logits' device: class indices (leading shape) for ``"ce"``, Gaussian targets (shape of ``logits``) for
    ``"mse"``."""
    z = logits.detach()
    gen = torch.Generator(device=z.device)
    gen.manual_seed(seed)
    if kind == "ce":
        probs = torch.softmax(z.reshape(-1, z.shape[-1]).float(), dim=-1)
        return torch.multinomial(probs, 1, generator=gen).view(z.shape[:-1])
    noise = torch.randn(z.shape, generator=gen, device=z.device, dtype=torch.float32)
    return (z.float() + noise * 0.5**0.5).to(z.dtype)


class FisherMixin:
    """Sampled-label curvature for a :class:`whiten.optim._base.WhitenOptimizer` (see the module docstring for the
    contract). Subclasses call :meth:`_init_fisher` before ``WhitenOptimizer.__init__``, define
    :meth:`fisher_schedule` and read :meth:`fisher_grad` (or override :meth:`capture_fisher`) in their step."""

    # ----- setup and schedule ---------------------------------------------------------------------------------
    def _init_fisher(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid fisher_seed: {seed!r} (allowed: an integer >= 0)")
        self.fisher_seed = seed
        self.fisher_steps = 0  # optimizer steps taken: the schedule's clock
        self.fisher_skipped = 0  # calls skipped for non-finite logits, captures dropped for non-finite gradients
        self._reset_fisher_transient()

    def _reset_fisher_transient(self) -> None:
        self.sampling_fisher = False  # True while the extra backward runs (for module hooks)
        self.fisher_batch_n = 0  # labels of the call in progress
        self._fisher_sums = None  # per fisher_params() entry: sum over calls of n_call * mean gradient, or None
        self._fisher_n = 0  # labels kept since the last step
        self._fisher_calls = 0  # calls since the last step
        self._fisher_sync = None  # the group the kept gradients are averaged over at the step
        self._fisher_sharded = False  # the kept sums came from FSDP2's backward (see _sample_fisher_sharded)
        self._fisher: dict = {}  # parameter -> mean sampled gradient, during the step that captured it
        self.fisher_n = 0  # labels behind the captured gradients of this step

    def fisher_schedule(self, step: int) -> bool:
        """Whether the optimizer needs curvature at the step that follows ``step`` steps taken: every step unless
        the optimizer says otherwise (TNT every T1, Sophia every k, K-FAC at its factor steps)."""
        return True

    def fisher_due(self) -> bool:
        """Whether the coming ``step()`` wants sampled gradients (what ``sample_fisher`` checks)."""
        self.resolve_pending()  # a sync-free step read one step later: a skipped one does not advance the clock
        return bool(self.fisher_schedule(self.fisher_steps))

    def fisher_params(self) -> list[torch.Tensor]:
        """Every parameter of every group, in order (the alignment of ``capture_fisher``'s ``grads``)."""
        return [p for g in self.param_groups for p in g["params"]]

    def fisher_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The mean sampled-label gradient of ``p`` captured for the step in progress, or None."""
        return self._fisher.get(p)

    def _fisher_key(self, p: torch.Tensor) -> torch.Tensor:
        """Where the step looks a parameter up: its full-size stand-in while a distributed step runs on it (an
        owned FSDP2 parameter), else the parameter."""
        ctx = self._dist[1] if self._dist is not None else None
        return ctx.view(p) if ctx is not None and ctx.owns(p) else p

    def _fisher_group(self):
        """The group sampled gradients are averaged over (None: one process)."""
        if self.process_group is not None:
            return self.process_group
        if any(is_dtensor(p) for p in self.fisher_params()):
            return process_group_of(self.fisher_params(), None)
        return default_group()

    def _check_fisher_layout(self) -> None:
        """Sampling is supported on one process, under DDP and under FSDP2 (``Shard(0)`` on a 1-D mesh), where each
        rank samples labels for its own part of the batch. Under tensor parallel (and FSDP2 x TP, HSDP, expert
        parallel) the ranks of a TP or replicate group share their batch and its labels: the label counts and the
        sampled gradients would be counted once per rank, so such layouts are refused rather than averaged wrong."""
        for p in self.fisher_params():
            if is_dtensor(p):
                placements = tuple(p.placements)
                if p.device_mesh.ndim != 1 or type(placements[0]).__name__ != "Shard" or placements[0].dim != 0:
                    raise ValueError(
                        f"{type(self).__name__}.sample_fisher: a parameter of shape {tuple(p.shape)} is placed as "
                        f"{placements} on a mesh of shape {tuple(p.device_mesh.shape)}; sampled curvature supports "
                        "one process, DDP and FSDP2 (Shard(0) on a 1-D mesh), not tensor parallel, 2-D meshes "
                        "(FSDP2 x TP, HSDP) or expert parallel, where ranks share labels. Use FSDP2 or DDP for this "
                        "optimizer, or an optimizer that does not sample (SPlus, SOAP, Muon, ...) on this layout")

    # ----- the call users make ----------------------------------------------------------------------------------
    def sample_fisher(self, logits: torch.Tensor, kind: str = "ce") -> bool:
        """Sample labels from ``logits`` and keep the gradient of their mean loss for the next ``step()``, if the
        optimizer needs curvature at this step (returns True); otherwise do nothing (returns False). Call it after
        the forward and before ``loss.backward()`` (the graph is kept for it). Logits that are not finite (on any
        rank) follow the ``nonfinite`` policy: FloatingPointError, or the call is skipped (returns False), warned
        about and counted in ``fisher_skipped``."""
        if kind not in FISHER_KINDS:
            raise ValueError(f"Invalid kind: {kind!r} (allowed: {', '.join(map(repr, FISHER_KINDS))}; 'ce' for "
                             "logits over classes in the last dim, 'mse' for a squared-error regression output)")
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"{type(self).__name__}.sample_fisher: logits must be a floating-point tensor, got "
                            f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else logits.dtype}")
        self._check_fisher_layout()
        if not self.fisher_due():
            return False
        if not logits.requires_grad:
            raise ValueError(f"{type(self).__name__}.sample_fisher: logits do not require grad; pass the output of "
                             "a forward run with gradients enabled, before calling backward on it")
        if kind == "ce" and (logits.ndim < 1 or logits.shape[-1] < 1):
            raise ValueError(f"{type(self).__name__}.sample_fisher: kind='ce' needs class logits in the last dim, "
                             f"got shape {tuple(logits.shape)}")
        group = self._fisher_group()
        world, rank = world_and_rank(group)
        n = logits.numel() // logits.shape[-1] if kind == "ce" else logits.numel()
        params = self.fisher_params()
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        if any(is_dtensor(params[i]) for i in wanted):  # FSDP2: every rank joins the backward, even with n == 0
            self._fisher_sync = group
            return self._sample_fisher_sharded(logits, kind, n, wanted, group, world, rank)
        if self._logits_nonfinite(logits, group):  # the same answer on every rank of the group
            return self._skip_fisher_call(group)
        # every rank that samples meets the others in the step's all-reduce, even with no labels this time
        self._fisher_sync = group
        if n == 0 or not wanted:
            self._fisher_calls += 1
            return True
        loss = self._sampled_loss(logits, kind, self._fisher_calls * world + rank)
        self._fisher_calls += 1
        with self._sampling(n):
            grads = torch.autograd.grad(loss, [params[i] for i in wanted], retain_graph=True, allow_unused=True)
        if self._fisher_sums is None:
            self._fisher_sums = [None] * len(params)
        for i, g in zip(wanted, grads):
            if g is None:
                continue
            dtype = torch.float64 if params[i].dtype == torch.float64 else torch.float32
            g = g.to(dtype) if g.dtype != dtype else g
            if self._fisher_sums[i] is None:
                self._fisher_sums[i] = g.mul_(n)  # autograd's fresh tensor: no copy
            else:
                self._fisher_sums[i].add_(g, alpha=n)
        self._fisher_n += n
        return True

    @staticmethod
    def _logits_nonfinite(logits: torch.Tensor, group) -> bool:
        """Whether the logits of this call are not finite here or, with a group, on any of its ranks (one
        all-reduce of a flag: every rank then skips the same call, as ``step()`` skips on every rank)."""
        bad = ~torch.isfinite(logits.detach()).all()
        if group is None:
            return bool(bad)
        return bool(all_reduce_flat([bad.to(torch.float32).reshape(1)], group, op="max")[0].item() > 0)

    def _skip_fisher_call(self, group) -> bool:
        """A call whose logits are not finite (a diverged forward): no labels are drawn from them and nothing is
        kept; the optimizer's ``nonfinite`` policy decides between a FloatingPointError and a counted warning."""
        where = " (on at least one rank)" if group is not None else ""
        message = (f"{type(self).__name__}.sample_fisher: the logits are not finite{where}, so no labels can be "
                   "sampled from them")
        if self.nonfinite == "raise":
            raise FloatingPointError(message + " (nonfinite='raise')")
        self.fisher_skipped += 1
        self._fisher_calls += 1  # the call index of the label streams counts every call
        warnings.warn(message + f"; this call is skipped, no curvature is kept from it ({self.fisher_skipped} "
                      "skipped so far, opt.fisher_skipped)", RuntimeWarning, stacklevel=3)
        return False

    def _sampled_loss(self, logits: torch.Tensor, kind: str, stream: int) -> torch.Tensor:
        """The mean loss of ``logits`` on labels drawn from them with the label stream ``stream`` of this step; in
        float32 at least (bf16 logits), float64 for a float64 model."""
        labels = sample_labels(logits, kind, _mix(self.fisher_seed, self.fisher_steps, stream))
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.enable_grad():
            if kind == "ce":
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), labels.reshape(-1))
            return F.mse_loss(logits.to(dtype), labels.to(dtype))

    @contextlib.contextmanager
    def _sampling(self, n: int):
        """While the extra backward runs: the flags module hooks read, and a clear error for a freed graph."""
        self.sampling_fisher, self.fisher_batch_n = True, n
        try:
            yield
        except RuntimeError as e:
            if "backward through the graph a second time" in str(e):
                raise RuntimeError(f"{type(self).__name__}.sample_fisher needs the forward's graph: call it "
                                   "before loss.backward() (or keep the graph with retain_graph=True)") from e
            raise
        finally:
            self.sampling_fisher, self.fisher_batch_n = False, 0

    def _sample_fisher_sharded(self, logits, kind, n, wanted, group, world, rank) -> bool:
        """``sample_fisher`` for FSDP2 (DTensor) parameters. The extra backward runs through FSDP's own backward
        (``backward(retain_graph=True)``), which all-gathers each layer's weights again and reduce-scatters its
        gradients into the sharded ``p.grad``: the only way to get a sharded parameter's gradient, since the
        forward used FSDP's unsharded copies. Every ``p.grad`` of this optimizer is set aside before and put back
        after, so the ordinary gradients are untouched. The loss is scaled by ``n·world/N`` (``N``: the labels of
        all ranks, one all-reduce of a count) so that FSDP's average over ranks is the mean over all labels."""
        params = self.fisher_params()
        # the label count and whether this rank's logits are finite, in one all-reduce: every rank then skips a
        # call with non-finite logits somewhere, or joins FSDP's backward (a rank left out of it would hang it)
        bad = (~torch.isfinite(logits.detach()).all()).to(torch.float64).reshape(1)
        count = all_reduce_flat([torch.tensor([float(n)], dtype=torch.float64, device=bad.device), bad], group)
        labels, bad_ranks = torch.cat(count).tolist()
        if bad_ranks > 0:
            return self._skip_fisher_call(group)
        total = int(round(labels))
        stream = self._fisher_calls * world + rank
        self._fisher_calls += 1
        if total == 0:  # no rank has a label: no backward anywhere
            return True
        with torch.enable_grad():
            if n == 0:  # this rank still joins FSDP's collectives of the backward, with a zero loss
                loss = logits.sum() * 0.0
            else:
                loss = self._sampled_loss(logits, kind, stream) * (n * world / total)
        mine = [p for g in self.param_groups for p in g["params"]]
        kept = [p.grad for p in mine]
        for p in mine:
            p.grad = None
        try:
            with self._sampling(n):
                loss.backward(retain_graph=True)
            grads = [params[i].grad for i in wanted]
        finally:
            for p, g in zip(mine, kept):
                p.grad = g
        if not any(g is not None and is_dtensor(g) for g in grads):
            raise RuntimeError(
                f"{type(self).__name__}.sample_fisher: FSDP2 gave no sharded parameter a gradient from the sampled "
                "backward, so gradient sync is off (FSDPModule.set_requires_gradient_sync(False)): FSDP has added "
                "the sampled gradients to its unsynced ones and this step's gradients are wrong. Under FSDP2 call "
                "sample_fisher only with gradient sync on, and not after micro-batches run without it")
        if self._fisher_sums is None:
            self._fisher_sums = [None] * len(params)
        for i, g in zip(wanted, grads):
            if g is None:
                continue
            # a sharded gradient holds this rank's rows of the mean over every rank's labels; a replicated one
            # (a parameter FSDP does not manage) only this rank's share, summed over the ranks at the step
            g = g.to_local() * total if is_dtensor(g) else g * (total / world)
            g = g.to(torch.float64 if params[i].dtype == torch.float64 else torch.float32)
            if self._fisher_sums[i] is None:
                self._fisher_sums[i] = g
            else:
                self._fisher_sums[i].add_(g)
        self._fisher_n += total
        self._fisher_sharded = True
        return True

    # ----- at the step --------------------------------------------------------------------------------------------
    def capture_fisher(self, grads: list, n: int) -> None:
        """Receive the mean sampled-label gradients of this step (aligned with :meth:`fisher_params`, None where a
        parameter has none) and the number of labels behind them. Default: keep them for :meth:`fisher_grad`."""
        self._fisher = {self._fisher_key(p): g for p, g in zip(self.fisher_params(), grads) if g is not None}
        self.fisher_n = n

    def _consume_fisher(self) -> None:
        """Turn the kept sums into mean gradients (over every rank's labels) and capture them. Every rank that
        called sample_fisher since the last step joins the all-reduce (so it must be called on every rank)."""
        if self._fisher_calls == 0:  # nothing sampled on this rank since the last step: no collective
            return
        sums, n = self._fisher_sums, self._fisher_n
        params = self.fisher_params()
        if self._fisher_sharded:
            sums = self._reduce_sharded_fisher(params, sums)
        elif self._fisher_sync is not None:
            sums, n = self._all_reduce_fisher(self._fisher_sync, params, sums, n)
        if sums is None or n == 0:
            return
        grads = [None if s is None else s.div_(n) for s in sums]
        present = [g for g in grads if g is not None]
        bad = bool(present) and not all(bool(torch.isfinite(g).all()) for g in present)
        if self._fisher_sharded:  # each rank holds other gradients: decide together
            bad = any_true([bad], self._fisher_sync)[0]
        if bad:
            message = (f"{type(self).__name__}: the sampled-label gradients are not finite; no curvature is "
                       f"captured this step")
            if self.nonfinite == "raise":
                raise FloatingPointError(message)
            self.fisher_skipped += 1
            warnings.warn(message + f" ({self.fisher_skipped} dropped so far, opt.fisher_skipped)", RuntimeWarning,
                          stacklevel=5)
            return
        self.capture_fisher(grads, n)

    def _reduce_sharded_fisher(self, params, sums):
        """FSDP2: each owner assembles the full sampled gradients of its sharded parameters from every rank's rows
        (the non-owners keep None), each rank keeps its rows of an elementwise parameter's (no owner); replicated
        parameters' shares are summed over the ranks. Which entries exist
        is agreed first (a rank may have no gradient where another has)."""
        group = self._fisher_sync
        ctx = self.distributed_context()
        local = sums if sums is not None else [None] * len(params)
        present = any_true([s is not None for s in local], group)
        out = [None] * len(params)

        def zeros(i):
            return torch.zeros(local_shard(params[i]).shape, device=local_shard(params[i]).device,
                               dtype=torch.float64 if params[i].dtype == torch.float64 else torch.float32)

        sharded = [i for i in range(len(params)) if present[i] and is_dtensor(params[i])]
        # an elementwise parameter is stepped where it lies: FSDP's reduce-scatter left this rank its block already
        for i in sharded:
            if ctx.is_local(params[i]):
                out[i] = local[i] if local[i] is not None else zeros(i)
        sharded = [i for i in sharded if not ctx.is_local(params[i])]
        if sharded:
            full = ctx.gather_to_owners([params[i] for i in sharded],
                                        [local[i] if local[i] is not None else zeros(i) for i in sharded])
            for i in sharded:
                out[i] = full.get(params[i])
        replicated = [i for i in range(len(params)) if present[i] and not is_dtensor(params[i])]
        if replicated:
            summed, _ = self._all_reduce_fisher(group, [params[i] for i in replicated],
                                                [local[i] for i in replicated], 1)
            for i, t in zip(replicated, summed):
                out[i] = t
        return out

    @staticmethod
    def _all_reduce_fisher(group, params, sums, n):
        """Sum the kept sums and label counts over ``group``; a parameter no rank has a gradient for stays None.
        One flat buffer per dtype plus a float64 vector of (label count, presence flags)."""
        local = sums if sums is not None else [None] * len(params)
        meta = torch.tensor([float(n)] + [0.0 if s is None else 1.0 for s in local], dtype=torch.float64)
        meta = all_reduce_flat([meta], group)[0]
        total = int(round(meta[0].item()))
        present = (meta[1:] > 0).tolist()
        if total == 0:
            return None, 0
        out = [None] * len(params)
        idx = [i for i in range(len(params)) if present[i]]
        dtypes = {i: torch.float64 if params[i].dtype == torch.float64 else torch.float32 for i in idx}
        summed = all_reduce_flat([local[i] if local[i] is not None else torch.zeros(params[i].shape, dtype=dtypes[i],
                                  device=params[i].device) for i in idx], group)
        for i, t in zip(idx, summed):
            out[i] = t.to(params[i].device)
        return out, total

    def fisher_waiting(self) -> bool:
        """Whether ``sample_fisher`` was called since the last step: this step consumes its gradients."""
        return self._fisher_calls > 0

    def needs_host_check(self, work) -> bool:
        """A sync-free step that consumes sampled gradients decides on the host (see whiten.optim.deferred)."""
        return self.fisher_waiting() or super().needs_host_check(work)

    def before_step(self, work) -> None:
        super().before_step(work)
        self._consume_fisher()
        self.fisher_steps += 1

    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:  # consumed by the step, or dropped with a skipped one
            self._fisher_sums, self._fisher_n, self._fisher_calls, self._fisher_sync = None, 0, 0, None
            self._fisher_sharded = False
            self._fisher, self.fisher_n = {}, 0

    # ----- checkpoints and copies (whiten.optim.checkpoints) --------------------------------------------------------
    GLOBAL_STATE_KEYS = ("fisher",)

    def global_state(self) -> dict:
        return {**super().global_state(),
                "fisher": {"seed": self.fisher_seed, "steps": self.fisher_steps, "skipped": self.fisher_skipped}}

    def check_global_state(self, saved: dict, state_dict: dict) -> None:
        super().check_global_state(saved, state_dict)
        fisher = saved.get("fisher")
        if fisher is None:
            return
        name = type(self).__name__
        try:
            values = [int(fisher[k]) for k in ("seed", "steps", "skipped")]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{name}.load_state_dict: the checkpoint's sampling state is unreadable ({e!r}); "
                             "expected {'seed', 'steps', 'skipped'} integers") from None
        if min(values) < 0:
            raise ValueError(f"{name}.load_state_dict: the checkpoint's sampling state has a negative entry {fisher}")

    def load_global_state(self, saved: dict) -> None:
        super().load_global_state(saved)
        fisher = saved.get("fisher")
        if fisher is not None:
            self.fisher_seed, self.fisher_steps, self.fisher_skipped = (
                int(fisher["seed"]), int(fisher["steps"]), int(fisher["skipped"]))

    def reset_transient(self) -> None:
        super().reset_transient()
        self._reset_fisher_transient()

    def after_load(self) -> None:
        super().after_load()
        self._reset_fisher_transient()
