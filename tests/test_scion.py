"""Scion: parity with a float64 transcription of the reference (LIONS-EPFL/scion) for every norm and option, both
modes and the momentum mapping; parity with pytorch-optimizer's SCION; norms chosen from roles; init(); the
Frank–Wolfe ball; argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import whiten
from scion_reference import ReferenceScion
from scion_reference import lmo as reference_lmo
from whiten.optim.scion import resolve_norm

F64 = torch.float64

# (shape, norm, norm_kwargs): every norm of the reference with each of its options
CASES = [
    ((12, 8), "Spectral", {}),
    ((8, 12), "Spectral", {"normalized": False}),
    ((8, 12), "Spectral", {"max": True}),
    ((12, 8), "Spectral", {"steps": 3}),
    ((6, 3, 3, 3), "SpectralConv", {}),
    ((6, 4, 5), "SpectralConv", {}),
    ((10, 7), "Sign", {}),
    ((10, 7), "Sign", {"normalized": False}),
    ((10, 7), "ColNorm", {}),
    ((10, 7), "ColNorm", {"normalized": True}),
    ((20, 6), "ColNorm", {"transpose": True}),
    ((10, 7), "RowNorm", {}),
    ((10, 7), "RowNorm", {"normalized": False, "transpose": True}),
    ((9,), "BiasRMS", {}),
    ((5, 4), "BiasRMS", {}),
    ((9,), "Auto", {}),
    ((7, 5), "Auto", {}),
    ((4, 2, 3, 3), "Auto", {}),
]


def grads(shape, steps, seed=1, scale=1e6):
    """Gradients with norms far above every ε (1e-7 on ||X||_F before Newton–Schulz, 1e-8 in the norms), where the
    reference adds ε and whiten clamps by it: the two placements then agree to float64 precision."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) * scale for _ in range(steps)]


@pytest.mark.parametrize("shape,norm,kw", CASES, ids=[f"{n}-{'x'.join(map(str, s))}-{k}" for s, n, k in CASES])
@pytest.mark.parametrize("ref_momentum,unconstrained", [(0.1, False), (1.0, True), (0.5, True)])
def test_parity_with_the_reference_in_float64(shape, norm, kw, ref_momentum, unconstrained):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=F64)
    ref_w = w0.clone()
    ref = ReferenceScion([(ref_w, norm, kw, 3.0)], lr=0.05, momentum=ref_momentum, unconstrained=unconstrained)
    w = nn.Parameter(w0.clone())
    # whiten's momentum is the usual beta = 1 - the reference's momentum
    opt = whiten.Scion([{"params": [w], "norm": norm, "norm_kwargs": kw, "scale": 3.0}], lr=0.05,
                       momentum=1.0 - ref_momentum, unconstrained=unconstrained, ns_dtype=F64)
    for g in grads(shape, 5):
        ref.step([g])
        w.grad = g
        opt.step()
    torch.testing.assert_close(w.detach(), ref_w, rtol=1e-12, atol=1e-12)


PO_NORMS = {"Spectral": "SPECTRAL", "SpectralConv": "SPECTRALCONV", "Sign": "SIGN", "ColNorm": "COL",
            "RowNorm": "ROW", "BiasRMS": "BIAS"}
PO_KWARGS = {"max": "max_scale", "normalized": "normalize", "steps": "num_steps"}


def _pytorch_optimizer_scion(params, norm, kw, **options):
    from pytorch_optimizer import SCION
    from pytorch_optimizer.optimizer.scion import LMONorm

    if norm in ("Spectral", "Sign"):  # pytorch-optimizer renamed these two norms' options
        kw = {PO_KWARGS.get(k, k): v for k, v in kw.items()}
    return SCION(params, norm_type=getattr(LMONorm, PO_NORMS[norm]), norm_kwargs=kw, **options)


@pytest.mark.parametrize("shape,norm,kw", [c for c in CASES if c[1] not in ("Spectral", "SpectralConv", "Auto")],
                         ids=lambda c: str(c))
@pytest.mark.parametrize("constrained", [True, False])
def test_parity_with_pytorch_optimizer_elementwise_norms(shape, norm, kw, constrained):
    """pytorch-optimizer's SCION (4.1.0): the same rule with ``constraint`` (default False) for the reference's
    ``unconstrained`` (default False) and the reference's momentum convention; in float64 it matches for every
    norm whose LMO is elementwise."""
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=F64)
    theirs, ours = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    po = _pytorch_optimizer_scion([theirs], norm, kw, lr=0.05, momentum=0.1, constraint=constrained, scale=3.0)
    opt = whiten.Scion([{"params": [ours], "norm": norm, "norm_kwargs": kw}], lr=0.05, momentum=0.9, scale=3.0,
                       unconstrained=not constrained)
    for g in grads(shape, 5, scale=1.0):
        theirs.grad, ours.grad = g.clone(), g.clone()
        po.step()
        opt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,norm,kw", [((24, 16), "Spectral", {}), ((16, 24), "Spectral", {"max": True}),
                                           ((24, 16), "Spectral", {"normalized": False}),
                                           ((8, 4, 3, 3), "SpectralConv", {})], ids=str)
