"""SpecGD: spectral gradient descent, the exact update U Vᵀ (from an SVD) that Muon approximates with
Newton–Schulz; AdamW for the parameters that are not hidden matrices, as Muon."""

from __future__ import annotations

import math
import warnings

import torch

from ..linalg import svd_polar
from .checks import check_lr
from .muon import OrthogonalMomentum

__all__ = ["SpecGD", "SPECGD_SCALES"]

SPECGD_SCALES = ("muon", "rms", "nuclear", "none")
SVD_COUNTERS = ("svd_retries", "svd_fallbacks")


class SpecGD(OrthogonalMomentum):
    r"""Spectral gradient descent for hidden matrices and AdamW for every other parameter, in one torch optimizer.

    For a hidden matrix :math:`W \in \mathbb{R}^{m \times n}` (a conv weight is viewed as (out, in·k·k)) with
    gradient :math:`G`, the step is Muon's with the orthogonalisation done exactly:

    .. math::
        B &\leftarrow \mu B + (1-\mu) G, \qquad \tilde B = (1-\mu) G + \mu B \ \text{(Nesterov) or } B \\
        \tilde B &= U \Sigma V^\top \ \text{(reduced SVD)}, \qquad O = U V^\top \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\, O

    where U Vᵀ keeps only the numerically non-zero singular values (σ > σ_max·max(m, n)·machine ε), so a
    rank-deficient direction gets its partial isometry and a zero one no step (see :func:`whiten.linalg.svd_polar`).
    The scale :math:`s` (``scale``):

    - ``"muon"`` (default): :math:`\sqrt{\max(1, m/n)}`, Keller Jordan's Muon scaling, so SpecGD is the exact
      companion of ``whiten.Muon`` at the same lr (Muon's Newton–Schulz leaves singular values in about
      [0.7, 1.2] instead of 1);
    - ``"rms"``: :math:`\sqrt{m/n}` = √(d_out/d_in), the LMO of the RMS→RMS operator norm (Scion's Spectral,
      modula's Linear): the update has spectral RMS→RMS norm exactly η;
    - ``"nuclear"``: :math:`\|\tilde B\|_* = \sum_i \sigma_i`, steepest descent under the spectral norm
      (Bernstein & Newhouse, "Old Optimizer, New Norm": argmin of ⟨G, Δ⟩ + ‖Δ‖²₂/(2η) is −η‖G‖_* U Vᵀ). This step
      grows with the gradient, so its η lives on a scale of its own (about Muon's lr divided by a typical ‖G‖_*);
    - ``"none"``: 1.

    With ``momentum=0`` the direction is the gradient itself: SpecGD is then the update of Shampoo without
    accumulation (L = GGᵀ, R = GᵀG, :math:`L^{-1/4} G R^{-1/4} = U V^\top`; tests/test_identities.py).

    The SVD runs in ``svd_dtype`` (default: the state dtype, float32, or float64 for float64 parameters). The fallback
    ladder: a batched SVD of same-shape matrices, then matrix by matrix, then a float64 retry
    (``counters["svd_retries"]``), then Polar Express Newton–Schulz in float64 (``counters["svd_fallbacks"]``, with a
    warning), so a step never fails on a finite gradient. Embeddings, heads and vectors (and, without roles,
    tensors that are not ≥2-D) are stepped by AdamW exactly as in :class:`whiten.Muon` (``adam_lr``,
    ``adam_betas``, ``adam_eps``, the shared ``lr`` with ``lr_scale``, decay off for vectors and embeddings).

    Cost: an SVD is O(m n min(m, n)) like Newton–Schulz but far less parallel (LAPACK on the CPU, cuSOLVER on
    GPUs), typically several times slower than 5 Newton–Schulz iterations; SpecGD is the exact reference, Muon the
    fast method.

    State per parameter: as :class:`whiten.Muon` (``step``, ``momentum`` or ``exp_avg``/``exp_avg_sq``, ``ema`` when
    averaging).

    Args:
        params: parameters or param-group dicts (groups from :func:`whiten.param_groups` carry a ``role``).
        lr: η for hidden matrices (default 0.02, Muon's).
        momentum: μ (default 0.95); 0 orthogonalises the gradient itself. nesterov: Nesterov momentum (default True).
        scale: ``"muon"`` (default), ``"rms"``, ``"nuclear"`` or ``"none"`` (above).
        weight_decay: λ, decoupled, ``W *= 1 - η λ`` for both paths (default 0.0).
        svd_dtype: dtype of the SVD; None (default) = the state dtype (float32; float64 for float64 parameters).
        adam_lr, adam_betas, adam_eps: the AdamW path, as :class:`whiten.Muon` (defaults 3e-4, (0.9, 0.95), 1e-10).
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the AdamW path and the update).
        batched: one SVD call for same-shape matrices (default True).
        batch_dims: leading dims that index a stack of matrices (default 0; mixture-of-experts weights
            (E, out, in) with 1), as :class:`whiten.Muon`.

    References: J. Bernstein, L. Newhouse, "Old Optimizer, New Norm: An Anthology", arXiv 2409.20325 (2024);
    D. Carlson, V. Cevher, L. Carin, "Stochastic Spectral Descent for Restricted Boltzmann Machines" (2015).
    """

    EXTRA_COUNTERS = SVD_COUNTERS  # on every rank from the start: distributed runs reduce every counter

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        scale: str = "muon",
        weight_decay: float = 0.0,
        svd_dtype: torch.dtype | None = None,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        ema_rate: float | None = None,
        nonfinite: str = "skip",
        process_group=None,
        batched: bool = True,
        batch_dims: int = 0,
        compiled: bool = False,
    ):
        check_lr("adam_lr", adam_lr)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, scale=scale, weight_decay=weight_decay,
                        batch_dims=batch_dims,
                        svd_dtype=svd_dtype, adam_lr=adam_lr, adam_betas=adam_betas, adam_eps=adam_eps,
                        ema_rate=ema_rate, role=None, lr_scale=1.0)
        self.batched = bool(batched)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, compiled=compiled)

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        if group["scale"] not in SPECGD_SCALES:
            raise ValueError(f"Invalid scale: {group['scale']!r} (allowed: {', '.join(map(repr, SPECGD_SCALES))})")
        dtype = group["svd_dtype"]
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid svd_dtype: {dtype!r} (allowed: None, torch.float32 or torch.float64)")

    # No sync_free (SYNC_FREE stays False): the SVD at every step is the algorithm, and torch.linalg.svd on CUDA
    # checks cuSOLVER's result on the host (a sync inside torch; there is no svd_ex), before svd_polar's retries and
    # fallback decide per matrix on the host. Freeing the step would mean another algorithm (Newton–Schulz: Muon).

    def _orthogonalize(self, X: torch.Tensor, group: dict) -> torch.Tensor:
        result = svd_polar(X, group["svd_dtype"] or X.dtype)
        self.counters["svd_retries"] += result.retried
        if result.fallbacks:
            self.counters["svd_fallbacks"] += result.fallbacks
            warnings.warn(f"SpecGD: the SVD failed for {result.fallbacks} matrix(es) even in float64; their step "
                          "used Polar Express Newton–Schulz instead (counters['svd_fallbacks'])", RuntimeWarning,
                          stacklevel=4)
        O = result.factor
        if group["scale"] == "nuclear":
            O.mul_(result.nuclear.view(-1, 1, 1))
        return O.to(X.dtype)

    def _lr_multiplier(self, m: int, n: int, group: dict) -> float:
        scale = group["scale"]
        if scale == "muon":
            return math.sqrt(max(1.0, m / n))
        if scale == "rms":
            return math.sqrt(m / n)
        return 1.0  # "none", and "nuclear" (the factor is in the direction already)
