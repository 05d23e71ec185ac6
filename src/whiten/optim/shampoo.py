"""Shampoo (Gupta, Koren, Singer 2018) as Distributed Shampoo computes it (Shi et al. 2023,
facebookresearch/optimizers): blocked Kronecker-factored preconditioning by inverse roots refreshed every few
steps, with the step size grafted block by block from Adam (or AdaGrad, RMSprop)."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import NamedTuple

import torch

from ..averaging import AveragingMixin
from ..linalg import InverseRootResult, matrix_inverse_root

from . import kernels
from ._base import WhitenOptimizer
from .checks import (check_bool, check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .sides import SMALL_FACTORS, check_max_factor_ratio, kept_sides  # noqa: F401 (SMALL_FACTORS: re-exported)
from .stacks import bucket
from .update import (add_all, apply_all, commit, commit_all, decays, grad_in, host_values, lerp_all, masked,
                     state_dtype, stored_dtype, write)

__all__ = ["Shampoo", "InverseRootResult", "block_layout", "matrix_inverse_root", "merge_small_dims"]

GRAFTING_TYPES = (None, "adagrad", "rmsprop", "adam")
# grafting_beta2=None takes Distributed Shampoo's default of each grafting config.
DEFAULT_GRAFTING_BETA2 = {"adagrad": 1.0, "rmsprop": 0.99, "adam": 0.999}
# Distributed Shampoo's guard on the Shampoo direction's norm when grafting.
GRAFT_NORM_EPS = 1e-16


# ----- kernels (pure functions: no optimizer state) -------------------------------------------------------------


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dims, then merge adjacent dims from the last one backwards while their product stays
    ``<= max_dim`` (Distributed Shampoo's ``merge_small_dims`` with target dimensionality 1). A tensor whose dims are
    all 1 (or a 0-d tensor) becomes ``(1,)``; ``(32, 3, 64, 64)`` with 8192 becomes ``(96, 4096)``."""
    dims = [d for d in shape if d != 1] or [1]
    merged = [dims[-1]]
    for d in reversed(dims[:-1]):
        if merged[-1] * d <= max_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


class Block(NamedTuple):
    """One independent Shampoo problem: a slice of a parameter's merged view."""

    index: tuple[slice, ...]  # into ``tensor.reshape(merged_shape)``
    dims: tuple[int, ...]
    modes: tuple[int, ...]  # the preconditioned modes (identity on the others)
    factor_keys: tuple[str, ...]  # state names, one per preconditioned mode
    root_keys: tuple[str, ...]


def preconditioned_modes(dims: tuple[int, ...], max_factor_ratio: float | None) -> tuple[int, ...]:
    """The modes of a block that get a factor. All of them in Distributed Shampoo (``max_factor_ratio=None``).
    With a ratio r, the largest mode is left out (identity on it) while the factors and roots of the others
    (``2 Σ d_j²`` numbers) exceed r times the block's ``Π d_j`` and :data:`SMALL_FACTORS` (:func:`kept_sides`,
    the rule SPlus, SOAP and TNT share): a vector longer than 181 keeps no factor, a (1024, 64) block only its
    64-side one, while square and 1:4 matrices keep both (4× and 8.5×), and so does every block whose factors are
    small anyway."""
    return kept_sides(dims, range(len(dims)), max_factor_ratio)


@functools.lru_cache(maxsize=4096)
def block_layout(shape: tuple[int, ...], max_dim: int,
                 max_factor_ratio: float | None = None) -> tuple[tuple[int, ...], tuple[Block, ...]]:
    """``(merged_shape, blocks)``: the merged shape (:func:`merge_small_dims`) cut along every dim into chunks of
    ``max_dim`` (Distributed Shampoo's ``multi_dim_split``), blocks numbered in row-major order of the chunks, each
    with its :func:`preconditioned_modes`."""
    merged = merge_small_dims(shape, max_dim)
    blocks = []
    for i, offsets in enumerate(itertools.product(*(range(0, d, max_dim) for d in merged))):
        dims = tuple(min(max_dim, d - o) for o, d in zip(offsets, merged))
        modes = preconditioned_modes(dims, max_factor_ratio)
        blocks.append(Block(index=tuple(slice(o, o + n) for o, n in zip(offsets, dims)), dims=dims, modes=modes,
                            factor_keys=tuple(f"factor_{i}_{j}" for j in modes),
                            root_keys=tuple(f"root_{i}_{j}" for j in modes)))
    return merged, tuple(blocks)


def _contract_all_but(G: torch.Tensor, j: int) -> torch.Tensor:
    """The mode-j factor statistic: G contracted with itself over every dim except j (G Gᵀ, Gᵀ G for matrices)."""
    others = [k for k in range(G.ndim) if k != j]
    return torch.tensordot(G, G, dims=(others, others))


