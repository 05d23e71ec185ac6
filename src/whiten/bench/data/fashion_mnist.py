"""Fashion-MNIST and the IDX format it comes in: the Debian package's folder, the cache, or the public mirror."""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailable
from .cache import default_cache_dir, write_atomic


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The mirror torchvision uses for Fashion-MNIST.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SUBDIR = "fashion-mnist"

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array.

    Raises ValueError naming the file when the magic number, the dimensions or
    the payload length are wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) on corrupt data
        raise ValueError(f"malformed IDX file {path}: cannot read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"malformed IDX file {path}: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"malformed IDX file {path}: truncated header ({ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"malformed IDX file {path}: header says shape {shape} ({expected} bytes) "
            f"but the payload has {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Paths of the four files in ``directory`` (gzipped or not), or None if any is missing."""
    found = {}
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in (directory / name, directory / name[: -len(".gz")]):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _download_fashion_mnist(directory: Path, timeout: float = 20.0) -> dict[str, Path] | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES.values():
            target = directory / name
            if target.is_file():
                continue
            with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=timeout) as resp:
                write_atomic(target, resp.read())
    except Exception:  # any network/filesystem failure means "not available here"
        return None
    return find_idx_files(directory)


def locate_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files (paths by key of :data:`FASHION_MNIST_FILES`).

    If ``root`` is given only that directory is used (a wrong path should not silently fall back to other data).
    Otherwise the Debian package location ``/usr/share/datasets/fashion-mnist`` is tried, then the cache directory,
    then a download from the public mirror into the cache.
    """
    if root is not None:
        root = Path(root).expanduser()
        files = find_idx_files(root)
        if files is None:
            raise DataUnavailable(
                f"Fashion-MNIST not found in {root}: it needs "
                f"{', '.join(FASHION_MNIST_FILES.values())} (gzipped or not).")
        return files
    cache = default_cache_dir() / FASHION_MNIST_SUBDIR
    files = (find_idx_files(FASHION_MNIST_SYSTEM_DIR) or find_idx_files(cache)
             or _download_fashion_mnist(cache))
    if files is None:
        raise DataUnavailable(
            f"Fashion-MNIST is missing: not in {FASHION_MNIST_SYSTEM_DIR} nor {cache}, and the "
            f"download from {FASHION_MNIST_URL} failed. Install it with\n"
            f"  apt-get install -y dataset-fashion-mnist\n"
            f"(or without root: apt-get download dataset-fashion-mnist && dpkg -x *.deb DIR), "
            f"or pass a directory holding {', '.join(FASHION_MNIST_FILES.values())}.")
    return files


def read_idx_files(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    out = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
        out[f"{split}_images"] = torch.from_numpy(images.astype(np.uint8, copy=False))
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return out


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load Fashion-MNIST as raw tensors.

    Returns a dict with ``train_images`` (uint8, 60000x28x28), ``train_labels``
    (int64), ``test_images`` (10000x28x28) and ``test_labels``. Where the files are
    looked for: :func:`locate_fashion_mnist`.
    """
    return read_idx_files(locate_fashion_mnist(root))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,C,H,W) -> float32 (N,C,H,W) scaled to [-1, 1]."""
    x = images.to(torch.float32) / 127.5 - 1.0
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x