def test_parity_with_pytorch_optimizer_spectral_norms_in_bfloat16(shape, norm, kw):
    """pytorch-optimizer always runs Newton–Schulz in bfloat16 (and rounds the scaled update to bfloat16): with
    ns_dtype=torch.bfloat16 the steps agree to bfloat16 precision, so the scales (√(d_out/d_in), √d_out, max, the
    conv kernel factor) and the momentum mapping are the same."""
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    theirs, ours = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    po = _pytorch_optimizer_scion([theirs], norm, kw, lr=0.05, momentum=0.1, constraint=True, scale=3.0)
    opt = whiten.Scion([{"params": [ours], "norm": norm, "norm_kwargs": kw}], lr=0.05, momentum=0.9, scale=3.0,
                       ns_dtype=torch.bfloat16)
    for g in grads(shape, 3, scale=1.0):
        before = ours.detach().clone()
        theirs.grad, ours.grad = g.float(), g.float()
        po.step()
        opt.step()
        step_theirs = theirs.detach() - before
        assert ((ours.detach() - theirs.detach()).norm() / step_theirs.norm()).item() < 2e-2
        ours.data.copy_(theirs.detach())  # compare one step at a time


# ----- norms from roles ----------------------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 8)
        self.pos_emb = nn.Parameter(torch.zeros(5, 8))
        self.pos_embed3d = nn.Parameter(torch.zeros(1, 5, 8))
        self.conv = nn.Conv2d(2, 8, 3)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 30)


def test_default_norms_come_from_the_roles():
    model = Net()
    opt = whiten.Scion(whiten.param_groups(model))
    got = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            norm, options = resolve_norm(p, group)
            got[name] = (norm, options.get("transpose"))
    assert got == {
        "tok.weight": ("ColNorm", True), "pos_emb": ("ColNorm", True), "pos_embed3d": ("BiasRMS", None),
        "conv.weight": ("SpectralConv", None), "conv.bias": ("BiasRMS", None), "fc.weight": ("Spectral", None),
        "fc.bias": ("BiasRMS", None), "norm.weight": ("BiasRMS", None), "norm.bias": ("BiasRMS", None),
        "head.weight": ("Sign", None), "head.bias": ("BiasRMS", None)}
    plain = whiten.Scion(model.parameters())  # no roles: by shape, as the reference's "Auto"
    assert [resolve_norm(p, plain.param_groups[0])[0] for p in (model.fc.weight, model.conv.weight, model.fc.bias)] \
        == ["Spectral", "SpectralConv", "BiasRMS"]


def test_embedding_rows_get_unit_rms_and_absent_tokens_no_step():
    emb = nn.Embedding(6, 4)
    opt = whiten.Scion([{"params": [emb.weight], "role": "embedding"}], lr=0.1, momentum=0.0, unconstrained=True)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 3])).sum().backward()
    opt.step()
    step = (before - emb.weight.detach()) / 0.1
    torch.testing.assert_close(step[[1, 3]].square().mean(dim=1), torch.ones(2), rtol=1e-6, atol=0)
    assert torch.equal(step[[0, 2, 4, 5]], torch.zeros(4, 4))


@pytest.mark.parametrize("norm,kw", [("Spectral", {}), ("Sign", {}), ("ColNorm", {}), ("RowNorm", {"transpose": True})])
def test_a_matrix_stored_transposed_takes_the_lmo_of_its_real_orientation(norm, kw):
    """Hugging Face's Conv1D stores (in, out); whiten.param_groups marks it ``transposed``."""
    torch.manual_seed(0)
    w0, gs = torch.randn(6, 10, dtype=F64), grads((6, 10), 3)
    stored = nn.Parameter(w0.T.clone())  # (in, out)
    real = nn.Parameter(w0.clone())
    kwargs = dict(lr=0.05, momentum=0.5, ns_dtype=F64)
    a = whiten.Scion([{"params": [stored], "norm": norm, "norm_kwargs": kw, "transposed": True}], **kwargs)
    b = whiten.Scion([{"params": [real], "norm": norm, "norm_kwargs": kw}], **kwargs)
    for g in gs:
        stored.grad, real.grad = g.T.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(stored.detach().T, real.detach(), rtol=1e-13, atol=1e-13)


