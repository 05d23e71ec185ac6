"""Labelled images for the vit and dit tasks, from a user's own data or Fashion-MNIST (:func:`load_images`), and the
held-out split of them (:func:`held_out_split`)."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailable
from .fashion_mnist import FASHION_MNIST_FILES, find_idx_files, locate_fashion_mnist, normalize_images, read_idx_files


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
NPZ_KEYS = (("x", "y"), ("images", "labels"))  # a single pool, split here
NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")  # Keras's layout: the held-out part comes with it
NPY_PAIRS = (("x.npy", "y.npy"), ("images.npy", "labels.npy"))
# A pool of images is split once, the same way for every run, seed and optimizer: from each class a random tenth
# (at least one image), drawn with this seed; the held-out part is capped at the profile's validation size.
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.1
# PIL modes -> the 8-bit mode an image is read in; others (16-bit, float) are refused.
_PIL_MODES = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBX": "RGB", "CMYK": "RGB",
              "YCbCr": "RGB", "RGBA": "RGBA", "RGBa": "RGBA", "PA": "RGBA"}
_ACCEPTED = (f"a folder with one subfolder of images per class (DIR/<class>/*.png, .jpg, ...), an .npz with arrays "
             f"x and y (or images and labels, or {', '.join(NPZ_SPLIT_KEYS)}), a folder with x.npy and y.npy (or "
             f"images.npy and labels.npy), or a folder with the IDX files {', '.join(FASHION_MNIST_FILES.values())}")


@dataclass
class ImageSet:
    """Labelled images as loaded: ``images`` float32 (N, C, H, W) in [-1, 1], ``labels`` int64 in 0..K-1 indexing
    ``classes`` (the sorted class folder names, or the sorted distinct labels of the arrays), and ``held_out_*`` when
    the data bring their own held-out split (IDX t10k files, an .npz with x_test). ``record``: where they came from
    (format, path, sha256 of the source files)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    record: dict
    held_out_images: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return tuple(int(d) for d in self.images.shape[1:])


