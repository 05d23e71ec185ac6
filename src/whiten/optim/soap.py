"""SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors, the basis refreshed by one step of
power iteration and QR."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..averaging import AveragingMixin
from ..linalg import finite_flags, rotate, unrotate, update_factors, warn_eigh_failure

from . import kernels
from ._base import WhitenOptimizer
from .eigenbasis import EigenbasisFactors, basis_slots, read_bases, write_basis
from .checks import (check_betas, check_bool, check_ema_rate, check_int, check_lr, check_range, check_role,
                     check_weight_decay, rotation_dtype, state_dtype_option)
from .quantize import check_basis_bits
from .sides import ALWAYS_KEPT_SIDE, check_max_factor_ratio, kept_sides
from .stacks import bucket
from .update import (adam_direction_kernel, apply_all, commit_all, decays, grad_in, state_dtype,
                     step_decay_after_kernel, step_to, stored_dtype)

__all__ = ["SOAP"]


class _Layout(NamedTuple):
    matrix: tuple[int, int] | None  # the (m, n) view whose sides may be rotated; None = plain Adam
    left: bool
    right: bool
    decay: bool


def _layout(p: torch.Tensor, group: dict) -> _Layout:
    decay = decays(p, group)
    limit = group["max_precond_dim"]
    if p.ndim >= 2:
        m, n = p.shape[0], p.numel() // p.shape[0]
        left, right = m <= limit, n <= limit
    elif p.ndim == 1 and group["precondition_1d"]:
        m, n = p.shape[0], 1
        left, right = m <= limit, False
    else:
        return _Layout(None, False, False, decay)
    if p.ndim >= 2:  # max_factor_ratio among the sides max_precond_dim leaves; precondition_1d is asked for
        # (a group from a checkpoint of before the option has no key: its state was built without it)
        sides = kept_sides((m, n), [j for j, keep in ((0, left), (1, right)) if keep], group.get("max_factor_ratio"),
                           ALWAYS_KEPT_SIDE)
        left, right = 0 in sides, 1 in sides
    if not (left or right):
        return _Layout(None, False, False, decay)
    return _Layout((m, n), left, right, decay)


BASIS_KEYS = ("basis_", "qbasis_", "qscale_")  # a side's basis: the tensor, or its codes and scales


class SOAP(EigenbasisFactors, AveragingMixin, WhitenOptimizer):
    r"""SOAP, with the update rule of the authors' code (nikhilvyas/SOAP, ``soap.py``).

    For a matrix parameter with gradient :math:`G`, factors :math:`L, R` and their eigenbases :math:`Q_L, Q_R`:

    .. math::
        \tilde G &= Q_L^\top G Q_R, \quad m \leftarrow \beta_1 m + (1-\beta_1)\tilde G, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\tilde G^2 \\
        \theta &\leftarrow \theta - \eta \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            Q_L \tfrac{m}{\sqrt v + \epsilon} Q_R^\top, \qquad \theta \leftarrow \theta (1 - \eta\lambda) \\
        L &\leftarrow \beta_s L + (1-\beta_s) G G^\top, \quad R \leftarrow \beta_s R + (1-\beta_s) G^\top G

    The first step only builds the factors and takes :math:`Q` from ``eigh`` (columns in descending eigenvalue
    order); it does not move the parameters, as the reference ("so that we never use the current gradients in the
    projection"). Every ``precondition_frequency`` updates each basis is refreshed by one power-iteration step,
    :math:`Q \leftarrow \mathrm{qr}(F\,Q_s)`, where :math:`Q_s` is Q with its columns sorted by the estimated
    eigenvalues :math:`\mathrm{diag}(Q^\top F Q)`; :math:`v` is permuted with the columns and :math:`m` is carried
    into the new basis. (The reference rotates m out of and back into the basis on every step; whiten does it only
    when the basis changes, which is the same in exact arithmetic and saves two of four rotations per step.)

    A side longer than ``max_precond_dim`` gets no factor and is not rotated (one-sided SOAP; e.g. the vocabulary
    side of embeddings). Tensors with more than 2 dims are treated as (d0, d1·d2·…) matrices (the reference keeps a
    factor per dim). 1-D parameters take plain Adam unless ``precondition_1d``. Weight decay is off for the
    ``vector`` and ``embedding`` roles.

    State per parameter (float32, float64 for float64 parameters): ``step`` (int, counts calls including the first),
    ``exp_avg``, ``exp_avg_sq`` (shape of p; in the eigenbasis), ``factor_left`` / ``basis_left`` (m, m) and
    ``factor_right`` / ``basis_right`` (n, n) for each rotated side, ``ema`` when averaging. With
    ``state_dtype=torch.bfloat16`` m, v and the bases are bfloat16; with ``basis_bits`` each basis is ``qbasis_*``
    (uint8 codes) and ``qscale_*`` (float32 scales) instead.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η (default 3e-3). betas: (β1, β2) (default (0.95, 0.95)).
        shampoo_beta: β_s for the factors (default None: β2).
        eps: ε (default 1e-8). weight_decay: λ, decoupled, after the update (default 0.01).
        precondition_frequency: refresh the bases every this many updates (default 10).
        max_precond_dim: longest side that gets a factor (default 10000, the reference's).
        max_factor_ratio: None (default: the reference's rule, ``max_precond_dim`` only) or r ≥ 2, e.g. 20
            (Shampoo's): of the sides within ``max_precond_dim``, the largest is left out (no factor, no basis)
            while the factors and bases of the rest (``2 Σ d²`` numbers) exceed r times the parameter's ``m·n`` and
            2^16 numbers, a side of at most 1024 never (:func:`whiten.optim.sides.kept_sides`): with 20 a (8192,
            256) embedding keeps only its 256-side pair. It costs loss where the vocabulary side matters (0.13 more
            validation loss, 2 seeds, docs/results/memory-defaults), hence not the default. It decides the state
            keys: do not change it once a parameter has state.
        precondition_1d: give 1-D parameters a factor (default False).
        normalize_grads: divide the update by its RMS (default False).
        correct_bias: Adam's bias correction (default True).
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`).
        batched: process same-shape matrices as one stack (default True).
        rotation_dtype: None (default) or ``torch.bfloat16`` (also ``"bf16"``/``"bfloat16"``): the dtype of the two
            per-step rotations, the gradient into the eigenbasis and the Adam direction out of it (the gradient,
            the direction and the bases are cast for the step; torch accumulates in float32, the product is
            rounded to bfloat16). Factors, bases, their refreshes (including carrying m into a new basis), m and v
            stay in the state dtype. Off by default: the loss stays within seed noise (lm, 4 seeds), but the step
            is no faster on an H200 (the refreshes dominate it) and 6x slower on a CPU without bfloat16 units;
            see docs/performance.md.

        state_dtype: None (default: float32 state, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): the storage of ``exp_avg``, ``exp_avg_sq`` and the bases ``basis_*``, half
            the bytes. The arithmetic stays in float32: the stored values are cast up for the step (and for a
            refresh) and the new ones rounded once on the way back. The factors stay float32 (their small
            eigenvalues order the basis) and so does ``ema`` (see SPlus). It decides the state's dtypes: set it
            before the first step.
        basis_bits: None (default: the bases in the state dtype), 8 or 4: each basis kept block-wise quantized
            (``qbasis_*`` uint8 codes, ``qscale_*`` a float32 scale per 64 entries of a row; 1.06 or 0.56 bytes an
            entry against 4), dequantized per bucket for each step's rotations and for the refresh (whose new
            basis is quantized again); 4 bits follows 4-bit Shampoo (Wang et al. 2024): the linear-square map and,
            on use, one Björck step of orthogonal rectification (:mod:`whiten.optim.quantize`). It decides the state
            keys: set it before the first step.

    Reference: N. Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321 (2024).
    """

    BEFORE_OPTIONS = {"max_factor_ratio": None}  # a checkpoint from before the option: its factors are all there

    MEMORY_OPTIONS = {"max_precond_dim": (("factor", "basis"), "a side larger than max_precond_dim gets no factor and "
                                      "no basis"),
                      "max_factor_ratio": (("factor", "basis"), "the largest side is left out while the factors and "
                                           "bases take more than this times the parameter (e.g. 20: a vocabulary "
                                           "side goes; costs loss, docs/memory.md)"),
                      "state_dtype": (("exp_avg", "exp_avg_sq", "basis"), "torch.bfloat16 stores m, v and the bases "
                                      "in half the bytes (float32 arithmetic)"),
                      "basis_bits": (("basis",), "8 or 4 keeps each basis block-wise quantized: 1.06 or 0.56 bytes "
                                     "an entry against 4")}  # see memory_report

    SECOND_MOMENT_KEY = "exp_avg_sq"  # restarted where it overflowed (WhitenOptimizer.restart_overflowed_moments)
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        ema_rate: float | None = None,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        batched: bool = True,
        rotation_dtype: torch.dtype | str | None = None,
        state_dtype: torch.dtype | str | None = None,
        basis_bits: int | None = None,
        max_factor_ratio: float | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        max_factor_ratio=max_factor_ratio,
                        precondition_1d=precondition_1d, normalize_grads=normalize_grads, correct_bias=correct_bias,
                        ema_rate=ema_rate, role=None, rotation_dtype=rotation_dtype,
                        state_dtype=state_dtype, basis_bits=basis_bits)
        self.batched = bool(batched)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        if group["shampoo_beta"] is not None:
            check_range("shampoo_beta", group["shampoo_beta"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"])
        check_int("precondition_frequency", group["precondition_frequency"], 1)
        check_int("max_precond_dim", group["max_precond_dim"], 1)
        check_max_factor_ratio(group.get("max_factor_ratio"))
        for flag in ("precondition_1d", "normalize_grads", "correct_bias"):
            check_bool(flag, group[flag])
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])
        rotation_dtype(group.get("rotation_dtype"))
        state_dtype_option(group.get("state_dtype"))
        check_basis_bits(group.get("basis_bits"))

    def initial_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, _layout(p, group), group)

    def _init_state(self, p: torch.Tensor, layout: _Layout, group: dict) -> dict:
        stored = stored_dtype(p, group)  # the state_dtype option: m, v and the bases
        state = {"step": 0,
                 "exp_avg": torch.zeros(p.shape, dtype=stored, device=p.device),
                 "exp_avg_sq": torch.zeros(p.shape, dtype=stored, device=p.device)}
        if layout.matrix is None:
            return state
        return self.factor_state(state, layout.matrix, layout.left, layout.right, state_dtype(p), p.device,
                                 basis_dtype=stored, basis_bits=group.get("basis_bits"))

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        layouts = [_layout(p, group) for p in params]
        states = []
        for p, layout in zip(params, layouts):
            if not self.state[p]:
                self.state[p] = self._init_state(p, layout, group)
            self.state[p]["step"] += 1
            states.append(self.state[p])
        self.update_averages(group, params, states)
        dtype_of = [state_dtype(p) for p in params]  # the arithmetic's dtype (state_dtype may store m, v, Q lower)
        grads = [grad_in(p, d) for p, d in zip(params, dtype_of)]

        # Adam in the eigenbasis; the first call of a parameter only builds its factors and basis.
        rest = [i for i, s in enumerate(states) if s["step"] > 1]
        # rotation_dtype: the bases are cast once per step for both rotations (a cast is O(d²), the rotations
        # O(d²n): ~1% of a step; a cached copy would be state to keep in step with the basis and in checkpoints)
        low = rotation_dtype(group.get("rotation_dtype"))
        bits = group.get("basis_bits")
        buckets = {}
        for bkey, idxs in bucket([i for i in rest if layouts[i].matrix is not None],
                                 lambda i: self._bucket_key(gi, group, params[i])).items():
            S, pos = self._stacks_for(gi, group, bkey, [params[i] for i in idxs], layouts[idxs[0]])
            stored = {k: v if pos is None else v[pos] for k, v in S.items() if k.startswith(BASIS_KEYS)}
            # in the work dtype: the stacks themselves, or cast up (state_dtype), or dequantized (basis_bits)
            bases = read_bases(stored, bits, dtype_of[idxs[0]])
            if low is not None:
                bases = {k: v.to(low) for k, v in bases.items()}
            buckets[bkey] = (idxs, bases)
        rotated: list = list(grads)
        for idxs, S in buckets.values():
            G = torch.stack([grads[i].reshape(layouts[i].matrix) for i in idxs])
            R = rotate(G if low is None else G.to(low), S.get("basis_left"), S.get("basis_right"))
            for j, i in enumerate(idxs):
                rotated[i] = R[j].view(params[i].shape).to(dtype_of[i])
        if rest:
            direction = dict(zip(rest, self._adam_direction(group, [states[i] for i in rest],
                                                            [rotated[i] for i in rest])))
            for idxs, S in buckets.values():  # back to the parameter's basis
                D = torch.stack([direction[i].reshape(layouts[i].matrix) for i in idxs])
                D = unrotate(D if low is None else D.to(low), S.get("basis_left"), S.get("basis_right"))
                for j, i in enumerate(idxs):
                    direction[i] = D[j].view(params[i].shape).to(dtype_of[i])
            self._apply(group, [(params[i], states[i], direction[i], layouts[i]) for i in rest], self._ok)

        # Factors take the raw gradient; new bases at the first call (eigh) and every precondition_frequency
        # updates (power iteration + QR).
        beta_s = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        matrices = [i for i, lay in enumerate(layouts) if lay.matrix is not None]
        factors = [[states[i].get("factor_left"), states[i].get("factor_right")] for i in matrices]
        olds = [f for pair in factors for f in pair if f is not None]
        news = olds
        if self._ok is not None and olds:  # a sync-free step: the factors updated on copies (one launch), committed
            news = [torch.empty_like(f) for f in olds]
            torch._foreach_copy_(news, olds)
            copies = iter(news)
            factors = [[None if f is None else next(copies) for f in pair] for pair in factors]
        for i, pair in zip(matrices, factors):
            update_factors(*pair, grads[i].reshape(layouts[i].matrix), beta_s)
        commit_all(olds, news, self._ok)
        first = [i for i, s in enumerate(states) if s["step"] == 1]
        if first:
            # descending eigenvalue order, as the reference
            self.refresh_bases([states[i] for i in first if layouts[i].matrix is not None], 1e-30, descending=True,
                               bits=group.get("basis_bits"))
        freq = group["precondition_frequency"]
        due = [i for i in rest if layouts[i].matrix is not None and (states[i]["step"] - 1) % freq == 0]
        if due:
            self._qr_refresh(gi, group, params, layouts, due)

    def needs_host_check(self, work) -> bool:
        """A parameter's first call (it builds the bases) and refresh steps decide on the host."""
        def due(p: torch.Tensor, group: dict) -> bool:  # _step_group's rules, for this step: (step + 1 - 1) % freq
            step = self.state[p]["step"]
            return step == 0 or (_layout(p, group).matrix is not None and step % group["precondition_frequency"] == 0)

        return any(due(p, group) for group, params in work for p in params)

    def _bucket_key(self, gi: int, group: dict, p: torch.Tensor):
        if not self.batched:
            return ("one", id(p))
        return (gi, _layout(p, group), self.state[p]["exp_avg"].dtype, p.device)

    def _stacks_for(self, gi: int, group: dict, key, present: list[torch.Tensor], layout: _Layout):
        """The bucket's stable stacks and the positions of ``present`` in them (None: all of them)."""
        m, n = layout.matrix
        shapes = {"exp_avg": (m, n), "exp_avg_sq": (m, n)}
        for side, d, has in (("left", m, layout.left), ("right", n, layout.right)):
            if has:
                shapes[f"factor_{side}"] = (d, d)
                shapes.update(basis_slots(side, d, group.get("basis_bits")))
        return self.bucket_stacks(gi, key, present, lambda q: self._bucket_key(gi, group, q), shapes)

    def _adam_direction(self, group, states, rotated) -> list[torch.Tensor]:
        """m and v updated with the rotated gradients; returns m / (sqrt(v) + eps), still rotated."""
        beta1, beta2 = group["betas"]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        stored = None
        if any(x.dtype != r.dtype for x, r in zip(m, rotated)):  # state_dtype: float32 arithmetic, rounded once
            stored = (m, v)
            m, v = [x.to(r.dtype) for x, r in zip(m, rotated)], [x.to(r.dtype) for x, r in zip(v, rotated)]
        ok = self._ok  # a sync-free step's device-side flag: the new moments are computed aside and committed
        if stored is None and kernels.active(m, v, rotated):
            values = kernels.step_values([1.0 - beta1, beta2, 1.0 - beta2, group["eps"]], m[0].device)
            return adam_direction_kernel(m, v, rotated, values, ok)
        kept = stored if stored is not None else (m, v)
        m, v = apply_all("lerp", m, rotated, 1.0 - beta1, ok=ok), apply_all("mul", v, beta2, ok=ok)
        torch._foreach_addcmul_(v, rotated, rotated, 1.0 - beta2)
        commit_all(kept[0] + kept[1], m + v, ok)
        if stored is not None:
            # the step uses the stored (rounded) moments, so it is a function of the state a checkpoint holds
            m, v = [x.to(r.dtype) for x, r in zip(stored[0], rotated)], [x.to(r.dtype) for x, r in zip(stored[1], rotated)]
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["eps"])
        return torch._foreach_div(m, denom)

    @staticmethod
    def _apply(group, items, ok=None) -> None:
        """theta <- (theta - step_size * direction) * (1 - lr*wd), in the state dtype for low-precision params.
        ``ok``: a sync-free step's flag (the new values computed aside and committed, the same arithmetic)."""
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        ps, ds, sizes, keeps = [], [], [], []
        for p, s, d, lay in items:
            if group["normalize_grads"]:  # a mean per tensor: foreach has no mean, this option stays per parameter
                d = d / (1e-30 + d.square().mean().sqrt())
            t = s["step"] - 1  # Adam's step count: the first call made no update
            step_size = lr * ((1.0 - beta2**t) ** 0.5 / (1.0 - beta1**t) if group["correct_bias"] else 1.0)
            keep = 1.0 - lr * group["weight_decay"] * lay.decay
            if p.dtype != d.dtype:  # low precision: in the state's dtype, rounded once
                step_to(p, d.dtype, d, -step_size, keep=keep, decay_first=False, ok=ok)
            else:
                ps.append(p), ds.append(d), sizes.append(step_size), keeps.append(keep)
        if not ps:
            return
        if kernels.active(ps, ds):
            step_decay_after_kernel(ps, ds, kernels.step_values(sizes + keeps, ps[0].device), ok)
            return
        # step_to's arithmetic, one launch per op: the add takes one alpha per call, so one call per step size
        # (parameters whose step counts differ); the decay after the step, per-tensor scalars
        new = [None] * len(ps)
        for size, js in bucket(range(len(ps)), lambda j: sizes[j]).items():
            for j, n in zip(js, apply_all("add", [ps[j] for j in js], [ds[j] for j in js], alpha=-size, ok=ok)):
                new[j] = n
        torch._foreach_mul_(new, keeps)
        commit_all(ps, new, ok)

    def _qr_refresh(self, gi, group, params, layouts, due) -> None:
        """One power-iteration step per basis, ``Q <- qr(F Q_sorted)``, with v permuted and m carried over."""
        for bkey, idxs in bucket(due, lambda i: self._bucket_key(gi, group, params[i])).items():
            stacks, pos = self._stacks_for(gi, group, bkey, [params[i] for i in idxs], layouts[idxs[0]])
            S = stacks if pos is None else {k: v[pos] for k, v in stacks.items()}  # the due members, copied
            work = S["factor_left" if "factor_left" in S else "factor_right"].dtype
            bits = group.get("basis_bits")
            if S["exp_avg"].dtype != work or bits is not None:
                # state_dtype / basis_bits: refresh in float32 (bases dequantized), round once into the stored m, v, Q
                up = {k: v.to(work) for k, v in S.items() if not k.startswith(BASIS_KEYS)}
                up.update(read_bases(S, bits, work))
                self._qr_refresh_stacks(up)
                for k, v in up.items():
                    if k.startswith("basis_"):
                        write_basis(S, k[len("basis_"):], v, bits)
                    else:
                        S[k].copy_(v)
            else:
                self._qr_refresh_stacks(S)
            if pos is not None:
                for k, v in S.items():
                    stacks[k].index_copy_(0, pos, v)

    def _qr_refresh_stacks(self, S: dict) -> None:
        exp_avg, exp_avg_sq = S["exp_avg"], S["exp_avg_sq"]
        # v overflowed by a huge gradient makes every later update m/inf = 0: restart it, and m with it (m/eps
        # from a zero v would be a huge step).
        for j, bad in enumerate(self.restart_nonfinite(list(exp_avg_sq.unbind(0)))):
            if bad:
                exp_avg[j].zero_()
        old = {side: S[f"basis_{side}"].clone() for side in ("left", "right") if f"basis_{side}" in S}
        for side, dim in (("left", 1), ("right", 2)):
            if side not in old:
                continue
            F, Q = S[f"factor_{side}"], S[f"basis_{side}"]
            restarted = self.restart_nonfinite(list(F.unbind(0)))  # overflowed: zero, keep the basis this time
            estimate = torch.einsum("bij,bik,bkj->bj", Q, F, Q)  # diag(Qᵀ F Q)
            order = estimate.argsort(dim=-1, descending=True)
            sorted_Q = torch.gather(Q, 2, order.unsqueeze(1).expand_as(Q))
            new_Q = torch.linalg.qr(torch.bmm(F, sorted_Q)).Q
            ok = finite_flags(list(new_Q.unbind(0)))
            for j, good in enumerate(ok):
                if not good or restarted[j]:  # keep this basis and the order of v
                    order[j] = torch.arange(order.shape[-1], device=order.device)
                    new_Q[j] = Q[j]
                    if not restarted[j]:
                        self.counters["eigh_failures"] += 1
            failed = sum(1 for good, r in zip(ok, restarted) if not good and not r)
            if failed:
                warn_eigh_failure(type(self).__name__, failed)
            index = order.unsqueeze(1) if dim == 2 else order.unsqueeze(2)
            exp_avg_sq.copy_(torch.gather(exp_avg_sq, dim, index.expand_as(exp_avg_sq)))
            Q.copy_(new_Q)
        # m into the new basis: Q_newᵀ Q_old m Q_oldᵀ Q_new
        QL, QR = S.get("basis_left"), S.get("basis_right")
        exp_avg.copy_(rotate(unrotate(exp_avg, old.get("left"), old.get("right")), QL, QR))
