"""whiten-bench: how much sooner do whitening optimizers reach AdamW's loss, on your hardware?

    whiten-bench compare                       # AdamW vs SPlus on lm, cpu profile, default lrs (~8 min on 2 cores)
    whiten-bench compare --profile tiny --steps 50          # a smoke test (seconds)
    whiten-bench sweep --task lm --optimizers adamw,splus,pytorch_optimizer:SOAP --seeds 0,1 --starts init,adamw@500
    whiten-bench sweep --optimizers adamw,splus --lrs "adamw=0.00215,0.00464;splus=0.1,0.215" --width 64,128,256
    whiten-bench compare --task vit --data-root DIR          # your own images: class folders, .npz, .npy, IDX
    whiten-bench stability --steps 300                       # refresh interval x lr: who diverges?
    whiten-bench tune --optimizers adamw,splus --steps 500 --budgets 1,2   # every hyperparameter, per budget
    whiten-bench tune --optimizers adamw --space '{"adamw": {"lr": [0.002, 0.005], "betas[1]": null}}'
    whiten-bench report results/sweep [--clock cpu]
    whiten-bench samples results/sweep/dit/cpu/init/splus/lr0.464-seed0   # grid of DiT samples
    whiten-bench list                          # the optimizer registry

compare, sweep, stability, report and samples need the bench extra: pip install "whiten[bench]" (from a clone:
pip install -e ".[bench]"). Every mistake on the command line ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch

# Only modules that import nothing beyond torch are imported here, so that `list` and every error message work
# without the bench extra; the data loaders (numpy) and plots (matplotlib) are imported once _require() has
# checked they are there.
from .errors import DataUnavailable, UsageError
from .models import PROFILES, TASKS
from .registry import REGISTRY, get_spec, with_options
from .samples import write_samples
from .sweep import PROGRESS_INTERVAL, run_sweep, run_tune
# cli.Progress and cli._plan: their names from before they moved to sweep.py
from .sweep import Progress, plan_runs as _plan  # noqa: F401

BENCH_EXTRA = 'pip install "whiten[bench]" (from a clone: pip install -e ".[bench]")'
RUN_COMMANDS = ("compare", "sweep", "stability", "tune")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other mistake (argparse's default prints the whole usage first), exit code 2.
        self.exit(2, f"whiten-bench: error: {message} (see {self.prog} --help)\n")


def _csv(kind, what: str):
    def parse(text):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}")
        return values
    return parse


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _non_negative_int(text):
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return v


def _lrs(text):
    """``--lrs``: "0.1,0.2" (every optimizer) or "splus=0.1,0.2;adamw=0.001" (per optimizer; the others keep their
    registry grid)."""
    if "=" not in text:
        return _csv(float, "numbers")(text)
    out = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected LR,LR,... or NAME=LR,LR;NAME=LR,...; got {part!r}")
        out[name.strip()] = _csv(float, f"numbers after {name.strip()}=")(values)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one NAME=LR,...")
    return out


_WORDS = {"none": None, "true": True, "false": False}


def _option(text):
    """``--opt KEY=VALUE``: VALUE as a Python literal (100, 1e-3, (0.9, 0.95), None, True), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. ema_rate=0.99), got {text!r}")
    value = value.strip()
    if value.lower() in _WORDS:
        return key.strip(), _WORDS[value.lower()]
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), tuple(parsed) if isinstance(parsed, list) else parsed