def _files_sha256(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        raw = f.read_bytes()
        h.update(f"{f.relative_to(root).as_posix()}\0{len(raw)}\0".encode())
        h.update(raw)
    return h.hexdigest()


def _unit_range(x: np.ndarray, where: str) -> torch.Tensor:
    """Pixel values -> float32 in [-1, 1]: uint8 (and integers in 0..255) by /127.5 - 1, as Fashion-MNIST; floats in
    [0, 1] by 2x - 1; floats already in [-1, 1] as they are."""
    if x.dtype == np.uint8:
        return normalize_images(torch.from_numpy(np.ascontiguousarray(x)))
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataUnavailable(f"{where}: integer pixel values must lie in 0..255 (these span {lo}..{hi}); save "
                                  "8-bit images, or floats in [0, 1]")
        return normalize_images(torch.from_numpy(x.astype(np.uint8)))
    if not np.issubdtype(x.dtype, np.floating):
        raise DataUnavailable(f"{where}: pixel values must be numbers (uint8, or floats in [0, 1]); got {x.dtype}")
    if not np.isfinite(x).all():
        raise DataUnavailable(f"{where}: the images hold NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if lo >= 0.0 and hi <= 1.0:
        return t * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return t
    raise DataUnavailable(f"{where}: float pixel values must lie in [0, 1] or [-1, 1] (these span [{lo:.4g}, "
                          f"{hi:.4g}]); scale them, or save uint8 images in 0..255")


def _nchw(x: np.ndarray, where: str, name: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); a 4-d array has its channels on the shorter of axes 1 and 3 (channels-last on a
    tie), so (N, H, W, C) and (N, C, H, W) both work for images larger than their channel count."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x if x.shape[1] < x.shape[3] else x.transpose(0, 3, 1, 2)
    raise DataUnavailable(f"{where}: {name} has shape {x.shape}; images must be (N, H, W), (N, H, W, C) or "
                          "(N, C, H, W)")


def _encode_labels(arrays: list[np.ndarray], where: str) -> tuple[list[str], list[np.ndarray]]:
    """Labels (integers or strings) -> indices into the sorted distinct labels, shared by every array."""
    for y in arrays:
        if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataUnavailable(f"{where}: labels must be integers or strings; these are {y.dtype} with "
                                  "fractional values")
        if y.dtype.kind not in "iubfUS":
            raise DataUnavailable(f"{where}: labels must be integers or strings, got {y.dtype}")
    values = np.concatenate([y.astype(np.int64) if y.dtype.kind in "bf" else y for y in arrays])
    classes, codes = np.unique(values, return_inverse=True)
    out, start = [], 0
    for y in arrays:
        out.append(codes[start:start + len(y)].astype(np.int64))
        start += len(y)
    return [str(c) for c in classes], out


def _arrays(x: np.ndarray, y: np.ndarray, where: str, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataUnavailable(f"{where}: {names[1]} has shape {y.shape}; labels must be one per image, shape (N,)")
    x = _nchw(x, where, names[0])
    if len(x) != len(y):
        raise DataUnavailable(f"{where}: {len(x)} images in {names[0]} but {len(y)} labels in {names[1]}; they "
                              "must match one to one")
    if len(x) == 0:
        raise DataUnavailable(f"{where}: {names[0]} holds no images")
    return x, y


def _load_npy(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataUnavailable(f"{where}: cannot read {path} as a NumPy array ({exc}); save it with "
                              "np.save(path, array) from a plain numeric array") from None
    except OSError as exc:
        raise DataUnavailable(f"{where}: cannot read {path} ({exc})") from None


def _read_npz(path: Path, where: str) -> tuple[dict, dict]:
    if not zipfile.is_zipfile(path):
        raise DataUnavailable(f"{where}: not a NumPy .npz archive (not a zip file); save one with "
                              "np.savez(path, x=images, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if set(NPZ_SPLIT_KEYS) <= keys:
                arrays = {k: archive[k] for k in NPZ_SPLIT_KEYS}
            else:
                pair = next(((xk, yk) for xk, yk in NPZ_KEYS if xk in keys and yk in keys), None)
                if pair is None:
                    raise DataUnavailable(
                        f"{where}: the archive holds {', '.join(sorted(keys)) or 'no arrays'}; it needs x and y, "
                        f"images and labels, or {', '.join(NPZ_SPLIT_KEYS)}")
                arrays = {"x": archive[pair[0]], "y": archive[pair[1]], "names": pair}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataUnavailable(f"{where}: cannot read the archive ({exc}); save plain numeric arrays with "
                              "np.savez(path, x=images, y=labels)") from None
    record = {"format": "npz", "path": str(path.resolve()), "sha256": _files_sha256([path], path.parent),
              "files": 1}
    return arrays, record


def _read_image_folder(root: Path, parts: dict[str, list[Path]], where: str) -> tuple[dict, list, dict]:
    """Images of the class folders of each part ({"train": [class dirs]} or {"train": ..., "held_out": ...}) ->
    ({part: (x uint8 (N, C, H, W), y)}, class names, record). Classes are the training part's folder names."""
    try:
        from PIL import Image
    except ImportError:
        raise DataUnavailable(f"{where}: reading a folder of images needs Pillow, not installed here: pip install "
                              "pillow (part of the bench extra)") from None
    files, empty = {}, []
    for part, class_dirs in parts.items():
        for d in class_dirs:
            files[part, d.name] = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                                         and not any(q.startswith(".") for q in f.relative_to(d).parts))
            if not files[part, d.name]:
                empty.append(str(d))
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DataUnavailable(f"{where}: class folder{'s' if len(empty) > 1 else ''} {shown} "
                              f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMAGE_SUFFIXES)}); "
                              "remove empty class folders or add images")
    classes = sorted(name for part, name in files if part == "train")
    strays = sorted({name for part, name in files if part != "train"} - set(classes))
    if strays:
        raise DataUnavailable(f"{where}: the held-out part has class folders the training part lacks: "
                              f"{', '.join(strays[:5])}")
    # First pass, headers only: sizes and modes, so a mismatch is found before anything is decoded.
    modes, first = set(), None
    for (part, name), paths in files.items():
        for f in paths:
            try:
                with Image.open(f) as im:
                    size, mode = im.size, im.mode
                    if mode == "P":
                        mode = "RGBA" if "transparency" in im.info else "RGB"
            except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
                raise DataUnavailable(f"{where}: cannot read {f} as an image ({exc})") from None
            if mode not in _PIL_MODES:
                raise DataUnavailable(f"{where}: {f} is a PIL mode {mode} image (16-bit or floating point); save "
                                      "8-bit images, or pass an .npz of floats in [0, 1]")
            if first is None:
                first = (f, size)
            elif size != first[1]:
                raise DataUnavailable(f"{where}: the images differ in size: {first[0]} is {first[1][0]}x{first[1][1]} "
                                      f"but {f} is {size[0]}x{size[1]} (width x height); resize them to one size")
            modes.add(_PIL_MODES[mode])
    # One mode for all: colour if any image has colour (grey ones are repeated over R, G, B), alpha if any has it.
    target = ("RGB" if modes & {"RGB", "RGBA"} else "L") + ("A" if modes & {"LA", "RGBA"} else "")
    (width, height), channels = first[1], len(target)
    h, out, count = hashlib.sha256(), {}, 0
    for part in parts:
        items = [(classes.index(name), f) for (q, name), paths in files.items() if q == part for f in paths]
        x = np.empty((len(items), height, width, channels), dtype=np.uint8)
        y = np.array([label for label, _ in items], dtype=np.int64)
        for i, (_, f) in enumerate(items):
            raw = f.read_bytes()
            h.update(f"{f.relative_to(root).as_posix()}\0{len(raw)}\0".encode())
            h.update(raw)
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    x[i] = np.asarray(im.convert(target)).reshape(height, width, channels)
            except Exception as exc:
                raise DataUnavailable(f"{where}: cannot decode {f} ({exc})") from None
        out[part] = (x.transpose(0, 3, 1, 2), y)
        count += len(items)
    record = {"format": "image folder", "path": str(root.resolve()), "sha256": h.hexdigest(), "files": count,
              "mode": target}
    return out, classes, record


# Subfolder names that mark a folder as already split (DIR/train/<class>/..., DIR/val/<class>/...).
TRAIN_FOLDER = "train"
HELD_OUT_FOLDERS = ("val", "valid", "validation", "test")


def load_images(path: str | os.PathLike | None = None) -> ImageSet:
    """Labelled images for the vit and dit tasks, from ``path`` (``--data-root``):

    - a folder with one subfolder per class holding image files (png, jpg, bmp, gif, tiff, webp, ppm; read with
      Pillow). Classes are the sorted subfolder names; every image must have the same size; all are read in one
      mode: colour (RGB) if any image has colour, with alpha if any has it, else grey;
    - an ``.npz`` archive with arrays ``x`` (images) and ``y`` (labels), or ``images`` and ``labels``, or
      ``x_train``, ``y_train``, ``x_test``, ``y_test`` (the held-out split comes with it);
    - a folder holding ``x.npy`` and ``y.npy`` (or ``images.npy`` and ``labels.npy``), or the path of one of them;
    - a folder holding the Fashion-MNIST IDX files (MNIST's have the same names); None: Fashion-MNIST from the
      usual places (:func:`locate_fashion_mnist`).

    Array images are (N, H, W), (N, H, W, C) or (N, C, H, W) (channels on the shorter of axes 1 and 3), uint8 in
    0..255 or floats in [0, 1] or [-1, 1]; labels are integers or strings, one per image. Looked for in a folder in
    this order: IDX files, an .npy pair, class subfolders. Every mistake raises :class:`DataUnavailable` naming the
    file and what would work.
    """
    where = f"--data-root {path}" if path is not None else "Fashion-MNIST"
    if path is None or (Path(path).expanduser().is_dir() and find_idx_files(Path(path).expanduser()) is not None):
        files = locate_fashion_mnist(path)
        try:
            raw = read_idx_files(files)
        except ValueError as exc:
            raise DataUnavailable(f"{where}: {exc}") from None
        root = files["train_images"].parent
        ordered = [files[k] for k in FASHION_MNIST_FILES]
        record = {"format": "idx", "path": str(root.resolve()), "sha256": _files_sha256(ordered, root),
                  "files": len(ordered)}
        classes, (train_y, test_y) = _encode_labels([raw["train_labels"].numpy(), raw["test_labels"].numpy()], where)
        data = ImageSet(normalize_images(raw["train_images"]), torch.from_numpy(train_y), classes, record,
                        normalize_images(raw["test_images"]), torch.from_numpy(test_y))
        return _checked(data, where, pooled=False)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataUnavailable(f"{where}: no such file or directory")
    if p.is_file() and p.suffix.lower() == ".npz":
        arrays, record = _read_npz(p, where)
        if "x_train" in arrays:
            x, y = _arrays(arrays["x_train"], arrays["y_train"], where, ("x_train", "y_train"))
            xt, yt = _arrays(arrays["x_test"], arrays["y_test"], where, ("x_test", "y_test"))
            if x.shape[1:] != xt.shape[1:]:
                raise DataUnavailable(f"{where}: x_train images are {x.shape[1:]} (C, H, W) but x_test images are "
                                      f"{xt.shape[1:]}; both must have one shape")
            classes, (y, yt) = _encode_labels([y, yt], where)
            unseen = sorted(set(yt.tolist()) - set(y.tolist()))
            if unseen:
                raise DataUnavailable(f"{where}: y_test has labels that y_train never has: "
                                      f"{', '.join(classes[i] for i in unseen[:5])}")
            data = ImageSet(_unit_range(x, where), torch.from_numpy(y), classes, record,
                            _unit_range(xt, where), torch.from_numpy(yt))
            return _checked(data, where, pooled=False)
        x, y = _arrays(arrays["x"], arrays["y"], where, arrays["names"])
    elif p.is_file() and p.suffix.lower() == ".npy" or p.is_dir() and any((p / a).is_file() for a, _ in NPY_PAIRS):
        folder = p.parent if p.is_file() else p
        pair = next(((a, b) for a, b in NPY_PAIRS if (p.is_file() and p.name in (a, b)) or
                     (p.is_dir() and (p / a).is_file())), None)
        if pair is None:
            raise DataUnavailable(f"{where}: an .npy file must be one of a pair in one folder: "
                                  + " or ".join(f"{a} with {b}" for a, b in NPY_PAIRS))
        missing = [n for n in pair if not (folder / n).is_file()]
        if missing:
            raise DataUnavailable(f"{where}: {folder / pair[0]} needs {folder / pair[1]} beside it "
                                  f"({' and '.join(missing)} missing)")
        x, y = _arrays(_load_npy(folder / pair[0], where), _load_npy(folder / pair[1], where), where, pair)
        record = {"format": "npy", "path": str((folder / pair[0]).resolve()),
                  "sha256": _files_sha256([folder / n for n in pair], folder), "files": 2}
    elif p.is_dir():
        class_dirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DataUnavailable(f"{where}: no image data found there; expected {_ACCEPTED}")
        names = {d.name for d in class_dirs}
        held = next((n for n in HELD_OUT_FOLDERS if n in names), None)
        if TRAIN_FOLDER in names and held is not None and names <= {TRAIN_FOLDER, *HELD_OUT_FOLDERS}:
            # already split: train/<class>/... and val/<class>/... (the first of val, valid, validation, test)
            parts = {part: sorted(d for d in (p / folder).iterdir() if d.is_dir() and not d.name.startswith("."))
                     for part, folder in (("train", TRAIN_FOLDER), ("held_out", held))}
            for part, folder in (("train", TRAIN_FOLDER), ("held_out", held)):
                if not parts[part]:
                    raise DataUnavailable(f"{where}: {p / folder} has no class folders")
        else:
            parts = {"train": class_dirs}
        arrays, classes, record = _read_image_folder(p, parts, where)
        x, y = arrays["train"]
        if "held_out" in arrays:
            record["held_out_folder"] = held
            data = ImageSet(_unit_range(x, where), torch.from_numpy(y), classes, record,
                            _unit_range(arrays["held_out"][0], where), torch.from_numpy(arrays["held_out"][1]))
            return _checked(data, where, pooled=False)
        return _checked(ImageSet(_unit_range(x, where), torch.from_numpy(y), classes, record), where, pooled=True)
    else:
        raise DataUnavailable(f"{where}: not a data set whiten-bench reads; pass {_ACCEPTED}")
    classes, (y,) = _encode_labels([y], where)
    return _checked(ImageSet(_unit_range(x, where), torch.from_numpy(y), classes, record), where, pooled=True)


def _checked(data: ImageSet, where: str, pooled: bool) -> ImageSet:
    """Refuses data a classifier or a class-conditional model cannot learn from, or a pool too small to split."""
    if len(data.classes) < 2:
        raise DataUnavailable(f"{where}: all {len(data.labels)} images have one label ({data.classes[0]}); "
                              "classification and class-conditional generation need at least 2 classes")
    if pooled:
        counts = torch.bincount(data.labels, minlength=len(data.classes))
        few = [data.classes[i] for i in range(len(data.classes)) if counts[i] < 2]
        if few:
            raise DataUnavailable(f"{where}: class{'es' if len(few) > 1 else ''} {', '.join(few[:5])} "
                                  f"{'have' if len(few) > 1 else 'has'} a single image; every class needs at "
                                  "least 2 (one to train on, one held out)")
    data.record.update(classes=len(data.classes), image_shape=list(data.shape), images=len(data.labels))
    return data


def stratified_indices(labels: np.ndarray, fraction: float, cap: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of a held-out part: from every class a seeded random ``fraction`` of its items (at least one),
    the fraction lowered so that the whole stays near ``cap`` items. The same labels, fraction, cap and seed always
    give the same indices (NumPy's ``default_rng`` streams are stable across versions)."""
    labels = np.asarray(labels)
    share = min(fraction, cap / max(1, len(labels)))
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), max(1, int(round(share * len(idx)))))
        held.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(held))


