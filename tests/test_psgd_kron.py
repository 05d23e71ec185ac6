"""PSGDKron: parity with kron_torch (the reference implementation, installed from PyPI), batching, exact resume
with the random sources, robustness, arguments, averaging and a convergence sanity check."""

from __future__ import annotations

import copy
import io
import random
import warnings

import pytest
import torch
from torch import nn

import whiten
from state_checks import assert_same_state
from whiten import kron_kernels
from whiten.optim.psgd_kron import PSGDKron, precond_update_prob_schedule

@pytest.fixture(autouse=True)
def one_thread():
    """The problems here are tiny: on a busy 2-core machine, intra-op threads in batched matmuls cost milliseconds
    per call in waiting alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- a small problem with every kind of factor -------------------------------------------------------------------
# Two same-shape square matrices (batched together), a rectangular matrix, a vector (diagonal factor), a 3-D tensor
# (merged to 6x4, or kept 3-D with merge_dims=False) and an embedding-like 40x6 matrix whose 40 side exceeds
# max_size_triangular=32 (diagonal factor) and whose rows get zero gradients unless looked up.

SHAPES = {"W1": (8, 6), "W2a": (6, 6), "W2b": (6, 6), "b": (6,), "T": (2, 3, 4), "E": (40, 6)}
HYPER = dict(lr=0.02, b1=0.9, weight_decay=0.1, max_size_triangular=32, precond_lr=0.1, precond_init_scale=1.0)


def make_params(dtype=torch.float64, low=()):
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, s in SHAPES.items():
        out[k] = nn.Parameter((0.5 * torch.randn(s, generator=g, dtype=torch.float64)).to(
            torch.bfloat16 if k in low else dtype))
    return out


_g = torch.Generator().manual_seed(1)
X = torch.randn(16, 8, generator=_g, dtype=torch.float64)
Y = torch.randn(16, 4, generator=_g, dtype=torch.float64)
IDX = torch.randint(0, 40, (16,), generator=_g)


def loss_fn(P):
    dt = P["W1"].dtype
    f = {k: v.to(dt) for k, v in P.items()}  # bf16 parameters take part in float32
    h = torch.tanh(X.to(dt) @ f["W1"] + f["b"] + f["E"][IDX])
    h = torch.tanh(h @ f["W2a"]) @ f["W2b"]
    return ((h @ f["T"].reshape(6, 4) - Y.to(dt)) ** 2).mean()


def train(P, opt, start, stop):
    for _ in range(start, stop):
        opt.zero_grad()
        loss_fn(P).backward()
        opt.step()


def short_schedule(module=None):
    """Flat for 25 steps, then down to 0.2 by step ~41: the counter logic is exercised within 60 steps."""
    make = module.precond_update_prob_schedule if module else precond_update_prob_schedule
    sched = make(max_prob=1.0, min_prob=0.2, decay=0.1, flat_start=25)
    sched._compiled = False  # kron_torch's: run the schedule eagerly (torch.compile's exp may differ by an ulp)
    return sched


# ----- parity with kron_torch --------------------------------------------------------------------------------------


def _solve_in_own_dtype(X, A):
    """kron_torch's _solve_triangular_right without its cast to float32 (a no-op for float32 factors). PSGDKron
    solves in the factor dtype, float64 for float64 parameters."""
    return torch.linalg.solve_triangular(A, X.reshape(-1, X.size(-1)), upper=True, left=False).reshape_as(X)


@pytest.fixture
def kron(monkeypatch):
    import kron_torch.kron as K

    # torch.compile'd kernels draw their noise differently from eager code; compare against the eager functions.
    for name in ("_update_precond", "_balance_Q", "_precond_grad", "_clip_update_rms"):
        monkeypatch.setattr(K, name, getattr(K, name)._torchdynamo_orig_callable)
    monkeypatch.setattr(K, "_solve_triangular_right", _solve_in_own_dtype)
    return K


def test_balancing_and_schedule_are_covered():
    """The parity runs below use seed 42, kron_torch's coin seed: its first balancing falls on step 20, which the
    short schedule makes an update step."""
    coin = random.Random(42)
    assert [i for i in range(60) if coin.random() < 0.01] == [19]
    opt = PSGDKron([nn.Parameter(torch.zeros(2))], preconditioner_update_probability=short_schedule())
    due = [opt._advance_schedule() for _ in range(60)]
    assert all(due[:26]) and 6 < sum(due[26:]) < 20


@pytest.mark.parametrize("dtype, mode, into, merge, tri_block", [
    (torch.float64, None, True, True, 128),
    (torch.float64, None, True, True, 1),  # every triangular product split into blocks, recursively
    (torch.float64, "one_diag", False, False, 2),  # gradient probe; 3-D factors on the middle mode
    (torch.float64, "smart_one_diag", True, True, 128),
    (torch.float32, None, True, True, 128),
])
def test_parity_with_kron_torch(kron, monkeypatch, dtype, mode, into, merge, tri_block):
    monkeypatch.setattr(kron_kernels, "TRI_BLOCK", tri_block)
    opts = dict(HYPER, memory_save_mode=mode, momentum_into_precond_update=into, merge_dims=merge)
    pa, pb = make_params(dtype), make_params(dtype)
    ref = kron.Kron(list(pa.values()), preconditioner_update_probability=short_schedule(kron), precond_dtype=dtype,
                    **opts)
    opt = PSGDKron(list(pb.values()), preconditioner_update_probability=short_schedule(), seed=42, **opts)
    # kron_torch draws its probes from the global generator, PSGDKron from its own seeded with 42: the same
    # sequence, drawn in the same order (nothing else in the loop uses the global generator).
    torch.manual_seed(42)
    worst = 0.0
    for _ in range(60):
        for P, o in ((pa, ref), (pb, opt)):
            o.zero_grad()
            loss_fn(P).backward()
            o.step()
        worst = max(worst, max((pa[k] - pb[k]).abs().max().item() for k in SHAPES))
    # float64: rounding only (~1e-15 measured). float32: einsum vs batched matmul summation orders differ by an ulp
    # per step, and the fit feeds back for 60 steps (~6e-7 measured on weights of size ~0.5).
    assert worst < (1e-12 if dtype == torch.float64 else 1e-5), worst
    assert loss_fn(pb) < 0.3 * loss_fn(make_params(dtype))
    st = opt.state[pb["E"]]  # 40 > max_size_triangular: diagonal (also the largest dim for the *_diag modes)
    assert st["factor_0"].shape == (40,) and st["factor_1"].shape == (6, 6)
    if not merge:  # (2, 3, 4) kept 3-D; one_diag makes the largest dim diagonal
        assert [opt.state[pb["T"]][f"factor_{k}"].shape for k in range(3)] == [(2, 2), (3, 3), (4,)]


def test_default_schedule_matches_kron_torch(kron):
    sched = kron.precond_update_prob_schedule()
    sched._compiled = False
    counter, theirs = torch.tensor(0, dtype=torch.int32), []
    for n in range(4000):  # kron_torch.Kron.step's bookkeeping
        prob = sched(torch.tensor(n, dtype=torch.float32))
        counter += 1
        theirs.append(bool(counter >= 1 / prob))
        if theirs[-1]:
            counter = torch.tensor(0, dtype=torch.int32)
    opt = PSGDKron([nn.Parameter(torch.zeros(2))])
    ours = [opt._advance_schedule() for _ in range(4000)]
    assert ours == theirs
    # every step while flat; at steps 3500-4000 prob falls from 0.050 to 0.030: one update in 20 to 33 steps
    assert all(ours[:501]) and 15 <= sum(ours[3500:]) <= 25


@pytest.mark.parametrize("tri_block", [1, 2, 3, 16])
@pytest.mark.parametrize("d", [7, 8, 33, 100])
def test_blocked_triangular_products_equal_dense(monkeypatch, d, tri_block):
    """The triangular products skip the zero blocks of the factors; the results are the dense products."""
    monkeypatch.setattr(kron_kernels, "TRI_BLOCK", tri_block)
    g = torch.Generator().manual_seed(d)
    u, v = (torch.randn(3, d, d, generator=g, dtype=torch.float64).triu() for _ in range(2))
    x = torch.randn(3, d, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    cases = [(kron_kernels._tri_mm(u, x, upper=True), u @ x), (kron_kernels._tri_mm(u.mT, x, upper=False), u.mT @ x),
             (kron_kernels._mm_tri(y, u, upper=True), y @ u), (kron_kernels._mm_tri(y, u.mT, upper=False), y @ u.mT),
             (kron_kernels._upper_times_upper(u, v), u @ v), (kron_kernels._gram(x), x @ x.mT),
             (kron_kernels._gram(y.mT), y.mT @ y)]
    for got, want in cases:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert got.is_contiguous()
    assert torch.equal(kron_kernels._upper_times_upper(u, v).tril(-1), torch.zeros_like(u))


def test_blocking_only_on_the_cpu_and_above_the_threshold():
    assert kron_kernels._halve(torch.empty(1, 300, 300), 300) == 150
    assert kron_kernels._halve(torch.empty(1, 200, 200), 200) == 0  # halves below TRI_BLOCK (128)
    assert kron_kernels._halve(torch.empty(1, 300, 300, device="meta"), 300) == 0  # not measured off the CPU


def test_blocked_products_at_real_sizes_float32(monkeypatch):
    """A 300x260 weight (both factors split into 150/130-wide blocks) trained in float32 follows the dense-product
    run to rounding."""
    g = torch.Generator().manual_seed(5)
    W0, X0 = torch.randn(300, 260, generator=g) * 0.05, torch.randn(64, 260, generator=g)
    Y0 = torch.randn(64, 300, generator=g)
    finals = []
    for tri_block in (128, 10**9):
        monkeypatch.setattr(kron_kernels, "TRI_BLOCK", tri_block)
        W = nn.Parameter(W0.clone())
        opt = PSGDKron([W], lr=0.01, seed=1)
        for _ in range(8):
            opt.zero_grad()
            ((X0 @ W.T - Y0) ** 2).mean().backward()
            opt.step()
        finals.append(W.detach().clone())
    assert (finals[0] - W0).abs().max() > 1e-4  # the weight moved by far more than the tolerance below
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-6)


def test_cached_preconditioner_equals_uncached_float64(monkeypatch):
    """Steps that do not update the factors precondition with a cached QᵀQ, computed once per factor change."""
    recomputed = []  # per call on a non-update step: whether the bucket's products were computed anew
    original = PSGDKron._factor_grams

    def recording(self, bkey, qs):
        before = self._grams.get(bkey)
        out = original(self, bkey, qs)
        recomputed.append(self._grams[bkey] is not before)
        return out

    monkeypatch.setattr(PSGDKron, "_factor_grams", recording)
    results = []
    for cache in (True, False):
        P = make_params()
        opt = PSGDKron(list(P.values()), preconditioner_update_probability=short_schedule(),
                       cache_preconditioner=cache, **HYPER)
        train(P, opt, 0, 60)
        results.append((P, opt))
    (pa, oa), (pb, ob) = results
    for k in SHAPES:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-12, msg=k)
    assert ob._grams == {}
    # the schedule skips updates on most of steps 26-60; the products are recomputed after each update only
    assert len(recomputed) > 10 * len(oa._grams) and 0 < sum(recomputed) < len(recomputed) / 2
    for entries in oa._grams.values():  # and what is cached is the product of the factors as they are now
        for q, version, gram in entries:
            if gram is not None:
                assert q._version == version and torch.equal(gram, q.mT @ q)


# ----- batching, randomness, resume ----------------------------------------------------------------------------------


def test_batched_equals_per_parameter_float64():
    results = []
    for batched in (True, False):
        P = make_params()
        opt = PSGDKron(list(P.values()), preconditioner_update_probability=short_schedule(), batched=batched, **HYPER)
        train(P, opt, 0, 40)
        results.append((P, opt))
    (pa, oa), (pb, _) = results
    for k in SHAPES:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-12, msg=k)
    # the two square matrices really share stacks: their state tensors are views of one storage
    sa, sb = oa.state[pa["W2a"]], oa.state[pa["W2b"]]
    assert sa["factor_0"].untyped_storage().data_ptr() == sb["factor_0"].untyped_storage().data_ptr()


def test_seeded_and_global_rng_untouched():
    def run(seed):
        P = make_params(torch.float32)
        opt = PSGDKron(list(P.values()), seed=seed, **HYPER)
        train(P, opt, 0, 5)
        return torch.cat([p.detach().flatten() for p in P.values()])

    before = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def checkpoint(P, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"params": {k: v.detach() for k, v in P.items()}, "opt": opt.state_dict()}, buf)
    return buf.getvalue()



def mixed():
    """float32 parameters with W2a in bf16 (fp32 state); averaging on."""
    P = make_params(torch.float32, low=("W2a",))
    opt = PSGDKron(list(P.values()), preconditioner_update_probability=short_schedule(), ema_rate=0.9, seed=3,
                   **HYPER)
    return P, opt


@pytest.mark.parametrize("stop_at", [1, 20, 33])
def test_exact_resume(stop_at):
    total = 40
    P, opt = mixed()
    train(P, opt, 0, total)

    P2, opt2 = mixed()
    train(P2, opt2, 0, stop_at)
    blob = checkpoint(P2, opt2)
    del P2, opt2

    P3, opt3 = mixed()
    saved = torch.load(io.BytesIO(blob))  # weights_only: the random state is plain tensors, ints and tuples
    with torch.no_grad():
        for k, v in saved["params"].items():
            P3[k].copy_(v)
    opt3.load_state_dict(saved["opt"])
    train(P3, opt3, stop_at, total)

    for k in SHAPES:
        assert P[k].dtype == P3[k].dtype and torch.equal(P[k], P3[k]), k
        assert_same_state(opt.state[P[k]], opt3.state[P3[k]])
    assert P["W2a"].dtype == torch.bfloat16 and opt.state[P["W2a"]]["factor_0"].dtype == torch.float32
    a, b = opt.state_dict()["param_groups"][0]["psgd_kron"], opt3.state_dict()["param_groups"][0]["psgd_kron"]
    assert a["schedule_step"] == b["schedule_step"] == total and torch.equal(a["coin"], b["coin"])
    assert torch.equal(a["generators"]["cpu"], b["generators"]["cpu"])


def test_resume_without_random_state_differs():
    """Guard for the test above: restoring everything but the random state does change the run."""
    P, opt = mixed()
    train(P, opt, 0, 12)
    P2, opt2 = mixed()
    train(P2, opt2, 0, 6)
    sd = opt2.state_dict()
    del sd["param_groups"][0]["psgd_kron"]
    P3, opt3 = mixed()
    with torch.no_grad():
        for k in SHAPES:
            P3[k].copy_(P2[k])
    opt3.load_state_dict(sd)
    train(P3, opt3, 6, 12)
    assert not all(torch.equal(P[k], P3[k]) for k in SHAPES)


def test_deepcopy_keeps_settings_and_random_state():
    P, opt = mixed()
    train(P, opt, 0, 30)  # past the flat part of the schedule: the cached QᵀQ is in use
    assert opt._grams
    opt2 = copy.deepcopy(opt)  # copies the parameters with it; the cache is not copied but recomputed
    P2 = dict(zip(SHAPES, opt2.param_groups[0]["params"]))
    assert opt2.seed == 3 and opt2.batched and opt2.cache_preconditioner and opt2._prob_step == 30
    assert opt2._grams == {}
    train(P, opt, 30, 40)
    train(P2, opt2, 30, 40)
    for k in SHAPES:
        assert torch.equal(P[k], P2[k]), k
    plain = PSGDKron([nn.Parameter(torch.zeros(2, 2))], cache_preconditioner=False)
    assert not copy.deepcopy(plain).cache_preconditioner


# ----- robustness ------------------------------------------------------------------------------------------------


def run_steps(grads_fn, steps=30, **kw):
    w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    v = nn.Parameter(torch.ones(5))
    opt = PSGDKron([w, v], lr=0.01, preconditioner_update_probability=1.0, **kw)
    for t in range(steps):
        w.grad, v.grad = grads_fn(t, (6, 4)), grads_fn(t, (5,))
        opt.step()
    for st in opt.state.values():
        for val in st.values():
            assert not isinstance(val, torch.Tensor) or torch.isfinite(val).all()
    return w, v, opt


def test_zero_gradients_stay_finite_and_keep_factors():
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w, v, opt = run_steps(lambda t, s: torch.zeros(s))
    assert torch.equal(w, w0) and torch.equal(v, torch.ones(5))
    # kron_torch would grow Q by ~precond_lr per update here, without bound
    assert torch.equal(opt.state[w]["factor_0"], torch.eye(6)) and torch.equal(opt.state[v]["factor_0"],
                                                                              torch.ones(5))


def test_rank_one_gradients_stay_finite():
    g = torch.Generator().manual_seed(1)
    u, r = torch.randn(6, 1, generator=g), torch.randn(1, 4, generator=g)
    w, v, opt = run_steps(lambda t, s: ((t + 1) * u @ r) if s == (6, 4) else torch.full(s, t + 1.0))
    assert torch.isfinite(w).all() and torch.isfinite(v).all()
    q = opt.state[w]["factor_0"]
    assert torch.equal(q, q.triu()) and (q.diagonal() > 0).all()


def test_huge_gradients_stay_finite_and_bounded():
    """1e30 gradients overflow A Aᵀ and the update's mean square in float32; both are computed rescaled, and the
    RMS clip bounds every step at 1.1·lr."""
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    sign = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)).sign()
    w, v, opt = run_steps(lambda t, s: 1e30 * (sign if s == (6, 4) else torch.ones(s)))
    assert torch.isfinite(w).all() and torch.isfinite(v).all()
    moved = (w - w0).square().mean().sqrt().item()
    assert 0.01 < moved <= 30 * 0.01 * 1.1 + 1e-6
    # the factors adapted to the scale of the gradient: P shrank
    assert opt.state[w]["factor_0"].abs().max() < 0.9


def test_nonfinite_gradient_skips_step_and_keeps_state():
    P, opt = mixed()
    train(P, opt, 0, 3)
    params_before = {k: v.detach().clone() for k, v in P.items()}
    sd_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn(P).backward()
    P["W1"].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert opt.counters["skipped_steps"] == 1
    for k in SHAPES:
        assert torch.equal(P[k], params_before[k]), k
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        assert_same_state(st, sd_before["state"][pid])
    a, b = sd["param_groups"][0]["psgd_kron"], sd_before["param_groups"][0]["psgd_kron"]  # nothing moved
    assert (a["schedule_step"], a["update_counter"]) == (b["schedule_step"], b["update_counter"])
    assert torch.equal(a["coin"], b["coin"])
    assert torch.equal(a["generators"]["cpu"], b["generators"]["cpu"])
    assert sd["param_groups"][0]["whiten_counters"]["skipped_steps"] == 1


def test_nonfinite_gradient_raise_policy():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = PSGDKron([w], nonfinite="raise")
    w.grad = torch.full((3, 3), float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert not opt.state[w]


def test_scalar_bf16_and_float64_parameters():
    s = nn.Parameter(torch.tensor(2.0))  # kron_torch fails on 0-d tensors
    h = nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    d = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    opt = PSGDKron([s, h, d], lr=0.1)
    for _ in range(3):
        for p in (s, h, d):
            p.grad = torch.ones_like(p)
        opt.step()
    assert s.shape == () and s.item() < 2.0 and opt.state[s]["factor_0"].shape == (1,)
    assert h.dtype == torch.bfloat16 and (h < 1).all()
    assert opt.state[h]["momentum"].dtype == torch.float32 and opt.state[h]["factor_0"].dtype == torch.float32
    assert opt.state[d]["factor_1"].dtype == torch.float64


def test_weight_decay_masked_by_role_and_shape():
    ps = {r: nn.Parameter(torch.ones(3, 3)) for r in ("hidden", "head", "conv", "embedding", "vector")}
    bare = [nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))]  # roles from shapes: hidden, vector
    groups = [{"params": [p], "role": r} for r, p in ps.items()] + [{"params": bare}]
    opt = PSGDKron(groups, lr=1.0, weight_decay=0.5)
    for p in list(ps.values()) + bare:
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only decay moves the weights
    for r in ("hidden", "head", "conv"):
        assert torch.equal(ps[r], torch.full((3, 3), 0.5)), r
    assert torch.equal(ps["embedding"], torch.ones(3, 3)) and torch.equal(ps["vector"], torch.ones(3, 3))
    assert torch.equal(bare[0], torch.full((3, 3), 0.5)) and torch.equal(bare[1], torch.ones(3))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(b1=1.0), "b1"), (dict(b1=-0.1), "b1"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(preconditioner_update_probability=0.0), "preconditioner_update_probability"),
    (dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
    (dict(preconditioner_update_probability="often"), "preconditioner_update_probability"),
    (dict(max_size_triangular=-1), "max_size_triangular"), (dict(max_size_triangular=2.5), "max_size_triangular"),
    (dict(min_ndim_triangular=-1), "min_ndim_triangular"), (dict(memory_save_mode="some_diag"), "memory_save_mode"),
    (dict(momentum_into_precond_update=1), "momentum_into_precond_update"), (dict(precond_lr=-0.1), "precond_lr"),
    (dict(precond_init_scale=0.0), "precond_init_scale"), (dict(merge_dims="yes"), "merge_dims"),
    (dict(ema_rate=1.0), "ema_rate"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(batched="no"), "batched"),
    (dict(cache_preconditioner=1), "cache_preconditioner"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        PSGDKron([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_bad_role_and_bad_schedule_value():
    with pytest.raises(ValueError, match="Invalid role"):
        PSGDKron([{"params": [nn.Parameter(torch.zeros(2))], "role": "bias"}])
    w = nn.Parameter(torch.zeros(2))
    opt = PSGDKron([w], preconditioner_update_probability=lambda n: 2.0)
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match="Invalid preconditioner_update_probability"):
        opt.step()


# ----- averaging ---------------------------------------------------------------------------------------------------


def test_eval_train_round_trip_is_bit_exact():
    P, opt = mixed()
    train(P, opt, 0, 10)
    live = {k: v.detach().clone() for k, v in P.items()}
    opt.eval()
    st = opt.state[P["W1"]]
    assert st["step"] == 10
    torch.testing.assert_close(P["W1"].detach(), whiten.averaged_value(st["ema"], 0.9, 10))
    assert not torch.equal(P["W1"], live["W1"])
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    for k in SHAPES:
        assert torch.equal(P[k], live[k]), k
    train(P, opt, 10, 11)


def test_no_averaging_by_default():
    w = nn.Parameter(torch.ones(3, 2))
    opt = PSGDKron([w])
    w.grad = torch.ones(3, 2)
    opt.step()
    assert "ema" not in opt.state[w]
    before = w.detach().clone()
    opt.eval()
    assert torch.equal(w, before)
    opt.train()


# ----- integration and convergence -------------------------------------------------------------------------------


def test_lr_scheduler_and_closure():
    P = make_params(torch.float32)
    opt = PSGDKron(list(P.values()), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    for _ in range(6):
        def closure():
            opt.zero_grad()
            loss = loss_fn(P)
            loss.backward()
            return loss
        assert torch.isfinite(opt.step(closure))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_ill_conditioned_regression_converges():
    """Least squares with features scaled over 3 decades: PSGD whitens the input side and gets the loss down by
    orders of magnitude where plain SGD at a stable step size barely moves the small directions."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(256, 12, generator=g) * torch.logspace(-1.5, 1.5, 12)
    target = feats @ torch.randn(12, 3, generator=g)
    w = nn.Parameter(torch.zeros(12, 3))
    opt = PSGDKron([w], lr=0.05, b1=0.9, preconditioner_update_probability=1.0)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(300):
            loss = ((feats @ w - target) ** 2).mean()
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < 1e-3 * first, (loss.item(), first)


def test_update_due_of_a_number_rounds_as_the_tensor_comparison():
    """A Python probability is compared in Python (no tensor read at every step), rounded to float32 as torch's
    int32-against-float comparison rounds, so the same steps are due."""
    import random

    from whiten.kron_kernels import update_due

    rng = random.Random(0)
    probs = [1.0, 0.5, 0.1, 0.03, 1 / 3, 1e-6, 1e-45, 1e-39, 2.0, 7] + [rng.uniform(1e-4, 1.0) for _ in range(300)]
    # ties: 1/prob exactly at, just below and just above an integer once rounded to float32
    probs += [1 / (n + d) for n in (3, 33, 16777216, 16777217) for d in (-1e-9, 0.0, 1e-9)]
    for prob in probs:
        for counter in (0, 1, 2, 3, 4, 32, 33, 34, 999_999, 1_000_000, 16_777_216, 16_777_217, 2**31 - 1):
            expected = bool(torch.tensor(counter, dtype=torch.int32) >= 1 / prob)
            assert update_due(counter, prob) is expected, (counter, prob)
