r"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou 2020): a quasi-Newton step per layer whose inverse curvature is
a Kronecker product :math:`H_g \otimes H_a`. The input side :math:`H_a` follows :math:`(A + \sqrt\lambda I)^{-1}`
for the running second moment :math:`A` of the layer's inputs; the pre-activation side :math:`H_g` is built by
damped BFGS (or L-BFGS) updates from the change of the pre-activations and of their gradients between the
mini-batch's forward/backward and a second one on the same mini-batch after the step, which the optimizer asks
for through ``step(closure)``. The hooks are K-FAC's (:mod:`whiten.optim.kfac_layers`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import torch
from torch import nn

from ._base import WhitenOptimizer
from .checks import check_choice, check_int, check_lr, check_range, check_role, check_weight_decay
from .kfac_layers import Layer, LayerHooksMixin, a_statistic, input_rows, output_rows, Stats, layer_stat_dtype
from .update import decays, step_to

__all__ = ["KBFGS"]

VARIANTS = ("K-BFGS", "K-BFGS(L)")
POWELL = 0.2  # μ₁ of the Powell damping (the official code's constant)
SKIP_RATIO = 1e-4  # a pair with sᵀy <= 1e-4 |s|² |g| leaves H unchanged (the official code's rule)


# ----- kernels (no optimizer state; branch-free, so a step never waits for the device) ------------------------------

def bfgs_update_(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                 allow: torch.Tensor | bool = True) -> None:
    r"""The BFGS update of an inverse, in place:
    :math:`H \leftarrow H + (\rho^2 y^\top H y + \rho) s s^\top - \rho (s (Hy)^\top + (Hy) s^\top)`,
    :math:`\rho = 1/s^\top y`; skipped where :math:`s^\top y \le \max(0, 10^{-4} |s|^2 |g|)`, where the result is
    not finite, and where ``allow`` is False."""
    sy, ss = s @ y, s @ s
    Hy = H @ y
    ok = (sy > 0) & (sy > SKIP_RATIO * ss * torch.sqrt(g @ g)) & allow
    rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))
    new = H + (rho * rho * (y @ Hy) + rho) * torch.outer(s, s) - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
    H.copy_(torch.where(ok & torch.isfinite(new).all(), new, H))


def lbfgs_apply(S: torch.Tensor, Y: torch.Tensor, gamma: float, V: torch.Tensor) -> torch.Tensor:
    r""":math:`H V` for the L-BFGS inverse :math:`H` on :math:`\gamma I` of the pairs in the rows of ``S`` and ``Y``
    (oldest first; zero rows are empty slots), in the compact form of Byrd, Nocedal & Schnabel (1994) that the
    official code applies: with :math:`R` the upper triangle of :math:`S Y^\top` and :math:`D` its diagonal,

    .. math::
        H V = \gamma V + S^\top R^{-\top} \big[(D + \gamma Y Y^\top) R^{-1} S V - \gamma Y V\big]
              - \gamma Y^\top R^{-1} S V.

    An empty slot has a zero row and column in :math:`R` but a 1 on its diagonal, so it adds nothing."""
    SY = S @ Y.T
    D = SY.diagonal()
    R = torch.triu(SY)
    R.diagonal().copy_(torch.where(D > 0, D, torch.ones_like(D)))
    P = torch.linalg.solve_triangular(R, S @ V, upper=True)
    top = D[:, None] * P + gamma * ((Y @ Y.T) @ P - Y @ V)
    Q = torch.linalg.solve_triangular(R.T, top, upper=False)
    return gamma * V + S.T @ Q - gamma * (Y.T @ P)


def lbfgs_append_(S: torch.Tensor, Y: torch.Tensor, s: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                  allow: torch.Tensor | bool = True) -> None:
    """Append the pair (s, y) as the newest row of ``S`` and ``Y`` (the oldest leaves a full memory), in place,
    under the rule of :func:`bfgs_update_`: kept only where sᵀy > 1e-4 |s|² |g| and |s|² is finite."""
    ss = s @ s
    ok = torch.isfinite(ss) & (s @ y > SKIP_RATIO * ss * torch.sqrt(g @ g)) & allow
    for M, v in ((S, s), (Y, y)):
        M.copy_(torch.where(ok, torch.cat([M[1:], v[None]]), M))


