"""Shampoo: parity with the float64 reference of Distributed Shampoo's rule, reductions to AdamW and Adagrad, the
inverse-root kernel, exact resume, robustness, arguments, averaging and a convergence check."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from shampoo_reference import ReferenceShampoo, reference_merge, reference_modes, reference_split
from state_checks import assert_same_state
from whiten.optim.shampoo import Shampoo, block_layout, matrix_inverse_root, merge_small_dims

F64 = torch.float64

# Shapes chosen with max_preconditioner_dim=8 so that every path runs: two same-shape matrices (one stack), a
# vector (order 1, full-matrix AdaGrad), a 3-D tensor and a 4-D one that merge to order-3 blocks, a 4-D tensor that
# merges to a matrix, a matrix split into 6 blocks (two same-shape pairs, and (8, 1) sides), a 0-d scalar and a
# (1, 5, 1) tensor that squeezes to a vector.
SHAPES = {"w1": (6, 5), "w2": (6, 5), "vec": (7,), "t3": (3, 5, 4), "conv": (4, 3, 2, 2), "conv2": (3, 2, 2, 2),
          "big": (20, 9), "scalar": (), "col": (1, 5, 1)}
MAX_DIM = 8


def make_params(dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: nn.Parameter(torch.randn(s, generator=g, dtype=F64).to(dtype)) for k, s in SHAPES.items()}


def grads_at(t, params):
    """Deterministic gradients that depend on the parameters (so weight decay and the update interact)."""
    g = torch.Generator().manual_seed(100 + t)
    return {k: (torch.randn(p.shape, generator=g, dtype=F64) + 0.3 * p.detach().to(F64)).to(p.dtype)
            for k, p in params.items()}


def decay_of(params):
    return {k: p.ndim >= 2 for k, p in params.items()}  # the roles from shapes: vectors and scalars don't decay


def max_diff(params, theta):
    return max((p.detach().to(F64) - theta[k]).abs().max().item() for k, p in params.items())


# ----- blocking ------------------------------------------------------------------------------------------------


def test_merge_small_dims_matches_distributed_shampoo_examples():
    # the examples of DS's merge_small_dims docstring
    assert merge_small_dims((1, 2, 5, 1), 10) == (10,)
    assert merge_small_dims((1, 2, 5, 1), 1) == (2, 5)
    assert merge_small_dims((32, 3, 64, 64), 8192) == (96, 4096)
    assert merge_small_dims((), 8) == (1,) and merge_small_dims((1, 1), 8) == (1,)
    for shape in SHAPES.values():
        assert merge_small_dims(shape, MAX_DIM) == reference_merge(shape, MAX_DIM)


@pytest.mark.parametrize("ratio", [None, 20.0, 3.0])
def test_block_layout_matches_multi_dim_split(ratio):
    for shape in list(SHAPES.values()) + [(2048, 3), (17, 17, 3), (50, 7), (1025,), (300, 10), (600,), (40, 30, 20)]:
        merged, blocks = block_layout(shape, MAX_DIM, ratio)
        X = torch.arange(math.prod(shape), dtype=F64).reshape(merged)
        expected = reference_split(X, MAX_DIM)
        assert len(blocks) == len(expected)
        for blk, e in zip(blocks, expected):
            assert blk.dims == tuple(e.shape) and torch.equal(X[blk.index], e)
            assert list(blk.modes) == reference_modes(blk.dims, ratio)
            assert len(blk.factor_keys) == len(blk.root_keys) == len(blk.modes)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("config", ["adam", "no_grafting"])
def test_parity_with_left_out_modes(config, batched):
    """Blocks whose factors would take more than max_factor_ratio times their memory (and 2^16 numbers) leave out
    their largest modes: a (256, 10) block keeps its 10-side factor, a 256-vector block none (the grafted step, or Ḡ
    without grafting); the reference applies the identity on those modes."""
    shapes = {"tall": (300, 10), "wide": (10, 300), "vec": (600,), "small": (12, 9)}
    g = torch.Generator().manual_seed(0)
    params = {k: nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for k, s in shapes.items()}
    # epsilon 1e-3: the 256-sided factors are rank-deficient for these few steps (see CONFIGS)
    hyper = dict(max_preconditioner_dim=256, max_factor_ratio=20.0, **{**CONFIGS[config], "epsilon": 1e-3})
    ref = ReferenceShampoo(params, decay_of(params), **hyper)
    opt = Shampoo(list(params.values()), batched=batched, **hyper)
    worst = 0.0
    for t in range(9):
        grads = grads_at(t, params)
        for k, p in params.items():
            p.grad = grads[k]
        ref.step(grads)
        opt.step()
        worst = max(worst, max_diff(params, ref.theta))
    assert worst < 1e-10, worst
    st = opt.state[params["tall"]]
    assert {k for k in st if k.startswith("factor_")} == {"factor_0_1", "factor_1_0", "factor_1_1"}  # (44, 10) keeps both
    assert {k for k in opt.state[params["vec"]] if k.startswith("factor_")} == {"factor_2_0"}  # 88² is small


def test_factor_ratio_keeps_state_proportionate_on_long_and_tall_tensors():
    """The issue's shapes: DS gives a (50000,) vector 49 blocks of 1024² and a (50000, 64) embedding 49 (1024, 64)
    blocks with a 1024² factor each; the default ratio leaves those modes out, and keeps every factor of square and
    1:4 matrices and of a (64, 64, 3, 3) conv weight (merged to (64, 576))."""
    def factor_numbers(shape, ratio):
        return sum(2 * sum(b.dims[j] ** 2 for j in b.modes) for b in block_layout(shape, 1024, ratio)[1])

    for shape in [(50000,), (50000, 64), (1025, 64)]:
        assert factor_numbers(shape, None) > 20 * math.prod(shape)
        assert factor_numbers(shape, 20.0) <= 20 * math.prod(shape)
    assert [b.modes for b in block_layout((50000, 64), 1024, 20.0)[1]] == [(1,)] * 49
    assert [b.modes for b in block_layout((50000,), 1024, 20.0)[1]] == [()] * 49
    for shape in [(128, 128), (128, 512), (512, 128), (4096, 4096), (65, 128), (64, 64, 3, 3), (10,)]:
        assert block_layout(shape, 1024, 20.0) == block_layout(shape, 1024, None)
    for shape in [(50000,), (50000, 64)]:
        p = nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        opt = Shampoo([p])  # the defaults
        opt.step()
        state_numbers = sum(t.numel() for t in opt.state[p].values() if torch.is_tensor(t))
        assert state_numbers <= 3 * p.numel()  # momentum, the grafting moment and small factors


    _, blocks = block_layout((20, 9), MAX_DIM)
    assert [b.dims for b in blocks] == [(8, 8), (8, 1), (8, 8), (8, 1), (4, 8), (4, 1)]
    assert blocks[3].factor_keys == ("factor_3_0", "factor_3_1")


# ----- parity with the float64 reference ------------------------------------------------------------------------

# epsilon=1e-6 rather than 1e-12: early factors are rank-deficient (a vector's factor has rank <= t), and a root that
# is some steps old meets gradients with a large component in its null space, where its eigenvalues are
# (epsilon + rounding)^(-1/(2k)): two correct implementations then differ by ~rounding/epsilon, relatively. At 1e-8
# that is already 1e-10 (seen between the batched and per-block paths); the kernel is tested at 1e-12 below.
CONFIGS = {
    "adam": dict(lr=0.02, betas=(0.9, 1.0), epsilon=1e-6, weight_decay=0.1, precondition_frequency=3),
    "adagrad_ema_factors": dict(lr=0.05, betas=(0.8, 0.99), epsilon=1e-6, weight_decay=0.05,
                                precondition_frequency=2, start_preconditioning_step=5, grafting="adagrad"),
    "rmsprop_no_momentum": dict(lr=0.02, betas=(0.0, 0.95), epsilon=1e-6, precondition_frequency=3,
                                use_bias_correction=False, grafting="rmsprop", grafting_beta2=0.9),
    "no_grafting": dict(lr=0.01, betas=(0.5, 1.0), epsilon=1e-6, weight_decay=0.1, precondition_frequency=4,
                        grafting=None),
}


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_with_float64_reference(config, batched):
    # these blocks' factors are all small: whiten's default max_factor_ratio keeps every mode, as DS
    hyper = dict(max_preconditioner_dim=MAX_DIM, **CONFIGS[config])
    params = make_params()
    ref = ReferenceShampoo(params, decay_of(params), **hyper)
    opt = Shampoo(list(params.values()), batched=batched, **hyper)
    worst = 0.0
    for t in range(10):  # crosses 2 to 4 refreshes
        grads = grads_at(t, params)
        for k, p in params.items():
            p.grad = grads[k]
        ref.step(grads)
        opt.step()
        worst = max(worst, max_diff(params, ref.theta))
    assert worst < 1e-10, worst  # batched and per-block paths: both against the reference
    st = opt.state[params["big"]]
    assert st["factor_5_0"].shape == (4, 4) and st["root_5_1"].shape == (1, 1) and "factor_6_0" not in st
    assert opt.state[params["t3"]]["factor_0_2"].shape == (4, 4)
    assert opt.state[params["scalar"]]["factor_0_0"].shape == (1, 1)
    assert ("momentum" in opt.state[params["w1"]]) == (hyper["betas"][0] > 0)
    assert ("graft" in opt.state[params["w1"]]) == (hyper.get("grafting", "adam") is not None)


def test_members_of_a_stack_at_different_steps():
    """Same-shape blocks whose parameters have different step counts (one had no gradient for a while) share a
    stack but are refreshed and grafted on their own schedule: batched equals per-block in float64."""
    results = []
    for batched in (True, False):
        params = make_params()
        opt = Shampoo(list(params.values()), batched=batched, max_preconditioner_dim=MAX_DIM, epsilon=1e-6,
                      precondition_frequency=2, start_preconditioning_step=4)
        for t in range(9):
            for k, g in grads_at(t, params).items():
                params[k].grad = None if (k == "w2" and t in (1, 2, 3)) else g
            opt.step()
        assert opt.state[params["w2"]]["step"] == 6 and opt.state[params["w1"]]["step"] == 9
        results.append(params)
    for k in SHAPES:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=1e-10, msg=k)


def test_stacked_state_is_shared_views():
    params = make_params(torch.float32)
    opt = Shampoo(list(params.values()), max_preconditioner_dim=MAX_DIM)
    for k, g in grads_at(0, params).items():
        params[k].grad = g
    opt.step()
    a, b = opt.state[params["w1"]]["factor_0_0"], opt.state[params["w2"]]["factor_0_0"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert a.dtype == torch.float32


# ----- reductions -----------------------------------------------------------------------------------------------


def two_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(6, 5, generator=g, dtype=F64)), nn.Parameter(torch.randn(7, generator=g, dtype=F64))


def run_pair(opt_a, opt_b, pa, pb, steps=25):
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        for x, y in zip(pa, pb):
            grad = torch.randn(x.shape, generator=g, dtype=F64) + 0.5 * x.detach()
            x.grad, y.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    return max((x - y).abs().max().item() for x, y in zip(pa, pb))


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_never_preconditioned_with_adam_grafting_is_adamw(beta1):
    W, b = two_params()
    W2, b2 = copy.deepcopy(W), copy.deepcopy(b)
    sh = Shampoo([W, b], lr=0.03, betas=(beta1, 1.0), weight_decay=0.1, grafting="adam", grafting_beta2=0.99,
                 grafting_epsilon=1e-8, start_preconditioning_step=math.inf)
    # Shampoo decays hidden matrices only (the vector's role from its shape is "vector")
    adamw = torch.optim.AdamW([{"params": [W2]}, {"params": [b2], "weight_decay": 0.0}], lr=0.03,
                              betas=(beta1, 0.99), eps=1e-8, weight_decay=0.1)
    assert run_pair(sh, adamw, [W, b], [W2, b2]) < 1e-12
    assert not any(k.startswith(("factor", "root")) for k in sh.state[W])  # none kept when never used


def test_never_preconditioned_with_adagrad_grafting_is_adagrad():
    # torch.optim.Adagrad divides by sqrt(sum) + eps, the same placement as DS's AdaGrad grafting.
    W, b = two_params(1)
    W2, b2 = copy.deepcopy(W), copy.deepcopy(b)
    sh = Shampoo([W, b], lr=0.1, betas=(0.0, 1.0), grafting="adagrad", grafting_epsilon=1e-10,
                 start_preconditioning_step=math.inf)
    ada = torch.optim.Adagrad([W2, b2], lr=0.1, eps=1e-10)
    assert run_pair(sh, ada, [W, b], [W2, b2]) < 1e-12


def test_grafting_norm_is_per_block():
    """After preconditioning starts, each block's update has the Frobenius norm of its Adam update."""
    W = nn.Parameter(torch.zeros(20, 9, dtype=F64))
    W2 = copy.deepcopy(W)
    sh = Shampoo([W], lr=1.0, max_preconditioner_dim=MAX_DIM, betas=(0.0, 1.0))
    adam = torch.optim.Adam([W2], lr=1.0, betas=(0.0, 0.999), eps=1e-10)
    G = torch.randn(20, 9, dtype=F64)
    W.grad, W2.grad = G.clone(), G.clone()
    sh.step()
    adam.step()
    _, blocks = block_layout((20, 9), MAX_DIM)
    for blk in blocks:
        torch.testing.assert_close(W.detach()[blk.index].norm(), W2.detach()[blk.index].norm())
    assert not torch.allclose(W, W2)  # but the direction is Shampoo's


