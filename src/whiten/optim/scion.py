"""Scion (Pethick et al. 2025): steps along the linear minimization oracle (LMO) of a norm chosen per layer, with a
Frank–Wolfe shrink that keeps every weight inside a ball of its norm."""

from __future__ import annotations

import math

import torch

from ..averaging import AveragingMixin
from ..linalg import matrix_view, newton_schulz, ns_schedule
from ..roles import ROLES, role_from_shape
from ._base import WhitenOptimizer
from .checks import check_bool, check_ema_rate, check_int, check_lr, check_range, check_role, check_weight_decay
from .stacks import bucket
from .update import ema_all, grads_in, state_dtype, step_all

__all__ = ["Scion", "NORMS", "ROLE_NORMS"]

# Every norm of the reference with its options and their defaults (LIONS-EPFL/scion, scion.py). ``steps`` of the
# spectral norms overrides the group's ``ns_steps`` (the reference's norm_kwargs={"steps": 9}).
NORMS = {
    "Spectral": {"max": False, "normalized": True, "steps": None},
    "SpectralConv": {"steps": None},
    "Sign": {"normalized": True, "zero_init": False},
    "ColNorm": {"normalized": False, "transpose": False},
    "RowNorm": {"normalized": True, "transpose": False},
    "BiasRMS": {},
    "Auto": {},
}
SPECTRAL = ("Spectral", "SpectralConv")
# The norm of each role when a group sets none. Embeddings stored (vocab, d) get ColNorm(transpose=True): every
# token's vector is normalized to RMS 1 (the reference's shallow-nanogpt "ColNorm" input layer, and modula's Embed).
ROLE_NORMS = {
    "hidden": ("Spectral", {}),
    "experts": ("Spectral", {}),  # each expert's matrix (whiten steps them one by one)
    "conv": ("SpectralConv", {}),
    "head": ("Sign", {}),
    "embedding": ("ColNorm", {"transpose": True}),
    "vector": ("BiasRMS", {}),
}
NS_EPS = 1e-7  # the reference's guard on the Frobenius normalization before Newton–Schulz
# The longest vector whose BiasRMS is taken as a row of a stack: aten's CPU grain size. A shorter row is summed
# serially alone and in a stack alike (same bits); a longer one alone may be split between threads.
STACK_ROW_LIMIT = 32768


def resolve_norm(p: torch.Tensor, group: dict) -> tuple[str, dict]:
    """``(norm name, its options)`` for parameter ``p`` in ``group``: the group's ``norm`` (``"Auto"`` picks by
    shape as the reference does) or, when it sets none, the norm of the role (``group["role"]`` or the role of the
    shape). A tensor with fewer than 2 dims always gets BiasRMS from a role; a 3-D or larger hidden/conv weight
    gets SpectralConv, and a non-2-D embedding (ViT's ``pos_embed``, ``cls_token``) BiasRMS, as the reference's
    DeiT configuration. Dims are counted after the group's ``batch_dims`` leading ones."""
    name, options = group["norm"], dict(group["norm_kwargs"] or {})
    nd = p.ndim - group["batch_dims"]
    if name is None:
        role = group["role"] or role_from_shape(p)
        name, options = ROLE_NORMS[role]
        options = dict(options)
        if nd < 2 or (role == "embedding" and nd != 2):
            name, options = "BiasRMS", {}
        elif role in ("hidden", "conv", "experts"):
            name = "Spectral" if nd == 2 else "SpectralConv"
    if name == "Auto":
        name = "BiasRMS" if nd < 2 else "Spectral" if nd == 2 else "SpectralConv"
        options = {}
    return name, {**NORMS[name], **options}


