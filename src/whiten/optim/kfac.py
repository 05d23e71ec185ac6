r"""K-FAC (Martens & Grosse 2015) and EKFAC (George et al. 2018): Kronecker-factored natural-gradient steps whose
curvature comes from the model's own layers, through forward and backward hooks the optimizer registers itself.

For a layer with input rows :math:`a` (a 1 appended for the bias: the homogeneous coordinate) and output
gradients :math:`g`, the Fisher block of its weight matrix :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}` is
approximated by :math:`A \otimes G` with :math:`A = E[a a^\top]`, :math:`G = E[g g^\top]`; the natural gradient
:math:`(A \otimes G)^{-1} \mathrm{vec}(\nabla W)` is :math:`G^{-1} \nabla W A^{-1}`. EKFAC keeps K-FAC's
eigenbasis :math:`(Q_G, Q_A)` and replaces the eigenvalues :math:`\lambda_G \lambda_A^\top` by a running average of
the squared per-example gradients in that basis.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_flat, broadcast_flat
from ..fisher import FisherMixin
from ..linalg import robust_eigh_basis
from ..roles import NO_DECAY_ROLES, role_from_shape
from ._base import (WhitenOptimizer, check_int, check_lr, check_range, check_role, check_weight_decay,
                    state_dtype)

__all__ = ["KFAC", "EKFAC"]

FISHER_TYPES = ("empirical", "sampled")
LOSS_AVERAGES = ("batch+sequence", "batch")
# EKFAC's per-example gradients of a weight-sharing layer (sequences, conv positions) are formed for a chunk of
# examples at a time, at most this many elements, so memory stays bounded whatever the batch.
CHUNK_ELEMENTS = 1 << 22


# ----- which modules are K-FAC layers ------------------------------------------------------------------------------

def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"embedding"`` for a module K-FAC preconditions, None otherwise.

    ``nn.MultiheadAttention``'s ``out_proj`` is a Linear whose hooks never fire (the attention calls
    ``F.multi_head_attention_forward`` with its weight; kfac-pytorch issue #267), so it is not a layer here: its
    parameters take the fallback. Grouped convolutions (``groups > 1``) and non-zero padding modes are not the
    im2col product K-FAC's conv factors describe: fallback too."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    if isinstance(module, nn.Embedding) and not module.sparse:
        return "embedding"
    return None


@dataclass(eq=False)
class _Layer:
    """One preconditioned layer: its module, its weight and (when the optimizer steps it) its bias. The gradient
    matrix is (d_out, d_in): a Linear's (out, in [+1]), a conv's (out, in·kh·kw [+1]), an embedding's transposed
    weight (dim, vocabulary), since the embedding is a Linear from one-hot vectors whose A factor is diagonal."""

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def d_out(self) -> int:
        return self.weight.shape[1] if self.kind == "embedding" else self.weight.shape[0]

    @property
    def d_in(self) -> int:
        if self.kind == "embedding":
            return self.weight.shape[0]
        return math.prod(self.weight.shape[1:]) + (self.bias is not None)  # shapes only: no DTensor indexing

    @property
    def diagonal_a(self) -> bool:
        return self.kind == "embedding"

    def matrix(self, w_grad: torch.Tensor | None, b_grad: torch.Tensor | None, dtype) -> torch.Tensor:
        """The (d_out, d_in) gradient matrix in ``dtype``; a missing gradient counts as zeros."""
        w = torch.zeros(self.weight.shape, dtype=dtype, device=self.weight.device) if w_grad is None \
            else w_grad.to(dtype)
        if self.kind == "embedding":
            return w.T
        w = w.reshape(self.weight.shape[0], -1)
        if self.bias is None:
            return w
        b = torch.zeros(self.bias.shape, dtype=dtype, device=w.device) if b_grad is None else b_grad.to(dtype)
        return torch.cat([w, b.reshape(-1, 1)], dim=1)

    def split(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`matrix`: the weight's and the bias's parts, in their shapes."""
        if self.kind == "embedding":
            return M.T, None
        if self.bias is None:
            return M.reshape(self.weight.shape), None
        return M[:, :-1].reshape(self.weight.shape), M[:, -1].reshape(self.bias.shape)


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col: (batch, positions, in·kh·kw), the order of ``weight.view(out, -1)``'s columns."""
    if x.ndim == 3:  # unbatched input
        x = x.unsqueeze(0)
    if isinstance(module.padding, str):  # "same"/"valid": the module's own (possibly asymmetric) zero padding
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = 0
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def _input_rows(layer: _Layer, x: torch.Tensor, dtype) -> torch.Tensor:
    """The layer's input as (examples, positions, d_in) in ``dtype``, a column of ones appended for the bias;
    for an embedding, the token indices as (examples, positions)."""
    if layer.kind == "embedding":
        return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    if layer.kind == "conv2d":
        X = _conv_patches(layer.module, x).to(dtype)
    else:
        X = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, x.shape[-1]).to(dtype)
    if layer.bias is not None:
        X = torch.cat([X, X.new_ones(X.shape[:-1] + (1,))], dim=-1)
    return X