# ----- the inverse-root kernel ---------------------------------------------------------------------------------


def spectral(lams, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(lams), len(lams), generator=g, dtype=F64)).Q
    return Q, torch.tensor(lams, dtype=F64)


def from_spectrum(Q, lams):
    return Q @ torch.diag(lams) @ Q.T


@pytest.mark.parametrize("root", [2, 4, 6])
def test_inverse_root_of_spd_matrices(root):
    mats, expected = [], []
    for s in range(3):
        Q, lams = spectral([3.0, 1.5, 0.7, 0.2, 0.05], seed=s)
        mats.append(from_spectrum(Q, lams))
        expected.append(from_spectrum(Q, (lams + 1e-12) ** (-1.0 / root)))
    result = matrix_inverse_root(torch.stack(mats), root, 1e-12)
    assert result.ok == [True] * 3 and result.retried == 0
    torch.testing.assert_close(result.roots, torch.stack(expected), rtol=1e-10, atol=1e-12)
    # the defining property
    X = result.roots[0]
    torch.testing.assert_close(torch.linalg.matrix_power(X, root) @ mats[0], torch.eye(5, dtype=F64))
    # float32 input, float64 answer
    r32 = matrix_inverse_root(torch.stack(mats).float(), root, 1e-12)
    assert r32.roots.dtype == torch.float32
    torch.testing.assert_close(r32.roots.double(), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_inverse_root_rank_deficient_and_shifted():
    eps = 1e-8
    # rank 3 of 6: the null space gets (eps + rounding)^(-1/4)
    Q, lams = spectral([2.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    result = matrix_inverse_root(from_spectrum(Q, lams)[None], 4, eps)
    torch.testing.assert_close(result.roots[0], from_spectrum(Q, (lams + eps) ** -0.25), rtol=1e-5, atol=0)
    # not PSD (round-off gone large): the spectrum is shifted so the smallest eigenvalue of A + eps I is eps
    Q, lams = spectral([2.0, 1.0, -1e-3, 0.5], seed=1)
    result = matrix_inverse_root(from_spectrum(Q, lams)[None], 4, eps)
    torch.testing.assert_close(result.roots[0], from_spectrum(Q, (lams + 1e-3 + eps) ** -0.25), rtol=1e-8, atol=0)
    # the zero matrix: eps^(-1/root) I
    result = matrix_inverse_root(torch.zeros(2, 3, 3, dtype=F64), 2, 1e-6)
    torch.testing.assert_close(result.roots, 1e3 * torch.eye(3, dtype=F64).expand(2, 3, 3))


def test_inverse_root_reports_bad_input_and_retries(monkeypatch):
    A = torch.eye(3).expand(3, 3, 3).clone()
    A[1, 0, 1] = float("inf")
    result = matrix_inverse_root(A, 4, 1e-12)
    assert result.ok == [True, False, True] and result.retried == 0
    eigh = torch.linalg.eigh

    def fails_in_float32(X):
        if X.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure")
        return eigh(X)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    A = torch.stack([from_spectrum(*spectral([2.0, 1.0, 0.5], s)).float() for s in range(2)])
    result = matrix_inverse_root(A, 4, 1e-12)
    assert result.ok == [True, True] and result.retried == 2
    torch.testing.assert_close(torch.linalg.matrix_power(result.roots[0].double(), 4) @ A[0].double(),
                               torch.eye(3, dtype=F64), rtol=0, atol=1e-5)


def test_failed_root_keeps_previous_and_counts(monkeypatch):
    W = nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([W], precondition_frequency=2, max_preconditioner_dim=8)  # 8 < 12: a matrix, two factors
    for _ in range(2):
        W.grad = torch.randn(4, 3)
        opt.step()
    good = opt.state[W]["root_0_0"].clone()
    assert not torch.equal(good, torch.eye(4))

    def always_fails(X):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    with pytest.warns(RuntimeWarning, match="keeping their previous root"):
        for _ in range(2):
            W.grad = torch.randn(4, 3)
            opt.step()
    assert torch.equal(opt.state[W]["root_0_0"], good)
    assert opt.counters["eigh_failures"] == 2 and opt.counters["eigh_retries"] == 2  # one refresh (step 4)
    assert torch.isfinite(W).all()


# ----- exact resume ---------------------------------------------------------------------------------------------

RESUME_HYPER = dict(lr=0.02, max_preconditioner_dim=MAX_DIM, precondition_frequency=3, weight_decay=0.1,
                    ema_rate=0.9)


def mixed_params():
    params = make_params(torch.float32)
    params["w2"] = nn.Parameter(params["w2"].detach().to(torch.bfloat16))
    params["conv"] = nn.Parameter(params["conv"].detach().to(torch.bfloat16))
    return params


def train(params, opt, start, stop):
    for t in range(start, stop):
        for k, g in grads_at(t, params).items():
            params[k].grad = g
        opt.step()



@pytest.mark.parametrize("stop_at", [1, 3, 4, 8])  # 3: right after the first root refresh
def test_exact_resume(stop_at):
    total = 10
    full = mixed_params()
    opt = Shampoo(list(full.values()), **RESUME_HYPER)
    train(full, opt, 0, total)

    part = mixed_params()
    opt2 = Shampoo(list(part.values()), **RESUME_HYPER)
    train(part, opt2, 0, stop_at)
    buf = io.BytesIO()
    torch.save({"params": {k: p.detach() for k, p in part.items()}, "opt": opt2.state_dict()}, buf)
    del part, opt2

    resumed = mixed_params()
    opt3 = Shampoo(list(resumed.values()), **RESUME_HYPER)
    saved = torch.load(io.BytesIO(buf.getvalue()))
    with torch.no_grad():
        for k, p in resumed.items():
            p.copy_(saved["params"][k])
    opt3.load_state_dict(saved["opt"])
    train(resumed, opt3, stop_at, total)

    for k in SHAPES:
        assert full[k].dtype == resumed[k].dtype and torch.equal(full[k], resumed[k]), k
        assert_same_state(opt.state[full[k]], opt3.state[resumed[k]])
    for st in opt3.state.values():
        assert st["factor_0_0"].dtype == torch.float32 and st["graft"].dtype == torch.float32


# ----- robustness -----------------------------------------------------------------------------------------------


def run_steps(grad_fn, steps=6, shape=(6, 4), **kw):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(shape))
    opt = Shampoo([W], precondition_frequency=1, max_preconditioner_dim=16, **kw)  # a matrix, not a 24-vector
    for t in range(steps):
        W.grad = grad_fn(t)
        opt.step()
    return W, opt


def all_finite(W, opt):
    return bool(torch.isfinite(W).all()) and all(
        bool(torch.isfinite(v).all()) for v in opt.state[W].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("grafting", ["adam", None])
def test_zero_gradients_stay_finite(grafting):
    W0 = None
    W, opt = run_steps(lambda t: torch.zeros(6, 4), grafting=grafting)
    assert all_finite(W, opt) and opt.counters["eigh_failures"] == 0
    torch.manual_seed(0)
    W0 = torch.randn(6, 4)
    assert torch.equal(W.detach(), W0)  # no gradient, no decay: nothing moves


def test_rank_one_gradients_stay_finite():
    u, v = torch.randn(6, 1), torch.randn(1, 4)
    W, opt = run_steps(lambda t: (t + 1) * u @ v, steps=8)
    assert all_finite(W, opt) and opt.counters["eigh_failures"] == 0


@pytest.mark.parametrize("grafting", ["adam", None])
def test_huge_finite_gradients_never_produce_nan(grafting):
    # G Gᵀ overflows float32: the overflowed factor restarts from zero at the refresh and keeps its previous root
    # (issue 11; it used to stay inf and count as a failed root), with a warning.
    with pytest.warns(RuntimeWarning, match="restarted from zero"):
        W, opt = run_steps(lambda t: torch.full((6, 4), 1e30) * torch.randn(6, 4).sign(), grafting=grafting,
                           betas=(0.9, 0.99))
    assert torch.isfinite(W).all()
    assert opt.counters["factor_restarts"] > 0 and opt.counters["eigh_failures"] == 0


def test_empty_parameter_is_left_alone():
    E = nn.Parameter(torch.zeros(0, 3))
    W = nn.Parameter(torch.ones(2, 2))
    opt = Shampoo([E, W])
    E.grad, W.grad = torch.zeros(0, 3), torch.ones(2, 2)
    opt.step()
    assert not opt.state[E] and opt.state[W]["step"] == 1


def test_nonfinite_gradient_skips_step_and_keeps_state():
    params = make_params(torch.float32)
    opt = Shampoo(list(params.values()), max_preconditioner_dim=MAX_DIM)
    train(params, opt, 0, 2)
    before = {k: p.detach().clone() for k, p in params.items()}
    state_before = copy.deepcopy(opt.state_dict())
    for k, g in grads_at(2, params).items():
        params[k].grad = g
    params["w1"].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert opt.counters["skipped_steps"] == 1
    for k, p in params.items():
        assert torch.equal(p, before[k])
    for pid, st in opt.state_dict()["state"].items():
        assert_same_state(st, state_before["state"][pid])


def test_nonfinite_gradient_raise_policy():
    W = nn.Parameter(torch.zeros(3, 3))
    opt = Shampoo([W], nonfinite="raise")
    W.grad = torch.full((3, 3), float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert not opt.state[W]


# ----- arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(1.0, 1.0)), "betas\\[0\\]"),
    (dict(betas=(0.9, 0.0)), "betas\\[1\\]"), (dict(betas=(0.9, 1.5)), "betas\\[1\\]"), (dict(betas=0.9), "betas"),
    (dict(epsilon=0.0), "epsilon"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
    (dict(start_preconditioning_step=2.5), "start_preconditioning_step"),
    (dict(use_bias_correction="yes"), "use_bias_correction"), (dict(grafting="sgd"), "grafting"),
    (dict(grafting_beta2=1.0), "grafting_beta2"), (dict(grafting="adagrad", grafting_beta2=0.9), "grafting_beta2"),
    (dict(grafting_epsilon=-1e-8), "grafting_epsilon"), (dict(ema_rate=1.0), "ema_rate"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(batched="no"), "batched"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        Shampoo([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_good_edge_arguments_accepted():
    p = nn.Parameter(torch.zeros(2, 2))
    Shampoo([p], start_preconditioning_step=math.inf)
    Shampoo([p], precondition_frequency=10, start_preconditioning_step=10)
    Shampoo([p], grafting="adagrad", grafting_beta2=1.0)
    Shampoo([p], grafting=None, betas=(0.0, 0.5))


def test_bad_role_and_add_param_group():
    with pytest.raises(ValueError, match="Invalid role"):
        Shampoo([{"params": [nn.Parameter(torch.zeros(2))], "role": "bias"}])
    opt = Shampoo([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -3})
    assert len(opt.param_groups) == 1


def test_weight_decay_masked_by_role():
    ps = {r: nn.Parameter(torch.ones(3, 3)) for r in ("hidden", "head", "embedding", "vector")}
    opt = Shampoo([{"params": [p], "role": r} for r, p in ps.items()], lr=0.5, weight_decay=0.2)
    for p in ps.values():
        p.grad = torch.zeros(3, 3)
    opt.step()  # zero gradient: only decay moves the weights
    assert torch.allclose(ps["hidden"], torch.full((3, 3), 0.9)) and torch.allclose(ps["head"], torch.full((3, 3), 0.9))
    assert torch.equal(ps["embedding"], torch.ones(3, 3)) and torch.equal(ps["vector"], torch.ones(3, 3))


# ----- averaging ------------------------------------------------------------------------------------------------


def test_averaging_eval_train_round_trip():
    params = mixed_params()
    opt = Shampoo(list(params.values()), **RESUME_HYPER)
    ema = {k: torch.zeros(p.shape, dtype=F64) for k, p in params.items()}
    for t in range(6):
        for k, p in params.items():
            ema[k] = 0.9 * ema[k] + 0.1 * p.detach().to(F64)  # the pre-update parameters
        train(params, opt, t, t + 1)
    live = {k: p.detach().clone() for k, p in params.items()}
    opt.eval()
    for k, p in params.items():
        assert opt.state[p]["step"] == 6
        expected = (ema[k] / (1 - 0.9**6)).to(p.dtype)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if p.dtype == torch.bfloat16 else 1e-6)
    assert not torch.equal(params["w1"], live["w1"])
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    for k, p in params.items():
        assert torch.equal(p, live[k]), k


def test_no_averaging_eval_is_a_no_op():
    params = make_params(torch.float32)
    opt = Shampoo(list(params.values()), max_preconditioner_dim=MAX_DIM)
    train(params, opt, 0, 3)
    live = {k: p.detach().clone() for k, p in params.items()}
    opt.eval()
    for k, p in params.items():
        assert torch.equal(p, live[k]) and "ema" not in opt.state[p]
    opt.train()
    train(params, opt, 3, 4)


# ----- convergence ----------------------------------------------------------------------------------------------


def test_converges_on_ill_conditioned_regression():
    torch.manual_seed(0)
    X = torch.randn(128, 12) * torch.logspace(-0.5, 0.5, 12)  # input scales 0.3..3
    W_true = torch.randn(12, 8, dtype=F64).float()
    Y = X @ W_true
    W = nn.Parameter(torch.zeros(12, 8))
    b = nn.Parameter(torch.zeros(8))
    # max_preconditioner_dim=64 keeps W a 12x8 matrix with two Kronecker factors (with the default 1024 it would be
    # merged into one 96-vector with a 96x96 factor)
    opt = Shampoo([W, b], lr=0.05, precondition_frequency=5, max_preconditioner_dim=64)

    def loss():
        return ((X @ W + b - Y) ** 2).mean()

    first = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 1e-2 * first, (loss().item(), first)
