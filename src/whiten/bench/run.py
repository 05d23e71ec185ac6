"""One training run: a task, an optimizer at one learning rate, one seed, one starting point.

Results are data: ``config.json`` (the resolved config, the data used, versions, threads, git revision),
``evals.jsonl`` (one record per evaluation, written as it happens) and ``done.json`` (the summary, written last: a
run without it is unfinished). The clocks count data, forward, backward and optimizer step (refreshes included):
wall time (``seconds``) and the process's CPU time (``cpu_seconds``, every thread's); evaluation and compile
warm-up do not count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .parallel import Parallel
from .registry import OptimizerSpec, build_optimizer, get_spec, with_options
from .tasks import Task, eval_steps, lr_factor

DIVERGENCE_MARGIN = 1.0  # nats above the starting validation loss


@dataclass(frozen=True)
class RunConfig:
    task: str
    profile: str
    optimizer: str
    lr: float
    seed: int
    steps: int
    start: str = "init"  # "init" or "adamw@N": AdamW's weights after N steps, fresh optimizer state
    warmup: int = -1  # -1: 5% of steps
    schedule: str = "constant"
    evals: int = 20
    compile: bool = False
    width: int | None = None  # --width: the model's width instead of the profile's (None: the profile's)
    refresh: int | None = None  # --refresh: the optimizer's refresh interval (its registry refresh_option)
    options: tuple = ()  # --opt: ((key, value), ...) over the registry's options, sorted by key

    def warmup_steps(self) -> int:
        return max(1, int(0.05 * self.steps)) if self.warmup < 0 else self.warmup

    def run_name(self) -> str:
        return f"lr{self.lr:.3g}-seed{self.seed}"

    def variant(self) -> str:
        """The optimizer and what changes it, as the report names it: "splus", "shampoo refresh=100"."""
        extra = ([f"refresh={self.refresh}"] if self.refresh is not None else []) + [f"{k}={v}" for k, v in self.options]
        return " ".join([self.optimizer, *extra])

    def run_dir(self, root: Path) -> Path:
        opt = self.optimizer.replace(":", "-")
        if self.refresh is not None:
            opt += f"-refresh{self.refresh}"
        for k, v in self.options:
            opt += "-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{k}={v}")
        profile = self.profile if self.width is None else f"{self.profile}-w{self.width}"
        return Path(root) / self.task / profile / self.start.replace("@", "") / opt / self.run_name()

    def spec(self) -> OptimizerSpec:
        """The registry entry with this run's --refresh and --opt applied to its options."""
        return with_options(get_spec(self.optimizer), self.refresh, dict(self.options))


def data_hash(task: Task) -> str:
    """sha256 of the task's data as loaded (every tensor the task holds, the text corpus included), computed once
    per task object: another --text or data set must never pass for the one a finished run used."""
    cached = getattr(task, "_data_sha256", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()

    def add(name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{name}[{i}]", v)
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.device)):
            for k in sorted(vars(value)):
                if not k.startswith("_"):
                    add(f"{name}.{k}", vars(value)[k])

    add("task", task)
    task._data_sha256 = h.hexdigest()
    return task._data_sha256


def run_identity(cfg: RunConfig, task: Task, spec) -> dict:
    """Everything that changes a run's result: the task and its data (hash), profile, steps, schedule, warm-up,
    evaluations, optimizer and its options, start and seed (``compile`` does not: the same numbers, faster).
    Recorded in ``done.json``; a finished run is reused only when the identity is the same."""
    # width, refresh and options came later: at their defaults they are left out, so that a run made before keeps
    # the identity it was recorded with
    later = {"width": None, "refresh": None, "options": ()}
    run_fields = {k: v for k, v in asdict(cfg).items() if k != "compile" and not (k in later and v == later[k])}
    ident = {"run": run_fields, "task": task.describe(), "data_sha256": data_hash(task),
             "optimizer_options": spec.options, "optimizer_source": spec.source}
    return json.loads(json.dumps(ident, default=repr))  # as it reads back from JSON (tuples become lists)


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def finished(cfg: RunConfig, task: Task, root: Path) -> dict | None:
    """The summary of this run's finished record when it can be reused; None when the run must be done (no
    record, or an unreadable one: named in a warning). A finished record of another identity raises UsageError:
    its folder belongs to other settings and is never reused or overwritten."""
    path = cfg.run_dir(root) / "done.json"
    if not path.exists():
        return None
    task = task.with_width(cfg.width)
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        import warnings

        warnings.warn(f"unreadable run record {path} ({e}); the run is done again", RuntimeWarning, stacklevel=2)
        return None
    identity = run_identity(cfg, task, cfg.spec())
    saved = summary.get("identity")
    if saved == identity:
        return summary
    if saved is None:
        why = "it records no settings to compare (an older whiten-bench)"
    else:
        a, b = _flat(saved), _flat(identity)
        diff = [f"{k}: {a.get(k, '-')!r} there, {b.get(k, '-')!r} now" for k in sorted(set(a) | set(b))
                if a.get(k, "-") != b.get(k, "-")]
        why = "its settings differ: " + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "")
    raise UsageError(f"{path.parent} holds a finished run made with other settings ({why}); it is not reused. "
                     "Use another --out for these settings, or move that folder away to redo the run.")


