"""whiten-bench on a user's own images: every format load_images reads, the fixed stratified held-out split, the
models adapting to size, channels and classes, the data recorded with every run, and one clear line for each way
the data can be unusable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from whiten.bench import cli
from whiten.bench.data import DataUnavailable, held_out_split, load_images, stratified_indices
from whiten.bench.models import DiT, ViT, build_model, choose_patch
from whiten.bench.run import RunConfig, data_hash, run
from whiten.bench.tasks import make_task


def _folder(root: Path, classes=("cat", "dog", "frog"), per_class=12, size=(32, 32), mode="RGB", seed=0) -> Path:
    """A class-per-subfolder image set; class c's pixels cluster around 60 + 60 c so a model can learn them."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size[1], size[0], *channels)) * 40 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}.png")
    return root


def _refused(path, *words):
    with pytest.raises(DataUnavailable) as e:
        load_images(path)
    message = str(e.value)
    assert message.startswith(f"--data-root {path}"), message
    assert all(w in message for w in words), message
    return message


# ------------------------------------------------------------------------------------------------- formats

def test_image_folder(tmp_path):
    root = _folder(tmp_path / "imgs")
    data = load_images(root)
    assert data.shape == (3, 32, 32) and data.classes == ["cat", "dog", "frog"]
    assert data.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # sorted folders, sorted files
    first = np.array(Image.open(root / "cat" / "000.png"))
    assert torch.equal(data.images[0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.record["format"] == "image folder" and data.record["path"] == str(root.resolve())
    assert data.record["files"] == 36 and load_images(root).record["sha256"] == data.record["sha256"]
    (root / "cat" / "000.png").write_bytes((root / "cat" / "001.png").read_bytes())
    assert load_images(root).record["sha256"] != data.record["sha256"]  # the hash is of the files' content


def test_image_folder_modes_are_unified(tmp_path):
    root = _folder(tmp_path / "a", classes=("x",), mode="RGB")
    _folder(root, classes=("y",), mode="L")  # grey images beside colour ones: repeated over R, G, B
    data = load_images(root)
    assert data.shape == (3, 32, 32) and data.record["mode"] == "RGB"
    grey = data.images[data.labels == 1][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert load_images(_folder(tmp_path / "b", classes=("p", "q"), mode="L")).shape == (1, 32, 32)
    rgba = _folder(tmp_path / "c", classes=("p",), mode="RGBA")
    _folder(rgba, classes=("q",), mode="RGB")
    assert load_images(rgba).shape == (4, 32, 32)  # alpha if any image has it


def test_image_folder_already_split(tmp_path):
    _folder(tmp_path / "d" / "train", per_class=5)
    _folder(tmp_path / "d" / "val", classes=("cat", "frog"), per_class=2, seed=1)
    data = load_images(tmp_path / "d")
    assert data.classes == ["cat", "dog", "frog"] and len(data.labels) == 15
    assert data.held_out_labels.tolist() == [0, 0, 2, 2] and data.record["held_out_folder"] == "val"


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 16, 12, 3), dtype=np.uint8)  # (N, H, W, C), non-square
    y = np.array(["b", "a"] * 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_images(tmp_path / "d.npz")
    assert data.shape == (3, 16, 12) and data.classes == ["a", "b"] and data.labels[:2].tolist() == [1, 0]
    assert torch.equal(data.images, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert data.record["format"] == "npz"
    # images/labels keys, channels-first floats in [0, 1], integer labels that are not 0..K-1
    floats = rng.random((20, 2, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.repeat([3, 7], 10))
    data = load_images(tmp_path / "f.npz")
    assert data.shape == (2, 9, 9) and data.classes == ["3", "7"]
    assert torch.allclose(data.images, torch.from_numpy(floats) * 2 - 1)
    # Keras's layout: the held-out part comes with it
    np.savez(tmp_path / "k.npz", x_train=x[:14, ..., 0], y_train=np.arange(14) % 2, x_test=x[14:, ..., 0],
             y_test=np.arange(6) % 2)
    data = load_images(tmp_path / "k.npz")
    assert data.shape == (1, 16, 12) and len(data.labels) == 14 and len(data.held_out_labels) == 6
    # an .npy pair, by folder or by either file
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(20) % 4)
    for path in (tmp_path, tmp_path / "x.npy", tmp_path / "y.npy"):
        data = load_images(path)
        assert data.shape == (3, 16, 12) and len(data.classes) == 4 and data.record["format"] == "npy"


def test_idx_folder(tmp_path):
    from test_bench_data_models import _write_idx  # the IDX writer of the Fashion-MNIST tests

    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 3).astype(np.uint8))
    data = load_images(tmp_path)
    assert data.record["format"] == "idx" and data.shape == (1, 28, 28) and data.classes == ["0", "1", "2"]
    train_x, train_y, val_x, val_y, split = held_out_split(data, 4)
    assert len(train_y) == 30 and torch.equal(val_y, data.held_out_labels[:4])  # the t10k files' first images
    assert "first 4" in split["held_out"]


# ------------------------------------------------------------------------------------------------- errors

def test_unusable_image_folders(tmp_path):
    _refused(tmp_path / "nope", "no such file or directory")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "no image data found", "class", ".npz", "IDX")
    sizes = _folder(tmp_path / "sizes", classes=("a",))
    _folder(sizes, classes=("b",), size=(28, 30))
    _refused(sizes, "differ in size", "32x32", "28x30", "resize")
    one = _folder(tmp_path / "one", classes=("only",))
    _refused(one, "one label (only)", "at least 2 classes")
    hollow = _folder(tmp_path / "hollow", classes=("a", "b"))
    (hollow / "c").mkdir()
    _refused(hollow, "class folder", str(hollow / "c"), "no images")
    broken = _folder(tmp_path / "broken", classes=("a", "b"))
    (broken / "b" / "bad.png").write_bytes(b"not a png")
    _refused(broken, "cannot read", "bad.png", "as an image")
    lonely = _folder(tmp_path / "lonely", classes=("a",))
    _folder(lonely, classes=("b",), per_class=1)
    _refused(lonely, "class b has a single image", "at least 2")
    deep = _folder(tmp_path / "deep", classes=("a", "b"))
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(deep / "a" / "wide.png")
    _refused(deep, "16-bit", "wide.png")
    (tmp_path / "notes.txt").write_text("hello")
    _refused(tmp_path / "notes.txt", "not a data set", ".npz")


