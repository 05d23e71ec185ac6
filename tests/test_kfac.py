"""K-FAC and EKFAC: factors against curvlinops-for-pytorch's KFAC/EKFAC operators (empirical and sampled-label
Fisher, MLP, conv, sequence and embedding layers), the preconditioned update and whole runs against float64
references written from the papers, EKFAC's eigenvalue correction against per-example gradients computed one
example at a time, the hooks' lifecycle, the fallback, exact resume, fault cases and DDP."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import warnings

import curvlinops  # pinned in the test extra (scripts/setup.sh installs it without its deps)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
import whiten.fisher
from whiten.optim.kfac import EKFAC, KFAC

BOTH = [KFAC, EKFAC]


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


# ----- models --------------------------------------------------------------------------------------------------------

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2, padding="valid"),
                         nn.Flatten(), nn.Linear(8, 5))


class Seq(nn.Module):
    """Linear layers on (batch, time, dim) inputs; logits returned as (batch, classes, time) (curvlinops' and
    cross_entropy's layout), so the loss averages over batch·time tokens."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).transpose(1, 2)


class Pooled(Seq):
    """A sequence classifier (ViT-like): the loss averages over examples only."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.tanh(self.fc1(x))).mean(1))


class Emb(nn.Module):
    def __init__(self, vocab=7, dim=4, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, classes)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx))).transpose(1, 2)


class OneHot(nn.Module):
    """Emb with the embedding written as a Linear on one-hot vectors (what curvlinops supports)."""

    def __init__(self, emb: Emb):
        super().__init__()
        self.vocab = emb.emb.num_embeddings
        self.lin = nn.Linear(self.vocab, emb.emb.embedding_dim, bias=False)
        self.head = copy.deepcopy(emb.head)
        with torch.no_grad():
            self.lin.weight.copy_(emb.emb.weight.T)

    def forward(self, idx):
        return self.head(torch.tanh(self.lin(F.one_hot(idx, self.vocab).to(self.lin.weight.dtype)))).transpose(1, 2)


def data(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    if kind == "cnn":
        return torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 5, (12,), generator=g)
    if kind in ("seq", "pooled"):
        return torch.randn(6, 7, 5, generator=g), torch.randint(0, 4 if kind == "seq" else 3,
                                                                 (6, 7) if kind == "seq" else (6,), generator=g)
    return torch.randint(0, 7, (5, 6), generator=g), torch.randint(0, 3, (5, 6), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn, "seq": Seq, "pooled": Pooled, "emb": Emb}


def layers_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]


def one_step(opt, model, x, y, sampled=False):
    out = model(x)
    if sampled:
        opt.sample_fisher(out.transpose(1, -1) if out.ndim > 2 else out)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    opt.step()


def curvlinops_factors(model, x, y, fisher_type="empirical"):
    op = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                       fisher_type=fisher_type, separate_weight_and_bias=False,
                                       check_deterministic=False)
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


# ----- factors against curvlinops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,loss_average", [("mlp", "batch+sequence"), ("mlp", "batch"), ("cnn", "batch+sequence"),
                                               ("seq", "batch+sequence"), ("pooled", "batch")])
def test_factors_match_curvlinops_empirical(kind, loss_average):
    model = MODELS[kind]()
    x, y = data(kind)
    A, G = curvlinops_factors(copy.deepcopy(model), x, y)
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, loss_average=loss_average,
               factor_decay=0.0)
    one_step(opt, model, x, y)
    for name, m in layers_of(model):
        s = opt.state[m.weight]
        torch.testing.assert_close(s["factor_a"], A[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s["factor_g"], G[name], rtol=1e-12, atol=1e-14)


def test_sequence_classifier_needs_loss_average_batch():
    """With the default convention a ViT-like model's sequence layers get L = batch·time loss terms instead of the
    batch's: G is off by the sequence length there (and exact at the pooled head)."""
    model = Pooled()
    x, y = data("pooled")
    _, G = curvlinops_factors(copy.deepcopy(model), x, y)
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, factor_decay=0.0)
    one_step(opt, model, x, y)
    torch.testing.assert_close(opt.state[model.fc1.weight]["factor_g"], 7 * G["fc1"])
    torch.testing.assert_close(opt.state[model.head.weight]["factor_g"], G["head"])