def _radius(p: torch.Tensor, group: dict) -> float:
    scale = group["scale"]
    if isinstance(scale, dict):
        return float(scale.get(group["role"] or role_from_shape(p), 1.0))
    return float(scale)


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def spectral_factor(shape: tuple[int, ...], name: str, options: dict, transposed: bool = False) -> float:
    """The multiplier of U Vᵀ in the LMO of a spectral norm for one matrix of ``shape``: Spectral √(d_out/d_in)
    (√d_out if not normalized; at least 1 with ``max``), SpectralConv √(out/in) / (kernel size) for a weight
    (out, in, *kernel)."""
    if name == "SpectralConv":
        out, fan_in = shape[0], shape[1] if len(shape) > 1 else 1
        return math.sqrt(out / fan_in) / math.prod(shape[2:])
    d_out, d_in = _matrix(shape)
    if transposed:
        d_out, d_in = d_in, d_out
    s = math.sqrt(d_out / d_in) if options["normalized"] else math.sqrt(d_out)
    return max(1.0, s) if options["max"] else s


def lmo(g: torch.Tensor, name: str, options: dict, eps: float, transposed: bool = False,
        batch_dims: int = 0) -> torch.Tensor:
    """The LMO direction of a norm that is not spectral (those are batched in the optimizer): a new tensor of g's
    shape. The first ``batch_dims`` dims index a stack (each member has its own LMO); a member of 3 or more dims
    is seen as the matrix (shape[0], rest); ``transposed`` (a Linear stored (in, out)) computes it on gᵀ."""
    shape = g.shape
    inner = shape[batch_dims:]
    if transposed and len(inner) == 2:
        return lmo(g.mT, name, options, eps, False, batch_dims).mT
    if name == "Sign":
        u = torch.sign(g)
        return u.div_(_matrix(inner)[1]) if options["normalized"] else u
    # g/(rms(g) + eps) = (g/c)/(rms(g/c) + eps/c) for c = max|g|: the same LMO, but the squares of a huge finite
    # gradient (1e20 in float32) no longer overflow to a zero step, and a momentum holding a spike keeps stepping.
    c = g.abs().amax()
    c = torch.where(c > 0, c, torch.ones_like(c))
    eps = eps / c
    g = g / c
    count = math.prod(shape[:batch_dims])
    if name == "BiasRMS":  # RMS over (the member's) dim 0, as the reference; |g| for a 0-d member
        x = g.reshape(count, *inner)
        rms = x.abs() if not inner else x.square().mean(dim=1, keepdim=True).sqrt_()
        return x.div_(rms.add_(eps)).reshape(shape)
    M = g.reshape(count, *_matrix(inner))
    if options["transpose"]:
        M = M.mT
    if name == "ColNorm":  # every column to RMS 1 (÷ d_in more if normalized)
        rms = torch.linalg.vector_norm(M, dim=-2, keepdim=True).div_(math.sqrt(M.shape[-2]))
        if options["normalized"]:
            rms.mul_(M.shape[-1])
    else:  # RowNorm: every row to norm 1 (RMS 1/√d_in if normalized)
        rms = torch.linalg.vector_norm(M, dim=-1, keepdim=True)
        if options["normalized"]:
            rms.mul_(math.sqrt(M.shape[-1]))
    u = M.div_(rms.add_(eps))
    return (u.mT if options["transpose"] else u).reshape(shape)


def bias_rms_rows(X: torch.Tensor, eps: float) -> torch.Tensor:
    """``lmo(x, "BiasRMS")`` of every row ``x`` of a (k, n) stack, in place: the same ops as :func:`lmo` on one
    vector (each row divided by its own max|x|), one launch per op for all the rows."""
    c = X.abs().amax(dim=1, keepdim=True)
    c = torch.where(c > 0, c, torch.ones_like(c))
    eps = eps / c
    X = X.div_(c)
    rms = X.square().mean(dim=1, keepdim=True).sqrt_()
    return X.div_(rms.add_(eps))