def test_radius_per_role_and_weight_decay():
    w, v = nn.Parameter(torch.ones(4, 4, dtype=F64)), nn.Parameter(torch.ones(3, dtype=F64))
    opt = whiten.Scion([{"params": [w], "role": "head"}, {"params": [v], "role": "vector"}], lr=0.1, momentum=0.0,
                       scale={"head": 8.0}, weight_decay=0.5)
    w.grad, v.grad = torch.ones(4, 4, dtype=F64), torch.full((3,), 2.0, dtype=F64)
    opt.step()
    keep = 1 - 0.1 * (1 + 0.5)  # the Frank–Wolfe shrink plus the decoupled decay
    torch.testing.assert_close(w.detach(), torch.full((4, 4), keep - 0.1 * 8.0 / 4, dtype=F64))  # sign / d_in
    torch.testing.assert_close(v.detach(), torch.full((3,), keep - 0.1 * 1.0, dtype=F64), rtol=1e-7, atol=0)


# ----- init() and the ball -------------------------------------------------------------------------------------------

def test_init_puts_every_parameter_on_the_sphere_of_its_norm():
    model = Net()
    opt = whiten.Scion(whiten.param_groups(model), scale={"hidden": 2.0, "conv": 3.0, "head": 4.0,
                                                          "embedding": 5.0, "vector": 6.0})
    opt.init(torch.Generator().manual_seed(0))
    fc = torch.linalg.svdvals(model.fc.weight.double())
    torch.testing.assert_close(fc, torch.full((8,), 2.0 * math.sqrt(8 / 8), dtype=F64))  # orthogonal · √(out/in)
    for k in range(9):  # one orthogonal (out, in) matrix per kernel position, · √(out/in)/k²
        s = torch.linalg.svdvals(model.conv.weight.double().flatten(2)[:, :, k])
        torch.testing.assert_close(s, torch.full((2,), 3.0 * math.sqrt(8 / 2) / 9, dtype=F64), rtol=1e-6, atol=0)
    assert torch.equal(model.head.weight.abs(), torch.full((30, 8), 4.0 / 8))  # ±radius/d_in
    rms = model.tok.weight.double().square().mean(dim=1).sqrt()  # every token's vector: RMS = radius
    torch.testing.assert_close(rms, torch.full((30,), 5.0, dtype=F64), rtol=1e-6, atol=0)
    assert torch.equal(model.norm.weight, torch.zeros(8)) and torch.equal(model.fc.bias, torch.zeros(8))


def test_init_matches_the_reference_for_spectral_weights():
    """The reference draws torch.nn.init.orthogonal_ on a float64 copy from the global generator: the same draws."""
    w = nn.Parameter(torch.empty(6, 4))
    torch.manual_seed(3)
    whiten.Scion([{"params": [w], "norm": "Spectral"}], scale=2.0).init()
    torch.manual_seed(3)
    expected = torch.nn.init.orthogonal_(torch.empty(6, 4, dtype=F64)) * math.sqrt(6 / 4) * 2.0
    torch.testing.assert_close(w.detach(), expected.float())


@pytest.mark.parametrize("norm,kw,measure", [
    ("Sign", {}, lambda w: w.abs().max() * w.shape[1]),  # ||W||_inf · d_in
    ("ColNorm", {"transpose": True}, lambda w: w.square().mean(dim=1).sqrt().max()),
    ("RowNorm", {}, lambda w: w.norm(dim=1).max() * math.sqrt(w.shape[1])),
    ("Spectral", {}, lambda w: torch.linalg.matrix_norm(w, ord=2) * math.sqrt(w.shape[1] / w.shape[0])),
])
def test_constrained_iterates_stay_in_the_ball(norm, kw, measure):
    """W <- (1 - lr) W - lr·ρ·lmo(D) is a convex combination of W and a point of the radius-ρ ball, so from init()
    the weights never leave it (Spectral with the convergent cubic run to convergence, an exact LMO)."""
    w = nn.Parameter(torch.empty(12, 8, dtype=F64))
    opt = whiten.Scion([{"params": [w], "norm": norm, "norm_kwargs": kw}], lr=0.2, momentum=0.5, scale=3.0,
                       ns_coefficients="cubic", ns_steps=80, ns_dtype=F64)
    opt.init(torch.Generator().manual_seed(0))
    for g in grads((12, 8), 20, scale=1.0):
        w.grad = g
        opt.step()
        assert measure(w.detach()).item() <= 3.0 * (1 + 1e-9)