def test_embedding_factors_are_those_of_the_one_hot_linear():
    model = Emb()
    x, y = data("emb")
    A, G = curvlinops_factors(OneHot(model), x, y)
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, factor_decay=0.0)
    one_step(opt, model, x, y)
    s = opt.state[model.emb.weight]
    assert s["factor_a"].shape == (7,)  # the diagonal A of one-hot inputs, kept as a vector
    torch.testing.assert_close(torch.diag(s["factor_a"]), A["lin"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s["factor_g"], G["lin"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[model.head.weight]["factor_g"], G["head"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_sampled_fisher_factors_match_curvlinops_on_the_same_labels(kind, monkeypatch):
    """fisher='sampled': G comes from the backward of sample_fisher's labels, with L = the number of labels. The
    Monte-Carlo Fisher on given labels is curvlinops' empirical Fisher on those labels."""
    drawn = []
    original = whiten.fisher.sample_labels

    def record(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(whiten.fisher, "sample_labels", record)
    model = MODELS[kind]()
    x, y = data(kind)
    ref = copy.deepcopy(model)
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, fisher="sampled", factor_decay=0.0)
    one_step(opt, model, x, y, sampled=True)
    assert len(drawn) == 1
    A, G = curvlinops_factors(ref, x, drawn[0])
    for name, m in layers_of(model):
        torch.testing.assert_close(opt.state[m.weight]["factor_a"], A[name], rtol=1e-12, atol=1e-14)
        # whiten.fisher forms the sampled loss in float32 (logits.float()), so G agrees to float32 precision
        torch.testing.assert_close(opt.state[m.weight]["factor_g"], G[name], rtol=1e-6, atol=1e-9)


# ----- EKFAC's eigenvalue correction -----------------------------------------------------------------------------------

def ekfac_scale_after_one_correction(model, x, y):
    """EKFAC's scale after one refresh (step 0) and one correction on the same batch at lr 0 with factor_decay 0:
    exactly this batch's correction in the eigenbasis of this batch's factors."""
    opt = EKFAC(model.parameters(), model=model, factor_every=1, scale_every=1, inverse_every=100, lr=0.0,
                factor_decay=0.0)
    one_step(opt, model, x, y)
    one_step(opt, model, x, y)
    return opt


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_correction_matches_curvlinops(kind):
    model = MODELS[kind]()
    x, y = data(kind)
    ref = copy.deepcopy(model)
    op = curvlinops.EKFACLinearOperator(ref, nn.CrossEntropyLoss(), list(ref.parameters()), [(x, y)],
                                        fisher_type="empirical", separate_weight_and_bias=False,
                                        check_deterministic=False)
    op._maybe_compute_ekfac()
    opt = ekfac_scale_after_one_correction(model, x, y)
    for name, m in layers_of(model):
        s = opt.state[m.weight]
        torch.testing.assert_close(s["scale"], op._corrected_eigenvalues[name], rtol=1e-9, atol=1e-14)


def per_example_correction(model, x, y, opt):
    """L Σ_n (Q_Gᵀ ∇W_n Q_A)², with ∇W_n the gradient of example n's share of the mean loss, computed by one
    backward per example (no hooks involved)."""
    terms = y.numel()
    out = {}
    for n in range(x.shape[0]):
        model.zero_grad()
        logits = model(x[n:n + 1])
        (F.cross_entropy(logits, y[n:n + 1], reduction="sum") / terms).backward()
        for name, m in layers_of(model):
            s = opt.state[m.weight]
            if isinstance(m, nn.Embedding):
                R = s["basis_g"].T @ m.weight.grad.T
            else:
                M = m.weight.grad.reshape(m.weight.shape[0], -1)
                if m.bias is not None:
                    M = torch.cat([M, m.bias.grad.reshape(-1, 1)], 1)
                R = s["basis_g"].T @ M @ s["basis_a"]
            out[name] = out.get(name, 0) + terms * R.square()
    return out


@pytest.mark.parametrize("kind", ["seq", "emb", "cnn", "mlp"])
def test_ekfac_correction_matches_per_example_gradients(kind):
    """Sequences and embeddings sum their positions within an example (curvlinops' EKFAC takes 2-d outputs only)."""
    model = MODELS[kind]()
    x, y = data(kind)
    opt = ekfac_scale_after_one_correction(model, x, y)
    direct = per_example_correction(model, x, y, opt)
    for name, m in layers_of(model):
        torch.testing.assert_close(opt.state[m.weight]["scale"], direct[name], rtol=1e-9, atol=1e-14)


def test_ekfac_weight_sharing_correction_is_independent_of_the_chunk(monkeypatch):
    model = Seq()
    x, y = data("seq")
    whole = ekfac_scale_after_one_correction(copy.deepcopy(model), x, y)
    monkeypatch.setattr("whiten.optim.ekfac.CHUNK_ELEMENTS", 1)  # one example at a time
    chunked = ekfac_scale_after_one_correction(copy.deepcopy(model), x, y)
    for (_, a), (_, b) in zip(layers_of(whole.model), layers_of(chunked.model)):
        torch.testing.assert_close(whole.state[a.weight]["scale"], chunked.state[b.weight]["scale"])


# ----- float64 references of the published rules --------------------------------------------------------------------

def kron_reference(A, G, M, damping):
    """(A_π ⊗ G_π)⁻¹ vec(M) with an explicit Kronecker matrix (column-major vec), π-split Tikhonov damping."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    Ad = A + pi * math.sqrt(damping) * torch.eye(A.shape[0])
    Gd = G + math.sqrt(damping) / pi * torch.eye(G.shape[0])
    v = torch.linalg.solve(torch.kron(Ad, Gd), M.T.reshape(-1))
    return v.reshape(M.shape[1], M.shape[0]).T


def test_kfac_direction_is_the_damped_kronecker_inverse():
    model = mlp()
    x, y = data("mlp")
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, damping=0.03, factor_decay=0.5)
    one_step(opt, model, x, y)
    for _, m in layers_of(model):
        s = opt.state[m.weight]
        M = torch.cat([m.weight.grad, m.bias.grad.reshape(-1, 1)], 1)
        got = opt._precondition(opt.plan().role[id(m.weight)][1], s, M, opt.param_groups[0])
        torch.testing.assert_close(got, kron_reference(s["factor_a"], s["factor_g"], M, 0.03), rtol=1e-10,
                                   atol=1e-12)


class Reference:
    """A slow K-FAC / EKFAC for an MLP of Linear layers (tanh between them), written from the papers: factors
    from the layers' inputs and the outputs' gradients (autograd's retain_grad), EMA from the identity every Tf
    steps, π-damped inverses (K-FAC) or eigenbases with a scale restarted from λ_G λ_Aᵀ and corrected from
    per-example gradients (EKFAC) every Ti steps, KL clip, SGD momentum and L2 decay on the weights."""

    def __init__(self, model, eigen, lr, momentum, damping, decay, kl_clip, wd, Tf, Ti, Ts):
        self.model, self.eigen = model, eigen
        self.lr, self.mu, self.lam, self.beta, self.kl, self.wd = lr, momentum, damping, decay, kl_clip, wd
        self.Tf, self.Ti, self.Ts = Tf, Ti, Ts
        self.lin = [m for m in model if isinstance(m, nn.Linear)]
        self.S = {}  # per layer: A, G, inverses or bases and scale, momentum buffers
        self.t = 0
        self.nus = []

    def forward(self, x):
        acts, outs, h = [], [], x
        for i, m in enumerate(self.lin):
            acts.append(h)
            s = m(h)
            s.retain_grad()
            outs.append(s)
            h = torch.tanh(s) if i + 1 < len(self.lin) else s
        return h, acts, outs

    def step(self, x, y):
        for m in self.lin:
            m.zero_grad()
        logits, acts, outs = self.forward(x)
        F.cross_entropy(logits, y).backward()
        N = x.shape[0]
        for i, m in enumerate(self.lin):
            S = self.S.setdefault(i, {"refreshed": False})
            a = torch.cat([acts[i].detach(), torch.ones(N, 1)], 1)
            d = outs[i].grad
            S.setdefault("A", torch.eye(a.shape[1]))  # factors start at the identity (alecwangcq)
            S.setdefault("G", torch.eye(d.shape[1]))
            if self.t % self.Tf == 0:
                A, G = a.T @ a / N, N * d.T @ d
                S["A"] = self.beta * S["A"] + (1 - self.beta) * A
                S["G"] = self.beta * S["G"] + (1 - self.beta) * G
            if self.eigen and self.t % self.Ts == 0 and S["refreshed"]:
                per = torch.stack([(S["QG"].T @ (N * torch.outer(d[n], a[n])) @ S["QA"]) ** 2 for n in range(N)])
                S["s"] = self.beta * S["s"] + (1 - self.beta) * per.sum(0) / N
            if self.t % self.Ti == 0 or not S["refreshed"]:
                if self.eigen:
                    la, S["QA"] = torch.linalg.eigh(S["A"])
                    lg, S["QG"] = torch.linalg.eigh(S["G"])
                    S["s"] = torch.outer(lg.clamp_min(0), la.clamp_min(0))
                else:
                    A, G = S["A"], S["G"]
                    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
                    S["Ai"] = torch.linalg.inv(A + pi * math.sqrt(self.lam) * torch.eye(A.shape[0]))
                    S["Gi"] = torch.linalg.inv(G + math.sqrt(self.lam) / pi * torch.eye(G.shape[0]))
                S["refreshed"] = True
        dirs, vg = [], 0.0
        for i, m in enumerate(self.lin):
            S = self.S[i]
            M = torch.cat([m.weight.grad, m.bias.grad.reshape(-1, 1)], 1)
            if self.eigen:
                V = S["QG"] @ ((S["QG"].T @ M @ S["QA"]) / (S["s"] + self.lam)) @ S["QA"].T
            else:
                V = S["Gi"] @ M @ S["Ai"]
            dirs.append(V)
            vg += self.lr ** 2 * float((V * M).sum())
        nu = min(1.0, math.sqrt(self.kl / abs(vg)))
        self.nus.append(nu)
        with torch.no_grad():
            for i, (m, V) in enumerate(zip(self.lin, dirs)):
                S = self.S[i]
                dw = nu * V[:, :-1] + self.wd * m.weight  # decay on weights (role hidden), not on biases
                db = nu * V[:, -1]
                S["bw"] = dw if "bw" not in S else self.mu * S["bw"] + dw
                S["bb"] = db if "bb" not in S else self.mu * S["bb"] + db
                m.weight -= self.lr * S["bw"]
                m.bias -= self.lr * S["bb"]
        self.t += 1


@pytest.mark.parametrize("cls", BOTH)
def test_whole_run_matches_the_float64_reference(cls):
    """Nine steps with factors every 2, refreshes every 3 (EKFAC: scales every 2), momentum, decay and an active
    KL clip, on a fresh batch each step."""
    hyper = dict(lr=0.3, momentum=0.9, damping=0.01, factor_decay=0.8, kl_clip=0.01, weight_decay=0.01,
                 factor_every=2, inverse_every=3)
    model, twin = mlp(), mlp()
    extra = dict(scale_every=2) if cls is EKFAC else {}
    opt = cls(model.parameters(), model=model, **hyper, **extra)
    ref = Reference(twin, cls is EKFAC, 0.3, 0.9, 0.01, 0.8, 0.01, 0.01, 2, 3, 2)
    for t in range(9):
        x, y = data("mlp", seed=10 + t)
        one_step(opt, model, x, y)
        ref.step(x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert min(ref.nus) < 0.7 and max(ref.nus) == 1.0  # the clip acted on some steps and not on others


# ----- hooks: lifecycle and memory ---------------------------------------------------------------------------------

def lm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.ReLU(inplace=True),
                         nn.Linear(6, 11, bias=False))


def lm_batch(t):
    g = torch.Generator().manual_seed(100 + t)
    idx = torch.randint(0, 11, (4, 5), generator=g)
    return idx, idx.roll(1, 1)


def lm_step(opt, model, t, sampled=False):
    idx, y = lm_batch(t)
    logits = model(idx)
    if sampled:
        opt.sample_fisher(logits)
    opt.zero_grad()
    F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)).backward()
    opt.step()


@pytest.mark.parametrize("cls", BOTH)
def test_hooks_keep_nothing_outside_factor_steps_and_under_no_grad(cls):
    model = lm()
    opt = cls(whiten.param_groups(model), model=model, factor_every=3, **({"scale_every": 3} if cls is EKFAC else {}))
    idx, _ = lm_batch(0)
    with torch.no_grad():
        model(idx)
    model(idx).detach()  # an output nobody backpropagates: the A statistic only, no tensor kept
    assert all(s.corr is None for s in opt._pending.values())
    opt._pending.clear()
    lm_step(opt, model, 0)  # step 0: a factor step
    lm_step(opt, model, 1)
    model(idx).sum()  # step 2: not a factor step, so the hooks do nothing
    assert opt._pending == {} and opt._ready == {}


def test_remove_and_register_hooks():
    model = lm()
    opt = KFAC(whiten.param_groups(model), model=model, factor_every=1)
    n = len(model[1]._forward_hooks)
    opt.remove_hooks()
    assert not opt.hooks_registered and all(not m._forward_hooks for m in model.modules())
    with pytest.warns(RuntimeWarning, match="caught no activations"):
        lm_step(opt, model, 0)  # nothing caught: raw gradients, said once
    assert opt.state[model[1].weight]["factor_updates"] == 0
    opt.register_hooks()
    assert len(model[1]._forward_hooks) == n
    lm_step(opt, model, 1)
    assert opt.state[model[1].weight]["factor_updates"] == 1


def test_a_dropped_optimizer_leaves_no_working_hooks():
    model = lm()
    opt = KFAC(whiten.param_groups(model), model=model, factor_every=1)
    ref = __import__("weakref").ref(opt)
    del opt
    gc.collect()
    assert ref() is None  # the hooks do not keep it alive
    assert all(not m._forward_hooks for m in model.modules())  # and they were removed with it
    lm_step(torch.optim.SGD(model.parameters(), lr=0.1), model, 0)


def test_copies_of_the_model_and_optimizer():
    model = lm()
    opt = KFAC(whiten.param_groups(model), model=model, factor_every=1)
    lm_step(opt, model, 0)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the hooks pickle as no-ops
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)  # e.g. an EMA copy of the weights: feeds nothing into opt
    loaded(lm_batch(0)[0]).sum().backward()
    copied(lm_batch(0)[0]).sum().backward()
    assert opt._pending == {}
    twin = copy.deepcopy(opt)  # hooks its own copy of the model
    assert twin.model is not model and twin.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    lm_step(twin, twin.model, 1)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.fisher == opt.fisher and clone.factor_every == 1 and clone.hooks_registered
    lm_step(clone, clone.model, 1)


# ----- arguments, layers and the fallback ----------------------------------------------------------------------------

def test_arguments_are_checked():
    model = lm()
    with pytest.raises(TypeError, match="model must be"):
        KFAC(model.parameters(), model=None)
    for bad, match in ((dict(fisher="true"), "fisher"), (dict(loss_average="tokens"), "loss_average"),
                       (dict(damping=0.0), "damping"), (dict(factor_decay=1.0), "factor_decay"),
                       (dict(kl_clip=-1.0), "kl_clip"), (dict(factor_every=0), "factor_every"),
                       (dict(inverse_every=1.5), "inverse_every"), (dict(momentum=1.0), "momentum")):
        with pytest.raises(ValueError, match=match):
            KFAC(model.parameters(), model=model, **bad)
    with pytest.raises(ValueError, match="scale_every"):
        EKFAC(model.parameters(), model=model, scale_every=0)
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a parameter of model"):
        KFAC([*model.parameters(), other.weight], model=model)
    opt = KFAC(model.parameters(), model=model)
    with pytest.raises(ValueError, match="not a parameter of model"):
        opt.add_param_group({"params": [other.bias]})
    assert len(opt.param_groups) == 1


class Mixed(nn.Module):
    """Layers of every kind, and parameters K-FAC does not precondition."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 6)
        self.pos = nn.Parameter(torch.randn(5, 6) * 0.1)  # a free tensor
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)  # out_proj's hooks never fire
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.weight.requires_grad_(False)  # its bias is trained without its weight
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        x = self.emb(idx) + self.pos
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.frozen(torch.relu(self.fc(self.norm(x))))
        return self.head(x)


def test_layers_and_fallback_parameters():
    model = Mixed()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = KFAC(params, model=model)
    plan = opt.plan()
    assert [layer.name for layer in plan.layers] == ["fc"]  # the embedding is tied to the head
    assert plan.layers[0].bias is model.fc.bias
    fallback = {id(p) for p in opt.fallback_parameters()}
    expected = [model.emb.weight, model.pos, model.attn.in_proj_weight, model.attn.in_proj_bias,
                model.attn.out_proj.weight, model.attn.out_proj.bias, model.norm.weight, model.norm.bias,
                model.frozen.bias]
    assert fallback == {id(p) for p in expected}
    for t in range(3):
        idx = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        F.cross_entropy(model(idx).reshape(-1, 9), idx.reshape(-1)).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_fallback_is_sgd_with_momentum():
    """Parameters outside the K-FAC layers take torch.optim.SGD(momentum, weight_decay)'s step on their raw
    gradient, whatever the K-FAC layers do."""
    model = lm()
    twin = copy.deepcopy(model)
    opt = KFAC([{"params": list(model[1].parameters()) + [model[4].weight]},
                {"params": list(model[2].parameters()), "weight_decay": 0.1, "role": "hidden"}], model=model,
               lr=0.05, momentum=0.8, factor_every=1)
    sgd = torch.optim.SGD(twin[2].parameters(), lr=0.05, momentum=0.8, weight_decay=0.1)
    for t in range(4):
        lm_step(opt, model, t)
        idx, y = lm_batch(t)
        sgd.zero_grad()
        F.cross_entropy(twin(idx).reshape(-1, 11), y.reshape(-1)).backward()
        sgd.step()
        with torch.no_grad():  # the other parameters follow K-FAC's path
            for name in ("1.weight", "1.bias", "4.weight"):
                dict(twin.named_parameters())[name].copy_(dict(model.named_parameters())[name])
    for p, q in zip(model[2].parameters(), twin[2].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ----- checkpoints and faults -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,sampled", [(KFAC, False), (KFAC, True), (EKFAC, False), (EKFAC, True)])
def test_exact_resume(cls, sampled, dtype):
    kw = dict(factor_every=2, inverse_every=3, fisher="sampled" if sampled else "empirical")
    if cls is EKFAC:
        kw["scale_every"] = 2

    def run(model, opt, start, stop):
        for t in range(start, stop):
            lm_step(opt, model, t, sampled)

    model = lm().to(dtype)
    opt = cls(whiten.param_groups(model), model=model, **kw)
    run(model, opt, 0, 10)
    expected = copy.deepcopy(model.state_dict())
    model2 = lm().to(dtype)
    opt2 = cls(whiten.param_groups(model2), model=model2, **kw)
    run(model2, opt2, 0, 5)
    model_sd, opt_sd = copy.deepcopy(model2.state_dict()), copy.deepcopy(opt2.state_dict())
    del opt2
    model3 = lm(seed=1).to(dtype)
    model3.load_state_dict(model_sd)
    opt3 = cls(whiten.param_groups(model3), model=model3, **kw)
    opt3.load_state_dict(opt_sd)
    run(model3, opt3, 5, 10)
    for k, v in model3.state_dict().items():
        assert torch.equal(v, expected[k]), k


@pytest.mark.parametrize("cls", BOTH)
def test_a_huge_finite_loss_restarts_the_factors(cls):
    """A loss scaled by 1e20 at one step overflows float32 G statistics: the factors restart from the next
    statistics, the previous inverses/bases are kept meanwhile, and nothing becomes NaN."""
    model = lm().float()
    opt = cls(whiten.param_groups(model), model=model, factor_every=1, inverse_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(12):
            idx, y = lm_batch(t)
            opt.zero_grad()
            loss = F.cross_entropy(model(idx).reshape(-1, 11), y.reshape(-1))
            (loss * (1e20 if t == 4 else 1.0)).backward()
            opt.step()
    assert opt.counters["factor_restarts"] >= 1 and opt.counters["eigh_failures"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert all(s["refreshes"] > 2 for s in opt.state.values() if "refreshes" in s)  # refreshed after the spike


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("kind", ["zero", "rank1", "nan"])
def test_degenerate_gradients_stay_finite(cls, kind):
    model = lm().float()
    opt = cls(whiten.param_groups(model), model=model, factor_every=1, inverse_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(5):
            idx, y = lm_batch(t)
            opt.zero_grad()
            logits = model(idx)
            if kind == "zero":
                (logits * 0).sum().backward()
            elif kind == "rank1":
                (logits[0, 0, 0] * 3).backward()
            else:
                (logits.sum() * float("nan")).backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if kind == "nan":
        assert opt.counters["skipped_steps"] == 5 and opt.fisher_steps == 0 and opt._pending == {}


def test_sampled_mode_without_sample_fisher_says_so():
    model = lm()
    opt = KFAC(whiten.param_groups(model), model=model, factor_every=1, fisher="sampled")
    with pytest.warns(RuntimeWarning, match="sample_fisher"):
        lm_step(opt, model, 0)
    assert opt.state[model[1].weight]["factor_updates"] == 0
    lm_step(opt, model, 1, sampled=True)
    assert opt.state[model[1].weight]["factor_updates"] == 1
    assert opt.sample_fisher(model(lm_batch(0)[0])) is True  # factor_every=1: every step samples
    empirical = KFAC(whiten.param_groups(model), model=model)
    assert empirical.sample_fisher(model(lm_batch(0)[0])) is False  # the empirical Fisher never samples


# ----- DDP: the numbers of one process on the full batch -------------------------------------------------------------

DDP_STEPS, DDP_SAVE = 8, 4


def ddp_settings(cls, sampled, extra=None):
    kw = dict(factor_every=2, inverse_every=3, lr=0.05, fisher="sampled" if sampled else "empirical")
    if cls is EKFAC:
        kw["scale_every"] = 2
    return {**kw, **(extra or {})}  # extra: e.g. state_dtype (tests/test_state_options.py)


def ddp_batch(t):
    idx, y = lm_batch(t)
    return torch.cat([idx, lm_batch(50 + t)[0]]), torch.cat([y, lm_batch(50 + t)[1]])  # 8 sequences


def _ddp_worker(rank, world, cls, sampled, extra=None):
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    model = lm()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = cls(whiten.param_groups(model), model=model, process_group=dist.group.WORLD,
              **ddp_settings(cls, sampled, extra))
    rows = slice(4 * rank, 4 * rank + 4)
    saved = None
    for t in range(DDP_STEPS):
        if t == DDP_SAVE:
            saved = copy.deepcopy((model.state_dict(), whiten.distributed.full_state_dict(opt)))
        idx, y = ddp_batch(t)
        logits = ddp(idx[rows])
        if sampled:
            opt.sample_fisher(logits)
        opt.zero_grad()
        F.cross_entropy(logits.reshape(-1, 11), y[rows].reshape(-1)).backward()
        opt.step()
    owned = sum(1 for p in model.parameters() if opt.state.get(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, saved, owned


def one_process(cls, sampled, start=0, resume=None, extra=None):
    """The full batch in one process: one forward for the empirical Fisher; the two halves as micro-batches
    (sample_fisher on each, half of each loss) for the sampled one, as DDP's ranks draw their labels."""
    model = lm()
    opt = cls(whiten.param_groups(model), model=model, **ddp_settings(cls, sampled, extra))
    if resume is not None:
        model.load_state_dict(resume[0])
        opt.load_state_dict(resume[1])
    for t in range(start, DDP_STEPS):
        idx, y = ddp_batch(t)
        opt.zero_grad()
        if sampled:
            for k in range(2):
                logits = model(idx[4 * k:4 * k + 4])
                opt.sample_fisher(logits)
                (F.cross_entropy(logits.reshape(-1, 11), y[4 * k:4 * k + 4].reshape(-1)) / 2).backward()
        else:
            F.cross_entropy(model(idx).reshape(-1, 11), y.reshape(-1)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls,sampled", [(KFAC, False), (EKFAC, False), (KFAC, True), (EKFAC, True)])
def test_ddp_equals_one_process_on_the_full_batch(cls, sampled):
    from dist_utils import launch

    results = launch(_ddp_worker, 2, cls, sampled)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = one_process(cls, sampled)
        resumed = one_process(cls, sampled, start=DDP_SAVE, resume=results[0][1])
    finally:
        torch.set_num_threads(threads)
    for rank, (params, _, owned) in enumerate(results):
        assert 0 < owned < len(params)  # the layers were split over the ranks
        for n in expected:
            torch.testing.assert_close(params[n], expected[n], rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {n}")
    for n in expected:  # rank 0's full_state_dict resumes one process
        torch.testing.assert_close(resumed[n], expected[n], rtol=1e-9, atol=1e-12, msg=n)


# ----- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq", "emb"])
@pytest.mark.parametrize("cls,sampled", [(KFAC, False), (EKFAC, False), (KFAC, True), (EKFAC, True)])
def test_fits_a_fixed_batch(kind, cls, sampled):
    """The K-FAC layers themselves train (every parameter of these models is a K-FAC layer's): the loss on a
    fixed batch labelled by a teacher falls below a fifth of its start in 60 steps."""
    model = MODELS[kind]()
    x, _ = data(kind)
    with torch.no_grad():  # labels a model of this architecture can fit: a teacher's
        y = MODELS[kind](seed=7)(x).argmax(1)
    opt = cls(model.parameters(), model=model, lr=0.1, factor_every=2, inverse_every=10,
              fisher="sampled" if sampled else "empirical")
    assert opt.fallback_parameters() == []
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        one_step(opt, model, x, y, sampled)
    assert F.cross_entropy(model(x), y).item() < 0.2 * first


# ----- the benchmark's registry --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["lm", "vit", "dit"])
@pytest.mark.parametrize("name", ["kfac", "ekfac", "kfac-sampled", "ekfac-sampled", "kfac-state-bf16",
                                  "ekfac-state-bf16"])
def test_registry_entries_build_with_the_model_and_run(tmp_path, task, name):
    """The harness builds them with model= and, for the sampled Fisher, calls sample_fisher on factor steps (a
    missed call would warn: warnings are errors here)."""
    from whiten.bench import registry
    from whiten.bench.run import RunConfig, run
    from whiten.bench.tasks import make_task

    torch.set_default_dtype(torch.float32)  # the benchmark's models
    t = make_task(task, "tiny")
    spec = registry.get_spec(name)
    opt = registry.build_optimizer(spec, t.build_model(0), spec.default_lr, t.width, steps=12)
    assert isinstance(opt, KFAC) and opt.plan().layers and opt.hooks_registered
    assert opt.fisher == ("sampled" if name.endswith("sampled") else "empirical")
    cfg = RunConfig(task=task, profile="tiny", optimizer=name, lr=spec.default_lr, seed=0, steps=12, evals=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. hooks that caught nothing
        summary = run(cfg, t, tmp_path)
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])


def _fsdp_worker(rank, world, classes, sampled=False, extra=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_default_dtype(torch.float64)
    out = {}
    for cls in classes:
        model = lm()
        mesh = init_device_mesh("cpu", (world,))
        if sampled:  # the hidden Linear its own FSDP unit: FSDP's per-unit hooks run in the sampled backward
            fully_shard(model[1], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = cls(whiten.param_groups(model), model=model, **ddp_settings(cls, sampled, extra))
        rows = slice(4 * rank, 4 * rank + 4)
        for t in range(DDP_STEPS):
            idx, y = ddp_batch(t)
            opt.zero_grad()
            logits = model(idx[rows])
            if sampled:
                opt.sample_fisher(logits)
            F.cross_entropy(logits.reshape(-1, 11), y[rows].reshape(-1)).backward()
            opt.step()
        out[cls.__name__] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("sampled", [False, True])
def test_fsdp2_equals_one_process_on_the_full_batch(sampled):
    """fully_shard (DTensor parameters): the parameters' mesh is used by itself. With the sampled Fisher, the extra
    backward runs through FSDP's own (whiten.fisher) and the hooks see each rank's sampled output gradients."""
    from dist_utils import launch

    results = launch(_fsdp_worker, 2, BOTH, sampled)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cls in BOTH:
            expected = one_process(cls, sampled)
            for rank, res in enumerate(results):
                for n in expected:
                    torch.testing.assert_close(res[cls.__name__][n], expected[n], rtol=1e-9, atol=1e-12,
                                               msg=f"{cls.__name__}, rank {rank}: {n}")
    finally:
        torch.set_num_threads(threads)
