r"""EKFAC (George et al. 2018): K-FAC in its Kronecker-factored eigenbasis, with the eigenvalues replaced by a
running average of the squared per-example gradients in that basis (the eigenbasis scaling), measured by the
hooks of :mod:`whiten.optim.kfac_layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_flat, broadcast_flat
from .checks import check_int
from .kfac import KFAC
from .kfac_layers import Layer, Ready, layer_stat_dtype
from .stacks import bucket
from .update import cast_all

__all__ = ["EKFAC"]

# EKFAC's per-example gradients of a weight-sharing layer (sequences, conv positions) are formed for a chunk of
# examples at a time, at most this many elements, so memory stays bounded whatever the batch.
CHUNK_ELEMENTS = 1 << 22


def per_example_correction(layer: Layer, X: torch.Tensor, Y: torch.Tensor, QA: torch.Tensor | None,
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
    TScal); ``factor_decay`` is also the scale's running-average rate (as there). ``state_dtype=torch.bfloat16``
    stores every ``momentum``, the bases ``basis_a``, ``basis_g`` and ``scale`` in bfloat16 (half their bytes;
    float32 arithmetic: cast up, updated, rounded once), the factors stay float32 (their small eigenvalues order the
    basis). The scale's running average at β = 0.95 adds 5% of the new statistic a step, above bfloat16's rounding
    (2^-9 to 2^-8 of a value); at ``factor_decay`` ≥ 0.99 a statistic within 20-40% of the average would be
    rounded away: keep ``state_dtype`` off there. ``sync_free`` and ``compiled``: as :class:`KFAC`'s (with
    ``sync_free`` scale steps decide on the host too).

    Reference: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent, "Fast Approximate Natural Gradient
    Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
    """

    MEMORY_OPTIONS = {"state_dtype": (("momentum", "basis_a", "basis_g", "scale"), "torch.bfloat16 stores the "
                                      "momenta, the bases and the scale in half the bytes (float32 arithmetic)")}
    STATE_DTYPE_KEYS = ("momentum", "basis_a", "basis_g", "scale")

    def __init__(self, params, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, damping: float = 1e-3,
                 factor_decay: float = 0.95, kl_clip: float | None = 1e-3, weight_decay: float = 0.0,
                 factor_every: int = 10, inverse_every: int = 100, scale_every: int = 10,
                 fisher: str = "empirical", loss_average: str = "batch+sequence", fisher_seed: int = 0,
                 nonfinite: str = "skip", process_group=None, max_dim: int | None = 10000,
                 state_dtype: torch.dtype | str | None = None, sync_free: bool = False,
                 compiled: bool = False):
        check_int("scale_every", scale_every, 1)
        self.scale_every = scale_every  # before the hooks exist
        self._replicas: dict = {}  # distributed: id(weight) -> (basis_a, basis_g) held by every rank
        self._replicas_stale = True
        super().__init__(params, model, lr=lr, momentum=momentum, damping=damping, factor_decay=factor_decay,
                         kl_clip=kl_clip, weight_decay=weight_decay, factor_every=factor_every,
                         inverse_every=inverse_every, fisher=fisher, loss_average=loss_average,
                         fisher_seed=fisher_seed, nonfinite=nonfinite, process_group=process_group, max_dim=max_dim,
                         state_dtype=state_dtype, sync_free=sync_free, compiled=compiled)

    def _scale_step(self, step: int) -> bool:
        return step % self.scale_every == 0

    def _layer_shapes(self, layer: Layer) -> dict:
        shapes = {"factor_a": (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in),
                  "factor_g": (layer.d_out, layer.d_out)}
        if not layer.diagonal_a:
            shapes["basis_a"] = (layer.d_in, layer.d_in)
        shapes["basis_g"] = (layer.d_out, layer.d_out)
        shapes["scale"] = (layer.d_out, layer.d_in)
        return shapes

    def _scale_basis(self, layer: Layer):
        """(Q_A or None, Q_G) for a layer refreshed at least once: from its state where this process holds it,
        else from the replicas of a distributed run."""
        ctx = self._dist[1] if self._dist is not None else None
        if ctx is not None:
            return self._replicas.get(id(layer.weight))
        s = self.state.get(layer.weight)
        if not s or not s["refreshes"]:
            return None
        return (None if layer.diagonal_a else s["basis_a"], s["basis_g"])

    def _correction(self, layer: Layer, X: torch.Tensor, Y: torch.Tensor, basis) -> torch.Tensor:
        # state_dtype: the stored bfloat16 bases cast up to the statistics' dtype
        return per_example_correction(layer, X, Y, *(None if Q is None else Q.to(Y.dtype) for Q in basis))

    def _fold(self, layer: Layer, state: dict, ready: Ready, group: dict) -> None:
        super()._fold(layer, state, ready, group)
        if ready.corr is not None and state["refreshes"]:
            beta = group["factor_decay"]
            stored = state["scale"]
            dtype = ready.corr.dtype  # the arithmetic's; state_dtype may store the scale in bfloat16
            scale = stored.to(dtype)
            scale.mul_(beta).add_(ready.corr, alpha=1.0 - beta)
            if scale is not stored:  # cast up, updated, rounded once
                stored.copy_(scale)

    def _refresh(self, layer: Layer, s: dict, group: dict) -> bool:
        """The eigenbasis of both factors, and the scale restarted from K-FAC's eigenvalues λ_G λ_Aᵀ."""
        eg = self._eigh(s["factor_g"])
        ea = None if layer.diagonal_a else self._eigh(s["factor_a"])
        if eg is None or (ea is None and not layer.diagonal_a):
            return False
        la = s["factor_a"].clamp_min(0) if layer.diagonal_a else ea[0]
        if not layer.diagonal_a:  # copy_: rounded once into bfloat16 bases (state_dtype)
            s["basis_a"].copy_(ea[1])
        s["basis_g"].copy_(eg[1])
        if s["scale"].dtype == eg[0].dtype:
            torch.outer(eg[0], la, out=s["scale"])
        else:
            s["scale"].copy_(torch.outer(eg[0], la))
        return True

    def _precondition(self, layer: Layer, s: dict, M: torch.Tensor, group: dict) -> torch.Tensor:
        return self._precondition_all([(layer, s, M, group)])[0]

    def _precondition_all(self, batch: list[tuple[Layer, dict, torch.Tensor, dict]]) -> list[torch.Tensor]:
        """QG (QGᵀ M QA / (scale + damping)) QAᵀ for each layer: the products layer by layer, the division by the
        damped scales as one _foreach op per dtype and damping."""
        dtypes = [M.dtype for _, _, M, _ in batch]
        bases, Rs = [], []
        for (layer, s, M, group), dtype in zip(batch, dtypes):
            QG = s["basis_g"].to(dtype)  # state_dtype: the stored bfloat16 bases and scale cast up
            QA = None if layer.diagonal_a else s["basis_a"].to(dtype)
            R = QG.T @ M
            Rs.append(R if QA is None else R @ QA)
            bases.append((QG, QA))
        for (dtype, damping), members in bucket(range(len(batch)), lambda i: (dtypes[i], batch[i][3]["damping"])).items():
            scales = cast_all([batch[i][1]["scale"] for i in members], dtype)
            torch._foreach_div_([Rs[i] for i in members], torch._foreach_add(scales, damping))
        out = []
        for (QG, QA), R in zip(bases, Rs):
            R = QG @ R
            out.append(R if QA is None else R @ QA.T)
        return out

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
                    for layer in group_layers:  # bfloat16 bases (state_dtype) sent as ``dtype``: exact
                        s = self.state[ctx.view(layer.weight)]
                        if not layer.diagonal_a:
                            parts.append(s["basis_a"].to(dtype))
                        parts.append(s["basis_g"].to(dtype))
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

    def reset_transient(self) -> None:
        super().reset_transient()
        self._replicas, self._replicas_stale = {}, True

    def after_load(self) -> None:
        super().after_load()
        self._replicas, self._replicas_stale = {}, True