def _init_value(shape: tuple[int, ...], device, name: str, options: dict, transposed: bool, generator,
                batch_dims: int = 0) -> torch.Tensor:
    """A new value of ``shape`` on the unit sphere of its norm, as the reference's ``Norm.init`` (in float64);
    each member of a stack over the first ``batch_dims`` dims is drawn on its own."""
    f64 = dict(dtype=torch.float64, device=device)
    if batch_dims:
        inner = tuple(shape[batch_dims:])
        members = [_init_value(inner, device, name, options, transposed, generator)
                   for _ in range(math.prod(shape[:batch_dims]))]
        return torch.stack(members).reshape(shape) if members else torch.zeros(shape, **f64)
    if name == "BiasRMS" or (name == "Sign" and options["zero_init"]):
        return torch.zeros(shape, **f64)
    if transposed and len(shape) == 2:
        return _init_value((shape[1], shape[0]), device, name, options, False, generator).mT
    m, n = _matrix(shape)
    if name == "Spectral":
        w = torch.nn.init.orthogonal_(torch.empty(m, n, **f64), generator=generator)
        return w.mul_(spectral_factor(shape, name, options)).view(shape)
    if name == "SpectralConv":  # one orthogonal (out, in) matrix per kernel position
        out, fan_in = shape[0], shape[1] if len(shape) > 1 else 1
        w = torch.empty(math.prod(shape[2:]), out, fan_in, **f64)
        for k in range(w.shape[0]):
            torch.nn.init.orthogonal_(w[k], generator=generator)
        return w.permute(1, 2, 0).reshape(shape).mul_(spectral_factor(shape, name, options))
    if name == "Sign":
        w = torch.randint(0, 2, (m, n), generator=generator, device=device).to(torch.float64).mul_(2).sub_(1)
        return (w.div_(n) if options["normalized"] else w).view(shape)
    M = torch.empty(n, m, **f64) if options["transpose"] else torch.empty(m, n, **f64)
    M.normal_(generator=generator)
    if name == "ColNorm":
        M.div_(M.norm(dim=0, keepdim=True)).mul_(math.sqrt(M.shape[0]))
        if options["normalized"]:
            M.div_(M.shape[1])
    else:
        M.div_(M.norm(dim=-1, keepdim=True))
        if options["normalized"]:
            M.div_(math.sqrt(M.shape[-1]))
    return (M.mT if options["transpose"] else M).reshape(shape)