def parse_start(start: str) -> int:
    """Steps of AdamW pre-training for a starting point: "init" -> 0, "adamw@N" -> N."""
    if start == "init":
        return 0
    if start.startswith("adamw@") and start[6:].isdigit() and int(start[6:]) > 0:
        return int(start[6:])
    raise ValueError(f"invalid start {start!r}: use 'init' or 'adamw@N' with N > 0")


def environment() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    import whiten

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count()
    env = {"whiten": whiten.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "cpus_usable": usable, "git": rev,
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        from importlib.metadata import version

        env["pytorch_optimizer"] = version("pytorch-optimizer")
    except Exception:  # not installed
        pass
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(opt) -> int:
    """The bytes of optimizer state this process holds at the end of a run (state only grows during one): a whiten
    optimizer's own report, else every tensor in ``opt.state`` (torch's AdamW and the other peers)."""
    if hasattr(opt, "memory_report"):
        return opt.memory_report().state_bytes
    if hasattr(opt, "optimizers"):  # registry.Chain: Muon for the matrices and AdamW for the rest
        return sum(state_bytes(o) for o in opt.optimizers)
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def checkpoint_path(task: Task, seed: int, steps: int, root: Path) -> Path:
    return Path(root) / "checkpoints" / f"{task.name}-{task.label}-seed{seed}-adamw{steps}.pt"


def start_checkpoint(task: Task, seed: int, steps: int, root: Path) -> Path:
    """AdamW's weights after ``steps`` steps at its default lr (cached under ``root/checkpoints``)."""
    path = checkpoint_path(task, seed, steps, root)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = get_spec("adamw")
    model = task.build_model(seed)
    opt = build_optimizer(spec, model, spec.default_lr, task.width)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(0.05 * steps))
    for step in range(steps):
        _train_step(task, model, opt, base, lr_factor(step, steps, warmup, "constant"), task.train_batch(seed, step))
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def _train_step(task, model, opt, base_lrs, factor: float, batch) -> torch.Tensor:
    for g, lr in zip(opt.param_groups, base_lrs):
        g["lr"] = lr * factor
    if getattr(opt, "needs_closure", False):
        # K-BFGS re-evaluates the same batch after its step (its second forward and backward, inside the timed
        # step like the rest of its cost): step(closure) evaluates the closure before and after the step and
        # returns the loss before it, the loss the other optimizers report
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            return loss

        return opt.step(closure)
    if hasattr(opt, "sample_fisher") and opt.fisher_due():
        # the Fisher family (whiten.fisher): the extra backward on labels sampled from the model, on the steps the
        # optimizer asks for it, inside the timed step like the rest of its cost
        loss, output = task.loss_and_output(model, batch)
        opt.sample_fisher(output, kind=task.fisher_kind)
    else:
        loss = task.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@contextlib.contextmanager
def _averaged(opt, on: bool):
    """The optimizer's averaged parameters swapped in for the duration, when ``on``."""
    if on:
        opt.eval()
    try:
        yield
    finally:
        if on:
            opt.train()


def _evaluate(task, model, opt, averages: bool) -> dict:
    model.eval()
    try:
        with _averaged(opt, averages):
            metrics = task.evaluate(model)
            if hasattr(model, "reshard"):
                # FSDP2 keeps the root's parameters gathered after a forward with no backward; without this the
                # next training forward would reuse the gathered averaged weights instead of the live ones
                model.reshard()
            return metrics
    finally:
        model.train()