def _space(text):
    """``--space``: JSON, or the path of a JSON file: {optimizer: {hyperparameter: grid}}."""
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"expected JSON or a JSON file, got {text!r} (no such file)")
        source = path.read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('expected {"OPTIMIZER": {"KEY": [values], ...}, ...}')
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _common(p: argparse.ArgumentParser, out: str, steps: int, optimizers=("adamw", "splus"), seeds=(0,)):
    p.add_argument("--task", choices=sorted(TASKS), default="lm",
                   help="lm: character GPT on Shakespeare (or --text); vit: image classification; dit: "
                        "class-conditional flow matching; both on Fashion-MNIST or --data-root (default: lm)")
    p.add_argument("--profile", choices=list(PROFILES), default="cpu",
                   help="model size: tiny (seconds, for smoke tests), cpu (2 cores), gpu (close to the SPlus "
                        "paper's model; needs a GPU) (default: cpu)")
    p.add_argument("--optimizers", type=_csv(str, "optimizer names"), default=list(optimizers),
                   help="comma-separated registry names, or pytorch_optimizer:<Class> (see `whiten-bench list`) "
                        f"(default: {','.join(optimizers)})")
    p.add_argument("--steps", type=_positive_int, default=steps, help=f"training steps per run (default: {steps})")
    p.add_argument("--seeds", type=_csv(int, "integers"), default=list(seeds),
                   help="comma-separated seeds; each seed runs every optimizer "
                        + ("(tune: the sweeps run the first, the tuned point all) " if len(seeds) > 1 else "")
                        + f"(default: {','.join(map(str, seeds))})")
    p.add_argument("--starts", type=_csv(str, "starting points"), default=["init"],
                   help="init and/or adamw@N: AdamW's weights after N steps, fresh optimizer state (default: init)")
    p.add_argument("--evals", type=_positive_int, default=20,
                   help="evaluations per run, denser near the end (default: 20)")
    p.add_argument("--warmup", type=_non_negative_int, default=-1,
                   help="linear warm-up steps (default: 5%% of --steps)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="lr after the warm-up (default: constant, as in the SPlus paper)")
    p.add_argument("--device", default=None,
                   help=f"cpu, cuda, cuda:N or mps (default: cuda when torch sees a GPU, else cpu; "
                        f"here: {_default_device()})")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up not timed)")
    p.add_argument("--text", default=None,
                   help="lm task: train on this UTF-8 text file instead of Shakespeare (the last 10%% is held out "
                        "for validation)")
    p.add_argument("--data-root", "--data", dest="data_root", default=None,
                   help="vit/dit: your images: a folder of class subfolders (or train/ and val/ each of class "
                        "subfolders), an .npz with x and y (or images and labels, or x_train, y_train, x_test, "
                        "y_test), a folder with x.npy and y.npy, or a folder with IDX files; any size, channels and "
                        "classes (default: Fashion-MNIST from the Debian package's folder, then ~/.cache/whiten)")
    p.add_argument("--width", type=_csv(int, "integers"), default=None,
                   help="model width(s) instead of the profile's, e.g. 64,128,256 (a multiple of the profile's "
                        "heads); each width is its own set of runs (default: the profile's)")
    p.add_argument("--opt", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an optimizer option over the registry's, for every optimizer of the command; repeatable "
                        "(e.g. --opt ema_rate=0.99) (default: none)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"CPU threads for torch (default: torch's own choice, here {torch.get_num_threads()}); "
                        "recorded in config.json")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "tp", "fsdp+tp"], default="ddp",
                   help="under torchrun --nproc_per_node N: DDP or FSDP2 (fully_shard) over the N processes, the same "
                        "global batch split between them; tp: tensor parallel over the N (lm task); fsdp+tp: TP over "
                        "pairs, FSDP2 over the N/2 pairs (lm task) (default: ddp; ignored in one process)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"results directory (default: {out})")
    p.add_argument("--no-plots", action="store_true", help="write the report without plots (no matplotlib needed)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="whiten-bench", description=__doc__.split("\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{compare,sweep,stability,tune,report,samples,list}")
    c = sub.add_parser("compare", help="each optimizer at its default lr for the task (the main comparison)",
                       description="Each optimizer at the lr tuned for the task in the project's results (see "
                                   "registry.TASK_DEFAULTS), else its registry default, which the command names as "
                                   "not tuned on that task: AdamW vs SPlus on lm by default.")
    _common(c, "results/compare", 1000)
    s = sub.add_parser("sweep", help="each optimizer over its lr grid (resumable)",
                       description="Each optimizer over its lr grid (see `whiten-bench list`); finished runs are "
                                   "skipped, so an interrupted sweep resumes.")
    _common(s, "results/sweep", 1000)
    lrs_help = ('lrs instead of the registry grids: "0.1,0.2" for every optimizer, or per optimizer '
                '"splus=0.1,0.2;adamw=0.001,0.002" (the others keep their grid) (default: the registry grids)')
    s.add_argument("--lrs", type=_lrs, default=None, help=lrs_help)
    s.add_argument("--refresh", type=_csv(int, "integers"), default=None,
                   help="refresh intervals of the preconditioner (SPlus inverse_every, SOAP and Shampoo "
                        "precondition_frequency), each its own set of runs (default: the registry's)")
    st = sub.add_parser("stability", help="refresh interval x lr grid: which optimizer diverges with stale "
                                          "preconditioners (resumable)",
                        description="The SPlus paper's claim 1: Shampoo with long-cached inverses diverges, SPlus "
                                    "does not. Every optimizer runs at every refresh interval and lr; the report "
                                    "counts divergence (non-finite loss, or a final validation loss no lower than "
                                    "the start) and draws a heat map per optimizer.")
    _common(st, "results/stability", 300, optimizers=("splus", "shampoo", "shampoo-nograft", "soap"))
    st.add_argument("--lrs", type=_lrs, default=None, help=lrs_help)
    st.add_argument("--refresh", type=_csv(int, "integers"), default=[10, 30, 100],
                    help="refresh intervals (SPlus inverse_every, SOAP and Shampoo precondition_frequency) "
                         "(default: 10,30,100)")
    t = sub.add_parser("tune", help="coordinate descent over every hyperparameter, per budget (resumable)",
                       description="Coordinate descent over each optimizer's hyperparameters (lr, weight decay, "
                                   "betas or momentum, warm-up, refresh interval, its own knobs: the registry's "
                                   "search space, `--space` over it), from the registry's setting, one at a time at "
                                   "the others' current best, until a round changes nothing by more than the seed "
                                   "noise; at each budget (--budgets x --steps). Finished runs are reused by "
                                   "identity, so an interrupted tune resumes. The report gives the path, each "
                                   "hyperparameter's sensitivity, steps to AdamW's tuned loss with a 95%% interval "
                                   "and a one-sided t-test, and the speedup against the budget.")
    _common(t, "results/tune", 500, seeds=(0, 1))
    t.add_argument("--space", type=_space, default=None,
                   help='JSON (or a JSON file) over the registry\'s search spaces: {"OPTIMIZER": {"KEY": [values] | '
                        '{"grid": [...], "start": v} | null}}; KEY is lr, warmup (a fraction of the run), an option, '
                        'or OPTION[i] for one element of a tuple option (betas[1]); null drops it (default: the '
                        "registry's spaces; `whiten-bench list --spaces` prints them)")
    t.add_argument("--budgets", type=_csv(float, "numbers"), default=[1.0],
                   help="multiples of --steps to tune at, e.g. 1,2,4,8 (the data-to-model ratio grows with them; "
                        "the report gives tokens per parameter: at the cpu profile's lm, 500 steps are 2.5 tokens "
                        "per parameter, so 1,2,4,8 x 500 reach Chinchilla's 20) (default: 1)")
    t.add_argument("--noise-seeds", type=_csv(int, "integers"), default=None,
                   help="seeds run at the starting point to measure the noise (their std) (default: the first two "
                        "of --seeds)")
    t.add_argument("--noise-floor", type=float, default=None,
                   help="the smallest noise assumed, in nats (default: 0.002)")
    t.add_argument("--max-rounds", type=_positive_int, default=3, help="rounds over all hyperparameters at most "
                                                                         "(default: 3)")
    t.add_argument("--no-confirm", action="store_true",
                   help="keep a change only when it beats the current value on the first seed by more than the "
                        "noise (default: a smaller gain on the first seed is run on every noise seed and kept when "
                        "the mean gain exceeds noise x sqrt(2/n))")
    t.add_argument("--full-grid", action="store_true",
                   help="sweep each hyperparameter's whole grid (default: the current value's neighbours, walking "
                        "on while the best is at an edge)")
    r = sub.add_parser("report", help="tables and plots from a results directory",
                       description="Markdown tables (report.md) and PNG plots (plots/) from a results directory.")
    r.add_argument("out", type=Path, help="a results directory (compare's, sweep's or stability's --out)")
    r.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    r.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time-to-AdamW and the seconds plot from wall-clock time or from the process's CPU time "
                        "(less sensitive to a loaded machine) (default: wall)")
    sm = sub.add_parser("samples", help="draw a grid of samples from a finished dit run",
                        description="Draw 8 samples per class from a finished dit run (writes samples.png there).")
    sm.add_argument("run_dir", type=Path, help="a finished dit run's directory (holds done.json and model.pt)")
    sm.add_argument("--steps", type=_positive_int, default=50, help="Euler steps (default: 50)")
    sm.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (default: 1.5)")
    ls = sub.add_parser("list", help="the optimizer registry: names, default lrs, lr grids",
                        description="The optimizer registry: names, default lrs, lr grids.")
    ls.add_argument("--spaces", action="store_true", help="also each optimizer's search space for tune")
    return ap