def _output_rows(layer: _Layer, g: torch.Tensor, dtype) -> torch.Tensor:
    """The output gradient as (examples, positions, d_out) in ``dtype``."""
    if layer.kind == "conv2d":
        if g.ndim == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2).to(dtype)
    return g.reshape(g.shape[0] if g.ndim > 1 else 1, -1, g.shape[-1]).to(dtype)


def _a_statistic(layer: _Layer, X: torch.Tensor) -> torch.Tensor:
    """E[a aᵀ] over all rows (examples × positions); the token frequencies for an embedding."""
    if layer.kind == "embedding":
        idx = X.reshape(-1)
        return torch.bincount(idx, minlength=layer.d_in).to(layer_stat_dtype(layer)) / max(idx.numel(), 1)
    rows = X.reshape(-1, X.shape[-1])
    return rows.T @ rows / max(rows.shape[0], 1)


def layer_stat_dtype(layer: _Layer) -> torch.dtype:
    return state_dtype(layer.weight)


def _per_example_correction(layer: _Layer, X: torch.Tensor, Y: torch.Tensor, QA: torch.Tensor | None,
                            QG: torch.Tensor) -> torch.Tensor:
    r"""EKFAC's :math:`\sum_n (Q_G^\top \nabla W_n Q_A)^2` over the examples n of a batch, where
    :math:`\nabla W_n = \sum_t g_{n,t} a_{n,t}^\top` sums the positions t (tokens, conv positions) of example n
    (the per-example gradients of George et al. and of curvlinops' EKFAC). Without weight sharing (one position)
    the square of a rank-one matrix is the outer product of the squares, one (d_out × n)(n × d_in) product.
    With sharing the rotated per-example gradients are formed a chunk of examples at a time."""
    Yr = Y @ QG  # (n, t, d_out)
    if layer.kind == "embedding":  # QA = I: the rotated per-example gradient is sparse in the vocabulary
        n, t = X.shape
        keys = (torch.arange(n, device=X.device).unsqueeze(1) * layer.d_in + X).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = Yr.new_zeros(unique.numel(), Yr.shape[-1]).index_add_(0, inverse, Yr.reshape(-1, Yr.shape[-1]))
        out = Yr.new_zeros(layer.d_in, Yr.shape[-1]).index_add_(0, unique % layer.d_in, sums.square_())
        return out.T
    Xr = X @ QA  # (n, t, d_in)
    if Xr.shape[1] == 1:
        return Yr[:, 0].square().T @ Xr[:, 0].square()
    out = Yr.new_zeros(Yr.shape[-1], Xr.shape[-1])
    chunk = max(1, CHUNK_ELEMENTS // (Yr.shape[-1] * Xr.shape[-1]))
    for i in range(0, Xr.shape[0], chunk):
        P = Yr[i:i + chunk].transpose(1, 2) @ Xr[i:i + chunk]  # (chunk, d_out, d_in)
        out += P.square_().sum(0)
    return out


@dataclass
class _Stats:
    """One layer's statistics since the last step: sums over hook calls and how many calls."""

    a: torch.Tensor | None = None
    a_calls: int = 0
    g: torch.Tensor | None = None
    g_calls: int = 0
    corr: torch.Tensor | None = None
    corr_calls: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old.add_(value))
        setattr(self, name + "_calls", getattr(self, name + "_calls") + 1)


@dataclass
class _Ready:
    """One layer's statistics for this step (means over calls, and over ranks in a distributed run)."""

    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    corr: torch.Tensor | None = None


class _Hook:
    """A forward hook that reaches its optimizer through a weak reference, so a dropped optimizer neither stays
    alive through the model nor keeps working; it pickles (and deep-copies along with a model) as a no-op."""

    def __init__(self, optimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self, module, args, kwargs, output):
        opt = self.optimizer()
        if opt is not None:
            opt._on_forward(module, args, kwargs, output)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.optimizer = lambda: None

    def __deepcopy__(self, memo):
        dead = _Hook.__new__(_Hook)
        dead.optimizer = lambda: None
        return dead


@dataclass(eq=False)
class _Plan:
    """Which parameter is what, for the current param groups: K-FAC layers and the fallback parameters."""

    layers: list[_Layer] = field(default_factory=list)
    by_module: dict = field(default_factory=dict)  # id(module) -> _Layer
    role: dict = field(default_factory=dict)  # id(param) -> ("weight" | "bias", _Layer) for K-FAC parameters


# ----- the optimizers ------------------------------------------------------------------------------------------


