"""SPlus (Frans, Levine, Abbeel 2025): sign descent in a rarely refreshed Shampoo eigenbasis, with shape-aware
scaling and iterate averaging."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..averaging import AUTO, AveragingMixin, check_ema_rate
from ..linalg import rotate, unrotate, update_factors
from ..roles import role_from_shape
from ._base import WhitenOptimizer
from .eigenbasis import EigenbasisFactors, basis_slots, read_bases
from .checks import (check_betas, check_bool, check_int, check_lr, check_range, check_role, check_weight_decay,
                     rotation_dtype, state_dtype_option)
from .quantize import check_basis_bits
from .sides import ALWAYS_KEPT_SIDE, check_max_factor_ratio, kept_sides
from .stacks import bucket
from .update import commit, decays, grad_in, lerp_all, state_dtype, step_all, stored_dtype

__all__ = ["SPlus", "derived_nonstandard_constant", "hidden_width"]

# The paper's nonstandard_constant and the width of the model it was set at (GPT-2 small, d = 768). Narrower models
# get c = 1e-3 · 768 / d: the paper's constant starves their embeddings, head and gains (docs/results/width-defaults).
# Wider ones keep 1e-3: nothing here measures them, the paper's value is the one tried there, and c ∝ 1/d would take
# the step of their embeddings and gains (lr·c) below what AdamW is run with at those widths.
PAPER_CONSTANT = 1e-3
PAPER_WIDTH = 768


class _Layout(NamedTuple):
    """How one parameter is treated, derived from its shape and its group (never stored)."""

    matrix: tuple[int, int] | None  # the (m, n) view that is whitened, or None for plain sign descent
    left: bool  # the m side has a factor and is rotated
    right: bool  # the n side has a factor and is rotated
    scale: float  # multiplies lr: 2/(m+n) for standard hidden matrices, nonstandard_constant otherwise
    decay: bool  # weight decay applies


def _view(p: torch.Tensor, group: dict) -> tuple[tuple[int, int] | None, bool, bool, bool]:
    """``(matrix, left, right, standard)``: the (m, n) view that is whitened (None: plain sign descent), which sides
    have a factor, and whether p is a hidden matrix scaled by 2/(m+n)."""
    role = group["role"] or role_from_shape(p)
    matrix = None
    if p.ndim == 2 and role != "vector":
        matrix = (p.shape[0], p.shape[1])
    elif p.ndim >= 3 and group["whiten_conv"] and role in ("conv", "hidden"):
        matrix = (p.shape[0], p.numel() // p.shape[0])
    left = right = False
    if matrix is not None:
        # max_dim first (the paper's rule), then max_factor_ratio among the sides it leaves; a group from a
        # checkpoint of before the option has no key: its state was built with every side below max_dim
        sides = kept_sides(matrix, [j for j in (0, 1) if matrix[j] < group["max_dim"]], group.get("max_factor_ratio"),
                           ALWAYS_KEPT_SIDE)
        left, right = 0 in sides, 1 in sides
    if not (left or right):
        matrix = None
    return matrix, left, right, matrix is not None and left and right and role in ("hidden", "conv", "experts")


def _layout(p: torch.Tensor, group: dict) -> _Layout:
    matrix, left, right, standard = _view(p, group)
    scale = 2.0 / (matrix[0] + matrix[1]) if standard else group["nonstandard_constant"]
    return _Layout(matrix, left, right, scale, decays(p, group))


def hidden_width(groups: list[dict]) -> int | None:
    """The model's width as SPlus sees it in ``groups`` (param-group dicts with SPlus's settings): the median of
    the smaller sides of the hidden matrices, those scaled by 2/(m+n) (the lower middle one of an even count);
    None when there are none. In a transformer every hidden matrix (d×d, 3d×d, 4d×d, d×4d) has d as its smaller
    side; the median keeps a few odd layers (grouped-query k/v projections, a bottleneck) from moving it. A DTensor
    (FSDP2) counts by its global shape, so every rank finds the same width."""
    sides = []
    for g in groups:
        for p in g["params"]:
            matrix, _, _, standard = _view(p, g)
            if standard and min(matrix) > 0:  # an empty matrix has no width
                sides.append(min(matrix))
    sides.sort()
    return sides[(len(sides) - 1) // 2] if sides else None


def derived_nonstandard_constant(width: int | None) -> float:
    """The default ``nonstandard_constant`` for a model of this hidden width: ``1e-3 · max(1, 768 / width)``, the
    paper's 1e-3 at the paper's width 768 and above, larger in proportion below; the paper's 1e-3 when there are
    no hidden matrices (``width`` None)."""
    return PAPER_CONSTANT if width is None else PAPER_CONSTANT * max(1.0, PAPER_WIDTH / width)


class SPlus(EigenbasisFactors, AveragingMixin, WhitenOptimizer):
    r"""SPlus, as computed by the code behind the paper's results (kvfrans/splus, ``experiments/``).

    For a matrix parameter :math:`\theta \in \mathbb{R}^{m \times n}` with gradient :math:`G`, at step :math:`t`:

    .. math::
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        L &\leftarrow \beta_2 L + (1-\beta_2) G G^\top, \quad R \leftarrow \beta_2 R + (1-\beta_2) G^\top G \\
        U &= Q_L \,\mathrm{sign}(Q_L^\top M Q_R)\, Q_R^\top \\
        \bar\theta &\leftarrow r\,\bar\theta + (1-r)\,\theta \qquad\text{(pre-update } \theta\text{)} \\
        \theta &\leftarrow \theta - s\,(U + \lambda\,\theta), \qquad s = \eta \cdot 2/(m+n)

    and after the update, at step 1 and every ``inverse_every`` steps, :math:`Q_L, Q_R` become the eigenvectors of
    :math:`L + \epsilon I` and :math:`R + \epsilon I` (eigenvalues are discarded, so the update is bounded whatever
    the basis: :math:`\|U\|_F \le \sqrt{mn}`). A side of size ``>= max_dim`` has no factor and is not rotated.
    Parameters that are not hidden matrices (roles ``embedding``, ``head``, ``vector``, ``conv``; tensors that are
    not 2-D; matrices with a side ``>= max_dim``) use :math:`s = \eta \cdot c` with ``c = nonstandard_constant``;
    2-D embeddings and heads are still rotated. By default c comes from the model's width d (see
    :func:`hidden_width`): :math:`c = 10^{-3} \cdot \max(1, 768 / d)`, the paper's :math:`10^{-3}` at the
    paper's width 768 and above: the paper's constant starves the embeddings, the head and the gains of narrower
    models (docs/results/width-defaults). Non-matrix parameters take :math:`U = \mathrm{sign}(M)`. Weight decay
    is off for the ``vector`` and ``embedding`` roles. ``eval()`` swaps in :math:`\bar\theta / (1-r^t)`
    for a fixed rate r (with ``ema_rate="auto"`` the rate follows the step count and the lr, see
    :mod:`whiten.averaging`), ``train()`` swaps the live parameters back.

    State per parameter (``optimizer.state[p]``), in float32 (float64 for float64 parameters):
    ``step`` (int), ``momentum`` and ``ema`` (shape of p; ``live`` too while in eval mode); for whitened matrices ``factor_left`` (m, m),
    ``basis_left`` (m, m), ``factor_right`` (n, n), ``basis_right`` (n, n) for each side that has a factor. With
    ``state_dtype=torch.bfloat16`` the momentum and bases are bfloat16; with ``basis_bits`` each basis is
    ``qbasis_*`` (uint8 codes) and ``qscale_*`` (float32 scales) instead.

    Args:
        params: parameters or param-group dicts; groups from :func:`whiten.param_groups` carry a ``role``. Without a
            role, a parameter's role comes from its shape (2-D hidden, ≥3-D conv, else vector).
        lr: learning rate η (default 0.2; the paper sweeps 0.01…10, about Adam's lr × width × 2).
        betas: (β1, β2), momentum and factor EMA rates (default (0.9, 0.95), as run in the paper).
        ema_rate: the parameter average used by ``eval()`` (default ``"auto"``: about the last 10% of the steps,
            shrinking to the live parameters as a schedule decays the lr; see :mod:`whiten.averaging`), a fixed
            EMA rate r (the paper's 0.999 at 10k steps), or None (no average).
        weight_decay: λ, decoupled and scaled by the same s as the update (default 0.1).
        inverse_every: refresh the eigenbasis every this many steps, and at step 1 (default 100).
        eps: added to the factors' diagonal before the eigendecomposition (default 1e-30).
        max_dim: sides of this size or more get no factor (default 10000, the paper's).
        max_factor_ratio: None (default: the paper's rule, ``max_dim`` only) or r ≥ 2, e.g. 20 (Shampoo's): of the
            sides below ``max_dim``, the largest is left out (no factor, no basis, not rotated) while the factors and
            bases of the rest (``2 Σ d²`` numbers) exceed r times the parameter's ``m·n`` and 2^16 numbers, a side
            of at most 1024 never (:func:`whiten.optim.sides.kept_sides`). With 20 a (8192, 256) embedding or head
            keeps only its 256-side pair (50× → 4× the parameters of a width-256 GPT, docs/memory.md); square and
            1:4 hidden matrices and every matrix with both sides up to 1024 keep both. It costs loss where the
            vocabulary side matters: 0.12 more validation loss (2 seeds) on a word-level Shakespeare GPT with a
            2048-word vocabulary at width 128 (docs/results/memory-defaults), hence not the default. A hidden
            matrix that loses a side takes the non-standard scale, as one beyond ``max_dim``. It decides the state
            keys: do not change it once a parameter has state.
        nonstandard_constant: c, the scale of non-hidden parameters, a number ≥ 0 or None (default None: derived,
            ``1e-3 · max(1, 768 / d)`` with d the median smaller side of the hidden matrices of all the groups, 1e-3
            when there are none). The derived number is written into each group that had None, at construction and by
            ``add_param_group`` (from the groups present then), so ``param_groups`` and checkpoints hold the value
            used and a resumed run keeps it; a group set to None later gets it again at the next step.
        whiten_conv: whiten ≥3-D ``conv`` weights as (out, in·k·k) matrices with the hidden scale instead of sign
            descent at the non-standard scale (default False, as the paper).
        nonfinite: ``"skip"`` (default: a step with a non-finite gradient changes nothing, is counted in
            ``counters["skipped_steps"]`` and warns) or ``"raise"`` (FloatingPointError).
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        batched: process same-shape matrices in one batched call (default True). False does each matrix alone.
        rotation_dtype: None (default) or ``torch.bfloat16`` (also ``"bf16"``/``"bfloat16"``): the dtype of the
            four per-step rotations :math:`Q_L^\top M Q_R` and :math:`Q_L\,\mathrm{sign}(\cdot)\,Q_R^\top` (M and
            the bases are cast for the step; torch accumulates in float32, the product is rounded to bfloat16).
            Factors, bases, their eigendecompositions and all other state stay in the state dtype. Off by default:
            the loss stays within seed noise (lm, 4 seeds), the step is 13-28% faster on an H200 at width 768, no
            faster at width 128, and 9x slower on a CPU without bfloat16 units; see docs/performance.md.

        state_dtype: None (default: float32 state, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): the storage of ``momentum`` and the bases ``basis_*``, half the bytes. The
            arithmetic stays in float32: the stored values are cast up for the step and the new momentum (and a
            refreshed basis) is rounded once on the way back. The factors stay float32 (an EMA adding 5% of GGᵀ a
            step, whose small eigenvalues order the basis: bfloat16's 8 bits would lose them) and so does ``ema``
            (with r ≥ 0.99 an increment of (1-r)(θ-ē) is below bfloat16's rounding of ē: it would stop moving;
            tests/test_state_options.py shows both). It decides the state's dtypes: set it before the first step.
        sync_free: False (default) or True: an ordinary step never waits for the device. The non-finite check
            is decided on the device, every write of the step is masked by it (a skipped step still changes
            nothing, bit for bit), and its result is read at the next step, when ``counters`` are read, or by
            ``state_dict()``: a skipped step is counted, warned about or raised (``nonfinite="raise"``) then, one
            step late (until then its step counts read as if it had been taken; its tensors never change).
            Refresh steps, a parameter's first step and distributed steps still read the check on the host. It costs one more kernel per written tensor (docs/performance.md); the numbers are the default
            path's, bit for bit.
        compiled: False (default) or True: the step's elementwise chains (moments, the update and its decay; under
            ``sync_free`` the masked writes) run as ``torch.compile``-d kernels, one fused pass instead of a launch
            per op, and the rest eagerly. The numbers are the eager ones within float rounding (inductor fuses and
            may contract into FMAs); the kernels compile at the first steps, one graph per kernel and group, and
            nothing recompiles after (the lr and other numbers that change enter as tensors). Needs inductor (a C++
            compiler on a CPU, Triton on a GPU): a kernel that cannot compile runs eagerly, with a warning. See
            :mod:`whiten.optim.kernels` for what is compiled.
        basis_bits: None (default: the bases in the state dtype), 8 or 4: each basis kept block-wise quantized
            (``qbasis_*`` uint8 codes, ``qscale_*`` a float32 scale per 64 entries of a row; 1.06 or 0.56 bytes an
            entry against 4), dequantized per bucket for each step's rotations; 4 bits follows 4-bit Shampoo (Wang
            et al. 2024): the linear-square map and, on use, one Björck step of orthogonal rectification
            (:mod:`whiten.optim.quantize`). It decides the state keys: set it before the first step.

    Reference: K. Frans, S. Levine, P. Abbeel, "A Stable Whitening Optimizer for Efficient Neural Network
    Training", arXiv 2506.07254 (2025).
    """

    BEFORE_OPTIONS = {"max_factor_ratio": None}  # a checkpoint from before the option: its factors are all there
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    MEMORY_OPTIONS = {"max_dim": (("factor", "basis"), "a side of max_dim or more gets no factor and no basis (its m x m "
                              "or n x n pair)"),
                      "max_factor_ratio": (("factor", "basis"), "the largest side is left out while the factors and "
                                           "bases take more than this times the parameter (e.g. 20: a vocabulary "
                                           "side goes; costs loss, docs/memory.md)"),
                      "state_dtype": (("momentum", "basis"), "torch.bfloat16 stores the momentum and the bases in "
                                      "half the bytes (float32 arithmetic)"),
                      "basis_bits": (("basis",), "8 or 4 keeps each basis block-wise quantized: 1.06 or 0.56 bytes "
                                     "an entry against 4")}  # see memory_report

    def __init__(
        self,
        params,
        lr: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        ema_rate: float | str | None = AUTO,
        weight_decay: float = 0.1,
        inverse_every: int = 100,
        eps: float = 1e-30,
        max_dim: int = 10000,
        nonstandard_constant: float | None = None,
        whiten_conv: bool = False,
        nonfinite: str = "skip",
        process_group=None,
        batched: bool = True,
        rotation_dtype: torch.dtype | str | None = None,
        state_dtype: torch.dtype | str | None = None,
        basis_bits: int | None = None,
        max_factor_ratio: float | None = None,
        sync_free: bool = False,
        compiled: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, ema_rate=ema_rate, weight_decay=weight_decay,
                        inverse_every=inverse_every, eps=eps, max_dim=max_dim, max_factor_ratio=max_factor_ratio,
                        nonstandard_constant=nonstandard_constant, whiten_conv=whiten_conv, role=None,
                        rotation_dtype=rotation_dtype, state_dtype=state_dtype, basis_bits=basis_bits)
        self.batched = bool(batched)
        self._constructing = True  # the width is read once every group is in (the embeddings may come first)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)
        del self._constructing
        self.resolve_nonstandard_constant()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if not getattr(self, "_constructing", False):
            self.resolve_nonstandard_constant()

    def resolve_nonstandard_constant(self) -> None:
        """Write the derived ``nonstandard_constant`` (:func:`derived_nonstandard_constant` of
        :func:`hidden_width` over all groups) into every group that holds None; numbers are left as they are."""
        if any(g["nonstandard_constant"] is None for g in self.param_groups):
            c = derived_nonstandard_constant(hidden_width(self.param_groups))
            for g in self.param_groups:
                if g["nonstandard_constant"] is None:
                    g["nonstandard_constant"] = c

    def check_can_step(self) -> None:
        self.resolve_nonstandard_constant()  # a group set to None after construction
        super().check_can_step()

    def after_load(self) -> None:
        super().after_load()
        self.resolve_nonstandard_constant()  # a checkpoint's None; a number (old or new) is kept

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_ema_rate(group["ema_rate"])
        check_weight_decay(group["weight_decay"])
        check_int("inverse_every", group["inverse_every"], 1)
        check_range("eps", group["eps"], 0.0)
        check_int("max_dim", group["max_dim"], 1)
        check_max_factor_ratio(group.get("max_factor_ratio"))
        if group["nonstandard_constant"] is not None:  # None: derived once every group is in
            check_range("nonstandard_constant", group["nonstandard_constant"], 0.0)
        check_bool("whiten_conv", group["whiten_conv"])
        check_role(group["role"])
        rotation_dtype(group.get("rotation_dtype"))
        state_dtype_option(group.get("state_dtype"))
        check_basis_bits(group.get("basis_bits"))

    def initial_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, _layout(p, group), group)

    def _init_state(self, p: torch.Tensor, layout: _Layout, group: dict) -> dict:
        stored = stored_dtype(p, group)  # the state_dtype option: momentum and bases
        state = {"step": 0, "momentum": torch.zeros(p.shape, dtype=stored, device=p.device)}
        if layout.matrix is None:
            return state
        return self.factor_state(state, layout.matrix, layout.left, layout.right, state_dtype(p), p.device,
                                 basis_dtype=stored, basis_bits=group.get("basis_bits"))

    def elementwise(self, p: torch.Tensor, group: dict) -> bool:
        """Sign descent (no whitened view) decided by the number of dims and the role alone, never by the sizes:
        a block of the parameter takes the same path. (A matrix with no side below ``max_dim`` is also plain sign
        descent, but its block's sides could be kept: it stays with its owner.)"""
        if self.splits_experts(p, group):
            return False
        role = group["role"] or role_from_shape(p)
        return p.ndim < 2 or role == "vector" or (p.ndim >= 3 and not (group["whiten_conv"]
                                                                       and role in ("conv", "hidden")))

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        layouts = [_layout(p, group) for p in params]
        states = []
        for p, layout in zip(params, layouts):
            if not self.state[p]:
                self.state[p] = self._init_state(p, layout, group)
            state = self.state[p]
            state["step"] += 1
            states.append(state)

        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it
        moms = [s["momentum"] for s in states]
        work = [state_dtype(p) for p in params]  # the arithmetic's dtype; the momentum may be stored in bf16
        grads = [grad_in(p, d) for p, d in zip(params, work)]
        low = [i for i, m in enumerate(moms) if m.dtype != work[i]]
        if not low:
            lerp_all(moms, grads, 1.0 - beta1, ok)
        else:  # state_dtype: cast up, update, round once into the stored momentum
            if len(low) < len(moms):
                same = [i for i in range(len(moms)) if i not in set(low)]
                lerp_all([moms[i] for i in same], [grads[i] for i in same], 1.0 - beta1, ok)
            up = [moms[i].to(work[i]) for i in low]
            torch._foreach_lerp_(up, [grads[i] for i in low], 1.0 - beta1)
            for i, u in zip(low, up):
                commit(moms[i], u, ok)
        # The average is of the pre-update parameters (the experiment code; the released torch file differs).
        self.update_averages(group, params, states)

        updates: list[torch.Tensor | None] = [None] * len(params)
        plain = [i for i, lay in enumerate(layouts) if lay.matrix is None]
        if plain:
            for i, u in zip(plain, torch._foreach_sign([moms[i] for i in plain])):
                updates[i] = u if u.dtype == work[i] else u.to(work[i])  # ±1 and 0: exact in any dtype
        whitened = [i for i, lay in enumerate(layouts) if lay.matrix is not None]
        key_of = lambda q: self._bucket_key(gi, group, q)  # noqa: E731
        for bucket_key, idxs in bucket(whitened, lambda i: key_of(params[i])).items():
            self._whiten_bucket(gi, group, bucket_key, key_of, idxs, layouts[idxs[0]], params, grads, updates,
                                beta2)

        # theta <- theta - s*(U + wd*theta), written as theta*(1 - s*wd) - s*U so it is two fused passes.
        keep = [1.0 - lr * lay.scale * group["weight_decay"] * lay.decay for lay in layouts]
        torch._foreach_mul_(updates, [-lr * lay.scale for lay in layouts])
        step_all(params, work, updates, keep, ok=ok)

        due = [i for i in whitened
               if states[i]["step"] == 1 or states[i]["step"] % group["inverse_every"] == 0]
        if due:
            self.refresh_bases([states[i] for i in due], group["eps"], bits=group.get("basis_bits"))

    def needs_host_check(self, work) -> bool:
        """Refresh steps decide on the host (the eigendecompositions)."""
        def due(p: torch.Tensor, group: dict) -> bool:  # _step_group's refresh rule, for this step
            step = self.state[p]["step"] + 1
            return _layout(p, group).matrix is not None and (step == 1 or step % group["inverse_every"] == 0)

        return any(due(p, group) for group, params in work for p in params)

    def _bucket_key(self, gi: int, group: dict, p: torch.Tensor):
        if not self.batched:
            return ("single", gi, id(p))
        lay = _layout(p, group)
        return (gi, lay.matrix, lay.left, lay.right, self.state[p]["momentum"].dtype, p.device)

    def _whiten_bucket(self, gi, group, key, key_of, idxs, layout, params, grads, updates, beta2) -> None:
        """Factor update and U = Q_L sign(Q_Lᵀ M Q_R) Q_Rᵀ for same-shape matrices, batched, state in place."""
        m, n = layout.matrix
        bits = group.get("basis_bits")
        shapes = {"momentum": (m, n)}
        for side, d, present in (("left", m, layout.left), ("right", n, layout.right)):
            if present:
                shapes[f"factor_{side}"] = (d, d)
                shapes.update(basis_slots(side, d, bits))
        S, pos = self.bucket_stacks(gi, key, [params[i] for i in idxs], key_of, shapes)
        rows = range(len(idxs)) if pos is None else self.bucket_rows(gi, key, [params[i] for i in idxs], key_of)
        # Factor updates go matrix by matrix into the stacked factors: stacking the gradients would cost a copy
        # of every gradient for no gain (the matmuls dominate), while the rotations run on stacks already in place.
        # A sync-free step updates copies of the stacks and commits them under its flag, one kernel per stack.
        factors = {k: S[k] if self._ok is None else S[k].clone() for k in ("factor_left", "factor_right") if k in S}
        for j, i in zip(rows, idxs):
            update_factors(factors["factor_left"][j] if "factor_left" in factors else None,
                           factors["factor_right"][j] if "factor_right" in factors else None,
                           grads[i].reshape(m, n), beta2)
        if self._ok is not None:
            for k, new in factors.items():
                commit(S[k], new, self._ok)
        if pos is not None:  # some members have no gradient this step: rotate the others' copies
            S = {k: v[pos] for k, v in S.items() if k != "factor_left" and k != "factor_right"}
        work = grads[idxs[0]].dtype  # the arithmetic's dtype (state_dtype and basis_bits store M and Q lower)
        M = S["momentum"] if S["momentum"].dtype == work else S["momentum"].to(work)
        bases = read_bases(S, bits, work)  # the stacks themselves when stored in the work dtype
        QL, QR = bases.get("basis_left"), bases.get("basis_right")
        low = rotation_dtype(group.get("rotation_dtype"))
        if low is not None:
            # cast per step, not cached: the casts cost ~1% of a step (H200, width 768), and a cached copy would be
            # state to keep in step with the basis and in checkpoints
            QL, QR = (None if Q is None else Q.to(low) for Q in (QL, QR))
        U = unrotate(rotate(M if low is None else M.to(low), QL, QR).sign_(), QL, QR)
        if U.dtype != M.dtype:
            U = U.to(M.dtype)
        for j, i in enumerate(idxs):
            updates[i] = U[j].view(params[i].shape)