class Scion(AveragingMixin, WhitenOptimizer):
    r"""Scion: momentum, then the linear minimization oracle (LMO) of a norm chosen per parameter, with a radius.

    For a parameter :math:`W` with gradient :math:`G`, momentum :math:`\beta`, learning rate :math:`\eta`, radius
    :math:`\rho` (``scale``) and the group's norm :math:`\|\cdot\|`:

    .. math::
        D &\leftarrow \beta D + (1-\beta) G \qquad (D_0 = 0) \\
        U &= \mathrm{lmo}(D) = \arg\max_{\|T\| \le 1} \langle D, T\rangle \qquad\text{(the ``sharp'' direction)} \\
        W &\leftarrow (1 - \eta\,(c + \lambda))\, W - \eta \rho\, U

    with :math:`c = 1` (constrained, the default: a Frank–Wolfe / conditional-gradient step, a convex combination
    of W and a point of the radius-ρ ball, so a W inside the ball stays inside) or :math:`c = 0`
    (``unconstrained=True``), and :math:`\lambda` = ``weight_decay`` (decoupled; 0 by default, as the reference has
    none). The norms and their LMOs (ε = ``eps``; a weight of 3+ dims is the matrix (d_out, rest)):

    =================  =========================================================  ============================
    ``norm``           lmo(D)                                                     default for role
    =================  =========================================================  ============================
    ``Spectral``       NS(D) · √(d_out/d_in) (√d_out if ``normalized=False``;     ``hidden``
                       max(1, ·) with ``max=True``)
    ``SpectralConv``   NS(D as (out, in·k)) · √(out/in) / (kernel size)           ``conv``
    ``Sign``           sign(D) / d_in (sign(D) if ``normalized=False``)            ``head``
    ``ColNorm``        each column / (its RMS + ε) (÷ d_in more if normalized);    ``embedding`` (2-D), with
                       ``transpose=True`` works on Dᵀ                              ``transpose=True``
    ``RowNorm``        each row / (its norm + ε) (· 1/√d_in if normalized)
    ``BiasRMS``        D / (RMS over dim 0 + ε)                                    ``vector``, non-2-D embeddings
    ``Auto``           by shape: BiasRMS (<2-D), Spectral (2-D), SpectralConv
    =================  =========================================================  ============================

    NS is ``ns_steps`` Newton–Schulz iterations of the schedule ``ns_coefficients`` (Keller Jordan's quintic by
    default, as the reference) after Frobenius normalization, in ``ns_dtype``; same-shape matrices of a group are
    orthogonalised in one batched call. A group picks its norm with ``norm`` (the reference's names) and
    ``norm_kwargs`` (its options: Spectral ``max``, ``normalized``, ``steps``; SpectralConv ``steps``; Sign
    ``normalized``, ``zero_init``; ColNorm/RowNorm ``normalized``, ``transpose``); without ``norm`` the role decides
    (groups from :func:`whiten.param_groups`, else the role of the shape). For an embedding stored (vocab, d), the
    reference offers Sign(normalized=False) (pass ``norm="Sign", norm_kwargs={"normalized": False}``), ColNorm
    (transpose=True) (the default here) or Spectral(normalized=False). Linear layers that
    :func:`whiten.param_groups` calls ``embedding`` (inside an embedder module) are better served by
    ``norm="Spectral"``. A group with ``"transposed": True`` (Hugging Face's Conv1D, stored (in, out)) takes every
    LMO of the real (out, in) matrix.

    **Momentum convention.** The reference's ``momentum`` is *one minus* the usual momentum (the weight of the new
    gradient): its ``momentum=0.1`` is ``momentum=0.9`` here, and its default 1.0 (no momentum) is 0 here.
    whiten's ``momentum`` is β as in ``torch.optim.SGD`` (and ``OneCycleLR(cycle_momentum=True)`` cycles it).

    ``init()`` re-initialises every parameter on the sphere of its norm times its radius, as the reference's
    ``Scion.init()`` (orthogonal · √(d_out/d_in) for Spectral, one orthogonal matrix per kernel position for
    SpectralConv, ±1/d_in for Sign, columns or rows of unit RMS for ColNorm/RowNorm, zeros for BiasRMS).

    Where whiten departs from the reference (LIONS-EPFL/scion ``scion.py``) and why:

    - ``momentum`` is β (above), default 0.9: the README's recommended 0.1 in its convention (its class default is
      1.0, no momentum).
    - Norms come from roles when a group names none (the reference needs a norm per group, default ``"Auto"``).
    - ``scale`` may be a dict ``{role: radius}`` (missing roles: 1), so one call sets the radii of every role
      (the reference's nanoGPT: ``{"hidden": 50, "head": 3000}``).
    - ``weight_decay`` (decoupled, added to the constrained shrink) is offered, as pytorch-optimizer's SCION.
    - Constrained mode refuses ``lr > 1``, where ``1 - lr`` would flip the sign of the weights.
    - Newton–Schulz runs in float32 on the CPU by default (bfloat16 on CUDA; the reference always uses bfloat16);
      pass ``ns_dtype=torch.bfloat16`` for the reference's arithmetic.
    - Spectral, Sign, ColNorm and RowNorm also take weights of 3+ dims as (d_out, rest) matrices (the reference
      handles only 2-D ones there), SpectralConv divides by the product of the kernel dims (the reference by
      k² from the first one: the same for square kernels), and BiasRMS of a 0-d tensor is g/(|g| + ε).
    - ColNorm, RowNorm and BiasRMS divide D by max|D| first (the same LMO, ε scaled alike), so the squares of a huge
      finite gradient do not overflow to a zero step in float32.
    - ``p.grad`` is never modified, state is a tensor per parameter, checkpoints and distributed runs work as for
      every whiten optimizer (the reference's ScionLight keeps the momentum in ``p.grad``; it is not offered).

    The reference's nanoGPT configuration (README) in whiten's terms::

        opt = whiten.Scion(whiten.param_groups(model), lr=2**-12, momentum=0.9,
                           scale={"hidden": 50.0, "head": 3000.0})

    State per parameter (float32, float64 for float64 parameters): ``step`` (int), ``momentum`` (shape of p);
    ``ema`` when averaging.

    Args:
        params: parameters or param-group dicts; groups from :func:`whiten.param_groups` carry a ``role``.
        lr: η (default 1e-3, the reference's; its examples use 2^-12 for nanoGPT with radius 50, 2^-6 for an MLP,
            2^-4 for a CNN). In constrained mode η is also the Frank–Wolfe step, so at most 1.
        momentum: β in [0, 1) (default 0.9; see above).
        norm: the group's norm, one of ``"Spectral"``, ``"SpectralConv"``, ``"Sign"``, ``"ColNorm"``, ``"RowNorm"``,
            ``"BiasRMS"``, ``"Auto"``, or None (default: by role).
        norm_kwargs: options of ``norm`` (default None: its defaults; must be empty when ``norm`` is None).
        scale: the radius ρ, a number ≥ 0 or ``{role: number}`` (default 1.0).
        unconstrained: drop the Frank–Wolfe shrink (default False).
        weight_decay: λ, decoupled (default 0.0).
        ns_steps: Newton–Schulz iterations of the spectral norms (default 5).
        ns_coefficients: the schedule, ``"jordan"`` (default), ``"polar_express"``, ``"cubic"`` or triples (see
            :func:`whiten.linalg.ns_schedule`).
        ns_dtype: dtype of Newton–Schulz; None (default) = bfloat16 on CUDA, the state dtype elsewhere.
        eps: ε of the non-spectral norms (default 1e-8, the reference's).
        ema_rate: iterate averaging for ``eval()``/``train()`` (default None: off).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient.
        process_group: a ``torch.distributed`` group to split the work over (DDP: replicated parameters,
            averaged gradients); default None: one process, or the mesh of DTensor (FSDP2) parameters.
            Each parameter's step runs on one owner rank; the numbers are those of one process.
        sync_free: False (default) or True: an ordinary step never waits for the device; the non-finite check is
            decided there, every write masked by it, and read one step later (see :class:`whiten.SPlus`).
        compiled: False (default) or True: the step's elementwise chains run as compiled kernels, the eager numbers
            within float rounding (see :class:`whiten.SPlus`; here the momentum and the update).
        batched: orthogonalise same-shape matrices of a group in one batched call (default True).
        batch_dims: leading dims that index a stack of same-shape weights (default 0): a group of mixture-of-experts
            weights (E, out, in) with ``batch_dims=1`` takes the LMO of each (out, in) matrix (and init() draws each
            on its own), instead of one (E, out·in) matrix.

    Reference: T. Pethick, W. Xie, K. Antonakopoulos, Z. Zhu, A. Silveti-Falls, V. Cevher, "Training Deep Learning
    Models with Norm-Constrained LMOs", arXiv 2502.07529 (2025); code LIONS-EPFL/scion.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        norm: str | None = None,
        norm_kwargs: dict | None = None,
        scale: float | dict = 1.0,
        unconstrained: bool = False,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: str | tuple = "jordan",
        ns_dtype: torch.dtype | None = None,
        eps: float = 1e-8,
        ema_rate: float | None = None,
        nonfinite: str = "skip",
        process_group=None,
        sync_free: bool = False,
        compiled: bool = False,
        batched: bool = True,
        batch_dims: int = 0,
    ):
        defaults = dict(lr=lr, momentum=momentum, norm=norm, norm_kwargs=norm_kwargs, scale=scale,
                        batch_dims=batch_dims,
                        unconstrained=unconstrained, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, eps=eps, ema_rate=ema_rate, role=None)
        self.batched = bool(batched)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group, sync_free=sync_free,
                         compiled=compiled)

    # ----- arguments ------------------------------------------------------------------------------------------
    SYNC_FREE = True  # its ordinary step masks every write (whiten.optim.deferred)


    def validate_group(self, group: dict) -> None:
        check_bool("unconstrained", group["unconstrained"])
        if group["unconstrained"]:
            check_lr("lr", group["lr"])
        else:  # a convex combination of W and a point of the ball
            check_range("lr", group["lr"], 0.0, 1.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_weight_decay(group["weight_decay"])
        check_int("ns_steps", group["ns_steps"], 0)
        ns_schedule(group["ns_coefficients"], "ns_coefficients")
        if group["ns_dtype"] is not None and not (isinstance(group["ns_dtype"], torch.dtype)
                                                  and group["ns_dtype"].is_floating_point):
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r} (allowed: None or a floating torch.dtype)")
        check_range("eps", group["eps"], 0.0)
        check_ema_rate(group["ema_rate"])
        check_role(group["role"])
        check_int("batch_dims", group["batch_dims"], 0)
        self._check_scale(group["scale"])
        self._check_norm(group)

    @staticmethod
    def _check_scale(scale) -> None:
        if isinstance(scale, dict):
            for role, value in scale.items():
                if role not in ROLES:
                    raise ValueError(f"Invalid scale: key {role!r} is not a role (allowed: {', '.join(ROLES)})")
                check_range(f"scale[{role!r}]", value, 0.0)
        else:
            check_range("scale", scale, 0.0)

    @staticmethod
    def _check_norm(group: dict) -> None:
        name, kwargs = group["norm"], group["norm_kwargs"]
        if name is not None and name not in NORMS:
            raise ValueError(f"Invalid norm: {name!r} (allowed: None (by role) or one of {', '.join(NORMS)})")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"Invalid norm_kwargs: {kwargs!r} (allowed: None or a dict of the norm's options)")
        if kwargs and name is None:
            raise ValueError(f"Invalid norm_kwargs: {kwargs!r} with norm=None; name the norm they are options of")
        for key, value in (kwargs or {}).items():
            if key not in NORMS[name]:
                allowed = ", ".join(NORMS[name]) or "none"
                raise ValueError(f"Invalid norm_kwargs: {name} has no option {key!r} (allowed: {allowed})")
            if key == "steps":
                check_int("norm_kwargs['steps']", value, 0)
            else:
                check_bool(f"norm_kwargs[{key!r}]", value)
        bd = group["batch_dims"]
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                continue
            if p.ndim < bd:
                raise ValueError(f"Invalid batch_dims: {bd} leading dims, but parameter {i} of the group has shape "
                                 f"{tuple(p.shape)}")
            if name not in (None, "Auto", "BiasRMS") and p.ndim - bd < 2:
                after = f" after batch_dims={bd}" if bd else ""
                raise ValueError(f"Invalid norm: {name!r} needs parameters of 2 or more dims{after}; parameter {i} "
                                 f"of the group has shape {tuple(p.shape)} (use 'BiasRMS', 'Auto' or a group of "
                                 "its own)")

    def check_can_step(self) -> None:
        super().check_can_step()
        for gi, group in enumerate(self.param_groups):
            if not group["unconstrained"] and float(group["lr"]) > 1.0:
                raise ValueError(f"Scion.step(): group {gi} has lr {group['lr']!r} in constrained mode (allowed: "
                                 "[0, 1], a convex combination); a scheduler or a write to param_groups set it")

    # ----- distribution ---------------------------------------------------------------------------------------
    def work_cost(self, p: torch.Tensor, group: dict) -> float:
        if resolve_norm(p, group)[0] not in SPECTRAL:
            return float(p.numel())  # elementwise LMOs
        lead, m, n = matrix_view(p.shape, group["batch_dims"])
        return float(math.prod(lead) * m * n * (m + n) + p.numel())

    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        # only the spectral norms run batched matrix products (the other LMOs are per tensor), and their members
        # are the (m, n) matrices: the sizes that keep every member of a stack aligned are theirs
        if resolve_norm(p, group)[0] not in SPECTRAL or p.numel() == 0:
            return True
        _, m, n = matrix_view(p.shape, group["batch_dims"])
        return all(size % 16 == 0 for size in (m * n, m * m, n * n))

    # ----- state and step -----------------------------------------------------------------------------------------
    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": None, "momentum": tuple(p.shape)}

    def _step_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        beta, lr = group["momentum"], float(group["lr"])
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["momentum"] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)
            state["step"] += 1
            states.append(state)
        self.update_averages(group, params, states)
        moms = [s["momentum"] for s in states]
        grads = grads_in(params, moms)
        ok = self._ok  # a sync-free step's device-side flag: the new momenta are computed aside and committed
        # the reference's arithmetic: buf*(1-m) + g*m with m = 1 - beta
        moms = ema_all(moms, grads, beta, 1.0 - beta, ok)

        transposed, bd = bool(group.get("transposed")), group["batch_dims"]
        norms = [resolve_norm(p, group) for p in params]
        updates: list = [None] * len(params)
        factors = [_radius(p, group) for p in params]
        spectral = [i for i, (name, _) in enumerate(norms) if name in SPECTRAL]
        # Vectors (biases, norm gains: the non-spectral parameters of every block) take BiasRMS as rows of one
        # stack per length; the other LMOs (embeddings, heads: a few per model) are taken one tensor at a time.
        vectors = [i for i, (name, _) in enumerate(norms)
                   if name == "BiasRMS" and bd == 0 and params[i].ndim == 1 and params[i].numel() < STACK_ROW_LIMIT]
        for idxs in bucket(vectors, lambda i: (params[i].numel(), moms[i].dtype, moms[i].device)).values():
            for i, u in zip(idxs, bias_rms_rows(torch.stack([moms[i] for i in idxs]), group["eps"])):
                updates[i] = u
        for i, (name, options) in enumerate(norms):
            if name not in SPECTRAL and updates[i] is None:
                updates[i] = lmo(moms[i], name, options, group["eps"], transposed, bd)
        def steps_of(i: int) -> int:  # a norm's own ``steps`` (the reference's norm_kwargs) wins over ns_steps
            steps = norms[i][1].get("steps")
            return group["ns_steps"] if steps is None else steps

        views = {i: matrix_view(params[i].shape, bd) for i in spectral}  # (stack dims, m, n)
        key = ((lambda i: (views[i][1:], steps_of(i), moms[i].dtype, moms[i].device))
               if self.batched else (lambda i: i))
        for idxs in bucket(spectral, key).values():
            m, n = views[idxs[0]][1:]
            starts = [0]
            for i in idxs:
                starts.append(starts[-1] + math.prod(views[i][0]))
            X = torch.cat([moms[i].reshape(-1, m, n) for i in idxs])  # one copy into the stack
            dtype = group["ns_dtype"] or (torch.bfloat16 if X.device.type == "cuda" else X.dtype)
            O = newton_schulz(X, steps_of(idxs[0]), group["ns_coefficients"], NS_EPS, dtype, overwrite=True)
            # the step's dtype, so that one fused add takes every parameter (widening from bfloat16 is exact: the
            # same numbers as add_ promoting the direction)
            O = O.to(X.dtype)
            for j, i in enumerate(idxs):
                updates[i] = O[starts[j]:starts[j + 1]].view(params[i].shape)
                factors[i] *= spectral_factor(params[i].shape[bd:], *norms[i], transposed)

        keep = 1.0 - lr * ((0.0 if group["unconstrained"] else 1.0) + group["weight_decay"])
        # one fused step per distinct step size (radius × the spectral factor: a few per group)
        for idxs in bucket(range(len(params)), lambda i: factors[i]).values():
            step_all([params[i] for i in idxs], [moms[i].dtype for i in idxs], [updates[i] for i in idxs],
                     [keep] * len(idxs), alpha=-lr * factors[idxs[0]], ok=ok)

    # ----- initialization -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every parameter to a point on the sphere of its norm times its radius, as the reference's
        ``Scion.init()`` (see the class docstring); random draws come from ``generator`` (default: torch's global
        one). In a distributed run each parameter is drawn on its owner rank and sent to the others, so every rank
        holds the same weights."""
        params, groups = [], {}
        for group in self.param_groups:
            for p in group["params"]:
                params.append(p)
                groups[p] = group

        def draw(p, value, state):
            group = groups[p]
            name, options = resolve_norm(value, group)
            w = _init_value(tuple(value.shape), value.device, name, options, bool(group.get("transposed")),
                            generator, group["batch_dims"])
            value.copy_(w.mul_(_radius(value, group)))

        self.owner_update(params, draw)
