"""Samples of a finished dit run: the run's own model draws a few images of each class, saved as one grid."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UsageError
from .models import PROFILES, build_model, sample


def write_samples(run_dir: Path, steps: int, guidance: float) -> Path:
    """Draws 8 samples per class (the first 16 classes at most) from the finished dit run in ``run_dir`` with
    ``steps`` Euler steps and classifier-free guidance ``guidance``, writes them as one grid, a row per class, to
    ``run_dir/samples.png``, says so on stdout and returns that path."""
    done = run_dir / "done.json"
    weights = run_dir / "model.pt"
    if not done.exists() or not weights.exists():
        raise UsageError(f"samples {run_dir}: not a finished dit run (needs done.json and model.pt; "
                         "dit runs are under <out>/dit/<profile>/<start>/<optimizer>/<lr-seed>)")
    summary = json.loads(done.read_text())
    cfg = summary["config"]
    if cfg["task"] != "dit":
        raise UsageError(f"samples {run_dir}: a {cfg['task']} run; samples needs a dit run")
    # the model as the run built it: its task description holds the width, patch, image shape and classes
    desc = summary.get("identity", {}).get("task", {})
    sizes = {**PROFILES[cfg["profile"]]["dit"], **{k: desc[k] for k in ("width", "depth", "heads", "patch") if k in desc}}
    channels, height, width = desc.get("image_shape", (1, 28, 28))
    classes = desc.get("classes", 10)
    model = build_model("dit", sizes, image_shape=(channels, height, width), classes=classes)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    rows = min(classes, 16)  # 8 samples for each of the first 16 classes at most
    y = torch.arange(rows).repeat_interleave(8)
    with torch.no_grad():
        images = sample(model, y, steps, torch.Generator().manual_seed(0), cfg_scale=guidance)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(channels, 4) if channels != 2 else 1  # grey+alpha: the grey channel
    grid = images[:, :shown].clamp(-1, 1).add(1).div(2).reshape(rows, 8, shown, height, width)
    grid = grid.permute(0, 3, 1, 4, 2).reshape(rows * height, 8 * width, shown)
    out = run_dir / "samples.png"
    if shown == 1:
        plt.imsave(out, grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(out, grid[..., :4 if shown == 4 else 3].numpy())
    print(f"samples: {out} (one row per class{'' if rows == classes else f', the first {rows} of {classes}'}, "
          f"{steps} Euler steps, guidance {guidance})")
    return out