def test_a_folder_of_images_without_pillow(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", per_class=2)
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # as if Pillow were not installed
    _refused(root, "needs Pillow", "pip install pillow", "bench extra")


def test_unusable_arrays(tmp_path):
    x = np.zeros((10, 8, 8), np.uint8)
    np.savez(tmp_path / "mismatch.npz", x=x, y=np.arange(9))
    _refused(tmp_path / "mismatch.npz", "10 images in x but 9 labels in y")
    np.savez(tmp_path / "keys.npz", pixels=x, y=np.arange(10))
    _refused(tmp_path / "keys.npz", "holds pixels, y", "x and y", "images and labels")
    np.savez(tmp_path / "range.npz", x=x.astype(np.float32) + 3, y=np.arange(10) % 2)
    _refused(tmp_path / "range.npz", "[0, 1] or [-1, 1]", "[3, 3]")
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(10))
    _refused(tmp_path / "one.npz", "one label", "at least 2 classes")
    np.savez(tmp_path / "obj.npz", x=x, y=np.array([{"a": 1}] * 10, dtype=object))
    _refused(tmp_path / "obj.npz", "cannot read the archive", "np.savez")
    (tmp_path / "fake.npz").write_text("not a zip")
    _refused(tmp_path / "fake.npz", "not a NumPy .npz archive")
    np.savez(tmp_path / "shape.npz", x=np.zeros((10, 8)), y=np.arange(10) % 2)
    _refused(tmp_path / "shape.npz", "shape (10, 8)", "(N, H, W)")
    np.savez(tmp_path / "frac.npz", x=x, y=np.linspace(0, 1, 10))
    _refused(tmp_path / "frac.npz", "fractional")
    (tmp_path / "pair").mkdir()
    np.save(tmp_path / "pair" / "images.npy", x)
    _refused(tmp_path / "pair", "labels.npy", "missing")
    np.save(tmp_path / "other.npy", x)
    _refused(tmp_path / "other.npy", "x.npy with y.npy")


# ----------------------------------------------------------------------------------------------- the split

def test_stratified_split_is_fixed_and_keeps_every_class():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    held = stratified_indices(labels, 0.1, cap=1000)
    assert np.array_equal(held, stratified_indices(labels, 0.1, cap=1000))  # same seed, same split
    assert not np.array_equal(held, stratified_indices(labels, 0.1, cap=1000, seed=1))
    assert np.bincount(labels[held]).tolist() == [5, 3, 2]  # a tenth of each class
    assert np.bincount(labels[stratified_indices(labels, 0.1, cap=2)]).tolist() == [1, 1, 1]  # capped, >= 1 each
    small = np.repeat([0, 1], [2, 40])
    assert np.bincount(small[stratified_indices(small, 0.1, cap=100)]).tolist() == [1, 4]


def test_held_out_split_of_a_pool(tmp_path):
    data = load_images(_folder(tmp_path / "imgs", per_class=20))
    train_x, train_y, val_x, val_y, split = held_out_split(data, 64)
    assert np.bincount(val_y.numpy()).tolist() == [2, 2, 2] and len(train_y) == 54
    # disjoint: every image lands on one side only
    seen = {tuple(x.flatten()[:64].tolist()) for x in train_x}
    assert not any(tuple(x.flatten()[:64].tolist()) in seen for x in val_x)
    assert split["seed"] == 0 and "stratified" in split["held_out"]