# ----- arguments -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="spectral"), "Invalid norm"),
    (dict(norm="Sign", norm_kwargs={"transpose": True}), "Sign has no option 'transpose'"),
    (dict(norm_kwargs={"normalized": True}), "with norm=None"),
    (dict(norm="Spectral", norm_kwargs={"steps": -1}), "steps"),
    (dict(norm="ColNorm", norm_kwargs={"normalized": 1}), "normalized"),
    (dict(norm="Spectral", params="vector"), "needs parameters of 2 or more dims"),
    (dict(scale={"hiden": 2.0}), "not a role"),
    (dict(scale=-1.0), "scale"),
    (dict(scale={"head": math.inf}), "scale"),
    (dict(lr=2.0), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(ns_coefficients="quintic"), "ns_coefficients"),
    (dict(ns_dtype=torch.int32), "ns_dtype"),
    (dict(unconstrained="yes"), "unconstrained"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    params = [nn.Parameter(torch.randn(3))] if kwargs.pop("params", None) == "vector" else \
        [nn.Parameter(torch.randn(4, 3))]
    with pytest.raises(ValueError, match=match):
        whiten.Scion(params, **kwargs)


def test_unconstrained_accepts_large_lr_and_constrained_refuses_it_at_the_step():
    w = nn.Parameter(torch.randn(4, 3))
    whiten.Scion([w], lr=3.0, unconstrained=True)
    opt = whiten.Scion([w], lr=0.5)
    w.grad = torch.randn(4, 3)
    opt.param_groups[0]["lr"] = 1.5  # a scheduler's doing
    before = w.detach().clone()
    with pytest.raises(ValueError, match="constrained mode"):
        opt.step()
    assert torch.equal(w, before)


def test_lmo_of_a_huge_gradient_is_finite():
    for shape, norm in [((5, 4), "Sign"), ((5, 4), "ColNorm"), ((5, 4), "RowNorm"), ((7,), "BiasRMS")]:
        g = torch.randn(shape) * 1e30
        u = whiten.optim.scion.lmo(g, norm, {**whiten.optim.scion.NORMS[norm]}, 1e-8)
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u.double(), reference_lmo(g.double(), norm, {}).double(), rtol=1e-5, atol=1e-6)


def _init_on_ranks(rank, world, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(rank)  # every rank's own default generator: the owner's draw must reach the others
    model = Net()
    if mode == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    group = torch.distributed.group.WORLD if mode == "ddp" else None
    opt = whiten.Scion(whiten.param_groups(model), scale={"hidden": 2.0}, process_group=group)
    opt.init()
    full = lambda p: p.full_tensor() if isinstance(p, DTensor) else p  # noqa: E731
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_init_gives_every_rank_the_same_weights(mode):
    from dist_utils import launch

    results = launch(_init_on_ranks, 2, mode)
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name
    s = torch.linalg.svdvals(results[0]["fc.weight"].double())
    torch.testing.assert_close(s, torch.full((8,), 2.0, dtype=F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm,kw,shape", [("Spectral", {}, (3, 6, 4)), ("SpectralConv", {}, (2, 4, 3, 2, 2)),
                                           ("Sign", {}, (3, 6, 4)), ("ColNorm", {"transpose": True}, (3, 6, 4)),
                                           ("RowNorm", {}, (3, 6, 4)), ("BiasRMS", {}, (3, 5))])
def test_batch_dims_takes_the_lmo_of_each_expert(norm, kw, shape):
    """Mixture-of-experts weights (E, ...) with batch_dims=1 step as E separate parameters would."""
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(shape, dtype=F64))
    alone = [nn.Parameter(stacked.detach()[e].clone()) for e in range(shape[0])]
    kwargs = dict(lr=0.05, momentum=0.5, scale=2.0, ns_dtype=F64)
    a = whiten.Scion([{"params": [stacked], "norm": norm, "norm_kwargs": kw, "batch_dims": 1}], **kwargs)
    b = whiten.Scion([{"params": alone, "norm": norm, "norm_kwargs": kw}], **kwargs)
    for g in grads(shape, 3):
        stacked.grad = g
        for e in range(shape[0]):
            alone[e].grad = g[e].clone()
        a.step()
        b.step()
    for e in range(shape[0]):
        torch.testing.assert_close(stacked.detach()[e], alone[e].detach(), rtol=1e-13, atol=1e-13)
    a.init(torch.Generator().manual_seed(0))
    if norm == "Spectral":  # every expert on the sphere: singular values 2·√(6/4)
        for e in range(shape[0]):
            torch.testing.assert_close(torch.linalg.svdvals(stacked.detach()[e]),
                                       torch.full((4,), 2.0 * math.sqrt(6 / 4), dtype=F64))


def test_batch_dims_on_a_role_group_and_its_checks():
    experts = nn.Parameter(torch.randn(4, 6, 5))
    opt = whiten.Scion([{"params": [experts], "role": "hidden", "batch_dims": 1}])
    assert resolve_norm(experts, opt.param_groups[0])[0] == "Spectral"  # not SpectralConv: (6, 5) matrices
    with pytest.raises(ValueError, match="needs parameters of 2 or more dims after batch_dims=2"):
        whiten.Scion([{"params": [experts], "norm": "Sign", "batch_dims": 2}])
    with pytest.raises(ValueError, match="batch_dims"):
        whiten.Scion([{"params": [experts], "batch_dims": 4}])