def _precondition_block(X: torch.Tensor, roots: list[torch.Tensor | None]) -> torch.Tensor:
    """``X ×_1 R_1 ×_2 R_2 ...`` for symmetric R (None: the identity): contracting dim 0 each time rotates the dims,
    so after one contraction per mode they are back in order (``R_1 X R_2`` for matrices)."""
    for R in roots:
        X = X.movedim(0, -1) if R is None else torch.tensordot(X, R, dims=([0], [0]))
    return X


# ----- the optimizer -----------------------------------------------------------------------------------------------


class Shampoo(AveragingMixin, WhitenOptimizer):
    r"""Shampoo with Distributed Shampoo's defaults and step order (facebookresearch/optimizers, single process).

    Every parameter is cut into blocks: size-1 dims dropped, adjacent dims merged while their product stays
    ``<= max_preconditioner_dim``, every dim split into chunks of ``max_preconditioner_dim``. Each block
    :math:`G` of order :math:`k` (dims :math:`d_1 \dots d_k`) is its own Shampoo problem, with one factor per mode.
    At step :math:`t` (per parameter):

    .. math::
        F_i &\leftarrow \beta_2 F_i + w\, G_{(i)} G_{(i)}^\top \qquad (w = 1 \text{ if } \beta_2 = 1 \text{ else }
            1-\beta_2;\ G_{(i)}: G \text{ unfolded along mode } i) \\
        \hat F_i &= (F_i / b_2 + \epsilon I)^{-1/(2k)} \quad\text{when refreshed, else the previous one
            (identity at first)},\quad b_2 = 1-\beta_2^t \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G, \qquad \bar G = M / (1-\beta_1^t) \\
        V &\leftarrow \beta_g V + w_g\, G \odot G, \qquad D = \bar G / (\sqrt{V / b_g} + \epsilon_g) \\
        P &= \bar G \times_1 \hat F_1 \cdots \times_k \hat F_k
            \;\cdot\; \frac{\|D\|_F}{\|\bar G \times_1 \hat F_1 \cdots \times_k \hat F_k\|_F + 10^{-16}}
            \qquad (P = D \text{ while } t < \texttt{start\_preconditioning\_step}) \\
        W &\leftarrow W - \eta\,(P + \lambda W)

    :math:`\hat F_i` are refreshed, after the factor update and before preconditioning, when ``t ==
    start_preconditioning_step`` or when ``t % precondition_frequency == 0`` and ``t > start_preconditioning_step``.
    The root (Distributed Shampoo's default ``EigenConfig``): eigendecomposition of :math:`F_i/b_2 + \epsilon I`
    (retried in float64 on failure), eigenvalues shifted so the smallest is :math:`\epsilon` when it is below,
    :math:`Q \mathrm{diag}(L^{-1/(2k)}) Q^\top` — so matrices get :math:`L^{-1/4} G R^{-1/4}` and vectors full-matrix
    AdaGrad :math:`F^{-1/2} g`. The norms in the grafting ratio are per block. Grafting: ``"adam"`` (:math:`\beta_g`,
    :math:`w_g = 1-\beta_g`, :math:`b_g = 1-\beta_g^t`), ``"rmsprop"`` (same, :math:`b_g = 1`), ``"adagrad"``
    (:math:`\beta_g = w_g = b_g = 1`), ``None`` (:math:`P` is the Shampoo direction unscaled, and :math:`\bar G`
    before preconditioning starts). :math:`b_2 = 1` when ``use_bias_correction`` is False or :math:`\beta_2 = 1`;
    :math:`\bar G = G` when :math:`\beta_1 = 0`, and :math:`\bar G = M` without bias correction. Weight decay
    :math:`\lambda` is decoupled (added to the direction) and off for the ``vector`` and ``embedding`` roles.

    With ``start_preconditioning_step=math.inf`` and ``grafting="adam"`` this is exactly AdamW (the Muon
    example of Distributed Shampoo's README routes non-hidden parameters this way); no factors are then kept.

    Choices where whiten differs from Distributed Shampoo (DS):

    - ``grafting="adam"`` by default. DS's constructor default is no grafting, but every example in its README
      grafts Adam, and without grafting the step size of Shampoo has nothing to do with Adam's learning rates.
    - A factor that is not finite, an eigendecomposition that fails even in float64, or a root that is not finite
      keeps the previous root (identity before the first), warns, and is counted in ``counters["eigh_failures"]``
      (float64 retries in ``counters["eigh_retries"]``). DS raises on non-finite factors or roots and after more than
      3 consecutive failed refreshes.
    - A block whose Shampoo direction has a non-finite norm (overflow) takes the grafted direction (or
      :math:`\bar G` without grafting) instead, so finite gradients never produce NaN.
    - With ``start_preconditioning_step=math.inf`` no factors are stored or updated (DS updates them anyway).
    - Non-finite gradients skip the whole step (``nonfinite="skip"``) or raise FloatingPointError.
    - The step count is per parameter (a parameter without a gradient does not advance); DS counts per group.
    - 0-d parameters and parameters whose dims are all 1 are 1-element vectors, as in DS: a 1×1 factor and
      exponent -1/2, so with grafting their update is the grafted one.
    - Empty parameters are left alone (no state).

    Memory. DS cuts every dim into ``max_preconditioner_dim``-sided blocks and gives every mode of every block a
    d×d factor and root: a (50000,) vector gets 49 blocks of 1024² (390 MiB of float32 state for a 0.2 MiB
    parameter, and 49 eigendecompositions of 1024² per refresh), a (50000, 64) embedding 415 MiB for 12 MiB.
    whiten departs from DS here: with ``max_factor_ratio`` r (default 20) a block leaves out its largest mode
    (identity on that mode; the root exponent stays -1/(2k) for a block of order k) while the factors and roots of
    the others take more than r times the block's own memory and more than 2^16 numbers
    (:func:`preconditioned_modes`). Square and 1:4 matrices and conv weights such as (64, 576) keep every factor
    (they take 4×, 8.5× and 18×); a (1024, 64) block keeps only its 64-side factor, so the (50000, 64) embedding
    has 1.5 MiB of factors; a vector (or a small matrix merged into one) longer than 181 keeps none, and a block
    without factors takes the grafted direction (Adam's, with the default grafting; Ḡ without grafting), which is
    where DS's README routes vectors. ``max_factor_ratio=None`` is DS's behaviour.
    Either way whiten warns once when a parameter's state exceeds 16× its memory and 64 MiB.

    State per parameter (``optimizer.state[p]``), in float32 (float64 for float64 parameters): ``step`` (int);
    ``momentum`` (shape of p; only if β1 > 0); ``graft`` (shape of p, the grafting second moment V; only with
    grafting); for block i (numbered as :func:`block_layout` does, a function of the shape and
    ``max_preconditioner_dim`` only) and mode j: ``factor_{i}_{j}`` and ``root_{i}_{j}`` (d_j, d_j) (not with
    ``start_preconditioning_step=math.inf``); ``ema`` (shape of p) when averaging. With
    ``state_dtype=torch.bfloat16`` the roots ``root_*`` are bfloat16, the rest as above.

    Args:
        params: parameters or param-group dicts; groups from :func:`whiten.param_groups` carry a ``role``, which
            decides weight decay only. Without a role, a parameter's role comes from its shape.
        lr: learning rate η (default 1e-2).
        betas: (β1, β2): the first-moment rate (0 disables it) and the factor rate; β2 = 1 sums the factors like
            AdaGrad, β2 < 1 is an EMA (default (0.9, 1.0), as DS).
        epsilon: ε added to the factors before the inverse root, > 0 (default 1e-12).
        weight_decay: λ, decoupled (default 0.0).
        max_preconditioner_dim: the largest block side (default 1024; DS's README suggests 8192). It decides the
            blocks, hence the state keys: do not change it once a parameter has state.
        max_factor_ratio: r in [2, 1e6], or None for DS's behaviour: a block leaves out its largest modes until
            the factors and roots of the others take at most r times its memory (default 20, see Memory above).
            It decides the state keys: do not change it once a parameter has state.
        precondition_frequency: refresh the roots every this many steps (default 1; DS's README suggests 100).
        start_preconditioning_step: the first step that preconditions; before it the update is the grafted one.
            None means ``precondition_frequency``; it may not be smaller; ``math.inf`` never preconditions
            (default None).
        use_bias_correction: divide M by 1-β1^t and the factors by 1-β2^t (default True).
        grafting: ``"adam"``, ``"rmsprop"``, ``"adagrad"`` or None (default ``"adam"``, see above).
        grafting_beta2: β_g, the second-moment rate of RMSprop/Adam grafting in [0, 1); None takes DS's default
            of each config: 0.999 for Adam, 0.99 for RMSprop, and 1 (a sum) for AdaGrad, which accepts only None
            or 1.0 (default None).
        grafting_epsilon: ε_g, > 0 (default 1e-10, DS; its README suggests the old Adam eps, e.g. 1e-8).
        ema_rate: rate of the parameter average used by ``eval()``; None averages nothing (default None).
        nonfinite: ``"skip"`` (default: a step with a non-finite gradient changes nothing, is counted in
            ``counters["skipped_steps"]`` and warns) or ``"raise"`` (FloatingPointError).
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the grafting and the update).
        batched: process same-shape matrix and vector blocks of a group as stacks: batched factor updates, root
            computations and ``torch.bmm`` preconditioning (default True). False does each block alone; blocks of
            order 3 or more always go one by one.
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): the inverse roots ``root_*`` stored in bfloat16, half their bytes; the
            arithmetic stays float32 (a new root is rounded once into storage and cast up to precondition). The
            rest stays float32: ``graft`` (Adam grafting's β_g = 0.999 adds 0.1% a step) and the factors (at
            β2 = 1 sums whose t-th term is 1/t of them) would soon take increments below bfloat16's rounding, and
            the roots are computed from the factors' small eigenvalues; the ``momentum`` is preconditioned by the
            roots, whose largest eigenvalues (up to ε^(-1/4) where the factors saw little) amplify its rounding
            (measured: 32-73% of the update with ε = 1e-12, bfloat16 roots too). A bfloat16 root moves the update
            by 2.2-4.4% (relative, measured on full-rank correlated gradients) and up to 13% where the factors are
            rank-deficient (docs/memory.md). Set it before the first step.

    References: V. Gupta, T. Koren, Y. Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
    H.-J. M. Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer
    for Training Neural Networks At-Scale", arXiv 2309.06497 (2023); facebookresearch/optimizers,
    ``distributed_shampoo/``.
    """

    MEMORY_OPTIONS = {"max_preconditioner_dim": (("factor", "root"), "sides are split into blocks of at most this "
                                             "size: a d-wide side then costs about d x max_preconditioner_dim per "
                                             "factor instead of d x d"),
                      "state_dtype": (("root",), "torch.bfloat16 stores the inverse roots in half the bytes (float32 "
                                      "arithmetic)")}  # see memory_report

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int = 1024,
        max_factor_ratio: float | None = 20.0,
        precondition_frequency: int = 1,
        start_preconditioning_step: int | float | None = None,
        use_bias_correction: bool = True,
        grafting: str | None = "adam",
        grafting_beta2: float | None = None,
        grafting_epsilon: float = 1e-10,
        ema_rate: float | None = None,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        batched: bool = True,
        state_dtype: torch.dtype | str | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
                        max_preconditioner_dim=max_preconditioner_dim, max_factor_ratio=max_factor_ratio,
                        precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step,
                        use_bias_correction=use_bias_correction, grafting=grafting, grafting_beta2=grafting_beta2,
                        grafting_epsilon=grafting_epsilon, ema_rate=ema_rate, role=None, state_dtype=state_dtype)
        check_bool("batched", batched)
        self.batched = batched
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (allowed: a pair (beta1 in [0, 1), beta2 in (0, 1]))")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, low_open=True)
        check_range("epsilon", group["epsilon"], 0.0, low_open=True)
        check_weight_decay(group["weight_decay"])
        check_int("max_preconditioner_dim", group["max_preconditioner_dim"], 1)
        check_max_factor_ratio(group["max_factor_ratio"])
        check_int("precondition_frequency", group["precondition_frequency"], 1)
        start, freq = group["start_preconditioning_step"], group["precondition_frequency"]
        if start is not None and start != math.inf:
            if isinstance(start, bool) or not isinstance(start, int) or start < freq:
                raise ValueError(f"Invalid start_preconditioning_step: {start!r} (allowed: None, math.inf or an "
                                 f"integer >= precondition_frequency = {freq})")
        check_bool("use_bias_correction", group["use_bias_correction"])
        grafting = group["grafting"]
        if grafting not in GRAFTING_TYPES:
            raise ValueError(f"Invalid grafting: {grafting!r} (allowed: {', '.join(map(repr, GRAFTING_TYPES))})")
        gb2 = group["grafting_beta2"]
        if gb2 is not None:
            if grafting == "adagrad":
                if gb2 != 1.0:
                    raise ValueError(f"Invalid grafting_beta2: {gb2!r} (allowed with AdaGrad grafting: None or 1.0)")
            else:
                check_range("grafting_beta2", gb2, 0.0, 1.0, high_open=True)
        check_range("grafting_epsilon", group["grafting_epsilon"], 0.0, low_open=True)
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])
        state_dtype_option(group.get("state_dtype"))

    # ----- the step -----------------------------------------------------------------------------------------------
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    def needs_host_check(self, work) -> bool:
        """Steps with a root due (and the grafting statistic's restart check, on the same steps) decide on the
        host."""
        def due(p: torch.Tensor, group: dict) -> bool:  # _step_group's rule, with its t for this step
            freq = group["precondition_frequency"]
            start = freq if group["start_preconditioning_step"] is None else group["start_preconditioning_step"]
            t = self.state[p].get("step", -1) + 1  # (no step yet: state from a changed option, made on the host)
            return t == 0 or t % freq == 0 or t == start

        return any(due(p, group) for group, params in work for p in params)

    def apply_step(self, work) -> None:
        failures = 0
        for gi, (group, params) in enumerate(work):
            params = [p for p in params if p.numel() > 0]
            if params:
                failures += self._step_group(gi, group, params)
        if failures:
            warnings.warn(
                f"{type(self).__name__}: inverse root failed for {failures} factor(s) (non-finite factor or "
                "eigendecomposition failure even in float64); keeping their previous root (identity before the "
                f"first). {self.counters['eigh_failures']} failures so far; persistent failures usually mean "
                "exploding gradients.", RuntimeWarning,
                stacklevel=5)  # past apply_step, step, torch.no_grad and torch.optim's hooks: the caller of step()

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        """Shampoo stacks blocks, not parameters, so its blocks decide (the rule of
        :meth:`WhitenOptimizer.stack_invariant`): every stacked block (order 1 or 2, with a factor) needs its size
        and its factors' sizes to be multiples of 16 elements. That rules out a block with a side of 1 (a split's
        remainder: a side of 32 with ``max_preconditioner_dim=31``), whose factor updates and preconditioning are
        matrix products with a dimension of 1, which MKL rounds differently in a stack of one (gemm) than in a
        larger one (batched gemm). Vector blocks are stacked without such products (see :meth:`_stacked_blocks`);
        blocks without a factor (element-wise) and blocks of order 3 or more (one by one) are never stacked."""
        _, blocks = block_layout(tuple(p.shape), group["max_preconditioner_dim"], group["max_factor_ratio"])
        for blk in blocks:
            if not blk.modes or len(blk.dims) > 2:
                continue
            sizes = [math.prod(blk.dims)] + [blk.dims[j] ** 2 for j in blk.modes]
            if 1 in blk.dims or any(size % 16 for size in sizes):
                return False
        return True

    def initial_state(self, p: torch.Tensor, group: dict) -> dict | None:
        if p.numel() == 0:
            return None
        state: dict = {}
        _, blocks = block_layout(tuple(p.shape), group["max_preconditioner_dim"], group["max_factor_ratio"])
        self._init_state(p, state, blocks, group, group["start_preconditioning_step"] != math.inf)
        return state

    def _init_state(self, p: torch.Tensor, state: dict, blocks, group: dict, precondition: bool) -> None:
        """Create missing entries (all on the first step; later ones if a group option was changed)."""
        dtype = state_dtype(p)
        # state_dtype: the roots in bfloat16. The grafting moment (β_g = 0.999, or AdaGrad's sum) and the factors
        # (sums at β2 = 1) take increments below bfloat16's rounding; the momentum's rounding would be amplified by
        # the roots it is preconditioned with (up to ε^(-1/4) where the factors saw little): they stay in ``dtype``
        stored = stored_dtype(p, group)
        state.setdefault("step", 0)
        if group["betas"][0] > 0 and "momentum" not in state:
            state["momentum"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if group["grafting"] is not None and "graft" not in state:
            state["graft"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        keys = [k for blk in blocks for k in blk.factor_keys]
        if precondition and keys and keys[0] not in state:
            for blk in blocks:
                for j, fk, rk in zip(blk.modes, blk.factor_keys, blk.root_keys):
                    state[fk] = torch.zeros(blk.dims[j], blk.dims[j], dtype=dtype, device=p.device)
                    state[rk] = torch.eye(blk.dims[j], dtype=stored, device=p.device)

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> int:
        """One step for the parameters of a group; returns how many root computations failed."""
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        freq = group["precondition_frequency"]
        start = group["start_preconditioning_step"]
        start = freq if start is None else start
        precondition = start != math.inf
        grafting = group["grafting"]
        gb2 = group["grafting_beta2"]
        gb2 = DEFAULT_GRAFTING_BETA2.get(grafting, 1.0) if gb2 is None else gb2
        bias_correction = group["use_bias_correction"]

        max_dim, ratio = group["max_preconditioner_dim"], group["max_factor_ratio"]
        layouts = [block_layout(tuple(p.shape), max_dim, ratio) for p in params]
        states = []
        for p, (_, blocks) in zip(params, layouts):
            state = self.state[p]
            self._init_state(p, state, blocks, group, precondition)
            state["step"] += 1
            states.append(state)
        self.update_averages(group, params, states)  # the pre-update parameters
        steps = [s["step"] for s in states]
        dtypes = [state_dtype(p) for p in params]
        grads = [grad_in(p, dt) for p, dt in zip(params, dtypes)]
        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it

        # Grafting second moment, from the raw gradient.
        graft_dirs = None
        if grafting is not None:
            V = [s["graft"] for s in states]
            # An overflowed V (a huge gradient) would zero the grafted step for good: every precondition_frequency
            # steps restart it, and the momentum with it (M / (0 + eps) would be a huge step), before this step's
            # gradient goes in, so V is never zero under a gradient (a gradient that overflows again gives inf
            # again: a zero step, never NaN).
            check = [i for i, t in enumerate(steps) if t % freq == 0]
            for i, bad in zip(check, self.restart_nonfinite([V[i] for i in check])):
                if bad and "momentum" in states[i]:
                    states[i]["momentum"].zero_()
        compiled = grafting is not None and kernels.active(params, grads)  # V, Ḡ and the grafted step in one kernel
        if grafting is not None and not compiled:
            # (AdaGrad's sum, gb2 = 1, has no decay: in place it skips the multiply, a sync-free step copies V by it)
            kept, V = V, (V if gb2 == 1.0 and ok is None else apply_all("mul", V, gb2, ok=ok))
            torch._foreach_addcmul_(V, grads, grads, value=1.0 if gb2 == 1.0 else 1.0 - gb2)
            commit_all(kept, V, ok)
        # First moment ("filtered gradient").
        moms = lerp_all([s["momentum"] for s in states], grads, 1.0 - beta1, ok) if beta1 > 0 else grads
        if compiled:
            values = ([gb2, 1.0 if gb2 == 1.0 else 1.0 - gb2, group["grafting_epsilon"]]
                      + [1.0 - beta1**t if beta1 > 0 and bias_correction else 1.0 for t in steps]
                      + [1.0 - gb2**t if grafting == "adam" else 1.0 for t in steps])
            gbar, graft_dirs = _graft_kernel(V, grads, moms, kernels.step_values(values, params[0].device), ok)
        elif beta1 > 0:
            gbar = torch._foreach_div(moms, [1.0 - beta1**t for t in steps]) if bias_correction else moms
        else:
            gbar = grads
        fresh_gbar = beta1 > 0 and bias_correction or compiled  # gbar[i] is not a state tensor or a gradient
        if grafting is not None and not compiled:
            denom = (torch._foreach_div(V, [1.0 - gb2**t for t in steps]) if grafting == "adam"
                     else torch._foreach_sqrt(V))
            if grafting == "adam":
                torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["grafting_epsilon"])
            graft_dirs = torch._foreach_div(gbar, denom)

        # Directions: grafted before preconditioning starts, Shampoo (grafted block by block) after.
        directions: list = [None] * len(params)
        active = []  # parameters preconditioned this step
        for i, t in enumerate(steps):
            if grafting is not None and t < start:
                directions[i] = graft_dirs[i]
            elif not precondition:  # no grafting, never preconditioned: the identity preconditioner
                directions[i] = gbar[i] if fresh_gbar else gbar[i].clone()
            else:
                directions[i] = torch.empty(params[i].shape, dtype=dtypes[i], device=params[i].device)
                active.append(i)
        failures = 0
        if precondition:
            ctx = _Ctx(params, states, layouts, grads, gbar, graft_dirs, directions, ok=ok,
                       active=set(active), beta2=beta2, w=1.0 if beta2 == 1.0 else 1.0 - beta2,
                       bc2=[1.0 - beta2**t if bias_correction and beta2 < 1.0 else 1.0 for t in steps],
                       due=[(t % freq == 0 and t > start) or t == start for t in steps], eps=group["epsilon"])
            entries = [(i, b) for i, (_, blocks) in enumerate(layouts) for b, blk in enumerate(blocks) if blk.modes]
            # blocks without a factor take the grafted direction (Ḡ without grafting), in one foreach copy
            plain = [(i, b) for i, (_, blocks) in enumerate(layouts) if i in ctx.active
                     for b, blk in enumerate(blocks) if not blk.modes]
            if plain:
                source = graft_dirs if graft_dirs is not None else gbar
                torch._foreach_copy_([ctx.block(directions, i, b) for i, b in plain],
                                     [ctx.block(source, i, b) for i, b in plain])
            stackable = (lambda e: len(layouts[e[0]][1][e[1]].dims) <= 2) if self.batched else (lambda e: False)
            alone = [e for e in entries if not stackable(e)]
            key = lambda e: ("shampoo", gi, layouts[e[0]][1][e[1]].dims, layouts[e[0]][1][e[1]].modes, dtypes[e[0]],
                             params[e[0]].device)
            stacked = bucket([e for e in entries if stackable(e)], key)
            if stacked:
                # Stable stacks: every stackable block of the group's parameters with state, with or without a
                # gradient this step (those without are left out by index), so a missing gradient rebuilds nothing.
                ctx.members = []
                for q in self.group_members(gi):
                    sq = self.state.get(q)
                    blocks_q = block_layout(tuple(q.shape), max_dim, ratio)[1]
                    for b, blk in enumerate(blocks_q):
                        if sq and blk.factor_keys and blk.factor_keys[0] in sq and len(blk.dims) <= 2:
                            ctx.members.append((q, b, blk, ("shampoo", gi, blk.dims, blk.modes, state_dtype(q),
                                                            q.device)))
            for k, bucket_entries in stacked.items():
                failures += self._stacked_blocks(k, bucket_entries, ctx)
            for e in alone:
                failures += self._single_block(e, ctx)

        # W <- W - lr*(P + wd*W), wd masked by role (the reference's L2 form, into the direction). Each direction
        # is this step's own tensor (never state or a gradient), so the decay goes into it in place. One launch per
        # op for the parameters in their state's dtype; a low-precision one in that dtype, rounded once.
        same = [i for i, p in enumerate(params) if p.dtype == dtypes[i]]
        decayed = [i for i in same if wd and decays(params[i], group)]
        if decayed:
            torch._foreach_add_([directions[i] for i in decayed], [params[i] for i in decayed], alpha=wd)
        if same:
            add_all([params[i] for i in same], [directions[i] for i in same], -lr, ok)
        for i, p in enumerate(params):
            if p.dtype == dtypes[i]:
                continue
            P, decay = directions[i], wd if decays(p, group) else 0.0

            def update(x, P=P, decay=decay):
                x.add_(P.add_(x, alpha=decay) if decay else P, alpha=-lr)

            write(p, dtypes[i], update, ok)
        return failures

    def _refresh(self, factors: torch.Tensor, roots: torch.Tensor, bc2: list[float], eps: float, order: int) -> int:
        """New roots for a (B, d, d) stack of factors, written into ``roots`` where they could be computed."""
        # An overflowed factor (a huge finite gradient) restarts from zero and keeps its root this time; its next
        # refresh is a normal one (with β2 = 1 an inf sum would otherwise block every refresh for good).
        restarted = self.restart_nonfinite(list(factors.unbind(0)))
        scale = host_values(bc2, factors.dtype, factors.device).view(-1, 1, 1)
        result = matrix_inverse_root(factors / scale, 2 * order, eps)
        self.counters["eigh_retries"] += result.retried
        if all(result.ok) and not any(restarted):
            roots.copy_(result.roots)
            return 0
        for j, ok in enumerate(result.ok):
            if ok and not restarted[j]:
                roots[j].copy_(result.roots[j])
        failed = sum(1 for ok, r in zip(result.ok, restarted) if not ok and not r)
        self.counters["eigh_failures"] += failed
        return failed

    def _stacked_blocks(self, key, entries: list[tuple[int, int]], c: "_Ctx") -> int:
        """Same-shape order-1 and order-2 blocks as stacks: factors by baddbmm (element-wise for vectors), roots,
        preconditioning by bmm."""
        i0, b0 = entries[0]
        dims, modes = c.layouts[i0][1][b0].dims, c.layouts[i0][1][b0].modes
        order = len(dims)  # the root's exponent is -1/(2·order) also when a mode is left out (identity on it)
        members = [(q, b, blk) for q, b, blk, k in c.members if k == key]
        names = [{**{f"F{j}": fk for j, fk in zip(modes, blk.factor_keys)},
                  **{f"R{j}": rk for j, rk in zip(modes, blk.root_keys)}} for _, _, blk in members]
        shapes = {**{f"F{j}": (dims[j], dims[j]) for j in modes}, **{f"R{j}": (dims[j], dims[j]) for j in modes}}
        S = self.stacked_state(key, [q for q, _, _ in members], shapes, names)
        where = {(id(q), b): j for j, (q, b, _) in enumerate(members)}
        rows = [where[(id(c.params[i]), b)] for i, b in entries]  # each entry's position in the stacks

        def index(js):  # stack positions of entries js, or None when they are the whole stack in order
            sel = [rows[j] for j in js]
            return None if sel == list(range(len(members))) else host_values(sel, torch.int64, S["F0"].device)

        G = torch.stack([c.block(c.grads, i, b) for i, b in entries])
        present = index(range(len(entries)))
        # (a sync-free step updates copies, committed under its flag below)
        Fs = {m: S[f"F{m}"] if present is None and c.ok is None else
              S[f"F{m}"].clone() if present is None else S[f"F{m}"][present] for m in modes}
        if order == 1:
            # No matrix product with a dimension of 1 on a stack (here a rank-1 update, below a matrix-vector
            # product): torch sends a stack of one to gemm and larger ones to batched gemm, which round those
            # differently (MKL), so a block's bits would depend on how many blocks share its stack this step. The
            # outer product is taken element-wise and added as _single_block adds it to a block alone: the same
            # bits in any stack, and the same as a block alone.
            if c.beta2 != 1.0:
                Fs[0].mul_(c.beta2)
            Fs[0].add_(G.unsqueeze(2) * G.unsqueeze(1), alpha=c.w)
        else:
            if 0 in Fs:
                Fs[0].baddbmm_(G, G.mT, beta=c.beta2, alpha=c.w)
            if 1 in Fs:
                Fs[1].baddbmm_(G.mT, G, beta=c.beta2, alpha=c.w)
        if c.ok is not None:
            for m in modes:
                commit(S[f"F{m}"], Fs[m] if present is None else S[f"F{m}"].index_copy(0, present, Fs[m]), c.ok)
        elif present is not None:
            for m in modes:
                S[f"F{m}"].index_copy_(0, present, Fs[m])
        del G, Fs

        failures = 0
        due = [j for j, (i, _) in enumerate(entries) if c.due[i]]
        if due:
            idx = index(due)
            bc2 = [c.bc2[entries[j][0]] for j in due]
            for m in modes:
                F, R = S[f"F{m}"], S[f"R{m}"]
                if idx is None:
                    failures += self._refresh(F, R, bc2, c.eps, order)
                else:
                    sub, subF = R[idx], F[idx]
                    failures += self._refresh(subF, sub, bc2, c.eps, order)
                    R.index_copy_(0, idx, sub)
                    F.index_copy_(0, idx, subF)  # a restarted factor was zeroed in the copy

        act = [j for j, (i, _) in enumerate(entries) if i in c.active]
        if not act:
            return failures
        roots = {m: S[f"R{m}"] for m in modes}
        idx = index(act)
        if idx is not None:
            roots = {m: R[idx] for m, R in roots.items()}
        act_entries = [entries[j] for j in act]
        X = torch.stack([c.block(c.gbar, i, b) for i, b in act_entries])
        roots = {m: R.to(X.dtype) for m, R in roots.items()}  # state_dtype: the stored bfloat16 roots, cast up
        if order == 1:  # xᵀR (R symmetric), as a block alone: a row vector times R rounds alike in any stack
            P = torch.bmm(X.unsqueeze(1), roots[0]).squeeze(1)
        else:
            P = torch.bmm(roots[0], X) if 0 in roots else X
            P = torch.bmm(P, roots[1]) if 1 in roots else P.clone()
        D = torch.stack([c.block(c.graft_dirs, i, b) for i, b in act_entries]) if c.graft_dirs is not None else X
        P = _graft(P, D, c.graft_dirs is not None, tuple(range(1, order + 1)))
        torch._foreach_copy_([c.block(c.directions, i, b) for i, b in act_entries], list(P.unbind(0)))
        return failures

    def _single_block(self, entry: tuple[int, int], c: "_Ctx") -> int:
        """One block of any order, by tensordot."""
        i, b = entry
        blk = c.layouts[i][1][b]
        state = c.states[i]
        G = c.block(c.grads, i, b)
        failures = 0
        for j, fk in zip(blk.modes, blk.factor_keys):
            F = state[fk] if c.ok is None else state[fk].clone()  # a sync-free step: a copy, committed
            if c.beta2 != 1.0:
                F.mul_(c.beta2)
            F.add_(_contract_all_but(G, j), alpha=c.w)
            if c.ok is not None:
                commit(state[fk], F, c.ok)
        if c.due[i]:
            for fk, rk in zip(blk.factor_keys, blk.root_keys):
                failures += self._refresh(state[fk].unsqueeze(0), state[rk].unsqueeze(0), [c.bc2[i]], c.eps,
                                          len(blk.dims))
        if i in c.active:
            X = c.block(c.gbar, i, b)
            roots = dict(zip(blk.modes, blk.root_keys))
            P = _precondition_block(X, [state[roots[j]].to(X.dtype) if j in roots else None
                                        for j in range(len(blk.dims))])
            D = c.block(c.graft_dirs, i, b) if c.graft_dirs is not None else X
            c.block(c.directions, i, b).copy_(_graft(P, D, c.graft_dirs is not None, None))
        return failures


def _graft(P: torch.Tensor, D: torch.Tensor, grafting: bool, dims) -> torch.Tensor:
    """``P ||D|| / (||P|| + 1e-16)`` per block (dims: the block dims of a stack, None for one block); a block whose
    Shampoo direction overflowed (non-finite norm) takes D, the grafted direction (Ḡ without grafting)."""
    p_norm = torch.linalg.vector_norm(P, dim=dims, keepdim=dims is not None)
    if grafting:
        d_norm = torch.linalg.vector_norm(D, dim=dims, keepdim=dims is not None)
        scaled = P * (d_norm / (p_norm + GRAFT_NORM_EPS))
    else:
        scaled = P
    return torch.where(p_norm.isfinite(), scaled, D)


class _Ctx:
    """What the block routines of one group step share (plain holder, never stored)."""

    def __init__(self, params, states, layouts, grads, gbar, graft_dirs, directions, *, active, beta2, w, bc2, due,
                 eps, ok=None):
        self.ok = ok  # a sync-free step's device-side flag (the factors' writes are masked by it)
        self.params, self.states, self.layouts = params, states, layouts
        self.grads, self.gbar, self.graft_dirs, self.directions = grads, gbar, graft_dirs, directions
        self.active, self.beta2, self.w, self.bc2, self.due, self.eps = active, beta2, w, bc2, due, eps

    def block(self, tensors: list[torch.Tensor], i: int, b: int) -> torch.Tensor:
        """Block b of parameter i's tensor in ``tensors`` (a view when the tensor is contiguous)."""
        merged, blocks = self.layouts[i]
        return tensors[i].reshape(merged)[blocks[b].index]


@kernels.kernel
def _graft_kernel(vs, grads, moms, values, ok):
    """The grafting statistics and step of :meth:`Shampoo._step_group` (compiled=True, whiten.optim.kernels):
    V ← β·V + w·g² (committed under ``ok``), Ḡ = m / bc1 and the grafted direction Ḡ / (√(V / bc2) + ε). ``values`` =
    β, w, ε, then each parameter's bc1 (1 without bias correction or momentum), then its bc2 (1 for AdaGrad). Returns
    (Ḡ, the grafted directions), new tensors."""
    n = len(vs)
    v = torch._foreach_mul(vs, values[0])
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), values[1]))
    torch._foreach_copy_(vs, masked(ok, v, vs))
    gbar = torch._foreach_div(moms, [values[3 + i] for i in range(n)])
    denom = torch._foreach_sqrt(torch._foreach_div(v, [values[3 + n + i] for i in range(n)]))
    torch._foreach_add_(denom, values[2])
    return gbar, torch._foreach_div(gbar, denom)