class KFAC(FisherMixin, WhitenOptimizer):
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
    parameter: ``step``, ``momentum``. The step clock (``fisher_steps``, also the sampled-label stream's) travels in
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

    References: J. Martens, R. Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
    ICML 2015; R. Grosse, J. Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
    ICML 2016; R. Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures", NeurIPS 2023.
    """

    scale_every: int | None = None  # EKFAC's
    PICKLED_SETTINGS = ("fisher", "loss_average", "kl_clip", "factor_every", "inverse_every", "scale_every")

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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be the torch.nn.Module whose layers it "
                            f"preconditions, got {type(model).__name__}")
        if fisher not in FISHER_TYPES:
            raise ValueError(f"Invalid fisher: {fisher!r} (allowed: {', '.join(map(repr, FISHER_TYPES))})")
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"Invalid loss_average: {loss_average!r} "
                             f"(allowed: {', '.join(map(repr, LOSS_AVERAGES))})")
        if kl_clip is not None:
            check_range("kl_clip", kl_clip, 0.0)
        check_int("factor_every", factor_every, 1)
        check_int("inverse_every", inverse_every, 1)
        self.model = model
        self.fisher = fisher
        self.loss_average = loss_average
        self.kl_clip = float(kl_clip) if kl_clip else 0.0
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self._model_params = {id(p) for p in model.parameters()}
        self._plan_key = None
        self._plan = _Plan()
        self._pending: dict = {}  # layer -> _Stats since the last step
        self._ready: dict = {}  # layer -> _Ready for the step in progress
        self._handles: list = []
        self._warned: set = set()
        self._replicas: dict = {}  # EKFAC, distributed: id(weight) -> (basis_a, basis_g) held by every rank
        self._init_fisher(fisher_seed)
        defaults = dict(lr=lr, momentum=momentum, damping=damping, factor_decay=factor_decay,
                        weight_decay=weight_decay, role=None)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group)
        self.register_hooks()

    # ----- arguments --------------------------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        check_lr("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("damping", group["damping"], 0.0, 1e6, low_open=True)
        check_range("factor_decay", group["factor_decay"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_role(group["role"])
        outside = [i for i, p in enumerate(group["params"]) if id(p) not in self._model_params]
        if outside:
            p = group["params"][outside[0]]
            raise ValueError(f"{type(self).__name__}: parameter {outside[0]} of the group (shape {tuple(p.shape)}) "
                             "is not a parameter of model; K-FAC steps the parameters of the model it hooks "
                             "(pass model.parameters() or whiten.param_groups(model) of that model)")

    # ----- hooks ------------------------------------------------------------------------------------------------
    def register_hooks(self) -> None:
        """Attach the forward hooks to every supported module of the model (done at construction)."""
        if self._handles:
            return
        hook = _Hook(self)
        self._handles = [m.register_forward_hook(hook, with_kwargs=True)
                         for m in self.model.modules() if layer_kind(m) is not None]
        weakref.finalize(self, _remove_handles, list(self._handles))

    def remove_hooks(self) -> None:
        """Detach the hooks: the model runs as if no K-FAC were attached; the optimizer keeps stepping with the
        factors it has. Statistics caught since the last step are dropped."""
        _remove_handles(self._handles)
        self._handles = []
        self._pending = {}

    @property
    def hooks_registered(self) -> bool:
        return bool(self._handles)

    def _factor_step(self, step: int) -> bool:
        return step % self.factor_every == 0

    def _scale_step(self, step: int) -> bool:
        return False

    def fisher_schedule(self, step: int) -> bool:
        return self.fisher == "sampled" and (self._factor_step(step) or self._scale_step(step))

    def fisher_params(self) -> list[torch.Tensor]:
        # Asking autograd for every layer's weight makes the sampled backward reach every layer's output, where
        # the hooks are; the gradients themselves are not used.
        weights = [layer.weight for layer in self.plan().layers]
        return weights or [p for g in self.param_groups for p in g["params"]]

    def capture_fisher(self, grads: list, n: int) -> None:
        """K-FAC takes the sampled backward's output gradients in its hooks; the parameter gradients are dropped."""

    def _on_forward(self, module, args, kwargs, output) -> None:
        step = self.fisher_steps
        factors, scale = self._factor_step(step), self._scale_step(step)
        if not (factors or scale) or not torch.is_grad_enabled():  # most steps, and evaluation: nothing to do
            return
        layer = self._plan.by_module.get(id(module))  # the plan is rebuilt whenever the param groups change
        if (layer is None or layer.module is not module or not isinstance(output, torch.Tensor)
                or not output.requires_grad):
            return
        basis = self._scale_basis(layer) if scale else None
        if not factors and basis is None:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        X = _input_rows(layer, x.detach(), layer_stat_dtype(layer))
        if factors:
            self._pending.setdefault(layer, _Stats()).add("a", _a_statistic(layer, X))
        hook = weakref.ref(self)
        keep = X if basis is not None else None

        def on_grad(grad, layer=layer, factors=factors, X=keep, basis=basis):
            opt = hook()
            if opt is not None:
                opt._on_output_grad(layer, factors, X, basis, grad)

        output.register_hook(on_grad)

    def _on_output_grad(self, layer: _Layer, factors: bool, X, basis, grad: torch.Tensor) -> None:
        sampled = self.fisher == "sampled"
        if bool(self.sampling_fisher) != sampled:  # the ordinary backward in sampled mode, or the reverse
            return
        Y = _output_rows(layer, grad.detach(), layer_stat_dtype(layer))
        if sampled:
            terms = self.fisher_batch_n
        elif self.loss_average == "batch" or layer.kind == "conv2d":
            terms = Y.shape[0]
        else:
            terms = Y.shape[0] * Y.shape[1]
        stats = self._pending.setdefault(layer, _Stats())
        if factors:
            rows = Y.reshape(-1, Y.shape[-1])
            stats.add("g", (rows.T @ rows).mul_(terms))
        if X is not None:
            stats.add("corr", _per_example_correction(layer, X, Y, *basis).mul_(terms))

    def _scale_basis(self, layer: _Layer):
        return None

    # ----- which parameter is what ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.plan()

    def plan(self) -> _Plan:
        """The K-FAC layers and the roles of the parameters, rebuilt when the param groups change."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(map(id, params))
        if key == self._plan_key:
            return self._plan
        ours = {id(p) for p in params}
        holders: dict = {}
        for _, m in self.model.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                holders.setdefault(id(p), {})[id(m)] = m
        plan = _Plan()
        for name, m in self.model.named_modules():
            kind = layer_kind(m)
            w = getattr(m, "weight", None) if kind else None
            if not isinstance(w, torch.Tensor) or id(w) not in ours or len(holders.get(id(w), ())) > 1:
                continue  # not optimized here, or tied to another module: fallback
            b = getattr(m, "bias", None) if kind != "embedding" else None
            if b is not None and (id(b) not in ours or len(holders.get(id(b), ())) > 1):
                b = None
            layer = _Layer(name=name, module=m, kind=kind, weight=w, bias=b)
            plan.layers.append(layer)
            plan.by_module[id(m)] = layer
            plan.role[id(w)] = ("weight", layer)
            if b is not None:
                plan.role[id(b)] = ("bias", layer)
        self._plan, self._plan_key = plan, key
        return plan

    def fallback_parameters(self) -> list[torch.Tensor]:
        """The parameters stepped by the fallback (SGD with momentum on the raw gradient)."""
        role = self.plan().role
        return [p for g in self.param_groups for p in g["params"] if id(p) not in role]

    # ----- state ----------------------------------------------------------------------------------------------
    def _layer_shapes(self, layer: _Layer) -> dict:
        a = (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in)
        g = (layer.d_out, layer.d_out)
        return {"factor_a": a, "factor_g": g, "inverse_a": a, "inverse_g": g}

    def _init_state(self, p: torch.Tensor) -> dict:
        dtype = state_dtype(p)
        state = {"step": 0, "momentum": torch.zeros(p.shape, dtype=dtype, device=p.device)}
        kind = self.plan().role.get(id(p))
        if kind is not None and kind[0] == "weight":
            for key, shape in self._layer_shapes(kind[1]).items():
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
            for key in ("factor_a", "factor_g"):
                _set_identity(state[key])
            state["factor_updates"] = 0
            state["refreshes"] = 0
        return state

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        shapes = {"step": None, "momentum": tuple(p.shape)}
        kind = self.plan().role.get(id(p))
        if kind is not None and kind[0] == "weight":
            shapes.update(self._layer_shapes(kind[1]))
            shapes.update(factor_updates=None, refreshes=None)
        return shapes

    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        kind = self.plan().role.get(id(p))
        if kind is None or kind[0] == "bias":
            return float(p.numel())
        layer = kind[1]
        m, n = layer.d_out, layer.d_in
        # the two products of the preconditioning every step; the inversions' m³ + n³ spread over their period
        return float(m * n * (m + n) + (m ** 3 + (n if layer.diagonal_a else n ** 3)) / self.inverse_every)

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # every layer is computed on its own (no stacks)

    def owner_unit(self, p: torch.Tensor, group: dict, gi: int, position: int):
        kind = self.plan().role.get(id(p))
        if kind is not None:  # a layer's weight and bias share one preconditioned matrix: one owner for both
            return ("layer", id(kind[1]))
        return super().owner_unit(p, group, gi, position)

    # ----- the step ---------------------------------------------------------------------------------------------
    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:  # used by this step, or dropped with a skipped one
            self._pending, self._ready = {}, {}

    def before_step(self, work) -> None:
        step = self.fisher_steps  # the mixin advances it
        super().before_step(work)
        self._ready = self._collect(step)

    def _collect(self, step: int) -> dict:
        """This step's statistics per layer (means over hook calls; over ranks in a distributed run)."""
        pending, self._pending = self._pending, {}
        layers = self.plan().layers
        ctx = self._dist[1] if self._dist is not None else None
        names = ("a", "g", "corr")
        ready = {}
        if ctx is None:
            current = {id(layer) for layer in layers}
            for layer, s in pending.items():
                if id(layer) in current:
                    ready[layer] = _Ready(*(getattr(s, k).div_(getattr(s, k + "_calls")) if getattr(s, k) is not None
                                            else None for k in names))
        else:
            ready = self._all_reduce_stats(ctx, layers, pending)
        if self._factor_step(step):
            self._check_caught(layers, ready)
        return ready

    def _all_reduce_stats(self, ctx, layers, pending) -> dict:
        """Sum every rank's per-call sums and call counts, then divide: the mean over all ranks' calls. One
        float64 vector of counts and one flat buffer per statistic dtype."""
        names = ("a", "g", "corr")
        counts = torch.zeros(len(layers) * 3, dtype=torch.float64)
        for i, layer in enumerate(layers):
            s = pending.get(layer)
            if s is not None:
                for j, k in enumerate(names):
                    counts[3 * i + j] = getattr(s, k + "_calls")
        counts = all_reduce_flat([counts], ctx.group)[0].cpu().tolist()
        shapes = []
        for i, layer in enumerate(layers):
            a = (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in)
            for j, shape in enumerate((a, (layer.d_out, layer.d_out), (layer.d_out, layer.d_in))):
                if counts[3 * i + j] > 0:
                    shapes.append((i, j, shape))
        by_dtype: dict = {}
        for i, j, shape in shapes:
            by_dtype.setdefault(layer_stat_dtype(layers[i]), []).append((i, j, shape))
        ready = {layer: _Ready() for i, layer in enumerate(layers) if any(counts[3 * i + j] for j in range(3))}
        items = [item for _, dtype_items in sorted(by_dtype.items(), key=lambda kv: str(kv[0]))
                 for item in dtype_items]
        parts = []
        for i, j, shape in items:
            s = pending.get(layers[i])
            value = getattr(s, names[j]) if s is not None else None
            parts.append(value if value is not None
                         else torch.zeros(shape, dtype=layer_stat_dtype(layers[i]), device=layers[i].weight.device))
        for (i, j, shape), summed in zip(items, all_reduce_flat(parts, ctx.group)):
            setattr(ready[layers[i]], names[j], summed.view(shape).to(layers[i].weight.device) / counts[3 * i + j])
        return ready

    def _check_caught(self, layers, ready) -> None:
        """Warn once when a factor step caught nothing for a layer, or only half of its statistics."""
        missing = [layer.name or type(layer.module).__name__ for layer in layers
                   if layer.weight.grad is not None and (layer not in ready or ready[layer].a is None)]
        half = [layer.name for layer in layers if layer in ready and ready[layer].a is not None
                and ready[layer].g is None]
        if half and self.fisher == "sampled" and "sampled" not in self._warned:
            self._warned.add("sampled")
            warnings.warn(f"{type(self).__name__}(fisher='sampled'): no sampled backward reached {len(half)} "
                          f"layer(s) (first: {half[0]!r}) at a factor step, so their factors were not updated; "
                          "call opt.sample_fisher(logits) after the forward and before loss.backward()",
                          RuntimeWarning, stacklevel=8)
        if missing and "missing" not in self._warned:
            self._warned.add("missing")
            warnings.warn(f"{type(self).__name__}: the hooks caught no activations for {len(missing)} layer(s) "
                          f"with a gradient (first: {missing[0]!r}) at a factor step (hooks removed, the forward "
                          "run under no_grad, a gradient set by hand, or a module whose forward bypasses its own "
                          "call); such a layer keeps its current factors, and one that never caught any is "
                          "stepped with its raw gradient. This warning is shown once.", RuntimeWarning,
                          stacklevel=8)

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
                self._fold(layer, self._layer_state(layer, view), ready, group_of[id(layer.weight)])
        self._refresh_due(step, [(layer, self.state.get(view(layer.weight)), group_of[id(layer.weight)])
                                 for layer in owned])
        self._after_refresh(ctx, step, plan.layers)

        # 2. the natural gradient of each owned layer that has a gradient
        with_grad = {id(q) for _, params in work for q in params}
        items, products = [], []  # (parameter (view), group, direction, preconditioned), lr²<V, grad> terms
        for layer in owned:
            pairs = [(layer.weight, view(layer.weight))]
            if layer.bias is not None:
                pairs.append((layer.bias, view(layer.bias)))
            if not any(id(q) in with_grad for _, q in pairs):
                continue
            state = self._layer_state(layer, view)
            dtype = state["momentum"].dtype
            grads = [q.grad if id(q) in with_grad else None for _, q in pairs]
            M = layer.matrix(grads[0], grads[1] if len(grads) > 1 else None, dtype)
            V = self._precondition(layer, state, M, group_of[id(layer.weight)]) if state["refreshes"] else M
            for (p, q), d in zip(pairs, layer.split(V)):
                if id(q) in with_grad:
                    group = group_of[id(p)]
                    products.append((d * q.grad.to(dtype)).sum(dtype=torch.float64) * float(group["lr"]) ** 2)
                    items.append((q, group, d, True))

        # 3. the KL clip: one factor for every K-FAC direction, from the sum over all layers (and ranks)
        nu = 1.0
        if self.kl_clip > 0:
            vg = float(torch.stack([t.to(products[0].device) for t in products]).sum()) if products else 0.0
            if ctx is not None:
                vg = ctx.sum_values([vg])[0]
            if vg != 0.0:
                nu = min(1.0, math.sqrt(self.kl_clip / abs(vg))) if math.isfinite(vg) else 0.0

        # 4. updates: the K-FAC directions, and the raw gradients of the fallback parameters
        layer_views = {id(view(p)) for p in self._layer_params()}
        for group, params in work:
            items.extend((q, group, q.grad, False) for q in params if id(q) not in layer_views)
        for q, group, d, preconditioned in items:
            state = self.state.get(q)
            if not state:
                state = self.state[q] = self._init_state(q)
            state["step"] += 1
            self._update(q, group, state, d.to(state["momentum"].dtype), nu if preconditioned else 1.0)

    def _layer_state(self, layer: _Layer, view) -> dict:
        w = view(layer.weight)
        if not self.state.get(w):
            self.state[w] = self._init_state(layer.weight)
        return self.state[w]

    def _layer_params(self):
        for layer in self.plan().layers:
            yield layer.weight
            if layer.bias is not None:
                yield layer.bias

    @staticmethod
    def _decays(p: torch.Tensor, group: dict) -> bool:
        return (group["role"] or role_from_shape(p)) not in NO_DECAY_ROLES

    def _update(self, p: torch.Tensor, group: dict, state: dict, direction: torch.Tensor, nu: float) -> None:
        """B <- mu B + nu d + wd p; p <- p - lr B (in the state dtype for low-precision parameters)."""
        buf = state["momentum"]
        lr, wd = float(group["lr"]), group["weight_decay"] * self._decays(p, group)
        buf.mul_(group["momentum"]).add_(direction, alpha=nu)
        if wd:
            buf.add_(p.to(buf.dtype), alpha=wd)
        if p.dtype == buf.dtype:
            p.add_(buf, alpha=-lr)
        else:
            p.copy_(p.to(buf.dtype).add_(buf, alpha=-lr))

    # ----- factors, inverses, preconditioning (K-FAC) ----------------------------------------------------------------
    def _fold(self, layer: _Layer, state: dict, ready: _Ready, group: dict) -> None:
        """Factor EMA from the identity (alecwangcq's initialisation): the first steps stay close to SGD while the
        averages fill, where copying the first statistics (kfac-pytorch) preconditions with one batch's rank-
        deficient factors until the next inversion. A and G enter together or not at all."""
        if ready.a is None or ready.g is None:
            return
        beta = group["factor_decay"]
        for key, value in (("factor_a", ready.a), ("factor_g", ready.g)):
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

    def _refresh(self, layer: _Layer, s: dict, group: dict) -> bool:
        """K-FAC: the damped inverses (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ from eigendecompositions (eigenvalues
        clamped at 0, so the damping keeps them finite); a failed eigendecomposition keeps the old inverses."""
        pi = self._pi(s["factor_a"], s["factor_g"], layer.diagonal_a)
        root = math.sqrt(group["damping"])
        eg = self._eigh(s["factor_g"])
        ea = None if layer.diagonal_a else self._eigh(s["factor_a"])
        if eg is None or (ea is None and not layer.diagonal_a):
            return False
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

    def _precondition(self, layer: _Layer, s: dict, M: torch.Tensor, group: dict) -> torch.Tensor:
        if layer.diagonal_a:
            return (s["inverse_g"] @ M) * s["inverse_a"]
        return s["inverse_g"] @ M @ s["inverse_a"]

    # ----- checkpoints and copies ---------------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()  # torch keeps defaults, state and param_groups only
        # the model travels with the optimizer so that a copy hooks its own copy of the model
        state.update({k: getattr(self, k) for k in ("model", *self.PICKLED_SETTINGS)})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._model_params = {id(p) for p in self.model.parameters()}
        self._plan_key, self._plan = None, _Plan()
        self._pending, self._ready, self._handles, self._warned, self._replicas = {}, {}, [], set(), {}
        self.plan()
        self.register_hooks()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._replicas = {}


def _set_identity(F: torch.Tensor) -> None:
    """A factor's starting value: I, or ones for a diagonal factor stored as a vector."""
    if F.ndim == 1:
        F.fill_(1.0)
    else:
        F.zero_().diagonal().fill_(1.0)


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()


class EKFAC(KFAC):
    r"""EKFAC: K-FAC with eigenvalue correction (George et al. 2018), with the same hooks, Fisher options,
    fallback, KL clip, momentum and distribution as :class:`KFAC`.

    Every ``inverse_every`` steps each layer's factors are eigendecomposed, :math:`A = Q_A \Lambda_A Q_A^\top`,
    :math:`G = Q_G \Lambda_G Q_G^\top` (Kronecker-factored eigenbasis), and the scale restarts from K-FAC's
    eigenvalues, :math:`S = \lambda_G \lambda_A^\top` (as alecwangcq's and Thrandis' EKFAC at each
    refresh). Every ``scale_every`` steps the scale takes the running average of the squared per-example
    gradients in that basis:

    .. math::
        S &\leftarrow \beta S + (1-\beta)\, L \textstyle\sum_n (Q_G^\top \nabla W_n Q_A)^{\odot 2},
        \qquad \nabla W_n = \textstyle\sum_t \delta_{n,t} a_{n,t}^\top \\
        V &= Q_G \big[(Q_G^\top \nabla W Q_A) \oslash (S + \lambda)\big] Q_A^\top

    then the KL clip, momentum and decay of :class:`KFAC`. **Per-example gradients from hooks**: on scale steps
    the forward hook keeps a reference to the layer's input (autograd keeps it for the backward anyway) and the
    output tensor's hook, when the output gradient :math:`\delta` arrives, forms the rotated per-example
    gradients of the batch's examples (dim 0; positions t of a sequence or conv output are summed within an
    example, as George et al. and curvlinops' ``EKFACLinearOperator``): without weight sharing as the outer
    product of squares :math:`(Q_G^\top\delta_n)^2 ((Q_A^\top a_n)^2)^\top`, one matrix product; with
    sharing as per-example matrices, a bounded chunk of examples at a time; for an embedding (:math:`Q_A = I`)
    as sparse sums per (example, token). The hook reduces them to the (d_out, d_in) sum at once, so nothing
    per-example outlives the backward. The correction of a scale step that also refreshes the basis was measured
    in the old basis and is superseded by the restart. λ is added to S (George et al.); no π split.

    In a distributed run every rank forms the corrections of its own examples, so every rank needs the bases:
    after each refresh the owners broadcast them (kept outside the optimizer state, rebuilt after a load).

    State per EKFAC weight: ``step``, ``momentum``, ``factor_a`` ((vocabulary,) for an embedding, whose basis is
    the identity), ``factor_g``, ``basis_a`` (d_in, d_in; not for an embedding), ``basis_g`` (d_out, d_out),
    ``scale`` (d_out, d_in), ``factor_updates``, ``refreshes``.

    Args: those of :class:`KFAC`, and ``scale_every``: steps between scale updates (default 10, alecwangcq's
    TScal); ``factor_decay`` is also the scale's running-average rate (as there).

    Reference: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent, "Fast Approximate Natural Gradient
    Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
    """

    def __init__(self, params, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, damping: float = 1e-3,
                 factor_decay: float = 0.95, kl_clip: float | None = 1e-3, weight_decay: float = 0.0,
                 factor_every: int = 10, inverse_every: int = 100, scale_every: int = 10,
                 fisher: str = "empirical", loss_average: str = "batch+sequence", fisher_seed: int = 0,
                 nonfinite: str = "skip", process_group=None):
        check_int("scale_every", scale_every, 1)
        self.scale_every = scale_every  # before the hooks exist
        self._replicas_stale = True
        super().__init__(params, model, lr=lr, momentum=momentum, damping=damping, factor_decay=factor_decay,
                         kl_clip=kl_clip, weight_decay=weight_decay, factor_every=factor_every,
                         inverse_every=inverse_every, fisher=fisher, loss_average=loss_average,
                         fisher_seed=fisher_seed, nonfinite=nonfinite, process_group=process_group)

    def _scale_step(self, step: int) -> bool:
        return step % self.scale_every == 0

    def _layer_shapes(self, layer: _Layer) -> dict:
        shapes = {"factor_a": (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in),
                  "factor_g": (layer.d_out, layer.d_out)}
        if not layer.diagonal_a:
            shapes["basis_a"] = (layer.d_in, layer.d_in)
        shapes["basis_g"] = (layer.d_out, layer.d_out)
        shapes["scale"] = (layer.d_out, layer.d_in)
        return shapes

    def _scale_basis(self, layer: _Layer):
        """(Q_A or None, Q_G) for a layer refreshed at least once: from its state where this process holds it,
        else from the replicas of a distributed run."""
        ctx = self._dist[1] if self._dist is not None else None
        if ctx is not None:
            return self._replicas.get(id(layer.weight))
        s = self.state.get(layer.weight)
        if not s or not s["refreshes"]:
            return None
        return (None if layer.diagonal_a else s["basis_a"], s["basis_g"])

    def _fold(self, layer: _Layer, state: dict, ready: _Ready, group: dict) -> None:
        super()._fold(layer, state, ready, group)
        if ready.corr is not None and state["refreshes"]:
            beta = group["factor_decay"]
            state["scale"].mul_(beta).add_(ready.corr.to(state["scale"].dtype), alpha=1.0 - beta)

    def _refresh(self, layer: _Layer, s: dict, group: dict) -> bool:
        """The eigenbasis of both factors, and the scale restarted from K-FAC's eigenvalues λ_G λ_Aᵀ."""
        eg = self._eigh(s["factor_g"])
        ea = None if layer.diagonal_a else self._eigh(s["factor_a"])
        if eg is None or (ea is None and not layer.diagonal_a):
            return False
        la = s["factor_a"].clamp_min(0) if layer.diagonal_a else ea[0]
        if not layer.diagonal_a:
            s["basis_a"].copy_(ea[1])
        s["basis_g"].copy_(eg[1])
        torch.outer(eg[0], la, out=s["scale"])
        return True

    def _precondition(self, layer: _Layer, s: dict, M: torch.Tensor, group: dict) -> torch.Tensor:
        QG = s["basis_g"]
        QA = None if layer.diagonal_a else s["basis_a"]
        R = QG.T @ M
        if QA is not None:
            R = R @ QA
        R = R / (s["scale"] + group["damping"])
        R = QG @ R
        return R if QA is None else R @ QA.T

    def _after_refresh(self, ctx, step: int, layers) -> None:
        """Distributed: give every rank the bases of the layers refreshed at this step (or all of them, after a
        load), so each can form the corrections of its own examples."""
        if ctx is None:
            return
        # every input of this decision is the same on every rank (the replicas cover all layers, owners' too)
        if not (self._replicas_stale or step % self.inverse_every == 0 or self._any_new(ctx, layers)):
            return
        self._replicas_stale = False
        flags = torch.zeros(len(layers), dtype=torch.float64)
        for i, layer in enumerate(layers):
            s = self.state.get(ctx.view(layer.weight)) if ctx.owns(layer.weight) else None
            if s and s["refreshes"]:
                flags[i] = 1.0
        have = [i for i, f in enumerate(all_reduce_flat([flags], ctx.group)[0].tolist()) if f > 0]
        for owner in range(ctx.world):
            mine = [layers[i] for i in have if ctx.owner[layers[i].weight] == owner]
            by_dtype: dict = {}
            for layer in mine:
                by_dtype.setdefault(layer_stat_dtype(layer), []).append(layer)
            for dtype, group_layers in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                sizes = [(0 if l.diagonal_a else l.d_in ** 2) + l.d_out ** 2 for l in group_layers]
                parts = None
                if owner == ctx.rank:
                    parts = []
                    for layer in group_layers:
                        s = self.state[ctx.view(layer.weight)]
                        if not layer.diagonal_a:
                            parts.append(s["basis_a"])
                        parts.append(s["basis_g"])
                flat = broadcast_flat(parts, sum(sizes), dtype, owner, ctx.group)
                if owner == ctx.rank:
                    for layer in group_layers:
                        s = self.state[ctx.view(layer.weight)]
                        self._replicas[id(layer.weight)] = (None if layer.diagonal_a else s["basis_a"], s["basis_g"])
                    continue
                offset = 0
                for layer, size in zip(group_layers, sizes):
                    piece = flat[offset:offset + size].to(layer.weight.device)
                    offset += size
                    na = 0 if layer.diagonal_a else layer.d_in ** 2
                    qa = None if layer.diagonal_a else piece[:na].view(layer.d_in, layer.d_in).clone()
                    qg = piece[na:].view(layer.d_out, layer.d_out).clone()
                    self._replicas[id(layer.weight)] = (qa, qg)

    def _any_new(self, ctx, layers) -> bool:
        """Whether a layer got its first basis at this step somewhere (every rank computes the same answer: it
        depends only on this step's statistics, which every rank has, and on the replicas every rank keeps)."""
        return any(layer in self._ready and self._ready[layer].a is not None and self._ready[layer].g is not None
                   and id(layer.weight) not in self._replicas for layer in layers)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._replicas_stale = True

    def __setstate__(self, state):
        super().__setstate__(state)
        self._replicas_stale = True
