"""TNT, Tensor Normal Training (Ren & Goldfarb 2021): a Kronecker-factored Fisher estimated from gradients of labels
sampled from the model's own predictions, one factor per mode of each parameter, inverted (power -1) every few
steps: Shampoo's cost, natural-gradient meaning."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..averaging import AveragingMixin
from ..fisher import FisherMixin
from ._base import WhitenOptimizer
from .checks import (check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .stacks import bucket
from .sides import ALWAYS_KEPT_SIDE, check_max_factor_ratio, kept_sides
from .update import apply_all, cache_runs, cast_all, commit_all, decays, grad_in, state_dtype, step_all, stored_dtype

__all__ = ["TNT", "CONV_RESHAPES"]

# How a 4-D conv weight (out, in, kh, kw) is seen: "filter" (out, in, kh·kw), the authors' CIFAR setting
# (filterFlattening); "kfac" (out, in·kh·kw), their autoencoder setting (KFACReshaping); "none" (out, in, kh, kw).
CONV_RESHAPES = ("filter", "kfac", "none")


class _Layout(NamedTuple):
    modes: tuple[int, ...]  # the tensor shape the factors act on
    factored: tuple[bool, ...]  # which modes get a factor (the others: a scalar, see TNT's docstring)
    decay: bool


def _layout(p: torch.Tensor, group: dict) -> _Layout:
    shape = tuple(p.shape)
    if p.ndim == 0:
        shape = (1,)
    elif p.ndim == 4 and group["conv_reshape"] == "filter":
        shape = (shape[0], shape[1], shape[2] * shape[3])
    elif p.ndim >= 3 and group["conv_reshape"] == "kfac":
        shape = (shape[0], math.prod(shape[1:]))
    limit = group["max_precond_dim"]
    present = [j for j, d in enumerate(shape) if d <= limit]
    if len(shape) >= 2:  # max_factor_ratio among the modes max_precond_dim leaves; vectors keep the authors' factor
        # (a group from a checkpoint of before the option has no key: its state was built without it)
        present = kept_sides(shape, present, group.get("max_factor_ratio"),
                           ALWAYS_KEPT_SIDE)
    return _Layout(shape, tuple(j in present for j in range(len(shape))), decays(p, group))


def mode_contraction(G: torch.Tensor, k: int) -> torch.Tensor:
    """``tensordot(G, G, all dims but k)``: the (d_k, d_k) Gram matrix of G's mode-k unfolding."""
    unfolded = G.movedim(k, 0).reshape(G.shape[k], -1)
    return unfolded @ unfolded.T


def precondition(M: torch.Tensor, inverses: list[torch.Tensor | None], scale: torch.Tensor) -> torch.Tensor:
    """``M ×_1 Inv_1 ×_2 Inv_2 … · scale``: each step contracts dim 0 with an inverse (symmetric) and moves the
    result to the end, so after every mode the dims are back in order (the authors' ``tensordot(Δ, Inv, ([0], [0]))``);
    a mode without a factor (None) is only moved."""
    return mode_products(M, inverses) * scale


def mode_products(M: torch.Tensor, inverses: list[torch.Tensor | None]) -> torch.Tensor:
    """:func:`precondition` without the scale (the step multiplies every parameter's by its own in one op)."""
    for inv in inverses:
        M = torch.tensordot(M, inv, dims=([0], [0])) if inv is not None else M.movedim(0, -1)
    return M