# ----------------------------------------------------------------------------------------- models adapt

def test_patch_choice():
    assert [choose_patch(28, 28, t) for t in (16, 49, 196)] == [7, 4, 2]  # the profiles' Fashion-MNIST patches
    assert [choose_patch(32, 32, t) for t in (16, 49, 196)] == [8, 4, 2]
    assert choose_patch(256, 256, 196) == 16  # the SPlus paper's ImageNet patch
    assert choose_patch(31, 31, 49) == 5  # a prime side: padded to 35, 7x7 tokens


def test_models_take_any_size_channels_and_classes():
    torch.manual_seed(0)
    vit = ViT(image_size=(31, 20), patch=4, channels=3, classes=5, width=16, depth=1, heads=2)
    assert vit(torch.randn(2, 3, 31, 20)).shape == (2, 5)
    dit = DiT(image_size=(31, 20), patch=4, channels=2, classes=5, width=16, depth=1, heads=2)
    x = torch.randn(2, 2, 31, 20)
    assert dit(x, torch.rand(2), torch.tensor([0, 5])).shape == x.shape  # padded in, cropped out
    assert dit.pos_embed.shape == (1, 8 * 5, 16)
    # unpatchify inverts the patching on a non-square grid
    for p in dit.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 2, 32, 20)
    dit32 = DiT(image_size=(32, 20), patch=4, channels=2, classes=5, width=16, depth=1, heads=2)
    patches = x.reshape(1, 2, 8, 4, 5, 4).permute(0, 2, 4, 3, 5, 1).reshape(1, 40, 32)
    assert torch.equal(dit32.unpatchify(patches), x)
    model = build_model("dit", "tiny", image_shape=(3, 16, 16), classes=4)
    assert model.y_embedder.weight.shape[0] == 5 and model.head.weight.shape[0] == 7 * 7 * 3


def test_tasks_adapt_to_the_data(tmp_path):
    root = _folder(tmp_path / "imgs")
    vit = make_task("vit", "tiny", data_root=root)
    assert vit.config["patch"] == 8 and vit.describe()["image_shape"] == [3, 32, 32]
    assert vit.describe()["classes"] == 3 and vit.describe()["tokens"] == 16
    assert vit.build_model(0)(vit.train_batch(0, 0)[0]).shape == (8, 3)
    dit = make_task("dit", "tiny", data_root=root)
    x, y, t, noise = dit.train_batch(0, 0)
    assert x.shape == (8, 3, 32, 32) and int(y.max()) <= 3  # 3 is the null class of 3 classes
    other = make_task("vit", "tiny", data_root=_folder(tmp_path / "other", seed=1))
    assert data_hash(other) != data_hash(vit)
    assert vit.data_record()["path"] == str(root.resolve()) and "path" not in vit.describe()["data"]


# ------------------------------------------------------------------------------------------------ end to end

def test_compare_vit_on_an_image_folder(tmp_path, capsys):
    """The issue's target: whiten-bench compare --task vit --data-root DIR on 32x32 RGB class folders."""
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert cli.main(["compare", "--task", "vit", "--data-root", str(root), "--profile", "tiny", "--steps", "3",
                     "--evals", "1", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## vit · profile tiny · start init" in report and "| splus |" in report
    assert (out / "plots" / "vit-tiny-init.png").exists()
    config = json.loads(next(out.glob("vit/tiny/init/adamw/*/config.json")).read_text())
    assert config["data"]["path"] == str(root.resolve()) and len(config["data"]["sha256"]) == 64
    assert config["data"]["split"]["held_out_images"] == 3 and config["task_config"]["image_shape"] == [3, 32, 32]


def test_dit_on_arrays_and_its_samples(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((30, 3, 12, 12)).astype(np.float32), y=np.arange(30) % 3)
    task = make_task("dit", "tiny", data_root=tmp_path / "d.npz")
    cfg = RunConfig(task="dit", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=2, evals=1)
    run(cfg, task, tmp_path / "out")
    assert cli.main(["samples", str(cfg.run_dir(tmp_path / "out")), "--steps", "2"]) == 0
    picture = Image.open(cfg.run_dir(tmp_path / "out") / "samples.png")
    assert picture.size == (8 * 12, 3 * 12) and picture.mode == "RGBA"  # 3 classes x 8 colour samples


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whiten-bench: error: --data-root"), lines
    return lines[0]


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    sizes = _folder(tmp_path / "sizes", classes=("a",), per_class=2)
    _folder(sizes, classes=("b",), per_class=2, size=(16, 16))
    np.savez(tmp_path / "m.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.arange(4))
    for path, words in ((sizes, "differ in size"), (tmp_path / "m.npz", "5 images in x but 4 labels")):
        out = tmp_path / "out"
        assert cli.main(["compare", "--task", "dit", "--data", str(path), "--profile", "tiny", "--out", str(out),
                         "--no-plots"]) == 2
        assert words in _error(capsys) and not out.exists()
