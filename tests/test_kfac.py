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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten
import whiten.fisher
from whiten.optim.kfac import EKFAC, KFAC

curvlinops = pytest.importorskip("curvlinops")  # pinned in the test extra; never skipped there

BOTH = [KFAC, EKFAC]


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


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
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, loss_average=loss_average)
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
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0)
    one_step(opt, model, x, y)
    torch.testing.assert_close(opt.state[model.fc1.weight]["factor_g"], 7 * G["fc1"])
    torch.testing.assert_close(opt.state[model.head.weight]["factor_g"], G["head"])


def test_embedding_factors_are_those_of_the_one_hot_linear():
    model = Emb()
    x, y = data("emb")
    A, G = curvlinops_factors(OneHot(model), x, y)
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0)
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
    opt = KFAC(model.parameters(), model=model, factor_every=1, lr=0.0, fisher="sampled")
    one_step(opt, model, x, y, sampled=True)
    assert len(drawn) == 1
    A, G = curvlinops_factors(ref, x, drawn[0])
    for name, m in layers_of(model):
        torch.testing.assert_close(opt.state[m.weight]["factor_a"], A[name], rtol=1e-12, atol=1e-14)
        # whiten.fisher forms the sampled loss in float32 (logits.float()), so G agrees to float32 precision
        torch.testing.assert_close(opt.state[m.weight]["factor_g"], G[name], rtol=1e-6, atol=1e-9)