def cast_all_or_none(tensors: list[torch.Tensor | None], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """:func:`~whiten.optim.update.cast_all` of the tensors of a list that has Nones (modes without a factor)."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    out = list(tensors)
    for i, t in zip(present, cast_all([tensors[i] for i in present], dtype)):
        out[i] = t
    return out


class TNT(FisherMixin, AveragingMixin, WhitenOptimizer):
    r"""TNT (Tensor Normal Training), as the authors run it (renyiryry/tnt_neurips_2021: ``utils_shampoo.py``,
    algorithm ``matrix-normal-correctFisher-same-trace-allVariables-…-momentum-grad``; the paper's Algorithm 3).

    Every parameter, viewed as a tensor of shape :math:`(n_1, \dots, n_k)` (conv weights per ``conv_reshape``, a
    bias as one mode), has one factor :math:`U_i` (:math:`n_i \times n_i`) per mode. With :math:`\hat G` the
    gradient of the mean loss on labels sampled from the model (``opt.sample_fisher(logits)``, see
    :mod:`whiten.fisher`), :math:`G` the ordinary gradient and :math:`t` the steps taken before this one:

    .. math::
        &\text{every } T_1 \text{ steps (when sampled): } U_i \leftarrow \beta U_i + \max(w, \tfrac{1}{t+1})\,
            \hat G_{(i)} \hat G_{(i)}^\top \quad (\text{the first capture sets } U_i = \hat G_{(i)} \hat G_{(i)}^\top)\\
        &\text{every } T_2 \text{ steps (every } T_1 \text{ while } t < T_2\text{): }
            c = \big(\mathrm{tr}(U_i) / \textstyle\prod_j n_j\big)^{1/k}, \quad
            \tilde U_i = \frac{U_i}{c^{k-1} \prod_{j \ne i} n_j}, \quad
            \mathrm{Inv}_i = (\tilde U_i + \epsilon I)^{-1} \\
        &m \leftarrow \mu m + G, \qquad \Delta = m \times_1 \mathrm{Inv}_1 \cdots \times_k \mathrm{Inv}_k, \qquad
            \theta \leftarrow \theta (1 - \eta\lambda) - \eta \Delta

    "Same trace": every :math:`\tilde U_i` has mean eigenvalue :math:`c`, so :math:`\otimes_i \tilde U_i` has the
    mean eigenvalue of :math:`\hat G^2` (the Fisher's scale) and the damping :math:`\epsilon` acts equally on every
    mode. A mode longer than ``max_precond_dim`` gets no factor: it stands for :math:`c I` (inverse
    :math:`1/(c+\epsilon)`, a scalar kept in ``inverse_scale``), which keeps that scale. Inverses are exact
    (Cholesky, float64 retry; a failure keeps the previous inverse and is counted in ``counters["eigh_failures"]``).

    **Curvature.** ``sample_fisher`` is due every ``T1`` steps (the optimizer's steps: 0, T1, 2·T1, …). Until a
    parameter's first capture its inverses are the identity, so a loop that never calls ``sample_fisher`` runs SGD
    with momentum (:math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta m`); at TNT's lrs that is a small step.

    **Why its lr is orders of magnitude below other optimizers'.** The step is :math:`\eta\Delta`, with
    :math:`\Delta` the *inverse* (not an inverse root) of the damped factors applied to a momentum without
    dampening, :math:`m \approx G/(1-\mu) = 10\,G`. The factors are scaled to the second moment of
    :math:`\hat G`, the gradient of the *mean* loss over the N labels of a call, i.e. the per-label Fisher divided
    by N, and every :math:`(\tilde U_i + \epsilon I)^{-1}` has eigenvalues in :math:`(0, 1/\epsilon]`: so
    :math:`\|\Delta\| \le \epsilon^{-k} \|m\|`, with equality where that curvature is far below ε (each inverse
    is then :math:`I/\epsilon`, and TNT is SGD with momentum at lr :math:`\eta\,\epsilon^{-k}`). At ε = 0.01 the
    bound is 100 for a vector, 1e4 for a matrix, 1e6 for a 3-mode tensor (a ``"filter"`` conv weight).
    ``benchmarks/tnt_step_scale.py`` measures it with the benchmark's settings (lr 1e-6, 201 steps; see
    ``docs/results/fisher-family``): on ``lm`` (N = 4096 tokens) every factor's mean eigenvalue c is below ε
    (matrices 7e-6 to 2e-3) and :math:`\|\Delta\|/\|m\|` is 2.8e3 to 9.7e3 for the matrices and 100 for the
    vectors; on ``vit`` (N = 64 images) the matrices' c spans ε (4e-4 to 4e-2) and their ratio is 2.4e2 to 3.3e3.

    **A starting lr from the authors' settings.** Their CIFAR-10 demo (renyiryry/tnt_neurips_2021, ``demo.ipynb``)
    runs SGD with the same momentum (0.9, no dampening) at lr 0.03 and TNT at ε = 0.01. At
    :math:`\eta = 0.03\,\epsilon^{2}` = 3e-6, TNT steps no matrix further than that SGD (the bound above), and as
    far where damping dominates. Their own TNT lr, 1e-4, is 33 times larger: it relies on the curvature of their
    ResNet-32 with batches of 128 not being small against ε (had damping dominated there, its 3-mode conv weights
    would have stepped 1e-4 · 1e6 = 100 times their momentum, over 3,000 times their SGD's step). In the benchmark's
    sweep (``docs/results/fisher-family``, 500 steps, 2 seeds) the best lr is 1e-6 on ``lm`` and on ``vit``, 1e-5
    next (2.606 against 2.590; 0.557 against 0.528), 1e-7 far worse (3.016, 0.966), and 1e-4 diverged (on
    ``vit`` one seed of two). Start at :math:`0.03\,\epsilon^{2}` (3e-6 at ε = 0.01) and sweep a decade either
    side; another ε moves that lr with :math:`\epsilon^{2}`.

    **Where whiten departs from the authors' code, and why.** No warm-start pass over the training set (it needs
    the data loader; the authors' own code path without it is the one above: the first capture sets the factors,
    then weight :math:`\max(w, 1/(t+1))`). Weight decay is off for the ``vector`` and ``embedding`` roles (whiten's
    convention; the authors decay everything). Modes longer than ``max_precond_dim`` are unfactored (the authors
    factor every mode, which for a vocabulary-sized embedding is a V×V inverse). Inverses by Cholesky rather than LU
    (the same matrix up to rounding: :math:`\tilde U_i + \epsilon I` is symmetric positive definite). A factor that
    overflowed (a huge finite gradient) restarts from the next capture and keeps its inverse meanwhile
    (``counters["factor_restarts"]``). The sampled labels for ``kind="mse"`` have variance 1/2 (the Gaussian whose
    log-likelihood is ``mse_loss``; the authors' code passes ``scale=1/2``, a standard deviation).

    State per parameter (float32, float64 for float64 parameters): ``step`` (int), ``captures`` (int: sampled
    gradients folded into the factors), ``momentum`` (shape of p), ``factor_i`` and ``inverse_i``
    (:math:`n_i \times n_i`) for each factored mode i of the layout, ``trace`` (0-d: the factors' common trace, the EMA of
    :math:`\|\hat G\|^2`, which gives c), ``inverse_scale`` (0-d: the product of the
    unfactored modes' :math:`1/(c+\epsilon)`, 1 when every mode is factored), ``ema`` when averaging.

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η (default 1e-4, the authors' CIFAR-10 and MNIST setting; too large where the curvature is small
            against ε: "A starting lr" above gives 3e-6 at ε = 0.01).
        momentum: μ of :math:`m \leftarrow \mu m + G` (default 0.9; no dampening, as the authors).
        damping: ε added after the same-trace normalization (default 0.01: CIFAR-10; the authors use 0.1 on
            MNIST).
        weight_decay: λ, decoupled, ``θ *= 1 - ηλ`` before the update (default 0.0; the authors use 10 on CIFAR-10
            with lr 1e-4).
        factor_decay: β (default 0.9). factor_weight: w (default 0.1).
        update_freq: T1, steps between factor updates, i.e. between sampled backwards (default 10, CIFAR; the
            autoencoders use 1).
        inverse_freq: T2, steps between inversions after the first T2 steps (default 100, CIFAR; autoencoders 20).
        conv_reshape: ``"filter"`` (default), ``"kfac"`` or ``"none"`` (see ``CONV_RESHAPES``).
        max_precond_dim: longest mode that gets a factor (default 10000).
        max_factor_ratio: None (default: ``max_precond_dim`` only) or r ≥ 2, e.g. 20 (Shampoo's): of the modes of
            a matrix or tensor within ``max_precond_dim``, the largest is left out (the :math:`cI` of an unfactored
            mode) while the factors and inverses of the rest (``2 Σ d²`` numbers) exceed r times the parameter's
            size and 2^16 numbers, a mode of at most 1024 never (:func:`whiten.optim.sides.kept_sides`); vectors
            keep the authors' factor. As SPlus's and SOAP's: not the default, see docs/memory.md. It decides the
            state keys: do not change it once a parameter has state.
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): ``momentum`` and the inverses ``inverse_*`` stored in bfloat16, half their
            bytes; the arithmetic stays float32 (cast up for the step, rounded once back). The factors stay float32
            (an EMA at factor_decay whose small eigenvalues the inverse amplifies). Set it before the first step.
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        fisher_seed: seed of the sampled labels (default 0).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient (ordinary or sampled).
        process_group: a ``torch.distributed`` group (DDP: replicated parameters, averaged gradients); each
            parameter's step runs on one owner rank and the sampled gradients are averaged over the group.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`). A step
            that consumes sampled gradients decides on the host.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the update).

    Reference: Y. Ren and D. Goldfarb, "Tensor Normal Training for Deep Learning Models", NeurIPS 2021
    (arXiv 2106.02925); code github.com/renyiryry/tnt_neurips_2021.
    """

    BEFORE_OPTIONS = {"max_factor_ratio": None}  # a checkpoint from before the option: its factors are all there

    MEMORY_OPTIONS = {"max_precond_dim": (("factor", "inverse"), "a side larger than max_precond_dim gets no factor and "
                                        "no inverse"),
                      "max_factor_ratio": (("factor", "inverse"), "the largest mode is left out while the factors "
                                           "and inverses take more than this times the parameter (e.g. 20: a "
                                           "vocabulary side goes)"),
                      "state_dtype": (("momentum", "inverse"), "torch.bfloat16 stores the momentum and the inverses "
                                      "in half the bytes (float32 arithmetic)")}  # see memory_report

    PICKLED = {"update_freq": 10, "inverse_freq": 100}  # settings kept as attributes, with their defaults
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)

    def needs_host_check(self, work) -> bool:
        """Refresh steps of the inverses decide on the host (and, as for Sophia, steps that consume sampled
        gradients)."""
        def due(s: dict) -> bool:  # _step_group's rule, with its t for this step
            t = s["step"]
            return s["captures"] > 0 and t % (self.update_freq if t < self.inverse_freq else self.inverse_freq) == 0

        return super().needs_host_check(work) or any(due(self.state[p]) for _, params in work for p in params)

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        momentum: float = 0.9,
        damping: float = 0.01,
        weight_decay: float = 0.0,
        factor_decay: float = 0.9,
        factor_weight: float = 0.1,
        update_freq: int = 10,
        inverse_freq: int = 100,
        conv_reshape: str = "filter",
        max_precond_dim: int = 10000,
        ema_rate: float | None = None,
        fisher_seed: int = 0,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        max_factor_ratio: float | None = None,
        state_dtype: torch.dtype | str | None = None,
    ):
        check_int("update_freq", update_freq, 1)
        check_int("inverse_freq", inverse_freq, 1)
        self.update_freq, self.inverse_freq = update_freq, inverse_freq
        self._init_fisher(fisher_seed)
        defaults = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay,
                        factor_decay=factor_decay, factor_weight=factor_weight, conv_reshape=conv_reshape,
                        max_precond_dim=max_precond_dim, max_factor_ratio=max_factor_ratio, ema_rate=ema_rate,
                        role=None, state_dtype=state_dtype)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("damping", group["damping"], 0.0, low_open=True)
        check_weight_decay(group["weight_decay"])
        check_range("factor_decay", group["factor_decay"], 0.0, 1.0)
        check_range("factor_weight", group["factor_weight"], 0.0, 1.0, low_open=True)
        if group["conv_reshape"] not in CONV_RESHAPES:
            raise ValueError(f"Invalid conv_reshape: {group['conv_reshape']!r} "
                             f"(allowed: {', '.join(map(repr, CONV_RESHAPES))})")
        check_int("max_precond_dim", group["max_precond_dim"], 1)
        check_max_factor_ratio(group.get("max_factor_ratio"))
        state_dtype_option(group.get("state_dtype"))
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])

    def fisher_schedule(self, step: int) -> bool:
        return step % self.update_freq == 0

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # every parameter is stepped on its own: its numbers never depend on others

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        lay = _layout(p, group)
        n = p.numel()
        return float(n + sum(n * d + d**3 / max(self.inverse_freq, 1) for d, f in zip(lay.modes, lay.factored) if f))

    # ----- state --------------------------------------------------------------------------------------------
    def initial_state(self, p: torch.Tensor, group: dict) -> dict:
        return self._init_state(p, _layout(p, group), group)

    @staticmethod
    def _init_state(p: torch.Tensor, layout: _Layout, group: dict) -> dict:
        dtype = state_dtype(p)
        stored = stored_dtype(p, group)  # state_dtype: the momentum and the inverses in bfloat16
        state = {"step": 0, "captures": 0, "momentum": torch.zeros(p.shape, dtype=stored, device=p.device),
                 "trace": torch.zeros((), dtype=dtype, device=p.device),
                 "inverse_scale": torch.ones((), dtype=dtype, device=p.device)}
        for i, (d, f) in enumerate(zip(layout.modes, layout.factored)):
            if f:
                state[f"factor_{i}"] = torch.zeros(d, d, dtype=dtype, device=p.device)
                state[f"inverse_{i}"] = torch.eye(d, dtype=stored, device=p.device)
        return state

    # ----- the step -------------------------------------------------------------------------------------------
    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        layouts = [_layout(p, group) for p in params]
        states = []
        for p, lay in zip(params, layouts):
            if not self.state[p]:
                self.state[p] = self._init_state(p, lay, group)
            states.append(self.state[p])
        for s in states:
            s["step"] += 1
        self.update_averages(group, params, states)
        lr, mu = float(group["lr"]), group["momentum"]
        ok = self._ok  # a sync-free step's device-side flag (its writes below are masked by it)
        for p, lay, s in zip(params, layouts, states):
            t = s["step"] - 1  # steps this parameter took before this one (the authors' i)
            dtype = state_dtype(p)  # the arithmetic's (state_dtype stores the momentum and inverses in bfloat16)
            sampled = self.fisher_grad(p)
            if sampled is not None:
                self._update_factors(s, lay, sampled.to(dtype).reshape(lay.modes), t, group)
            due = t % (self.update_freq if t < self.inverse_freq else self.inverse_freq) == 0
            if due and s["captures"] > 0:
                self._refresh_inverses(s, lay, group["damping"])
        # the elementwise work as _foreach ops over the parameters of one arithmetic dtype; the mode products one
        # parameter at a time
        for dtype, members in bucket(range(len(params)), lambda i: state_dtype(params[i])).items():
            for run in cache_runs([params[i] for i in members]):  # (on a CPU, runs that stay in cache)
                part = [members[j] for j in run]
                ps, lays, ss = [params[i] for i in part], [layouts[i] for i in part], [states[i] for i in part]
                stored = [s["momentum"] for s in ss]
                # the momenta themselves where stored in that dtype (a sync-free step: new ones); rounded once into
                # a lower stored momentum
                moms = apply_all("mul", cast_all(stored, dtype), mu, ok=ok)
                torch._foreach_add_(moms, [grad_in(p, dtype) for p in ps])
                commit_all(stored, moms, ok)
                lower = [i for i in range(len(ps)) if moms[i].dtype != stored[i].dtype]
                if lower:  # the step uses the stored value
                    for i, m in zip(lower, cast_all([stored[i] for i in lower], dtype)):
                        moms[i] = m
                deltas = []
                for m, lay, s in zip(moms, lays, ss):
                    inverses = [s.get(f"inverse_{i}") for i in range(len(lay.modes))]
                    deltas.append(mode_products(m.reshape(lay.modes), cast_all_or_none(inverses, dtype)))
                deltas = self.foreach_new("mul", deltas, [s["inverse_scale"] for s in ss])
                step_all(ps, [dtype] * len(ps), [d.reshape(p.shape) for d, p in zip(deltas, ps)],
                         [1.0 - lr * group["weight_decay"] * lay.decay for lay in lays], alpha=-lr, ok=ok)

    @staticmethod
    def _update_factors(s: dict, lay: _Layout, G: torch.Tensor, t: int, group: dict) -> None:
        first = s["captures"] == 0
        weight = max(group["factor_weight"], 1.0 / (t + 1))
        for i, f in enumerate(lay.factored):
            if not f:
                continue
            U = s[f"factor_{i}"]
            if first:
                U.copy_(mode_contraction(G, i))
            else:
                U.mul_(group["factor_decay"]).add_(mode_contraction(G, i), alpha=weight)
        # tr(U_i) is the same for every mode: kept on its own so unfactored parameters have it too
        if first:
            s["trace"].copy_(G.square().sum())
        else:
            s["trace"].mul_(group["factor_decay"]).add_(G.square().sum(), alpha=weight)
        s["captures"] += 1

    def _refresh_inverses(self, s: dict, lay: _Layout, damping: float) -> None:
        modes = [i for i, f in enumerate(lay.factored) if f]
        factors = [s[f"factor_{i}"] for i in modes]
        if any(self.restart_nonfinite(factors + [s["trace"]])):
            return  # rebuilt from the next captures; the previous inverses stay
        k, total = len(lay.modes), math.prod(lay.modes)
        c = (s["trace"] / total) ** (1.0 / k)
        if not bool(torch.isfinite(c)) or float(c) <= 0.0:
            return  # a zero sampled gradient so far: nothing to normalise; keep the previous inverses
        new = []
        for i, U in zip(modes, factors):
            others = total // lay.modes[i]
            A = U / (c ** (k - 1) * others)
            A.diagonal().add_(damping)
            inv = _spd_inverse(A)
            if inv is None:
                self.counters["eigh_failures"] += 1
                return
            new.append((i, inv))
        for i, inv in new:
            s[f"inverse_{i}"].copy_(inv)
        unfactored = k - len(modes)
        s["inverse_scale"].fill_((1.0 / (c + damping)) ** unfactored if unfactored else 1.0)


def _spd_inverse(A: torch.Tensor) -> torch.Tensor | None:
    """The inverse of a symmetric positive-definite matrix by Cholesky, retried in float64; None if it fails."""
    for dtype in (A.dtype, torch.float64):
        L, info = torch.linalg.cholesky_ex(A.to(dtype))
        if int(info) == 0:
            inv = torch.cholesky_inverse(L).to(A.dtype)
            if bool(torch.isfinite(inv).all()):
                return inv
    return None