# ---------------------------------------------------------------------------------------------------------------
# Checks made before anything loads or trains: a mistake costs no time and leaves nothing on disk.
# ---------------------------------------------------------------------------------------------------------------

def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _require(args) -> None:
    """The optional packages this command will import, checked now rather than after the training."""
    needs = {}
    if args.command in RUN_COMMANDS + ("samples",):
        needs["numpy"] = "the data loaders"
    if args.command == "samples" or (args.command in RUN_COMMANDS + ("report",) and not args.no_plots):
        needs["matplotlib"] = "the plots"
    if any(name.startswith("pytorch_optimizer:") for name in getattr(args, "optimizers", ())):
        needs["pytorch_optimizer"] = "the pytorch_optimizer:<Class> optimizers"
    missing = [module for module in needs if not _importable(module)]
    if missing:
        what = " and ".join(f"{module} (for {needs[module]})" for module in missing)
        # --no-plots is a way out only when the plots are all that is missing
        skip = "; or pass --no-plots" if missing == ["matplotlib"] and args.command != "samples" else ""
        raise UsageError(f"{args.command} needs {what}, not installed here: {BENCH_EXTRA}{skip}")


def check_device(text: str) -> torch.device:
    """``--device``: a device this torch can use, or a UsageError that says what to do instead."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text}: not a device name; use cpu, cuda, cuda:N or mps") from None
    build = f"torch {torch.__version__}"
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UsageError(f"--device {text}: this {build} is a CPU-only build; install a CUDA build of torch "
                             "(README, section 'Install') or use --device cpu")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: {build} (CUDA {torch.version.cuda}) sees no GPU (check nvidia-smi "
                             "and CUDA_VISIBLE_DEVICES), or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UsageError(f"--device {text}: there {'is' if n == 1 else 'are'} {n} CUDA device"
                             f"{'' if n == 1 else 's'}: cuda:0 to cuda:{n - 1}")
        return device
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {text}: {build} cannot use {device.type} here; use cpu"
                         + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def check_optimizer(name: str):
    """The registry entry for ``name``; a ``pytorch_optimizer:<Class>`` must name a class of that package."""
    try:
        spec = get_spec(name)
    except ValueError as e:
        raise UsageError(f"--optimizers: {e}") from None
    if name.startswith("pytorch_optimizer:") and name not in REGISTRY:
        import pytorch_optimizer
        from importlib.metadata import version

        class_name = name.split(":", 1)[1]
        if not isinstance(getattr(pytorch_optimizer, class_name, None), type):
            raise UsageError(f"--optimizers {name}: pytorch-optimizer {version('pytorch-optimizer')} has no "
                             f"optimizer class {class_name!r} (names are case-sensitive: e.g. "
                             "pytorch_optimizer:Lion, pytorch_optimizer:SOAP)")
    return spec


def _check_run_args(args) -> None:
    from .run import parse_start  # imports the data loaders: only after _require()

    for name in args.optimizers:
        check_optimizer(name)
    for start in args.starts:
        try:
            parse_start(start)
        except ValueError as e:
            raise UsageError(f"--starts: {e}") from None
    args.device = check_device(args.device or _default_device())
    if args.text is not None and args.task != "lm":
        raise UsageError(f"--text applies to the lm task only (this is --task {args.task})")
    if args.data_root is not None and args.task == "lm":
        raise UsageError("--data-root applies to the vit and dit tasks only (lm reads --text)")
    if args.data_root is not None and not Path(args.data_root).expanduser().exists():
        raise UsageError(f"--data-root {args.data_root}: no such file or directory")
    _check_lrs(args)
    heads = PROFILES[args.profile][args.task]["heads"]
    for width in args.width or ():
        if width < 1 or width % heads:
            raise UsageError(f"--width {width}: must be a positive multiple of the {args.profile} profile's {heads} "
                             f"attention heads (e.g. {heads * max(1, round(max(1, width) / heads))})")
    for refresh in getattr(args, "refresh", None) or ():
        if refresh < 1:
            raise UsageError(f"--refresh {refresh}: must be a positive number of steps")
    if getattr(args, "refresh", None):
        for name in args.optimizers:
            try:
                with_options(get_spec(name), args.refresh[0])
            except ValueError as e:
                raise UsageError(f"--refresh: {e}") from None
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if args.command == "tune":
        _check_tune_args(args)


def _check_tune_args(args) -> None:
    from .tune import NOISE_FLOOR, resolve_space

    if args.opt:
        raise UsageError("--opt: tune sets the options itself; give their values with --space (a grid of one "
                         "value fixes an option)")
    if args.warmup != -1:
        raise UsageError("--warmup: tune tunes the warm-up; give its grid (fractions of the run) with --space, "
                         'e.g. \'{"adamw": {"warmup": [0.05]}}\'')
    for name in args.space or {}:  # a space file may hold optimizers this command does not run; not unknown ones
        try:
            get_spec(name)
        except ValueError as e:
            raise UsageError(f"--space: {e}") from None
    for name in args.optimizers:
        try:
            resolve_space(name, (args.space or {}).get(name))
        except ValueError as e:
            raise UsageError(f"--space: {e}") from None
    if any(b <= 0 or not math.isfinite(b) for b in args.budgets):
        raise UsageError(f"--budgets: every budget must be a positive multiple of --steps, got "
                         f"{','.join(map(str, args.budgets))}")
    if len(set(args.budgets)) < len(args.budgets):
        raise UsageError("--budgets: a budget is given twice")
    if args.noise_floor is None:
        args.noise_floor = NOISE_FLOOR
    elif not (args.noise_floor >= 0 and math.isfinite(args.noise_floor)):
        raise UsageError(f"--noise-floor: must be a non-negative number of nats, got {args.noise_floor}")
    if args.noise_seeds is None:
        args.noise_seeds = args.seeds[:2]


def _check_lrs(args) -> None:
    lrs = getattr(args, "lrs", None)
    if not lrs:
        return
    if isinstance(lrs, dict):
        for name in lrs:
            if name not in args.optimizers:
                try:
                    get_spec(name)
                except ValueError as e:
                    raise UsageError(f"--lrs: {e}") from None
                raise UsageError(f"--lrs names {name}, which is not among --optimizers ({','.join(args.optimizers)}); "
                                 "add it there or drop its lrs")
        values = [lr for v in lrs.values() for lr in v]
    else:
        values = lrs
    if any(not (lr > 0 and math.isfinite(lr)) for lr in values):
        raise UsageError(f"--lrs: every lr must be a positive number, got {','.join(map(str, values))}")


def _report(args) -> int:
    from .report import write_report

    path = write_report(args.out, plots=not args.no_plots, clock=args.clock)
    print(path.read_text())
    print(f"report: {path}" + ("" if args.no_plots else f"\nplots:  {args.out / 'plots'}"))
    return 0


def _samples(args) -> int:
    write_samples(args.run_dir, args.steps, args.cfg)
    return 0


def _list(spaces: bool = False) -> int:
    for name, spec in REGISTRY.items():
        grid = ", ".join(f"{x:.3g}" for x in spec.lr_grid)
        print(f"{name:26s} default lr {spec.default_lr:<8.3g} grid [{grid}]  {spec.source}")
        if spaces:
            from .tune import resolve_space

            try:
                params = resolve_space(name)
            except ValueError as e:
                print(f"{'':26s} tune: {e}")
                continue
            print(f"{'':26s} tune: " + "; ".join(f"{p.key} {list(p.grid)} (start {p.start})" for p in params))
    print("pytorch_optimizer:<Class>  any optimizer of the pytorch-optimizer package")
    return 0


def main(argv=None) -> int:
    """The CLI; returns the exit code (0, or 2 after a one-line error on stderr) instead of raising SystemExit."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "list":
            return _list(args.spaces)
        _require(args)
        if args.command == "report":
            return _report(args)
        if args.command == "samples":
            return _samples(args)
        _check_run_args(args)
        # cli.PROGRESS_INTERVAL is read as the command starts, so setting it here still sets the progress interval
        if args.command == "tune":
            return run_tune(args, progress_interval=PROGRESS_INTERVAL)
        return run_sweep(args, progress_interval=PROGRESS_INTERVAL)
    except (UsageError, ValueError, DataUnavailable, FileNotFoundError) as e:
        print(f"whiten-bench: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `whiten-bench list | head`: the reader left; silence the flush at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())