def held_out_split(data: ImageSet, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(train images, train labels, held-out images, held-out labels, how they were split) with about ``size``
    held-out images:

    - a pool (an image folder, x/y arrays): stratified, :data:`HELD_OUT_FRACTION` of each class drawn with
      :data:`SPLIT_SEED` (at least one image per class), capped near ``size``; the rest trains;
    - IDX files: the first ``size`` images of the t10k files (as whiten-bench always did; the published test sets
      come shuffled), training on all the train files;
    - an .npz with x_test: x_test, stratified down to about ``size`` when larger.
    """
    if data.held_out_images is None:
        held = torch.from_numpy(stratified_indices(data.labels.numpy(), HELD_OUT_FRACTION, size))
        keep = torch.ones(len(data.labels), dtype=torch.bool)
        keep[held] = False
        out = (data.images[keep], data.labels[keep], data.images[held], data.labels[held])
        how = (f"stratified: {HELD_OUT_FRACTION:.0%} of each class (at least 1) held out, at most about {size} "
               f"images, seed {SPLIT_SEED}")
    elif data.record["format"] == "idx":
        out = (data.images, data.labels, data.held_out_images[:size], data.held_out_labels[:size])
        how = f"the first {size} images of the t10k files"
    else:
        held = torch.from_numpy(stratified_indices(data.held_out_labels.numpy(), 1.0, size))
        out = (data.images, data.labels, data.held_out_images[held], data.held_out_labels[held])
        how = f"x_test, stratified down to about {size} images (seed {SPLIT_SEED})" if len(held) < len(
            data.held_out_labels) else "x_test, all of it"
    split = {"held_out": how, "seed": SPLIT_SEED, "train_images": len(out[1]), "held_out_images": len(out[3])}
    return (*out, split)
