"""Where the benchmark's downloaded and derived data live, and how a file there is written."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where downloaded and derived data live: ``$WHITEN_DATA`` or ``~/.cache/whiten``."""
    env = os.environ.get("WHITEN_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "whiten"


def write_atomic(path: Path, data: bytes) -> None:
    # Write to a sibling temp file and rename, so an interrupted run never leaves
    # a truncated cache file that later calls would trust.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
