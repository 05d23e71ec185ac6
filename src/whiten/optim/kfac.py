r"""K-FAC (Martens & Grosse 2015): Kronecker-factored natural-gradient steps whose curvature comes from the model's
own layers, through forward and backward hooks the optimizer registers itself (:mod:`whiten.optim.kfac_layers`).

For a layer with input rows :math:`a` (a 1 appended for the bias: the homogeneous coordinate) and output
gradients :math:`g`, the Fisher block of its weight matrix :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}` is
approximated by :math:`A \otimes G` with :math:`A = E[a a^\top]`, :math:`G = E[g g^\top]`; the natural gradient
:math:`(A \otimes G)^{-1} \mathrm{vec}(\nabla W)` is :math:`G^{-1} \nabla W A^{-1}`. EKFAC
(:mod:`whiten.optim.ekfac`) keeps K-FAC's eigenbasis :math:`(Q_G, Q_A)` and replaces the eigenvalues
:math:`\lambda_G \lambda_A^\top` by a running average of the squared per-example gradients in that basis.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from ..fisher import FisherMixin
from ..linalg import robust_eigh_basis
from . import kernels
from ._base import WhitenOptimizer
from .checks import (check_choice, check_int, check_lr, check_range, check_role, check_weight_decay,
                     state_dtype_option)
from .kfac_layers import Layer, LayerHooksMixin, Ready
from .stacks import bucket
from .update import apply_all, cast_all, commit_all, decays, state_dtype, step_all

__all__ = ["KFAC"]

FISHER_TYPES = ("empirical", "sampled")


class KFAC(LayerHooksMixin, FisherMixin, WhitenOptimizer):
    r"""K-FAC: Kronecker-factored approximate natural gradient (Martens & Grosse 2015), with its layers' curvature
    collected by hooks this optimizer registers on ``model``.

    For each preconditioned layer with (d_out, d_in) gradient matrix :math:`\nabla W` (bias as the last column):

    .. math::
        A &\leftarrow \beta A + (1-\beta)\,\overline{a a^\top}, \qquad
        G \leftarrow \beta G + (1-\beta)\, L\,\textstyle\sum_{rows} \delta \delta^\top
        \qquad \text{(every factor\_every steps, from } A_0 = G_0 = I) \\
        \pi &= \sqrt{\tfrac{\mathrm{tr}(A)/d_{in}}{\mathrm{tr}(G)/d_{out}}}, \quad
        A^{-1}_\lambda = (A + \pi\sqrt\lambda I)^{-1}, \quad G^{-1}_\lambda = (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1}
        \qquad \text{(every inverse\_every steps)} \\
        V &= G^{-1}_\lambda \nabla W A^{-1}_\lambda, \qquad
        \nu = \min\Big(1, \sqrt{\kappa / \textstyle\sum_{layers} \eta^2 \langle V, \nabla W \rangle}\Big) \\
        B &\leftarrow \mu B + \nu V + \omega W, \qquad W \leftarrow W - \eta B

    :math:`\overline{a a^\top}` is the mean over the layer's input rows (examples × positions: tokens, conv
    patches by im2col), :math:`\delta` the gradient of the loss with respect to the layer's output rows, and
    :math:`L` the number of loss terms the loss averages (so :math:`L\delta` is each term's own gradient and
    :math:`L \sum \delta\delta^\top = \frac{1}{L} \sum (L\delta)(L\delta)^\top`): the conventions of
    curvlinops' ``KFACLinearOperator`` (KFAC-expand, Eschenhagen et al. 2023), against which the tests check the
    factors. :math:`\pi` is Martens & Grosse's factored Tikhonov damping (§6.3), :math:`\kappa` = ``kl_clip``
    (the KL-clipping of both public PyTorch K-FACs, alecwangcq/KFAC-Pytorch and gpauloski/kfac-pytorch, on by
    default in both), :math:`\mu` = ``momentum`` (SGD momentum without dampening, as theirs), :math:`\omega` =
    ``weight_decay`` (L2 added to the clipped natural gradient, as ``torch.optim.SGD(weight_decay=)`` stepping a
    K-FAC-preconditioned gradient; alecwangcq's delay of decay by 20·TCov steps is not reproduced).

    **Fisher.** ``fisher="empirical"`` (default) takes :math:`\delta` from the ordinary ``loss.backward()``, so the
    training loop is AdamW's. ``fisher="sampled"`` is the true Fisher of the paper (one Monte-Carlo label per
    output): on factor steps call ``opt.sample_fisher(logits)`` after the forward and before the backward
    (:mod:`whiten.fisher`); the hooks then take :math:`\delta` from that extra backward, with :math:`L` = the
    number of sampled labels, and ignore the ordinary backward. Without that call the factors are not updated (a
    warning says so once).

    **L in the empirical Fisher.** The optimizer does not see the loss, so ``loss_average`` says what it averages:
    ``"batch+sequence"`` (default): every position of a Linear's or embedding's output is a loss term (a
    classifier's examples; a language model's tokens, ``cross_entropy`` over the flattened (batch·time) logits),
    and a conv layer's batch; ``"batch"``: the examples only (dim 0 of every layer's input), for a model whose
    layers see sequences but whose loss averages over examples (a ViT classifier). Either way a constant factor
    in :math:`L` shared by every layer only rescales λ and the step, which the KL clip bounds.

    **Layers.** ``nn.Linear`` (inputs of any shape: leading dims are rows), ``nn.Conv2d`` (``groups=1``, zero
    padding; the conv K-FAC of Grosse & Martens 2016 in curvlinops' KFAC-expand form: every output position is a
    row, A over im2col patches), ``nn.Embedding`` (a Linear from one-hot vectors: A is the diagonal of token
    frequencies, stored as a vector, as tensorflow/kfac's embedding factors). A module called several times
    before one step (a reused layer, gradient accumulation) averages its statistics over the calls. Biases of
    these layers are the homogeneous coordinate of the weight's matrix; their direction is the last column of
    :math:`V`, applied with the bias's own group settings.

    **Fallback.** Every other parameter the optimizer is given (norm gains and biases, free tensors such as
    positional embeddings, biases whose weight is not optimized, weights shared by several modules such as a tied
    LM head, ``MultiheadAttention``'s projections) is stepped by SGD with the group's momentum and L2 decay on its
    raw gradient: what both reference implementations do with parameters outside their K-FAC layers (they hand
    them to the same SGD). They are left out of the KL clip, as there. ``opt.fallback_parameters()`` lists them.
    A layer whose hooks caught nothing yet (e.g. a gradient set by hand) uses its raw gradient until they do,
    with a warning.

    **Hooks and memory.** One forward hook per supported module of ``model`` (registered at construction), which
    on factor steps only, in training with gradients enabled and an output that requires grad, adds the layer's
    A statistic and puts a hook on the output tensor for G. Nothing is kept between forward and backward except,
    on EKFAC's scale steps, a reference to the layer's input (which autograd keeps anyway). ``torch.no_grad()``
    evaluation costs nothing. ``opt.remove_hooks()`` detaches them (the optimizer then preconditions with the
    factors it has); ``opt.register_hooks()`` attaches them again. Hooks hold the optimizer weakly: a dropped
    optimizer's hooks do nothing, and ``torch.save(model)``/``copy.deepcopy(model)`` carry them as no-ops. A
    resumed run builds a new optimizer on the model (new hooks) and loads the state dict: factors, inverses,
    momenta and the step clock come back exactly.

    **Distributed.** With ``process_group`` (DDP) or DTensor parameters (FSDP2 ``fully_shard``; the sampled
    Fisher's extra backward then runs through FSDP's own, see :mod:`whiten.fisher`), every rank's statistics are
    averaged over the group before they enter the factors (a count vector and one flat buffer, on factor steps),
    so the factors are those of one process on the full batch (equal local batches); each layer (weight and bias
    together) is then stepped by one owner rank (whiten's cost-balanced plan), which also inverts its factors, and
    the new values are sent to the others. The KL clip's sum is all-reduced. A sampled-Fisher DDP or FSDP2 run
    equals one process that takes the ranks' batches as micro-batches (:mod:`whiten.fisher`).

    State per K-FAC weight (float32; float64 for float64 parameters): ``step`` (int), ``momentum`` (shape of p),
    ``factor_a`` (d_in, d_in) or (vocabulary,) for an embedding, ``factor_g`` (d_out, d_out), ``inverse_a``,
    ``inverse_g`` (same shapes), ``factor_updates`` and ``refreshes`` (ints). A K-FAC bias and a fallback
    parameter: ``step``, ``momentum``. With ``state_dtype=torch.bfloat16`` every ``momentum`` and the inverses are
    bfloat16, the factors float32. The step clock (``fisher_steps``, also the sampled-label stream's) travels in
    ``state_dict()["param_groups"][0]["fisher"]``.

    Args:
        params: parameters or param-group dicts (e.g. :func:`whiten.param_groups`); every one must belong to
            ``model``.
        model: the ``nn.Module`` whose layers are preconditioned (required: K-FAC's statistics come from it).
        lr: η (default 0.01, the middle of alecwangcq's CIFAR grid 3e-3…3e-2).
        momentum: μ (default 0.9). weight_decay: ω (default 0.0), off for the ``vector`` and ``embedding`` roles.
        damping: λ (default 1e-3, both references'); per group, read from the weight's group.
        factor_decay: β, the factors' running-average rate (default 0.95, both references').
        kl_clip: κ (default 1e-3, both references'; None or 0 turns the clip off).
        factor_every: steps between factor updates (default 10, alecwangcq's TCov).
        inverse_every: steps between inversions (default 100, alecwangcq's TInv).
        fisher: ``"empirical"`` (default) or ``"sampled"``. loss_average: ``"batch+sequence"`` (default) or
            ``"batch"`` (see above). fisher_seed: the sampled labels' seed (default 0).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group (DDP); default None.
        max_dim: a layer with an output side, or a non-diagonal input side, of this size or more is not
            preconditioned: its weight and bias take the SGD fallback (default 10000, SPlus's paper's side limit;
            None: every layer, as before issue 23). A 50304-vocabulary head would otherwise keep a 50304² G and its
            inverse (two 10 GB matrices); no model of whiten's tests or benchmarks has such a side, so their
            results are unchanged. (An embedding's vocabulary side is its diagonal A: not counted.) Set it at
            construction; it decides which parameters are layers.
        state_dtype: None (default: float32, float64 for float64 parameters) or ``torch.bfloat16`` (also
            ``"bf16"``/``"bfloat16"``): every ``momentum`` (μ = 0.9 adds 10% a step) and the damped inverses
            ``inverse_a``, ``inverse_g`` stored in bfloat16, half their bytes; the arithmetic stays float32 (an
            inverse is rounded once into storage when refreshed and cast up to precondition; B is cast up, updated
            and rounded once, and the step takes the stored B). The factors stay float32: EMAs at β = 0.95 whose
            changes under 4-8% bfloat16 would round away, and whose eigenvalues set the inverses. An inverse's
            rounding moves the direction by up to 2^-9 times its condition number (λ_max + δ)/δ, δ the damping:
            measured 0.3% on a layer with the factored damping, 4-11% on a factor spanning 1 to 1e-4 with
            δ = 1e-2 to 3e-3 (docs/memory.md). Set it at construction.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`). The KL
            clip's ν is then computed on the device (float64, from the same sum) and scales the directions by a
            multiply before the momentum's add, where the default path passes it as the add's Python ``alpha``:
            the same ν, the momenta within rounding of the default path's. Factor, refresh (and EKFAC's scale)
            steps, a layer's first refresh, and steps that consume sampled gradients decide on the host.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the KL clip's sum and the update).

    References: J. Martens, R. Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
    ICML 2015; R. Grosse, J. Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
    ICML 2016; R. Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures", NeurIPS 2023.
    """

    scale_every: int | None = None  # EKFAC's
    # settings kept as attributes, with their defaults; the model travels with the optimizer so that a copy hooks
    # its own copy of the model
    MEMORY_OPTIONS = {"max_dim": (("factor_a", "factor_g", "inverse_a", "inverse_g", "basis_a", "basis_g", "scale"),
                                  "a layer with a side of max_dim or more (its factor would be max_dim² or more) "
                                  "takes the SGD fallback"),
                      "state_dtype": (("momentum", "inverse_a", "inverse_g"), "torch.bfloat16 stores the momenta and "
                                      "the inverses in half the bytes (float32 arithmetic)")}  # see memory_report
    STATE_DTYPE_KEYS = ("momentum", "inverse_a", "inverse_g")  # see kfac_layers.LayerHooksMixin._init_state

    PICKLED = {"model": None, "fisher": "empirical", "loss_average": "batch+sequence", "kl_clip": 1e-3,
               "factor_every": 10, "inverse_every": 100, "scale_every": None}
    SYNC_FREE = True  # its ordinary step masks every write, ν on the device (whiten.optim.deferred)

    def __init__(
        self,
        params,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        factor_every: int = 10,
        inverse_every: int = 100,
        fisher: str = "empirical",
        loss_average: str = "batch+sequence",
        fisher_seed: int = 0,
        nonfinite: str = "skip",
        process_group=None,
        max_dim: int | None = 10000,
        state_dtype: torch.dtype | str | None = None,
        sync_free: bool = False,
        compiled: bool = False,
    ):
        check_choice("fisher", fisher, FISHER_TYPES)
        if kl_clip is not None:
            check_range("kl_clip", kl_clip, 0.0)
        check_int("factor_every", factor_every, 1)
        check_int("inverse_every", inverse_every, 1)
        self._set_model(model, loss_average, max_dim)
        self.fisher = fisher
        self.kl_clip = float(kl_clip) if kl_clip else 0.0
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self._init_fisher(fisher_seed)
        defaults = dict(lr=lr, momentum=momentum, damping=damping, factor_decay=factor_decay,
                        weight_decay=weight_decay, role=None, state_dtype=state_dtype)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)
        self.register_hooks()

    # ----- arguments --------------------------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("damping", group["damping"], 0.0, 1e6, low_open=True)
        check_range("factor_decay", group["factor_decay"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_role(group["role"])
        state_dtype_option(group.get("state_dtype"))
        self._check_in_model(group)

    # ----- state ----------------------------------------------------------------------------------------------
    def _layer_shapes(self, layer: Layer) -> dict:
        a = (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in)
        g = (layer.d_out, layer.d_out)
        return {"factor_a": a, "factor_g": g, "inverse_a": a, "inverse_g": g}

    LAYER_COUNTERS = ("factor_updates", "refreshes")

    def _start_layer(self, state: dict, layer: Layer) -> None:
        for key in ("factor_a", "factor_g"):
            _set_identity(state[key])

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        kind = self.plan().role.get(id(p))
        if kind is None or kind[0] == "bias":
            return float(p.numel())
        layer = kind[1]
        m, n = layer.d_out, layer.d_in
        # the two products of the preconditioning every step; the inversions' m³ + n³ spread over their period
        return float(m * n * (m + n) + (m ** 3 + (n if layer.diagonal_a else n ** 3)) / self.inverse_every)

    # ----- the step ---------------------------------------------------------------------------------------------
    def needs_host_check(self, work) -> bool:
        """Steps that fold statistics or refresh decide on the host (their eigendecompositions, the statistics the
        hooks caught), as do a layer's steps until its first refresh, a layer whose weight state is created now,
        and (FisherMixin) steps that consume sampled gradients: the sync-free step is the preconditioning, the KL
        clip and the update only."""
        step = self.fisher_steps
        if (self._pending or self._factor_step(step) or self._scale_step(step) or step % self.inverse_every == 0
                or super().needs_host_check(work)):
            return True
        stepped = {id(p) for _, params in work for p in params}
        for layer in self.plan().layers:
            if id(layer.weight) in stepped or (layer.bias is not None and id(layer.bias) in stepped):
                s = self.state.get(layer.weight)
                if not s or (s["factor_updates"] > 0 and s["refreshes"] == 0):
                    return True
        return False

    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:  # used by this step, or dropped with a skipped one
            self._pending, self._ready = {}, {}

    def before_step(self, work) -> None:
        step = self.fisher_steps  # the mixin advances it
        super().before_step(work)
        self._ready = self._collect(step)

    def apply_step(self, work) -> None:
        ctx = self._dist[1] if self._dist is not None else None
        step = self.fisher_steps - 1  # before_step advanced the clock
        plan = self.plan()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        view = (lambda p: ctx.view(p)) if ctx is not None else (lambda p: p)
        owned = [layer for layer in plan.layers if ctx is None or ctx.owns(layer.weight)]

        # 1. factors and refreshes of the layers this process owns
        for layer in owned:
            ready = self._ready.get(layer)
            if ready is not None:
                group = group_of[id(layer.weight)]
                self._fold(layer, self._layer_state(layer, view, group), ready, group)
        self._refresh_due(step, [(layer, self.state.get(view(layer.weight)), group_of[id(layer.weight)])
                                 for layer in owned])
        self._after_refresh(ctx, step, plan.layers)

        # 2. the natural gradient of each owned layer that has a gradient (its matrix products one layer at a time)
        with_grad = {id(q) for _, params in work for q in params}
        items = []  # (parameter (view), group, direction, preconditioned)
        layers = []  # (layer, its (parameter, view) pairs, state, gradient matrix)
        for layer in owned:
            pairs = [(layer.weight, view(layer.weight))]
            if layer.bias is not None:
                pairs.append((layer.bias, view(layer.bias)))
            if not any(id(q) in with_grad for _, q in pairs):
                continue
            state = self._layer_state(layer, view, group_of[id(layer.weight)])
            dtype = state_dtype(layer.weight)  # the arithmetic's (state_dtype may store momenta, inverses lower)
            grads = [q.grad if id(q) in with_grad else None for _, q in pairs]
            layers.append((layer, pairs, state, grads, dtype))
        layers = [(layer, pairs, state, M)
                  for (layer, pairs, state, _, _), M in zip(layers, _gradient_matrices(layers))]
        preconditioned = iter(self._precondition_all([(layer, state, M, group_of[id(layer.weight)])
                                                      for layer, _, state, M in layers if state["refreshes"]]))
        for layer, pairs, state, M in layers:
            V = next(preconditioned) if state["refreshes"] else M
            for (p, q), d in zip(pairs, layer.split(V)):
                if id(q) in with_grad:
                    items.append((q, group_of[id(p)], d, True))

        # 3. the KL clip: one factor for every K-FAC direction, from the sum over all layers (and ranks) of
        # lr²<V, grad>, each parameter's term summed on its own
        nu = 1.0
        ok = self._ok  # a sync-free step's device-side flag: every write below is masked by it
        if self.kl_clip > 0:
            vg = 0.0
            if items and kernels.active([d for _, _, d, _ in items], [q.grad for q, _, _, _ in items]):
                values = kernels.step_values([float(group["lr"]) ** 2 for _, group, _, _ in items], items[0][2].device)
                vg = _kl_kernel([d for _, _, d, _ in items], [q.grad for q, _, _, _ in items], values)
                if ok is None:
                    vg = float(vg)
            elif items:
                dirs = [d for _, _, d, _ in items]
                terms = [None] * len(items)
                for dtype, members in bucket(range(len(items)), lambda i: dirs[i].dtype).items():
                    products = torch._foreach_mul([dirs[i] for i in members],
                                                  cast_all([items[i][0].grad for i in members], dtype))
                    for i, t in zip(members, products):
                        terms[i] = t
                # no _foreach sum: a stacked sum would add in another order than each tensor's own (a CPU sum of
                # a large tensor on several threads adds the threads' parts), so each term is one reduction
                sums = [t.sum(dtype=torch.float64) for t in terms]
                torch._foreach_mul_(sums, [float(group["lr"]) ** 2 for _, group, _, _ in items])
                vg = torch.stack([t.to(sums[0].device) for t in sums]).sum()
                if ok is None:
                    vg = float(vg)
            if ctx is not None:
                vg = ctx.sum_values([vg])[0]
            if isinstance(vg, torch.Tensor):  # sync-free: ν on the device, nothing read
                nu = _device_nu(vg, self.kl_clip)
            elif vg != 0.0:
                nu = min(1.0, math.sqrt(self.kl_clip / abs(vg))) if math.isfinite(vg) else 0.0

        # 4. updates: the K-FAC directions, and the raw gradients of the fallback parameters
        layer_views = {id(view(p)) for p in self._layer_params()}
        for group, params in work:
            items.extend((q, group, q.grad, False) for q in params if id(q) not in layer_views)
        for q, group, _, _ in items:
            state = self.state.get(q)
            if not state:
                state = self.state[q] = self._init_state(q, group)
            state["step"] += 1
        for (_, dtype), part in bucket(items, lambda item: (id(item[1]), state_dtype(item[0]))).items():
            self._update(part[0][1], dtype, [q for q, _, _, _ in part],
                         cast_all([d for _, _, d, _ in part], dtype), [nu if pre else 1.0 for _, _, _, pre in part],
                         ok)

    def _update(self, group: dict, dtype: torch.dtype, params: list[torch.Tensor], directions: list[torch.Tensor],
                nus: list, ok: torch.Tensor | None = None) -> None:
        """B <- mu B + nu d + wd p; p <- p - lr B, for the parameters of one group whose state's dtype (the
        arithmetic's) is ``dtype``: in that dtype for low-precision parameters, the momenta stored per state_dtype.
        ``nus``: Python numbers, or (sync-free) ν as a 0-d device tensor; ``ok``: a sync-free step's flag (the new
        momenta are computed aside and committed)."""
        stored = [self.state[p]["momentum"] for p in params]
        # the momenta themselves where stored in that dtype (a sync-free step: new ones)
        bufs = apply_all("mul", cast_all(stored, dtype), group["momentum"], ok=ok)
        for nu, members in bucket(range(len(params)), lambda i: nus[i]).items():
            if isinstance(nu, torch.Tensor):  # a multiply, then the add (a tensor is no add's alpha)
                torch._foreach_add_([bufs[i] for i in members],
                                    torch._foreach_mul([directions[i] for i in members], nu))
            else:
                torch._foreach_add_([bufs[i] for i in members], [directions[i] for i in members], alpha=nu)
        decayed = [i for i, p in enumerate(params) if decays(p, group)]
        if group["weight_decay"] and decayed:
            torch._foreach_add_([bufs[i] for i in decayed], cast_all([params[i] for i in decayed], dtype),
                                alpha=group["weight_decay"])
        lower = [i for i in range(len(params)) if bufs[i] is not stored[i]]
        if lower:  # state_dtype: round once into storage; the step takes the stored value
            commit_all([stored[i] for i in lower], [bufs[i] for i in lower], ok)
            for i, b in zip(lower, cast_all([stored[i] for i in lower], dtype)):
                bufs[i] = b
        step_all(params, [dtype] * len(params), bufs, [1.0] * len(params), alpha=-float(group["lr"]), ok=ok)

    # ----- factors, inverses, preconditioning (K-FAC) ----------------------------------------------------------------
    def _fold(self, layer: Layer, state: dict, ready: Ready, group: dict) -> None:
        """Factor EMA from the identity (alecwangcq's initialisation): the first steps stay close to SGD while the
        averages fill, where copying the first statistics (kfac-pytorch) preconditions with one batch's rank-
        deficient factors until the next inversion. A and G enter together or not at all."""
        if ready.a is None or ready.g is None:
            return
        beta = group["factor_decay"]
        for key, value in (("factor_a", ready.a), ("factor_g", ready.g)):  # float32 under state_dtype too
            state[key].mul_(beta).add_(value.to(state[key].dtype), alpha=1.0 - beta)
        state["factor_updates"] += 1

    def _refresh_due(self, step: int, items) -> None:
        due = [(layer, s, g) for layer, s, g in items if s and s["factor_updates"] > 0
               and (step % self.inverse_every == 0 or s["refreshes"] == 0)]
        if not due:
            return
        # an overflowed factor (a huge finite gradient) restarts from its next statistics; the layer keeps its
        # previous inverses this time
        restarted = self.restart_nonfinite([s[k] for _, s, _ in due for k in ("factor_a", "factor_g")])
        for i, (layer, s, group) in enumerate(due):
            if restarted[2 * i] or restarted[2 * i + 1]:
                for key, bad in (("factor_a", restarted[2 * i]), ("factor_g", restarted[2 * i + 1])):
                    if bad:
                        _set_identity(s[key])  # where a fresh factor starts
                continue
            if self._refresh(layer, s, group):
                s["refreshes"] += 1

    def _eigh(self, F: torch.Tensor):
        """(eigenvalues clamped at 0, eigenvectors) of a symmetric factor, retried in float64; None on failure."""
        result = robust_eigh_basis([F], None, values=True)
        # a retry counts where it recovered the factor; one that failed too counts as a failure only
        self.counters["eigh_retries"] += result.recovered
        if not result.ok[0]:
            self.counters["eigh_failures"] += 1
            return None
        return result.values[0], result.vectors[0]

    @staticmethod
    def _pi(A: torch.Tensor, G: torch.Tensor, diagonal_a: bool) -> float:
        """Martens & Grosse's π = sqrt((tr A / d_A) / (tr G / d_G)); 1 where a trace is 0 (no statistics)."""
        ta = float(A.mean()) if diagonal_a else float(A.diagonal().mean())
        tg = float(G.diagonal().mean())
        if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
            return 1.0
        return math.sqrt(ta / tg)

    def _refresh(self, layer: Layer, s: dict, group: dict) -> bool:
        """K-FAC: the damped inverses (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ from eigendecompositions (eigenvalues
        clamped at 0, so the damping keeps them finite); a failed eigendecomposition keeps the old inverses."""
        pi = self._pi(s["factor_a"], s["factor_g"], layer.diagonal_a)
        root = math.sqrt(group["damping"])
        eg = self._eigh(s["factor_g"])
        ea = None if layer.diagonal_a else self._eigh(s["factor_a"])
        if eg is None or (ea is None and not layer.diagonal_a):
            return False
        # copy_: rounded once into a bfloat16 inverse (state_dtype)
        if layer.diagonal_a:
            s["inverse_a"].copy_(1.0 / (s["factor_a"].clamp_min(0) + pi * root))
        else:
            L, Q = ea
            s["inverse_a"].copy_((Q / (L + pi * root)) @ Q.T)
        L, Q = eg
        s["inverse_g"].copy_((Q / (L + root / pi)) @ Q.T)
        return True

    def _after_refresh(self, ctx, step: int, layers) -> None:
        pass

    def _precondition_all(self, batch: list[tuple[Layer, dict, torch.Tensor, dict]]) -> list[torch.Tensor]:
        """:meth:`_precondition` of each (layer, state, gradient matrix, group)."""
        return [self._precondition(*entry) for entry in batch]

    def _precondition(self, layer: Layer, s: dict, M: torch.Tensor, group: dict) -> torch.Tensor:
        inv_g, inv_a = s["inverse_g"].to(M.dtype), s["inverse_a"].to(M.dtype)  # state_dtype: cast up
        if layer.diagonal_a:
            return (inv_g @ M) * inv_a
        return inv_g @ M @ inv_a


def _gradient_matrices(layers: list) -> list[torch.Tensor]:
    """Each layer's (d_out, d_in) gradient matrix (:meth:`Layer.matrix`), from (layer, pairs, state, gradients,
    dtype). Under ``compiled=True`` the weight-and-bias concatenations of the layers that have both gradients in
    their state's dtype are one kernel (the same copies, exact), instead of one launch per layer."""
    out = [None] * len(layers)
    joined = [i for i, (layer, _, _, grads, dtype) in enumerate(layers)
              if layer.kind != "embedding" and len(grads) == 2 and all(g is not None and g.dtype == dtype
                                                                       for g in grads)]
    if joined and kernels.active([layers[i][3][0] for i in joined], [layers[i][3][1] for i in joined]):
        for i, M in zip(joined, _join_kernel([layers[i][3][0] for i in joined], [layers[i][3][1] for i in joined])):
            out[i] = M
    for i, (layer, _, _, grads, dtype) in enumerate(layers):
        if out[i] is None:
            out[i] = layer.matrix(grads[0], grads[1] if len(grads) > 1 else None, dtype)
    return out


@kernels.kernel
def _join_kernel(weights, biases):
    """[W | b] for each layer: the weight's gradient as (d_out, d_in) and the bias's as a last column."""
    return [torch.cat([w.reshape(w.shape[0], -1), b.reshape(-1, 1)], dim=1) for w, b in zip(weights, biases)]


@kernels.kernel
def _kl_kernel(directions, grads, values):
    """The KL clip's Σ lr²·<d, g> in float64 (compiled=True, whiten.optim.kernels): the products in the direction's
    dtype, each summed in float64, as the eager step; ``values``: each term's lr²."""
    sums = [(d * g.to(d.dtype)).sum(dtype=torch.float64) for d, g in zip(directions, grads)]
    return (torch.stack(sums) * values).sum()


def _device_nu(vg: torch.Tensor, kl_clip: float) -> torch.Tensor:
    """The KL clip's ν = min(1, sqrt(κ / |vg|)) (0 for a non-finite vg, 1 for vg = 0) as a 0-d tensor on vg's
    device, in vg's float64: the default path's Python arithmetic (a division and a square root, each correctly
    rounded in IEEE double), with no read."""
    nu = torch.div(torch.full_like(vg, kl_clip), vg.abs()).sqrt_().clamp_max_(1.0)
    nu = torch.where(vg.isfinite(), nu, torch.zeros_like(nu))
    return torch.where(vg == 0, torch.ones_like(nu), nu)


def _set_identity(F: torch.Tensor) -> None:
    """A factor's starting value: I, or ones for a diagonal factor stored as a vector."""
    if F.ndim == 1:
        F.fill_(1.0)
    else:
        F.zero_().diagonal().fill_(1.0)


# Names that moved out of this module but are still looked up here: ``from whiten.optim.kfac import EKFAC`` (EKFAC's
# module imports this one, so it cannot be imported at the top), and the hooks that pickles of models saved with
# K-FAC attached (``torch.save(model)``) name as ``whiten.optim.kfac._Hook``.
_MOVED = {"EKFAC": "ekfac", "_Hook": "kfac_layers"}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
