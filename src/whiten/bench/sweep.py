"""Running compare, sweep and stability: the plan of runs a command line asks for (optimizers, lrs, seeds, starting
points, widths, refresh intervals), the --opt options tried on the task's model before anything runs, a lock on the
results directory, the runs one after another with their progress, and the report at the end.

The command line is parsed and checked by whiten.bench.cli. Like it, this module imports nothing beyond torch when
it is imported: the data loaders, the training loop and the report are imported when a sweep starts.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from pathlib import Path

import torch

from .errors import UsageError
from .models import PROFILES
from .registry import build_optimizer, get_spec, task_default, with_options

# Seconds between plain progress lines when stderr is not a terminal (a log file, nohup, CI).
PROGRESS_INTERVAL = 30.0


# ---------------------------------------------------------------------------------------------------------------
# The plan: which runs, with which lrs and options
# ---------------------------------------------------------------------------------------------------------------

def plan_runs(args) -> list:
    """The runs a compare, sweep or stability command line asks for, in the order they run: each starting point,
    width, seed and optimizer, then each refresh interval and lr (compare: the lr and options tuned for the task,
    else the registry's default, see registry.task_default; sweep and stability: --lrs, or the registry's grid)."""
    from .run import RunConfig

    # the profile's own width is no --width at all: those runs are the plain ones (same folder, same identity)
    base = PROFILES[args.profile][args.task]["width"]
    widths = list(dict.fromkeys(None if w == base else w for w in (args.width or [None])))
    refreshes = getattr(args, "refresh", None) or [None]
    options = tuple(sorted(dict(args.opt).items()))
    lrs = getattr(args, "lrs", None)
    plan = []
    for start in args.starts:
        for width in widths:
            for seed in args.seeds:
                for name in args.optimizers:
                    spec = get_spec(name)
                    run_options = options
                    if args.command == "compare":
                        lr, tuned, _ = task_default(name, args.task)
                        grid = [lr]
                        run_options = tuple(sorted({**tuned, **dict(args.opt)}.items()))
                    elif isinstance(lrs, dict):
                        grid = lrs.get(name) or list(spec.lr_grid)
                    else:
                        grid = lrs or list(spec.lr_grid)
                    for refresh in refreshes:
                        for lr in grid:
                            plan.append(RunConfig(task=args.task, profile=args.profile, optimizer=name, lr=lr,
                                                  seed=seed, steps=args.steps, start=start, warmup=args.warmup,
                                                  schedule=args.schedule, evals=args.evals, compile=args.compile,
                                                  width=width, refresh=refresh, options=run_options))
    return plan


def compare_notes(names, task: str) -> list[str]:
    """What compare tells the user about its defaults: which lrs were not tuned on this task (their comparison rests
    on a setting from another task, or on none), and how to tune them."""
    notes = [note for name in names if (note := task_default(name, task)[2])]
    if notes:
        notes.append(f"a fair comparison tunes every optimizer on the task: whiten-bench sweep --task {task} (lr) "
                     f"or whiten-bench tune --task {task} (every hyperparameter)")
    return notes


def check_options(args, task) -> None:
    """``--opt`` and ``--refresh``, tried on the task's model before anything runs: an option an optimizer refuses
    or does not know stops here, not after hours of other runs."""
    options = dict(args.opt)
    refreshes = getattr(args, "refresh", None) or [None]
    if not options and refreshes == [None]:
        return
    model = task.build_model(0)
    for name in args.optimizers:
        base = get_spec(name)
        for refresh in refreshes:
            spec = with_options(base, refresh, options)
            try:
                opt = build_optimizer(spec, model, spec.default_lr, task.width, args.steps)
            except TypeError as e:  # an unexpected keyword argument
                unknown = next((k for k in options if repr(k) in str(e)), None)
                what = f"has no option {unknown!r}" if unknown else "refuses it"
                raise UsageError(f"--opt {unknown or ' '.join(f'{k}={v}' for k, v in options.items())}: {name} "
                                 f"{what} ({e}; its registry options: {', '.join(sorted(base.options))}; the "
                                 "others are its constructor's arguments)") from None
            except ValueError as e:
                raise UsageError(f"--opt {' '.join(f'{k}={v}' for k, v in options.items())}: {name} refuses it "
                                 f"({e})") from None
            # an optimizer that swallows unknown keywords (**kwargs) keeps none of them in its param groups; a named
            # constructor argument kept as an attribute (K-FAC's kl_clip) is a real option
            kept = {k for g in opt.param_groups for k in g}
            named = {k for k, a in inspect.signature(type(opt).__init__).parameters.items()
                     if a.kind not in (a.VAR_KEYWORD, a.VAR_POSITIONAL)}
            unknown = [k for k in options if k not in base.options and k not in kept and k not in named]
            if unknown:
                raise UsageError(f"--opt {unknown[0]}: {name} has no option {unknown[0]!r} (its options: "
                                 f"{', '.join(sorted(set(base.options) | kept - {'params', 'role'}))})")


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Where a user sees the runs move: a tqdm bar on a terminal; elsewhere (a log file, nohup, CI), where a bar's
    carriage returns make no lines, a plain line every ``interval`` seconds (default: PROGRESS_INTERVAL) with the
    step, the training loss and the time left. Run results go to stdout; progress goes to stderr."""

    def __init__(self, pending: list, stream=None, interval: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.remaining = sum(cfg.steps for cfg in pending)  # steps still to train, over every pending run
        self.trained = 0
        self.count = len(pending)
        self.index = 0
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.remaining, unit="step", dynamic_ncols=True, file=self.stream)
            except ImportError:  # the bench extra brings tqdm; without it, plain lines
                pass
        self.t0 = None

    def start_run(self, cfg) -> None:
        self.index += 1
        self.cfg = cfg
        self.done_in_run = 0
        self.losses = []
        self.last_line = time.perf_counter()
        if self.t0 is None:
            self.t0 = self.last_line
        if self.bar is not None:
            self.bar.set_description(f"{cfg.variant()} lr {cfg.lr:.3g} seed {cfg.seed} {cfg.start}")

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def step(self, step: int, loss: float) -> None:
        self.trained += step - self.done_in_run
        self.done_in_run = step
        self.losses.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_line < self.interval and step < self.cfg.steps:
            return
        # Seconds per step so far, evaluations included, so the estimate is the wall-clock time left.
        rate = (now - self.t0) / max(1, self.trained)
        left_run = (self.cfg.steps - step) * rate
        left_all = (self.remaining - self.trained) * rate
        mean_loss = sum(self.losses) / len(self.losses)
        print(f"  [run {self.index}/{self.count}] {self.cfg.variant()} lr {self.cfg.lr:.3g} seed {self.cfg.seed} "
              f"{self.cfg.start}: step {step}/{self.cfg.steps}, train loss {mean_loss:.3f}; "
              f"ETA {_duration(left_run)} for this run, {_duration(left_all)} for all", file=self.stream, flush=True)
        self.losses = []
        self.last_line = now

    def end_run(self, cfg, line: str) -> None:
        # A diverged run stops early: count its missing steps as done so the bar and the estimate stay right.
        skipped = cfg.steps - self.done_in_run
        self.remaining -= skipped
        if self.bar is not None:
            self.bar.total = self.remaining
            self.bar.refresh()
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------------------

