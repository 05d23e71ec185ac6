"""whiten-bench: how much sooner do whitening optimizers reach AdamW's loss, on your hardware?

    whiten-bench compare                       # AdamW vs SPlus on lm, cpu profile, default lrs (~10 min on 2 cores)
    whiten-bench sweep --task lm --optimizers adamw,splus,pytorch_optimizer:SOAP --seeds 0,1 --starts init,adamw@500
    whiten-bench report results/sweep
    whiten-bench samples results/sweep/dit/cpu/init/splus/lr0.464-seed0   # grid of DiT samples
    whiten-bench list                          # the optimizer registry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .data import DataUnavailable
from .models import PROFILES
from .registry import REGISTRY, get_spec
from .report import write_report
from .run import RunConfig, parse_start, run
from .tasks import TASK_CLASSES, make_task


def _csv(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _common(p: argparse.ArgumentParser, out: str, steps: int):
    p.add_argument("--task", choices=sorted(TASK_CLASSES), default="lm")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--optimizers", type=_csv(str), default=["adamw", "splus"],
                   help="comma-separated registry names (see `whiten-bench list`)")
    p.add_argument("--steps", type=_positive_int, default=steps, help="training steps per run")
    p.add_argument("--seeds", type=_csv(int), default=[0])
    p.add_argument("--starts", type=_csv(str), default=["init"], help="init and/or adamw@N (AdamW's weights at step N)")
    p.add_argument("--evals", type=_positive_int, default=20, help="evaluations per run, denser near the end")
    p.add_argument("--warmup", type=int, default=-1, help="linear warm-up steps (default: 5%% of steps)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up not timed)")
    p.add_argument("--text", default=None, help="lm task: train on this UTF-8 text file instead of Shakespeare")
    p.add_argument("--data-root", default=None, help="vit/dit: directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, default=Path(out), help="results directory")
    p.add_argument("--no-plots", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="whiten-bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="each optimizer at its default lr")
    _common(c, "results/compare", 1000)
    s = sub.add_parser("sweep", help="each optimizer over its lr grid (resumable)")
    _common(s, "results/sweep", 1000)
    s.add_argument("--lrs", type=_csv(float), default=None,
                   help="lrs for every optimizer instead of each one's registry grid")
    r = sub.add_parser("report", help="tables and plots from a results directory")
    r.add_argument("out", type=Path)
    r.add_argument("--no-plots", action="store_true")
    sm = sub.add_parser("samples", help="draw a grid of samples from a finished dit run")
    sm.add_argument("run_dir", type=Path)
    sm.add_argument("--steps", type=_positive_int, default=50, help="Euler steps")
    sm.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale")
    sub.add_parser("list", help="the optimizer registry")
    return ap


def _plan(args) -> list[RunConfig]:
    for name in args.optimizers:
        get_spec(name)
    for start in args.starts:
        parse_start(start)
    plan = []
    for start in args.starts:
        for seed in args.seeds:
            for name in args.optimizers:
                spec = get_spec(name)
                if args.command == "compare":
                    lrs = [spec.default_lr]
                else:
                    lrs = args.lrs or list(spec.lr_grid)
                for lr in lrs:
                    plan.append(RunConfig(task=args.task, profile=args.profile, optimizer=name, lr=lr, seed=seed,
                                          steps=args.steps, start=start, warmup=args.warmup,
                                          schedule=args.schedule, evals=args.evals, compile=args.compile))
    return plan


def _run_plan(args) -> int:
    plan = _plan(args)
    task = make_task(args.task, args.profile, args.device, text_path=args.text, data_root=args.data_root)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None
    print(f"{len(plan)} runs of {args.steps} steps: task {args.task}, profile {args.profile}, "
          f"optimizers {','.join(args.optimizers)}, seeds {args.seeds}, starts {args.starts} -> {args.out}")
    bar = tqdm(total=len(plan) * args.steps, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty()) \
        if tqdm else None
    for cfg in plan:
        if bar is not None:
            bar.set_description(f"{cfg.optimizer} lr {cfg.lr:.3g} seed {cfg.seed} {cfg.start}")
        summary = run(cfg, task, args.out, progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.update(max(0, cfg.steps - round(summary["records"][-1]["step"])))
        status = "diverged" if summary["diverged"] else f"final val loss {summary['final_val_loss']:.4f}"
        line = f"{cfg.optimizer:24s} lr {cfg.lr:<8.3g} seed {cfg.seed} {cfg.start:10s} {status}  " \
               f"({summary['seconds_per_step'] * 1e3:.0f} ms/step)"
        if bar is not None and not bar.disable:
            bar.write(line)
        else:
            print(line, flush=True)
    if bar is not None:
        bar.close()
    path = write_report(args.out, plots=not args.no_plots)
    print(f"\nreport: {path}\nplots:  {args.out / 'plots'}")
    print(path.read_text())
    return 0


def _samples(args) -> int:
    import json

    from .models import sample

    done = args.run_dir / "done.json"
    weights = args.run_dir / "model.pt"
    if not done.exists() or not weights.exists():
        raise SystemExit(f"error: {args.run_dir} is not a finished dit run (needs done.json and model.pt)")
    cfg = json.loads(done.read_text())["config"]
    if cfg["task"] != "dit":
        raise SystemExit(f"error: samples needs a dit run, {args.run_dir} is a {cfg['task']} run")
    task_config = PROFILES[cfg["profile"]]["dit"]
    from .models import build_model

    model = build_model("dit", task_config)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    y = torch.arange(10).repeat_interleave(8)
    with torch.no_grad():
        images = sample(model, y, args.steps, torch.Generator().manual_seed(0), cfg_scale=args.cfg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = images.clamp(-1, 1).add(1).div(2).reshape(10, 8, 28, 28).permute(0, 2, 1, 3).reshape(280, 224)
    out = args.run_dir / "samples.png"
    plt.imsave(out, grid.numpy(), cmap="gray")
    print(f"samples: {out} (one row per class, {args.steps} Euler steps, guidance {args.cfg})")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            for name, spec in REGISTRY.items():
                grid = ", ".join(f"{x:.3g}" for x in spec.lr_grid)
                print(f"{name:26s} default lr {spec.default_lr:<8.3g} grid [{grid}]  {spec.source}")
            print("pytorch_optimizer:<Class>  any optimizer of the pytorch-optimizer package")
            return 0
        if args.command == "report":
            path = write_report(args.out, plots=not args.no_plots)
            print(path.read_text())
            print(f"report: {path}")
            return 0
        if args.command == "samples":
            return _samples(args)
        return _run_plan(args)
    except (ValueError, DataUnavailable, FileNotFoundError) as e:
        print(f"whiten-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