def double_damping(s: torch.Tensor, y: torch.Tensor, Hy: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The paper's double damping of a pair (Powell's, then Levenberg–Marquardt's), as the official code runs it:

    .. math::
        s &\leftarrow \theta s + (1-\theta) H y,\ \ \theta = \tfrac{(1-\mu_1)\, y^\top H y}{y^\top H y - s^\top y}
        \quad \text{where } s^\top y \le \mu_1 y^\top H y \\
        y &\leftarrow \theta y + (1-\theta) s,\ \ \theta = \tfrac{(1-\mu_2)\, s^\top s}{s^\top s - s^\top y}
        \quad \text{where } s^\top y \le \mu_2 s^\top s

    (:math:`\mu_1 = 0.2`, :math:`\mu_2 = \sqrt\lambda`); ``Hy`` is :math:`H_g y` with the current :math:`H_g`. A
    zero :math:`y^\top H y` or :math:`s^\top s` (an all-zero vector, where the official code divides by zero) leaves
    the pair as it is."""
    sy, yHy = s @ y, y @ Hy
    powell = (sy <= POWELL * yHy) & (yHy > 0)
    theta = (1.0 - POWELL) * yHy / torch.where(powell, yHy - sy, torch.ones_like(yHy))
    s = torch.where(powell, theta * s + (1.0 - theta) * Hy, s)
    ss, sy = s @ s, s @ y
    lm = (sy <= mu * ss) & (ss > 0)
    theta = (1.0 - mu) * ss / torch.where(lm, ss - sy, torch.ones_like(ss))
    y = torch.where(lm, theta * y + (1.0 - theta) * s, y)
    return s, y


# ----- the optimizer ----------------------------------------------------------------------------------------------

class KBFGS(LayerHooksMixin, WhitenOptimizer):
    r"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020), as the authors' code
    (renyiryry/kbfgs_neurips2020_public) runs them, with the layers' statistics collected by hooks this optimizer
    registers on ``model``.

    **How to call it.** K-BFGS needs a second forward and backward on the same mini-batch after each step. Pass a
    closure that re-evaluates the loss, torch's convention for optimizers that re-evaluate
    (``torch.optim.LBFGS``)::

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)   # two evaluations of the closure; returns the first loss (before the step)

    ``step(closure)`` calls the closure at the current parameters (its gradients make the step; statistics from
    any earlier forward are dropped), steps, and calls it again at the new parameters, where the hooks take the
    second pass's pre-activations and their gradients. Afterwards ``p.grad`` holds the second evaluation's
    gradients. **Without a closure**, ``step()`` steps with the gradients and hook statistics of the forward and
    backward that preceded it (AdamW's loop), updates :math:`A` and :math:`H_a`, and leaves :math:`H_g` as it is
    (there is no second pass to take a pair from): a preconditioned step, not K-BFGS; it warns once where a layer
    was stepped that way.

    For each layer with input rows :math:`a` (a 1 appended for a bias), pre-activation rows :math:`h` and their
    gradients :math:`\delta`, and the (d_out, d_in) gradient matrix :math:`\nabla W` (bias as the last column):

    .. math::
        m &\leftarrow \rho\, m + (1-\rho)(\nabla W + \omega W), \qquad
        A \leftarrow \beta A + (1-\beta)\, \overline{a a^\top} \\
        W &\leftarrow W - \eta\, H_g\, m\, H_a \\
        s &= \bar h - \bar h^+, \quad y = L(\bar\delta - \bar\delta^+), \qquad
        \bar s \leftarrow \kappa \bar s + (1-\kappa) s, \quad \bar y \leftarrow \kappa \bar y + (1-\kappa) y \\
        H_g &\leftarrow \mathrm{BFGS}\big(H_g, \mathrm{damp}(\bar s, \bar y)\big), \qquad
        H_a \leftarrow \mathrm{BFGS}\big(H_a, (H_a \bar a, (A + \sqrt\lambda I) H_a \bar a)\big)

    Bars are means over the rows (examples × positions), :math:`{}^+` marks the second pass (after the step) and
    :math:`L` is the number of loss terms the loss averages (``loss_average``, as :class:`whiten.KFAC`'s), so
    :math:`L\bar\delta` is the mean of each term's own gradient (the official code's ``N · a.grad``). ``damp`` is
    the double damping (Powell's with :math:`\mu_1 = 0.2` on :math:`H_g`, then Levenberg–Marquardt's with
    :math:`\mu_2 = \sqrt\lambda`) and a BFGS update is skipped where :math:`s^\top y \le 10^{-4}|s|^2|g|` (g: the
    first pass's :math:`L\bar\delta` for :math:`H_g`, :math:`\bar a` for :math:`H_a`). :math:`H_a` is a
    Hessian-action BFGS estimate of :math:`(A + \sqrt\lambda I)^{-1}`, one rank-two update per step from the
    exact inverse at the first step (the official code's ``Hessian-action-BFGS``, there for both variants).
    K-BFGS keeps :math:`H_g` dense from :math:`\gamma I`; K-BFGS(L) keeps the last ``memory`` damped pairs and
    applies their L-BFGS inverse on :math:`\gamma I` (the official code applies the identity until the first pair
    is kept; the same at its :math:`\gamma = 1`). Every update runs every step, as there.

    **The first A.** The official code starts :math:`A` from its mean over one pass of forwards over the training
    set and skips the running average at the first step. Here :math:`A` starts at the first step's statistic, or,
    inside ``with opt.warm_start():``, at the mean over the forwards run there (no backward needed,
    ``torch.no_grad()`` allowed; before the first step): the official initialisation, over the batches given.
    :math:`H_a` then starts at :math:`(A + \sqrt\lambda I)^{-1}`.

    **Layers.** ``nn.Linear`` (the paper's; leading dims are rows) and ``nn.Conv2d`` (``groups=1``, zero padding;
    im2col rows as :class:`whiten.KFAC`'s, an extension the paper does not cover). **Fallback**: every other
    parameter (embeddings, norm gains, free tensors, tied weights) takes the same rule with identity curvature,
    :math:`m \leftarrow \rho m + (1-\rho)(g + \omega\theta)`, :math:`\theta \leftarrow \theta - \eta m`;
    ``opt.fallback_parameters()`` lists them. Weight decay :math:`\omega` is the official code's L2 term
    :math:`\tau` added to the gradient before the momentum, off for the ``vector`` and ``embedding`` roles
    (whiten's rule; the official code decays biases too).

    **Distributed.** With ``process_group`` (DDP) or DTensor parameters (FSDP2 ``fully_shard``) every rank's
    statistics of each pass are averaged over the group (as :class:`whiten.KFAC`'s), so the step is one
    process's on the full batch (equal local batches); each layer (weight and bias) has one owner rank that keeps
    its state, steps it and sends the new values. Call ``step(closure)`` on every rank: the closure's second
    evaluation is a collective of the wrapper (its backward reduces gradients).

    State per K-BFGS weight (float32; float64 for float64 parameters): ``step``, ``momentum`` (shape of p),
    ``factor_a`` and ``inverse_a`` (d_in, d_in), ``s_avg`` and ``y_avg`` (d_out,), ``a_updates`` (int), and
    ``inverse_g`` (d_out, d_out) for K-BFGS or ``pairs_s`` and ``pairs_y`` (memory, d_out; zero rows are empty)
    for K-BFGS(L). A K-BFGS bias and a fallback parameter: ``step``, ``momentum``.

    Args:
        params: parameters or param-group dicts (e.g. :func:`whiten.param_groups`); every one must belong to
            ``model``.
        model: the ``nn.Module`` whose layers are preconditioned (required).
        lr: η (default 0.3, the official ``train_model``'s). The damping keeps the eigenvalues of H_a below
            :math:`1/\sqrt\lambda` and H_g's near it along the pairs, so :math:`|H_g m H_a|` is about
            :math:`|m|`: η lives on SGD's scale (the benchmark's lm and vit tasks: best 4.64, 10 diverged).
        momentum: ρ of the gradient's running average (default 0.9, the official code's).
        damping: λ (default 0.3, the official code's); :math:`\sqrt\lambda` damps :math:`A` and is
            :math:`\mu_2`; in (0, 1). Per group, read from the weight's group.
        factor_decay: β, :math:`A`'s running-average rate (default 0.9, the official code's).
        pair_momentum: κ, the running average of the pairs (default 0.9, the official code's for mini-batches; 0
            for full-batch training, as there).
        weight_decay: ω (default 1e-5, the official code's τ).
        variant: ``"K-BFGS"`` (default) or ``"K-BFGS(L)"``. memory: K-BFGS(L)'s number of pairs (default 100,
            the official code's).
        hg_init: γ, the scale of :math:`H_g`'s start (default 1.0, the official code's).
        loss_average: ``"batch+sequence"`` (default) or ``"batch"``, as :class:`whiten.KFAC`'s.
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group (DDP); default None.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; K-BFGS's per-layer update has none yet: the same step).
        max_dim: a layer with an output side, or a non-diagonal input side, of this size or more is not
            preconditioned: its weight and bias take the SGD fallback (default 10000, SPlus's paper's side limit;
            None: every layer, as before issue 23). A 50304-vocabulary head would otherwise keep a 50304² G and its
            inverse (two 10 GB matrices); no model of whiten's tests or benchmarks has such a side, so their
            results are unchanged. (An embedding's vocabulary side is its diagonal A: not counted.) Set it at
            construction; it decides which parameters are layers.

    Reference: D. Goldfarb, Y. Ren, A. Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural
    Networks", NeurIPS 2020 (arXiv 2006.08877).
    """

    needs_closure = True  # the benchmark harness (and any loop) passes step() a closure that re-evaluates the batch
    LAYER_KINDS = ("linear", "conv2d")
    STATS = ("a", "mean_in", "mean_out", "grad")
    factor_every = 1  # the hooks' statistics are taken at every step
    MEMORY_OPTIONS = {"max_dim": (("factor_a", "inverse_a", "inverse_g", "pairs_s", "pairs_y"), "a layer with a side "
                                  "of max_dim or more takes the SGD fallback")}  # see memory_report

    PICKLED = {"variant": "K-BFGS", "memory": 100, "hg_init": 1.0}

    def __init__(
        self,
        params,
        model: nn.Module,
        lr: float = 0.3,
        momentum: float = 0.9,
        damping: float = 0.3,
        factor_decay: float = 0.9,
        pair_momentum: float = 0.9,
        weight_decay: float = 1e-5,
        variant: str = "K-BFGS",
        memory: int = 100,
        hg_init: float = 1.0,
        loss_average: str = "batch+sequence",
        nonfinite: str = "skip",
        process_group=None,
        max_dim: int | None = 10000,
        compiled: bool = False,
    ):
        check_choice("variant", variant, VARIANTS)
        check_int("memory", memory, 1)
        check_range("hg_init", hg_init, 0.0, 1e6, low_open=True)
        self._set_model(model, loss_average, max_dim)
        self.variant = variant
        self.memory = memory
        self.hg_init = float(hg_init)
        self._reset_passes()
        defaults = dict(lr=lr, momentum=momentum, damping=damping, factor_decay=factor_decay,
                        pair_momentum=pair_momentum, weight_decay=weight_decay, role=None)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, compiled=compiled)
        self.register_hooks()

    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("damping", group["damping"], 0.0, 1.0, low_open=True, high_open=True)
        check_range("factor_decay", group["factor_decay"], 0.0, 1.0, high_open=True)
        check_range("pair_momentum", group["pair_momentum"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_role(group["role"])
        self._check_in_model(group)

    # ----- state ----------------------------------------------------------------------------------------------
    @property
    def limited(self) -> bool:
        return self.variant == "K-BFGS(L)"

    def _layer_shapes(self, layer: Layer) -> dict:
        m, n = layer.d_out, layer.d_in
        shapes = {"factor_a": (n, n), "inverse_a": (n, n), "s_avg": (m,), "y_avg": (m,)}
        if self.limited:
            shapes.update(pairs_s=(self.memory, m), pairs_y=(self.memory, m))
        else:
            shapes["inverse_g"] = (m, m)
        return shapes

    LAYER_COUNTERS = ("a_updates",)

    def _start_layer(self, state: dict, layer: Layer) -> None:
        if not self.limited:
            state["inverse_g"].diagonal().fill_(self.hg_init)

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        kind = self.plan().role.get(id(p))
        if kind is None or kind[0] == "bias":
            return float(p.numel())
        m, n = kind[1].d_out, kind[1].d_in
        g_side = 4 * self.memory * m * n if self.limited else m * m * n
        return float(g_side + m * n * n + m * m + n * n)

    # ----- the hooks: what each pass takes ---------------------------------------------------------------------
    def _stat_shape(self, layer: Layer, name: str) -> tuple:
        return {"a": (layer.d_in, layer.d_in), "mean_in": (layer.d_in,), "mean_out": (layer.d_out,),
                "grad": (layer.d_out,)}[name]

    def _reset_passes(self) -> None:
        self._pass = 1  # 1: the step's gradients; 2: the closure's evaluation after the step; "warm": warm_start
        self._warm: dict = {}  # layer -> Stats of warm_start's forwards
        self._warm_due = False
        self._carry: dict = {}  # owned layer -> (first pass's mean pre-activation, L·mean gradient), this step
        self._stepped = False

    def _on_forward(self, module, args, kwargs, output) -> None:
        layer = self._plan.by_module.get(id(module))  # the plan is rebuilt whenever the param groups change
        if layer is None or layer.module is not module or not isinstance(output, torch.Tensor):
            return
        warm = self._pass == "warm"
        if not warm and not (torch.is_grad_enabled() and output.requires_grad):  # evaluation: nothing to do
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        dtype = layer_stat_dtype(layer)
        stats = (self._warm if warm else self._pending).setdefault(layer, Stats())
        if warm or self._pass == 1:
            X = input_rows(layer, x.detach(), dtype)
            stats.add("a", a_statistic(layer, X))
            if warm:
                return
            stats.add("mean_in", X.reshape(-1, X.shape[-1]).mean(0))
        H = output_rows(layer, output.detach(), dtype)
        stats.add("mean_out", H.reshape(-1, H.shape[-1]).mean(0))
        hook = weakref.ref(self)

        def on_grad(grad, layer=layer):
            opt = hook()
            if opt is None:
                return
            Y = output_rows(layer, grad.detach(), dtype)
            rows = Y.reshape(-1, Y.shape[-1])
            # L times the mean over the rows: each loss term's own gradient, averaged
            terms = opt._loss_terms(layer, Y) / max(rows.shape[0], 1)
            opt._pending.setdefault(layer, Stats()).add("grad", rows.sum(0) * terms)

        output.register_hook(on_grad)

    @contextlib.contextmanager
    def warm_start(self):
        """Forwards run inside (``torch.no_grad()`` allowed) give the first step's :math:`A`: the mean of their
        input statistics, as the official code's pass over the training set before training. Layers whose
        :math:`A` has started already are not changed. With several ranks, enter it on every rank."""
        self._pass, self._warm_due = "warm", True
        try:
            yield self
        finally:
            self._pass = 1

    # ----- the step ---------------------------------------------------------------------------------------------
    def step(self, closure=None):
        """One K-BFGS step. ``closure`` (zero_grad, forward, backward, return the loss) is evaluated before the step
        and again after it (see the class docstring); returns the first evaluation's loss."""
        def first():
            self._pending, self._pass = {}, 1  # this evaluation's statistics only
            return closure()

        self._stepped, self._carry = False, {}
        try:
            loss = super().step(first if closure is not None else None)
            # every rank decides alike (the skip is agreed, the plan is the same); no layer, no second pass
            if self._stepped and self.plan().layers:
                if closure is not None:
                    self._pass = 2
                    with torch.enable_grad():
                        closure()
                    self._pass = 1
                    self._update_pairs(self._reduce_pending())
                elif self._carry and "closure" not in self._warned:
                    self._warned.add("closure")
                    warnings.warn("KBFGS.step() without a closure: the step used the current H_g, which only a "
                                  "second evaluation after the step updates; pass step(closure) with a closure "
                                  "that re-evaluates the loss (zero_grad, forward, backward). This warning is "
                                  "shown once.", RuntimeWarning, stacklevel=3)
            return loss
        finally:
            self._pending, self._ready, self._carry, self._pass = {}, {}, {}, 1

    def before_step(self, work) -> None:
        super().before_step(work)
        self._ready = self._collect(0)
        if self._warm_due:  # every rank entered warm_start: one more reduction, on every rank
            self._warm_due = False
            pending, self._pending = self._pending, self._warm
            try:
                warm = self._reduce_pending()
            finally:
                self._pending, self._warm = pending, {}
            for layer, ready in warm.items():
                if ready.a is not None and layer in self._ready:
                    self._ready[layer].a_warm = ready.a
        self._stepped = True

    def apply_step(self, work) -> None:
        ctx = self._dist[1] if self._dist is not None else None
        plan = self.plan()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        view = (lambda p: ctx.view(p)) if ctx is not None else (lambda p: p)
        with_grad = {id(q) for _, params in work for q in params}
        started = []
        for layer in plan.layers:
            if ctx is not None and not ctx.owns(layer.weight):
                continue
            pairs = [(layer.weight, view(layer.weight))]
            if layer.bias is not None:
                pairs.append((layer.bias, view(layer.bias)))
            if not any(id(q) in with_grad for _, q in pairs):
                continue
            state = self._layer_state(layer, view)
            group = group_of[id(layer.weight)]
            moms = []
            for p, q in pairs:
                s = state if p is layer.weight else self._param_state(q)
                if id(q) in with_grad:
                    self._momentum(q, group_of[id(p)], s)
                moms.append(s["momentum"])
            ready = self._ready.get(layer)
            if ready is not None and ready.a is not None:
                self._fold_a(state, ready, group)
            M = layer.matrix(moms[0], moms[1] if len(moms) > 1 else None, moms[0].dtype)
            D = self._precondition(state, M) if state["a_updates"] else M
            for (p, q), d in zip(pairs, layer.split(D)):
                if id(q) in with_grad:
                    s = state if p is layer.weight else self.state[q]
                    s["step"] += 1
                    step_to(q, s["momentum"].dtype, d, -float(group_of[id(p)]["lr"]))
            if state["a_updates"] and ready is not None and ready.mean_in is not None:
                self._update_inverse_a(state, ready.mean_in, group)
                started.append(state)
            if ready is not None and ready.mean_out is not None and ready.grad is not None:
                self._carry[layer] = (ready.mean_out, ready.grad)
        # an overflowed A (a huge finite input) starts again from the next statistic, with a fresh inverse
        for state, bad in zip(started, self.restart_nonfinite([s["factor_a"] for s in started])):
            if bad:
                state["a_updates"] = 0
        layer_views = {id(view(p)) for p in self._layer_params()}
        for group, params in work:
            for q in params:
                if id(q) not in layer_views:  # the fallback: the same momentum, identity curvature
                    s = self._param_state(q)
                    self._momentum(q, group, s)
                    s["step"] += 1
                    step_to(q, s["momentum"].dtype, s["momentum"], -float(group["lr"]))

    def _param_state(self, q: torch.Tensor) -> dict:
        if not self.state.get(q):
            self.state[q] = self._init_state(q)
        return self.state[q]

    @staticmethod
    def _momentum(q: torch.Tensor, group: dict, state: dict) -> None:
        """m <- rho m + (1 - rho)(g + wd q): the official code's running average of the L2-regularised gradient."""
        m = state["momentum"]
        g = q.grad.to(m.dtype)
        wd = group["weight_decay"] * decays(q, group)
        if wd:
            g = g + wd * q.to(m.dtype)
        rho = group["momentum"]
        m.mul_(rho).add_(g, alpha=1.0 - rho)

    def _fold_a(self, state: dict, ready, group: dict) -> None:
        """A's running average; at its first update A starts at the warm-start mean (or this step's statistic)
        and H_a at (A + √λ I)⁻¹."""
        A = state["factor_a"]
        if state["a_updates"]:
            beta = group["factor_decay"]
            A.mul_(beta).add_(ready.a.to(A.dtype), alpha=1.0 - beta)
            state["a_updates"] += 1
            return
        A.copy_(ready.a_warm if ready.a_warm is not None else ready.a)
        damped = A + math.sqrt(group["damping"]) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:  # a non-finite statistic: start at the next one (one host sync, at the first step only)
            A.zero_()
            return
        state["inverse_a"].copy_(torch.cholesky_inverse(L))
        state["a_updates"] = 1

    def _update_inverse_a(self, state: dict, mean_in: torch.Tensor, group: dict) -> None:
        """H_a's Hessian-action BFGS update towards (A + √λ I)⁻¹: s = H_a ā, y = (A + √λ I) s."""
        Ha = state["inverse_a"]
        a = mean_in.to(Ha.dtype)
        s = Ha @ a
        y = state["factor_a"] @ s + math.sqrt(group["damping"]) * s
        bfgs_update_(Ha, s, y, a)

    def _precondition(self, state: dict, M: torch.Tensor) -> torch.Tensor:
        if self.limited:
            G = lbfgs_apply(state["pairs_s"], state["pairs_y"], self.hg_init, M)
        else:
            G = state["inverse_g"] @ M
        return G @ state["inverse_a"]

    @torch.no_grad()
    def _update_pairs(self, second: dict) -> None:
        """After the closure's second evaluation: each owned layer's pair (s, y), its running average, the double
        damping and the update of H_g (a pair that is not finite, from a diverged second pass, is dropped)."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for layer, (out1, grad1) in self._carry.items():
            after = second.get(layer)
            if after is None or after.mean_out is None or after.grad is None:
                continue
            state = self.state[layer.weight]  # outside the step the state is keyed by the parameter itself
            group = group_of[id(layer.weight)]
            s_avg, y_avg = state["s_avg"], state["y_avg"]
            s = (out1 - after.mean_out).to(s_avg.dtype)
            y = (grad1 - after.grad).to(s_avg.dtype)
            ok = torch.isfinite(s).all() & torch.isfinite(y).all()
            kappa = group["pair_momentum"]
            s_avg.copy_(torch.where(ok, kappa * s_avg + (1.0 - kappa) * s, s_avg))
            y_avg.copy_(torch.where(ok, kappa * y_avg + (1.0 - kappa) * y, y_avg))
            g = grad1.to(s_avg.dtype)
            mu = math.sqrt(group["damping"])
            if self.limited:
                S, Y = state["pairs_s"], state["pairs_y"]
                Hy = lbfgs_apply(S, Y, self.hg_init, y_avg[:, None])[:, 0]
                sd, yd = double_damping(s_avg, y_avg, Hy, mu)
                lbfgs_append_(S, Y, sd, yd, g, allow=ok)
            else:
                Hg = state["inverse_g"]
                sd, yd = double_damping(s_avg, y_avg, Hg @ y_avg, mu)
                bfgs_update_(Hg, sd, yd, g, allow=ok)

    # ----- checkpoints and copies (whiten.optim.checkpoints) -------------------------------------------------------
    def reset_transient(self) -> None:
        super().reset_transient()
        self._reset_passes()