def run_sweep(args, progress_interval: float | None = None) -> int:
    """Runs what a compare, sweep or stability command line asks for (arguments whiten.bench.cli has checked),
    the runs finished before skipped, then writes the report; returns the exit code. Progress lines come every
    ``progress_interval`` seconds where stderr is not a terminal (default: PROGRESS_INTERVAL)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = plan_runs(args)
    from .run import checkpoint_path, finished, parse_start, run
    from .tasks import make_task

    from .parallel import from_environment

    par, args.device = from_environment(args.parallel, args.device)
    if not par.main:  # rank 0 speaks for the run
        sys.stdout = open(os.devnull, "w")
    # the data first: a bad --text or data set is refused before --out is created
    task = make_task(args.task, args.profile, args.device, text_path=args.text, data_root=args.data_root)
    check_options(args, task)
    with sweep_lock(args.out, par.main):
        # every finished record is checked before any run starts: one of other settings stops the sweep here
        pending = [cfg for cfg in plan if finished(cfg, task, args.out) is None]
        return _run_pending(args, plan, pending, task, par, checkpoint_path, parse_start, run, progress_interval)


@contextlib.contextmanager
def sweep_lock(out: Path, main: bool):
    """An exclusive lock on ``out/.whiten-bench.lock`` while a sweep writes there: a second sweep into the same
    directory would run the same runs and interleave their ``evals.jsonl``. Released when the process ends, even
    killed. Only rank 0 of a torchrun job takes it (it alone writes)."""
    if not main:
        yield
        return
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".whiten-bench.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out}: another whiten-bench sweep is writing there (it holds {path}); wait "
                             "for it to finish or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_pending(args, plan, pending, task, par, checkpoint_path, parse_start, run, progress_interval) -> int:
    from .report import write_report

    done = f" ({len(plan) - len(pending)} already done, skipped)" if len(pending) < len(plan) else ""
    extra = (f", widths {','.join(map(str, args.width))}" if args.width else "") + \
        (f", refresh {','.join(map(str, args.refresh))}" if getattr(args, "refresh", None) else "") + \
        (f", options {' '.join(f'{k}={v}' for k, v in args.opt)}" if args.opt else "")
    print(f"{len(plan)} runs of {args.steps} steps{done}: task {args.task}, profile {args.profile}, "
          f"device {args.device} ({torch.get_num_threads()} threads), optimizers {','.join(args.optimizers)}, "
          f"seeds {','.join(map(str, args.seeds))}, starts {','.join(args.starts)}{extra} -> {args.out}"
          + (f" ({args.parallel} over {par.world} processes)" if par.world > 1 else ""), flush=True)
    if task.note():
        print(f"note: {task.note()}", flush=True)
    if args.command == "compare":
        for line in compare_notes(args.optimizers, args.task):
            print(f"note: {line}", flush=True)
    if args.profile == "gpu" and args.device.type == "cpu":
        print("note: the gpu profile on a CPU takes hours per run; --profile cpu is sized for 2 cores", flush=True)
    progress = Progress(pending, stream=None if par.main else open(os.devnull, "w"), interval=progress_interval)
    try:
        for cfg in pending:
            progress.start_run(cfg)
            offset = parse_start(cfg.start)
            if offset and not checkpoint_path(task, cfg.seed, offset, args.out).exists():
                progress.message(f"  training the {cfg.start} starting point (AdamW, {offset} steps, seed "
                                 f"{cfg.seed}; kept in {args.out / 'checkpoints'})")
            summary = run(cfg, task, args.out, progress=progress.step, parallel=par)
            status = "diverged" if summary["diverged"] else f"final val loss {summary['final_val_loss']:.4f}"
            width = f" width {cfg.width}" if cfg.width else ""
            progress.end_run(cfg, f"{cfg.variant():24s} lr {cfg.lr:<8.3g} seed {cfg.seed} {cfg.start:10s}{width} "
                                  f"{status}  ({summary['seconds_per_step'] * 1e3:.0f} ms/step)")
    finally:
        progress.close()
    if not par.main:
        return 0
    path = write_report(args.out, plots=not args.no_plots)
    print(f"\nreport: {path}" + ("" if args.no_plots else f"\nplots:  {args.out / 'plots'}"))
    print(path.read_text())
    return 0


def run_tune(args, progress_interval: float | None = None) -> int:
    """Runs what a tune command line asks for (arguments whiten.bench.cli has checked): a coordinate descent per
    optimizer, budget, starting point and width (whiten.bench.tune), finished runs reused, then the report."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .parallel import from_environment
    from .report import write_report
    from .run import run
    from .tasks import make_task
    from .tune import run_root, tune_runs

    par, args.device = from_environment(args.parallel, args.device)
    if par.world > 1:
        raise UsageError("tune runs in one process (its runs are small and many); use sweep under torchrun")
    task = make_task(args.task, args.profile, args.device, text_path=args.text, data_root=args.data_root)
    base = PROFILES[args.profile][args.task]["width"]
    widths = list(dict.fromkeys(None if w == base else w for w in (args.width or [None])))
    print(f"tune: task {args.task}, profile {args.profile}, device {args.device} ({torch.get_num_threads()} threads), "
          f"optimizers {','.join(args.optimizers)}, {args.steps} steps x budgets {','.join(f'{b:g}' for b in args.budgets)}, "
          f"seeds {','.join(map(str, args.seeds))} -> {args.out}", flush=True)
    if task.note():
        print(f"note: {task.note()}", flush=True)
    with sweep_lock(args.out, True):
        for start in args.starts:
            for width in widths:
                fields = dict(start=start, schedule=args.schedule, evals=args.evals, compile=args.compile,
                              width=width)

                def runner(cfg, task=task):
                    progress = Progress([cfg], interval=progress_interval)
                    progress.start_run(cfg)
                    try:
                        summary = run(cfg, task, run_root(args.out, cfg), progress=progress.step)
                    finally:
                        progress.close()
                    status = "diverged" if summary["diverged"] else f"final val loss {summary['final_val_loss']:.4f}"
                    print(f"    {cfg.variant():40s} lr {cfg.lr:<8.3g} warmup {cfg.warmup_steps():<4d} seed "
                          f"{cfg.seed} {status}", flush=True)
                    return summary

                tune_runs(task.with_width(width), args.optimizers, args.steps, args.budgets, args.out,
                          spaces=args.space, seeds=args.seeds, noise_seeds=args.noise_seeds,
                          noise_floor=args.noise_floor, max_rounds=args.max_rounds,
                          radius=None if args.full_grid else 1, run_fields=fields, runner=runner,
                          confirm=not args.no_confirm)
    path = write_report(args.out, plots=not args.no_plots)
    print(f"\nreport: {path}" + ("" if args.no_plots else f"\nplots:  {args.out / 'plots'}"))
    return 0