def run(cfg: RunConfig, task: Task, root: Path, progress=None, parallel: Parallel | None = None) -> dict:
    """Train and evaluate; returns the summary (also written to ``done.json``). Skips a finished run of the same
    identity (:func:`run_identity`); refuses one of another (:func:`finished`).

    ``progress(step, loss)``, when given, is called after every training step with the number of steps done in
    this run and that step's training loss. ``parallel``: a run under torchrun (see :mod:`.parallel`); rank 0
    writes the files."""
    par = parallel or Parallel()
    out = cfg.run_dir(root)
    previous = finished(cfg, task, root)
    if previous is not None:
        return previous
    task = task.with_width(cfg.width)
    spec = cfg.spec()
    offset = parse_start(cfg.start)
    if par.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", {"run": asdict(cfg), "task_config": task.describe(),
                                          "data": task.data_record(), "data_sha256": data_hash(task),
                                          "optimizer_options": spec.options, "optimizer_source": spec.source,
                                          "environment": {**environment(), **par.describe()}})

    model = task.build_model(cfg.seed)
    if offset:
        if par.main:
            start_checkpoint(task, cfg.seed, offset, root)
        par.barrier()
        model.load_state_dict(torch.load(checkpoint_path(task, cfg.seed, offset, root), map_location=task.device))
    wrapped = par.wrap(model)
    opt = build_optimizer(spec, model, cfg.lr, task.width, cfg.steps, process_group=par.optimizer_group())
    base_lrs = [g["lr"] for g in opt.param_groups]
    train_model = torch.compile(wrapped) if cfg.compile else wrapped
    if cfg.compile:  # compile on a throwaway forward/backward (no step: the weights do not change)
        task.loss(train_model, par.shard(task.train_batch(cfg.seed, offset))).backward()
        opt.zero_grad(set_to_none=True)

    checkpoints = set(eval_steps(cfg.steps, cfg.evals))
    records, clock, cpu_clock, data_seconds, diverged = [], 0.0, 0.0, 0.0, False
    first = None
    with open(out / "evals.jsonl", "w") if par.main else open(os.devnull, "w") as log:
        for step in range(cfg.steps + 1):
            if step in checkpoints:
                # Before the first step the average is the parameters themselves; some optimizers (the official
                # SPlus file, pytorch-optimizer's SPlus) cannot eval() before they have state.
                metrics = _evaluate(task, model, opt, spec.averages and step > 0)
                rec = {"step": step, "seconds": clock, "cpu_seconds": cpu_clock, **metrics}
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                first = metrics["val_loss"] if first is None else first
                loss = metrics["val_loss"]
                if not math.isfinite(loss) or loss > first + DIVERGENCE_MARGIN:
                    diverged = True
                    break
            if step == cfg.steps:
                break
            _sync(task.device)
            t0, c0 = time.perf_counter(), time.process_time()
            batch = par.shard(task.train_batch(cfg.seed, offset + step))
            t1 = time.perf_counter()
            loss = _train_step(task, train_model, opt, base_lrs,
                               lr_factor(step, cfg.steps, cfg.warmup_steps(), cfg.schedule), batch)
            _sync(task.device)
            clock += time.perf_counter() - t0
            cpu_clock += time.process_time() - c0
            data_seconds += t1 - t0
            loss = par.mean(loss.item())  # every rank takes the same decision below
            if not math.isfinite(loss):
                diverged = True
                rec = {"step": step + 1, "seconds": clock, "cpu_seconds": cpu_clock, "val_loss": float("nan"),
                       "train_loss": float("nan")}
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                break
            if progress is not None:
                progress(step + 1, loss)

    config = json.loads(json.dumps(asdict(cfg)))  # as done.json gives it back (tuples become lists)
    summary = {"config": config, "identity": run_identity(cfg, task, spec), "diverged": diverged,
               "final_val_loss": records[-1]["val_loss"] if not diverged else float("inf"),
               "train_seconds": clock, "seconds_per_step": clock / max(1, records[-1]["step"]),
               "train_cpu_seconds": cpu_clock, "threads": torch.get_num_threads(), "device": str(task.device),
               "data_seconds": data_seconds, "state_bytes": state_bytes(opt), "records": records}
    for k, v in records[-1].items():
        if k.startswith("val_") and k != "val_loss":
            summary[f"final_{k}"] = v
    if cfg.task == "dit":  # for `whiten-bench samples`
        with _averaged(opt, spec.averages):
            weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                       for k, v in model.state_dict().items()}
        if par.main:
            torch.save(weights, out / "model.pt")
    if par.main:
        _write_json(out / "done.json", summary)
    par.barrier()
    return summary
