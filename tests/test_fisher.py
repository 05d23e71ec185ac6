"""The sampled-label curvature contract (whiten.fisher): what sample_fisher samples and hands over, when it is a
no-op, that p.grad and the graph survive it, gradient accumulation, module hooks, exact resume of the label stream,
the non-finite policy, and DDP: sampling on every rank gives the numbers of one process."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
from dist_utils import launch, load_dcp, save_dcp
from whiten.fisher import FisherMixin, _mix, sample_labels
from whiten.optim._base import WhitenOptimizer

FISHER_OPTIMIZERS = {"TNT": lambda params, **kw: whiten.TNT(params, **{"lr": 1e-3, "update_freq": 2, **kw}),
                                          # a fast Hessian EMA and a large rho: the clipping is not saturated, so the curvature shows
                     "Sophia": lambda params, **kw: whiten.Sophia(params, **{"lr": 1e-3, "k": 2, "betas": (0.9, 0.5),
                                                                            "rho": 10.0, **kw})}


class Recorder(FisherMixin, WhitenOptimizer):
    """Plain SGD that records what the contract hands over: captured (grads, n) per step."""

    def __init__(self, params, every=1, seed=0, nonfinite="skip", process_group=None):
        self.every = every
        self.captured = []
        self._init_fisher(seed)
        super().__init__(params, dict(lr=0.1), nonfinite=nonfinite, process_group=process_group)

    def fisher_schedule(self, step):
        return step % self.every == 0

    def capture_fisher(self, grads, n):
        super().capture_fisher(grads, n)
        self.captured.append(([None if g is None else g.clone() for g in grads], n))

    def _step_group(self, gi, group, params):
        for p in params:
            p.add_(p.grad, alpha=-group["lr"])


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def data(t, rows=6):
    g = torch.Generator().manual_seed(50 + t)
    return torch.randn(rows, 5, generator=g), torch.randint(0, 4, (rows,), generator=g)


def sampled_grads(model, logits, labels, kind="ce"):
    """The mean-loss gradient on given labels, computed independently of whiten."""
    if kind == "ce":
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    else:
        loss = F.mse_loss(logits, labels)
    return torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)


def test_captured_gradient_is_the_mean_loss_gradient_on_the_documented_labels():
    model = net()
    opt = Recorder(model.parameters(), seed=7)
    for t in range(3):
        x, y = data(t)
        logits = model(x)
        assert opt.sample_fisher(logits)
        labels = sample_labels(logits, "ce", _mix(7, t, 0))  # stream 0: the first call of one process
        expected = sampled_grads(model, logits, labels)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
        grads, n = opt.captured[-1]
        assert n == 6
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_a_float64_model_gets_its_sampled_gradient_in_float64(kind):
    # the sampled loss is taken in the logits' precision when that is above float32, so a float64 model's curvature
    # is float64 to the last bits (it was computed in float32 and agreed to ~1e-7 only)
    model = net().double()
    opt = Recorder(model.parameters(), seed=3)
    x, _ = data(0)
    logits = model(x.double())
    assert opt.sample_fisher(logits, kind=kind)
    labels = sample_labels(logits, kind, _mix(3, 0, 0))
    expected = sampled_grads(model, logits, labels, kind)
    opt.zero_grad()
    logits.sum().backward()
    opt.step()
    grads, _ = opt.captured[-1]
    for g, e in zip(grads, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)


def test_labels_follow_the_predictive_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(40000, 4).clone()
    labels = sample_labels(logits, "ce", 123)
    freq = torch.bincount(labels, minlength=4).double() / labels.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.01, rtol=0)
    # any leading dims: (batch, time, classes) gives (batch, time) labels
    assert sample_labels(torch.randn(3, 5, 9), "ce", 1).shape == (3, 5)
    out = torch.randn(200, 50)
    targets = sample_labels(out, "mse", 5)
    assert targets.shape == out.shape
    assert abs((targets - out).var().item() - 0.5) < 0.02  # N(output, 1/2): the Gaussian of mse_loss


def test_mse_kind_counts_elements_and_uses_mse_loss():
    model = net()
    opt = Recorder(model.parameters(), seed=3)
    x, _ = data(0)
    out = model(x)
    assert opt.sample_fisher(out, kind="mse")
    expected = sampled_grads(model, out, sample_labels(out, "mse", _mix(3, 0, 0)), kind="mse")
    opt.zero_grad()
    out.square().mean().backward()
    opt.step()
    grads, n = opt.captured[-1]
    assert n == out.numel()
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_no_op_when_not_due_and_pgrad_and_graph_survive():
    model = net()
    opt = Recorder(model.parameters(), every=3)
    for t in range(7):
        x, y = data(t)
        logits = model(x)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward(retain_graph=True)
        before = [p.grad.clone() for p in model.parameters()]
        assert opt.sample_fisher(logits) == (t % 3 == 0)  # after a backward that kept the graph: fine too
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
        opt.step()
    assert len(opt.captured) == 3 and opt.fisher_steps == 7
    # the usual order: sample, then the ordinary backward on the same graph
    x, y = data(9)
    logits = model(x)
    opt2 = Recorder(model.parameters())
    assert opt2.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()  # the graph was retained for it


def test_clear_errors():
    model = net()
    opt = Recorder(model.parameters())
    x, y = data(0)
    with pytest.raises(ValueError, match="Invalid kind"):
        opt.sample_fisher(model(x), kind="bce")
    with pytest.raises(ValueError, match="do not require grad"):
        opt.sample_fisher(model(x).detach())
    with pytest.raises(TypeError, match="floating-point"):
        opt.sample_fisher(torch.ones(3, dtype=torch.long))
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        opt.sample_fisher(logits)
    with pytest.raises(ValueError, match="fisher_seed"):
        Recorder(model.parameters(), seed=-1)


def test_accumulation_is_the_mean_over_all_labels():
    model = net()
    opt = Recorder(model.parameters(), seed=2)
    parts, sizes = [], []
    for c, rows in enumerate((6, 3)):
        x, _ = data(c, rows)
        logits = model(x)
        opt.sample_fisher(logits)
        labels = sample_labels(logits, "ce", _mix(2, 0, c))  # call c of one process: stream c
        parts.append(sampled_grads(model, logits, labels))
        sizes.append(rows)
        F.cross_entropy(logits, labels).backward()
    opt.step()
    grads, n = opt.captured[-1]
    assert n == 9
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, (parts[0][i] * 6 + parts[1][i] * 3) / 9)


def test_module_hooks_see_the_sampling_flag():
    model = net()
    opt = Recorder(model.parameters())
    seen = []
    model[2].register_full_backward_hook(lambda m, gi, go: seen.append((opt.sampling_fisher, opt.fisher_batch_n)))
    x, y = data(0)
    logits = model(x)
    opt.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    assert seen == [(True, 6), (False, 0)]


def test_a_skipped_step_drops_the_sampled_gradients_and_does_not_advance_the_clock():
    model = net()
    opt = Recorder(model.parameters())
    x, y = data(0)
    logits = model(x)
    opt.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.captured == [] and opt.fisher_steps == 0 and opt._fisher_sums is None


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_sampled_gradients_follow_the_policy(policy):
    model = net()
    opt = Recorder(model.parameters(), nonfinite=policy)
    x, y = data(0)
    logits = model(x)
    opt.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    opt._fisher_sums[0][0, 0] = float("inf")  # as if the sampled backward had overflowed
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="sampled-label"):
            opt.step()
        return
    with pytest.warns(RuntimeWarning, match="sampled-label"):
        opt.step()
    assert opt.captured == [] and opt.fisher_skipped == 1 and opt.fisher_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _diverged(x):
    """A batch whose forward is not finite (one input entry NaN: its row of logits is NaN)."""
    x = x.clone()
    x[0, 0] = float("nan")
    return x


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_nonfinite_logits_skip_the_call_counted_and_warned(kind):
    """A diverged forward: no labels (torch's multinomial would raise on them), no backward, nothing kept; the
    call returns False, warns and counts, and the graph and p.grad are untouched for the ordinary backward."""
    model = net()
    opt = Recorder(model.parameters())
    x, y = data(0)
    logits = model(_diverged(x))
    assert not torch.isfinite(logits).all()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"logits are not finite.*1 skipped so far, opt.fisher_skipped"):
        assert opt.sample_fisher(logits, kind=kind) is False
    assert opt.fisher_skipped == 1 and opt._fisher_sums is None and opt._fisher_n == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    logits.sum().backward()  # the graph is still there
    assert opt.state_dict()["param_groups"][0]["fisher"]["skipped"] == 1


def test_nonfinite_logits_raise_under_the_raise_policy():
    model = net()
    opt = Recorder(model.parameters(), nonfinite="raise")
    x, _ = data(0)
    with pytest.raises(FloatingPointError, match=r"Recorder.sample_fisher: the logits are not finite.*'raise'"):
        opt.sample_fisher(model(_diverged(x)))
    assert opt.fisher_skipped == 0 and opt._fisher_sums is None and opt._fisher_calls == 0


def test_a_skipped_call_leaves_the_other_calls_of_the_step():
    """Gradient accumulation: a diverged micro-batch is skipped, the others are kept (their mean, their labels)."""
    model = net()
    opt = Recorder(model.parameters(), seed=2)
    x, _ = data(0)
    with pytest.warns(RuntimeWarning, match="logits are not finite"):
        assert opt.sample_fisher(model(_diverged(x))) is False
    logits = model(x)
    assert opt.sample_fisher(logits)
    labels = sample_labels(logits, "ce", _mix(2, 0, 1))  # call 1: the skipped call 0 still counts as a call
    expected = sampled_grads(model, logits, labels)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    grads, n = opt.captured[-1]
    assert n == 6 and opt.fisher_skipped == 1
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def run(opt_factory, model, start, stop, opt=None):
    opt = opt or opt_factory(model)
    for t in range(start, stop):
        x, y = data(t)
        logits = model(x)
        opt.sample_fisher(logits)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", list(FISHER_OPTIMIZERS))
def test_exact_resume_with_sampling(name):
    def factory(model):
        return FISHER_OPTIMIZERS[name](whiten.param_groups(model), fisher_seed=11)

    model = net()
    run(factory, model, 0, 9)
    expected = copy.deepcopy(model.state_dict())

    model2 = net()
    opt2 = run(factory, model2, 0, 5)
    sd = copy.deepcopy(opt2.state_dict())
    assert sd["param_groups"][0]["fisher"] == {"seed": 11, "steps": 5, "skipped": 0}
    model3 = net(seed=1)
    model3.load_state_dict(model2.state_dict())
    opt3 = FISHER_OPTIMIZERS[name](whiten.param_groups(model3))  # another seed: the checkpoint's wins
    opt3.load_state_dict(sd)
    run(factory, model3, 5, 9, opt=opt3)
    for k, v in model3.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # a pickled copy resumes the same way
    model4 = net()
    opt4 = run(factory, model4, 0, 5)
    clone = pickle.loads(pickle.dumps(opt4))
    assert clone.fisher_steps == 5 and clone.fisher_seed == 11


def test_corrupt_sampling_state_is_refused():
    model = net()
    opt = run(lambda m: FISHER_OPTIMIZERS["TNT"](whiten.param_groups(m)), model, 0, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["fisher"] = {"seed": 0}
    with pytest.raises(ValueError, match="sampling state is unreadable"):
        opt.load_state_dict(sd)


# ----- DDP: every rank samples; the numbers are those of one process ------------------------------------------------

RANK_ROWS = 4


def _global_batch(t, world):
    x, y = data(t, RANK_ROWS * world)
    return x.double(), y  # float64: the ranks' sums round differently from one process's; TNT's inverses amplify it


def _ddp_run(rank, world, name, steps):
    """Rank r trains on rows [r·4, r·4+4) of each global batch; gradients (ordinary and sampled) are averaged by
    whiten over the group, as DDP would (the ordinary ones by hand, here)."""
    import torch.distributed as dist

    model = net().double()
    opt = FISHER_OPTIMIZERS[name](whiten.param_groups(model), process_group=dist.group.WORLD)
    for t in range(steps):
        x, y = _global_batch(t, world)
        x, y = x[rank * RANK_ROWS:(rank + 1) * RANK_ROWS], y[rank * RANK_ROWS:(rank + 1) * RANK_ROWS]
        logits = model(x)
        opt.sample_fisher(logits)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    sd = opt.state_dict()["param_groups"][0]["fisher"]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, sd


def _one_process(name, world, steps, sample=True):
    """The same global batches on one process, the ranks' slices as micro-batches in stream order."""
    model = net().double()
    opt = FISHER_OPTIMIZERS[name](whiten.param_groups(model))
    for t in range(steps):
        x, y = _global_batch(t, world)
        opt.zero_grad()
        for r in range(world):
            logits = model(x[r * RANK_ROWS:(r + 1) * RANK_ROWS])
            if sample:
                opt.sample_fisher(logits)
            (F.cross_entropy(logits, y[r * RANK_ROWS:(r + 1) * RANK_ROWS]) / world).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _real_ddp_run(rank, world, name, steps):
    """torch's DistributedDataParallel around the model, and no process_group: the sampled gradients are averaged
    over the default group, as DDP averages p.grad (the extra autograd.grad does not disturb DDP's reducer)."""
    model = net().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = FISHER_OPTIMIZERS[name](whiten.param_groups(model))
    for t in range(steps):
        x, y = _global_batch(t, world)
        x, y = x[rank * RANK_ROWS:(rank + 1) * RANK_ROWS], y[rank * RANK_ROWS:(rank + 1) * RANK_ROWS]
        logits = ddp(x)
        opt.sample_fisher(logits)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.state_dict()["param_groups"][0]["fisher"]


@pytest.mark.parametrize("runner", ["process_group", "DistributedDataParallel"])
@pytest.mark.parametrize("name", list(FISHER_OPTIMIZERS))
def test_ddp_sampling_on_every_rank_matches_one_process(name, runner):
    world, steps = 2, 6
    results = launch(_ddp_run if runner == "process_group" else _real_ddp_run, world, name, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _one_process(name, world, steps)
    finally:
        torch.set_num_threads(threads)
    for rank, (params, fisher_state) in enumerate(results):
        assert fisher_state == results[0][1]  # the same sampling state on every rank
        for n, v in params.items():
            torch.testing.assert_close(v, expected[n], rtol=1e-11, atol=1e-12, msg=f"{name} rank {rank}: {n}")
    # and the sampled curvature mattered: a run without it ends elsewhere
    plain = _one_process(name, world, steps, sample=False)
    assert any(not torch.allclose(v, plain[n], rtol=1e-4, atol=1e-6) for n, v in expected.items())


@pytest.mark.parametrize("name", list(FISHER_OPTIMIZERS))
def test_dcp_round_trip_resumes_the_label_stream(name, tmp_path):
    """torch.distributed.checkpoint keeps only the first param group's extra keys: the sampling state travels
    there, so a DCP resume samples the same labels as the uninterrupted run."""
    def factory(model):
        return FISHER_OPTIMIZERS[name](whiten.param_groups(model), fisher_seed=4)

    model = net()
    opt = run(factory, model, 0, 5)
    save_dcp(model, opt, tmp_path)
    run(factory, model, 5, 9, opt=opt)

    model2 = net(seed=1)
    opt2 = FISHER_OPTIMIZERS[name](whiten.param_groups(model2))
    load_dcp(model2, opt2, tmp_path)
    assert (opt2.fisher_seed, opt2.fisher_steps) == (4, 5)
    run(factory, model2, 5, 9, opt=opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ----- FSDP2: the extra backward runs through fully_shard's own; the numbers are still those of one process ---------

def _fsdp_model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = net().double()
    mesh = init_device_mesh("cpu", (world,))
    # each Linear its own FSDP unit: model[0]'s input needs no gradient (FSDP's end-of-backward callback finishes
    # it), model[2]'s does (an autograd node does): both of FSDP's post-backward paths run the sampled backward
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_run(rank, world, name, steps):
    from dist_utils import full

    model = _fsdp_model(world)
    opt = FISHER_OPTIMIZERS[name](whiten.param_groups(model))
    for t in range(steps):
        x, y = _global_batch(t, world)
        x, y = x[rank * RANK_ROWS:(rank + 1) * RANK_ROWS], y[rank * RANK_ROWS:(rank + 1) * RANK_ROWS]
        opt.zero_grad()
        logits = model(x)
        opt.sample_fisher(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
    params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    return params, opt.state_dict()["param_groups"][0]["fisher"]


@pytest.mark.parametrize("name,world", [(name, 2) for name in FISHER_OPTIMIZERS] + [("TNT", 3)])
def test_fsdp2_sampling_on_every_rank_matches_one_process(name, world):
    """fully_shard on 2 ranks, and 3 (uneven shards, one empty: 4 rows over 3 ranks): sample_fisher's backward goes
    through FSDP (all-gather, reduce-scatter), the owner of each parameter assembles its sampled gradient, and the
    run equals one process taking the ranks' batches as micro-batches."""
    steps = 6
    results = launch(_fsdp_run, world, name, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _one_process(name, world, steps)
        plain = _one_process(name, world, steps, sample=False)
    finally:
        torch.set_num_threads(threads)
    for rank, (params, fisher_state) in enumerate(results):
        assert fisher_state == results[0][1]
        for n, v in params.items():
            torch.testing.assert_close(v, expected[n], rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}: {n}")
    assert any(not torch.allclose(v, plain[n], rtol=1e-4, atol=1e-6) for n, v in expected.items())


def _fsdp_recorder(rank, world, case):
    """What Recorder captures under FSDP2: on the owner the full mean gradient, elsewhere nothing; p.grad kept."""
    from dist_utils import full

    model = _fsdp_model(world)
    opt = Recorder(model.parameters())
    x, _ = _global_batch(0, world)
    rows = {"equal": [RANK_ROWS, RANK_ROWS], "unequal": [RANK_ROWS, 1], "empty": [RANK_ROWS, 0]}[case]
    start = sum(rows[:rank])
    logits = model(x[start:start + rows[rank]])
    logits.sum().backward(retain_graph=True)  # an ordinary gradient already there
    before = [full(p.grad).clone() for p in model.parameters()]
    assert opt.sample_fisher(logits)
    after = [full(p.grad).clone() for p in model.parameters()]
    opt.step()
    ctx = opt.distributed_context()
    captured = [(None if g is None else g.clone()) for g in opt.captured[0][0]]
    owned = [ctx.owns(p) for p in model.parameters()]
    return before, after, captured, owned, opt.captured[0][1], sum(rows)


@pytest.mark.parametrize("case", ["equal", "unequal", "empty"])
def test_fsdp2_sampled_gradient_is_the_mean_over_all_labels(case):
    """Ranks with different numbers of labels (one with none: it still joins FSDP's collectives): the owner
    captures the mean over every rank's labels, with the labels of stream call·world + rank."""
    results = launch(_fsdp_recorder, 2, case)
    total = results[0][5]
    model = net().double()
    x, _ = _global_batch(0, 2)
    rows = [RANK_ROWS, RANK_ROWS] if case == "equal" else [RANK_ROWS, 1 if case == "unequal" else 0]
    loss = 0.0
    for r in range(2):
        part = model(x[sum(rows[:r]):sum(rows[:r]) + rows[r]])
        if rows[r]:
            labels = sample_labels(part, "ce", _mix(0, 0, r))
            loss = loss + F.cross_entropy(part, labels, reduction="sum")
    expected = torch.autograd.grad(loss / total, list(model.parameters()))
    for rank, (before, after, captured, owned, n, _) in enumerate(results):
        assert n == total
        for b, a in zip(before, after):
            assert torch.equal(a, b)  # the ordinary gradient is untouched
        for g, e, own in zip(captured, expected, owned):
            if own:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
            else:
                assert g is None


def _fsdp_no_sync(rank, world):
    model = _fsdp_model(world)
    opt = Recorder(model.parameters())
    model.set_requires_gradient_sync(False)
    x, _ = _global_batch(0, world)
    logits = model(x[rank * RANK_ROWS:(rank + 1) * RANK_ROWS])
    try:
        opt.sample_fisher(logits)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_fsdp2_sampling_without_gradient_sync_is_refused():
    for message in launch(_fsdp_no_sync, 2):
        assert "gradient sync is off" in message


def _fsdp_accumulate(rank, world):
    """Two micro-batches per rank before one step, each with its own ordinary backward (FSDP accumulates p.grad)."""
    from dist_utils import full

    model = _fsdp_model(world)
    opt = Recorder(model.parameters())
    x, y = _global_batch(0, world)
    ordinary = []
    for c in range(2):
        rows = slice(rank * RANK_ROWS + 2 * c, rank * RANK_ROWS + 2 * c + 2)
        logits = model(x[rows])
        assert opt.sample_fisher(logits)
        F.cross_entropy(logits, y[rows]).backward()
        ordinary.append([full(p.grad).clone() for p in model.parameters()])
    opt.step()
    ctx = opt.distributed_context()
    return opt.captured[0], [ctx.owns(p) for p in model.parameters()], ordinary[-1]


def test_fsdp2_accumulation_is_the_mean_over_all_micro_batches():
    world = 2
    results = launch(_fsdp_accumulate, world)
    model = net().double()
    x, y = _global_batch(0, world)
    sampled, true = 0.0, 0.0
    for r in range(world):
        for c in range(2):
            rows = slice(r * RANK_ROWS + 2 * c, r * RANK_ROWS + 2 * c + 2)
            part = model(x[rows])
            labels = sample_labels(part, "ce", _mix(0, 0, c * world + r))
            sampled = sampled + F.cross_entropy(part, labels, reduction="sum")
            true = true + F.cross_entropy(part, y[rows]) / world  # FSDP averages the ranks' summed micro-batches
    expected = torch.autograd.grad(sampled / (2 * 2 * world), list(model.parameters()), retain_graph=True)
    expected_grad = torch.autograd.grad(true, list(model.parameters()))
    for (grads, n), owned, ordinary in results:
        assert n == 2 * 2 * world
        for g, e, own in zip(grads, expected, owned):
            if own:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
            else:
                assert g is None
        for g, e in zip(ordinary, expected_grad):  # the ordinary gradients accumulated as without sampling
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


# ----- non-finite logits on one rank: every rank skips the same call (no rank left in a collective) -------------------

def _one_rank_diverges(rank, world, mode, policy):
    """Rank 1's forward is not finite, rank 0's is. Under "skip" both ranks skip the call (rank 0 too: its labels
    alone would not be the batch's), count it and step on; under "raise" both raise. Then a finite step samples."""
    import torch.distributed as dist

    from dist_utils import full

    model = _fsdp_model(world) if mode == "fsdp2" else net().double()
    group = dist.group.WORLD if mode == "ddp" else None
    opt = Recorder(model.parameters(), nonfinite=policy, process_group=group)
    x, y = _global_batch(0, world)
    x, y = x[rank * RANK_ROWS:(rank + 1) * RANK_ROWS], y[rank * RANK_ROWS:(rank + 1) * RANK_ROWS]
    logits = model(_diverged(x) if rank == 1 else x)
    outcome = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome["sampled"] = opt.sample_fisher(logits)
        outcome["warned"] = [str(w.message) for w in caught]
    except FloatingPointError as e:
        outcome["raised"] = str(e)
        return outcome
    for p in model.parameters():  # finite ordinary gradients, the same on every rank (as after DDP's all-reduce)
        p.grad = torch.ones_like(p)
    opt.step()
    outcome.update(skipped=opt.fisher_skipped, captured=len(opt.captured),
                   fisher=opt.state_dict()["param_groups"][0]["fisher"])
    opt.zero_grad()
    logits = model(x)  # a finite step after it samples on every rank again
    outcome["next"] = opt.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    opt.step()
    outcome.update(captured_after=len(opt.captured), n=opt.captured[-1][1] if opt.captured else 0,
                   finite=all(bool(torch.isfinite(full(p)).all()) for p in model.parameters()))
    return outcome


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_nonfinite_logits_on_one_rank_are_skipped_on_every_rank(mode):
    results = launch(_one_rank_diverges, 2, mode, "skip")
    for rank, out in enumerate(results):
        assert out["sampled"] is False, rank
        assert len(out["warned"]) == 1 and "not finite (on at least one rank)" in out["warned"][0], rank
        assert out["skipped"] == 1 and out["captured"] == 0 and out["fisher"] == results[0]["fisher"], rank
        assert out["next"] is True and out["captured_after"] == 1 and out["n"] == 2 * RANK_ROWS, rank
        assert out["finite"], rank


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_nonfinite_logits_on_one_rank_raise_on_every_rank(mode):
    results = launch(_one_rank_diverges, 2, mode, "raise")
    for rank, out in enumerate(results):
        assert "the logits are not finite (on at least one rank)" in out["raised"], rank
