"""whiten-bench for the SPlus paper's claims and honest clocks: per-optimizer lrs, --refresh (each optimizer's own
option), --opt, --width, --threads and CPU time; the report's stability and lr-transfer sections, --clock, the
loaded-machine warning, AdamW's own steps-to-AdamW, whole curves on the plots."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from whiten.bench import cli, metrics, report, tasks
from whiten.bench.registry import build_optimizer
from whiten.bench.run import RunConfig, run, run_identity


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A small text (fast to load) that fits the tiny profile's validation set."""
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("".join(rng.choice(words) + rng.choice([" ", ", ", ".\n"]) for _ in range(1600)))
    return path


@pytest.fixture
def no_data_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the mistake was reported")

    monkeypatch.setattr(tasks, "make_task", refuse)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whiten-bench: error: "), lines
    return lines[0]


def _plan(*argv):
    return cli._plan(cli.build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------- the command line

def test_lrs_per_optimizer():
    plan = _plan("sweep", "--optimizers", "adamw,splus,soap", "--lrs", "splus=0.1,0.2;adamw=0.001")
    lrs = {name: [c.lr for c in plan if c.optimizer == name] for name in ("adamw", "splus", "soap")}
    assert lrs["adamw"] == [0.001] and lrs["splus"] == [0.1, 0.2]
    assert lrs["soap"] == list(cli.get_spec("soap").lr_grid)  # not named: its registry grid
    plan = _plan("sweep", "--optimizers", "adamw,splus", "--lrs", "0.1,0.2")
    assert [c.lr for c in plan] == [0.1, 0.2, 0.1, 0.2]  # a plain list: every optimizer


@pytest.mark.parametrize("lrs, words", [
    ("adam=0.1", ["--lrs", "unknown optimizer 'adam'"]),
    ("splus=0.1;soap=0.01", ["--lrs names soap", "not among --optimizers (adamw,splus)"]),
    ("splus=", ["--lrs", "numbers after splus="]),
    ("splus=0.1,-2", ["--lrs", "positive"]),
])
def test_lrs_mistakes(capsys, tmp_path, no_data_loading, lrs, words):
    assert cli.main(["sweep", "--lrs", lrs, "--out", str(tmp_path / "out")]) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line


def test_refresh_reaches_each_optimizers_own_option():
    for name, option in (("splus", "inverse_every"), ("soap", "precondition_frequency"),
                         ("shampoo", "precondition_frequency"), ("shampoo-nograft", "precondition_frequency")):
        cfg = RunConfig(task="lm", profile="tiny", optimizer=name, lr=1e-3, seed=0, steps=5, refresh=7)
        assert cfg.spec().options[option] == 7 and cfg.variant() == f"{name} refresh=7"
        assert cfg.run_dir(Path("r")).parts[-2] == f"{name}-refresh7"
    import torch

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    opt = build_optimizer(RunConfig(task="lm", profile="tiny", optimizer="shampoo-nograft", lr=1e-3, seed=0,
                                    steps=5, refresh=7).spec(), layer, 1e-3, 4)
    assert opt.param_groups[0]["precondition_frequency"] == 7 and opt.param_groups[0]["grafting"] is None


def test_refresh_needs_an_optimizer_that_refreshes(capsys, tmp_path, no_data_loading):
    assert cli.main(["sweep", "--optimizers", "adamw,splus", "--refresh", "10", "--out", str(tmp_path / "o")]) == 2
    line = _error(capsys)
    assert "--refresh: adamw has no refresh interval" in line and "splus" in line


def test_opt_values():
    assert cli._option("ema_rate=0.99") == ("ema_rate", 0.99)
    assert cli._option("grafting=none") == ("grafting", None)
    assert cli._option("betas=(0.9, 0.99)") == ("betas", (0.9, 0.99))
    assert cli._option("grafting=adam") == ("grafting", "adam")
    plan = _plan("compare", "--opt", "weight_decay=0", "--opt", "ema_rate=0.9", "--optimizers", "splus")
    assert plan[0].options == (("ema_rate", 0.9), ("weight_decay", 0))
    assert plan[0].spec().options["ema_rate"] == 0.9 and plan[0].variant() == "splus ema_rate=0.9 weight_decay=0"


@pytest.mark.parametrize("opt, words", [
    # the registry's own options are listed: splus keeps ema_rate (its nonstandard_constant is SPlus's default now)
    ("no_such=1", ["--opt no_such", "splus has no option 'no_such'", "its registry options: ema_rate"]),
    ("inverse_every=0", ["--opt inverse_every=0", "splus refuses it", "inverse_every"]),
])
def test_opt_mistakes_stop_before_anything_runs(capsys, tmp_path, text, opt, words):
    out = tmp_path / "out"
    assert cli.main(["compare", "--optimizers", "splus", "--opt", opt, "--text", str(text), "--profile", "tiny",
                     "--out", str(out)]) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_opt_takes_a_constructor_argument_kept_outside_the_param_groups(capsys, tmp_path, text):
    """K-FAC keeps kl_clip as an attribute, not a group key: --opt kl_clip still reaches it; a typo does not."""
    out = tmp_path / "out"
    assert cli.main(["sweep", "--task", "lm", "--optimizers", "kfac", "--lrs", "0.01", "--opt", "kl_clip=none",
                     "--text", str(text), "--profile", "tiny", "--steps", "2", "--evals", "1", "--no-plots",
                     "--out", str(out)]) == 0
    config = json.loads(next(out.rglob("config.json")).read_text())
    assert config["run"]["options"] == [["kl_clip", None]] and config["optimizer_options"]["kl_clip"] is None
    capsys.readouterr()
    assert cli.main(["compare", "--optimizers", "kfac", "--opt", "kl_clp=0.1", "--text", str(text), "--profile",
                     "tiny", "--out", str(tmp_path / "o2")]) == 2
    assert "kfac has no option 'kl_clp'" in _error(capsys)


def test_width(capsys, tmp_path, text, no_data_loading):
    plan = _plan("sweep", "--profile", "tiny", "--optimizers", "adamw", "--lrs", "0.001", "--width", "16,32,64")
    assert [c.width for c in plan] == [16, None, 64]  # the profile's own width is a plain run
    assert plan[0].run_dir(Path("r")).parts[2] == "tiny-w16" and plan[1].run_dir(Path("r")).parts[2] == "tiny"
    assert cli.main(["compare", "--profile", "tiny", "--width", "15", "--out", str(tmp_path / "o")]) == 2
    assert "--width 15: must be a positive multiple of the tiny profile's 2 attention heads" in _error(capsys)


def test_a_width_is_its_own_model_identity_and_checkpoint(tmp_path, text):
    task = tasks.make_task("lm", "tiny", text_path=text)
    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=2, evals=1, width=16,
                    start="adamw@2")
    summary = run(cfg, task, tmp_path)
    assert summary["identity"]["task"]["width"] == 16 and summary["identity"]["run"]["width"] == 16
    assert (tmp_path / "checkpoints" / "lm-tiny-w16-seed0-adamw2.pt").exists()
    config = json.loads((cfg.run_dir(tmp_path) / "config.json").read_text())
    assert config["task_config"]["width"] == 16 and config["run"]["width"] == 16
    assert task.width == 32  # the task itself is untouched
    # a plain run records no width, refresh or options: runs made before these options keep their identity
    plain = run_identity(RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=2), task,
                         cli.get_spec("adamw"))
    assert not {"width", "refresh", "options"} & set(plain["run"])


def test_threads_cpu_time_and_the_claim_3_starts(tmp_path, text, capsys):
    """--threads is applied and recorded; CPU time sits beside wall time; init and adamw@N in one sweep with
    per-optimizer lrs (the claim-3 command, tiny)."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        assert cli.main(["sweep", "--text", str(text), "--profile", "tiny", "--optimizers", "adamw,splus",
                         "--lrs", "adamw=0.001;splus=0.1", "--starts", "init,adamw@2", "--steps", "3", "--evals",
                         "1", "--threads", "1", "--out", str(out), "--no-plots"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "(1 threads)" in capsys.readouterr().out
    done = sorted(out.glob("lm/tiny/*/*/*/done.json"))
    assert len(done) == 4 and (out / "checkpoints" / "lm-tiny-seed0-adamw2.pt").exists()
    summary = json.loads(done[0].read_text())
    assert summary["threads"] == 1 and summary["train_cpu_seconds"] > 0 and summary["device"] == "cpu"
    assert all("cpu_seconds" in rec for rec in summary["records"])
    config = json.loads((done[0].parent / "config.json").read_text())
    assert config["environment"]["threads"] == 1 and config["environment"]["cpu_count"] >= 1
    assert config["data"]["format"] == "text" and len(config["data"]["sha256"]) == 64
    text_report = (out / "report.md").read_text()
    assert "start adamw@2" in text_report and "start init" in text_report


def test_stability_command(tmp_path, text):
    args = cli.build_parser().parse_args(["stability"])
    assert args.optimizers == ["splus", "shampoo", "shampoo-nograft", "soap"] and args.refresh == [10, 30, 100]
    assert args.steps == 300 and str(args.out) == "results/stability"
    out = tmp_path / "out"
    assert cli.main(["stability", "--text", str(text), "--profile", "tiny", "--optimizers", "splus,soap",
                     "--lrs", "splus=0.1;soap=0.003", "--refresh", "1,2", "--steps", "2", "--evals", "1",
                     "--out", str(out), "--no-plots"]) == 0
    done = [json.loads(p.read_text()) for p in out.glob("**/done.json")]
    options = sorted((d["config"]["optimizer"], d["identity"]["optimizer_options"].get("inverse_every",
                      d["identity"]["optimizer_options"].get("precondition_frequency"))) for d in done)
    assert options == [("soap", 1), ("soap", 2), ("splus", 1), ("splus", 2)]
    assert "## Stability: lm · profile tiny · start init" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ the report

def _fake(root: Path, optimizer: str, lr: float, curve: list[float], seed: int = 0, seconds_per_step: float = 0.1,
          cpu_per_step: float | None = None, threads: int = 2, diverged: bool = False, **config):
    steps = [0, 25, 50, 75, 100][: len(curve)]
    cpu = seconds_per_step * threads if cpu_per_step is None else cpu_per_step
    records = [{"step": s, "seconds": s * seconds_per_step, "cpu_seconds": s * cpu, "val_loss": v}
               for s, v in zip(steps, curve)]
    cfg = {"task": "lm", "profile": "cpu", "optimizer": optimizer, "lr": lr, "seed": seed, "steps": 100,
           "start": "init", "warmup": -1, "schedule": "constant", "evals": 4, "compile": False, "width": None,
           "refresh": None, "options": [], **config}
    out = root / json.dumps([optimizer, lr, seed, config]).replace("/", "_").replace('"', "")
    out.mkdir(parents=True)
    (out / "done.json").write_text(json.dumps({
        "config": cfg, "diverged": diverged, "final_val_loss": math.inf if diverged else curve[-1],
        "train_seconds": 100 * seconds_per_step, "train_cpu_seconds": 100 * cpu, "threads": threads,
        "device": "cpu", "seconds_per_step": seconds_per_step, "data_seconds": 0.0, "records": records}))


def test_adamw_reads_one_even_when_its_curve_dips_early(tmp_path):
    noisy = [4.0, 2.5, 1.69, 1.72, 1.70]  # below its own final loss at step 50
    _fake(tmp_path, "adamw", 0.001, noisy)
    _fake(tmp_path, "splus", 0.1, [4.0, 2.2, 1.70, 1.6, 1.5])
    records = [{"step": 25 * i, "seconds": 2.5 * i, "val_loss": v} for i, v in enumerate(noisy)]
    assert metrics.fraction_to_target(records, records) == (1.0, 1.0)
    assert metrics.crossing(records, 1.70) < 100  # the first crossing, which the rule above overrides
    text = report.write_report(tmp_path, plots=False).read_text()
    assert "| adamw | 0.001 | 1.700 | 1.00 | 1.00 |" in text and "| splus | 0.1 | 1.500 | 0.50 | 0.50 |" in text


def test_clock_and_the_loaded_machine_warning(tmp_path):
    # AdamW ran alone (CPU time = wall x 2 threads); SPlus shared the machine: 3x the wall time, same CPU time
    _fake(tmp_path, "adamw", 0.001, [4.0, 3.0, 2.0, 1.8, 1.7], seconds_per_step=0.1)
    _fake(tmp_path, "splus", 0.1, [4.0, 2.4, 1.7, 1.6, 1.5], seconds_per_step=0.3, cpu_per_step=0.2)
    wall = report.write_report(tmp_path, plots=False).read_text()
    assert "| splus | 0.1 | 1.500 | 0.50 | 1.50 |" in wall  # wall clock: 50 steps x 0.3 s / (100 x 0.1 s)
    assert "**Warning: a loaded machine.** 1 of 2 runs" in wall and "lowest 0.33: splus lr 0.1 seed 0" in wall
    assert "--clock cpu" in wall
    cpu = report.write_report(tmp_path, plots=False, clock="cpu").read_text()
    assert "| splus | 0.1 | 1.500 | 0.50 | 0.50 |" in cpu and "time-to-AdamW (cpu)" in cpu
    assert cli.main(["report", str(tmp_path), "--no-plots", "--clock", "cpu"]) == 0
    with pytest.raises(ValueError, match="clock"):
        report.write_report(tmp_path, plots=False, clock="gpu")


def test_the_loaded_machine_rule():
    run = {"train_seconds": 10.0, "train_cpu_seconds": 15.0, "threads": 2, "device": "cpu"}
    assert metrics.utilization(run) == 0.75 and metrics.utilization(run) < metrics.LOADED_UTILIZATION
    assert metrics.utilization({**run, "train_cpu_seconds": 19.0}) >= metrics.LOADED_UTILIZATION  # 0.95: quiet
    assert metrics.utilization({**run, "device": "cuda:0"}) is None  # on a GPU the CPU mostly waits
    assert metrics.utilization({"train_seconds": 10.0}) is None  # a record from before CPU time was kept


def test_records_without_cpu_time_still_report(tmp_path):
    _fake(tmp_path, "adamw", 0.001, [4.0, 3.0, 2.0, 1.8, 1.7])
    _fake(tmp_path, "splus", 0.1, [4.0, 2.4, 1.7, 1.6, 1.5], seconds_per_step=0.3, cpu_per_step=0.2)
    for done in tmp_path.glob("**/done.json"):  # as written before CPU time was kept
        old = json.loads(done.read_text())
        for rec in old["records"]:
            del rec["cpu_seconds"]
        del old["train_cpu_seconds"], old["threads"], old["device"]
        done.write_text(json.dumps(old))
    text = report.write_report(tmp_path, plots=False, clock="cpu").read_text()
    assert "| splus | 0.1 | 1.500 | 0.50 | n/a |" in text and "Warning" not in text


def test_plots_show_whole_curves(tmp_path, monkeypatch):
    curve = [9.5, 3.0, 2.0, 1.8, 1.7]  # a high start must not be cut off
    assert report.loss_range([[{"val_loss": v} for v in curve]]) == (pytest.approx(1.7 * 0.97),
                                                                       pytest.approx(9.5 * 1.03))
    _fake(tmp_path, "adamw", 0.001, curve)
    _fake(tmp_path, "splus", 0.1, [9.5, 2.4, 1.7, 1.6, 1.5])
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.write_report(tmp_path)
    for ax in figures[0].axes[:2]:
        lo, hi = ax.get_ylim()
        assert lo <= 1.5 and hi >= 9.5


def test_stability_section_and_heat_map(tmp_path):
    start = 4.0
    for refresh in (10, 100):
        for lr in (0.1, 1.0):
            _fake(tmp_path, "splus", lr, [start, 3.0, 2.5, 2.2, 2.0 + lr / 10], refresh=refresh)
        _fake(tmp_path, "shampoo-nograft", 0.001, [start, 3.0, 2.6, 2.4, 2.3], refresh=refresh)
    _fake(tmp_path, "shampoo-nograft", 0.01, [start, 3.0, 2.6], refresh=10, diverged=True)  # stopped, 1 nat up
    _fake(tmp_path, "shampoo-nograft", 0.01, [start, 3.9, 4.1, 4.2, 4.05], refresh=100)  # ends above its start
    text = report.write_report(tmp_path, plots=False).read_text()
    assert "## Stability: lm · profile cpu · start init" in text
    assert "| shampoo-nograft | 2/4 | 0.001 | 0.001 |" in text and "| splus | 0/4 | 1 | 1 |" in text
    assert "| 10 | 2.300 | div (1/1) |" in text and "| 100 | 2.300 | div (1/1) |" in text
    assert "| 100 | 2.010 | 2.100 |" in text
    lines = report.stability_sections(report.load_runs(tmp_path), tmp_path / "plots")  # the heat map alone
    assert "![lm-cpu-init-stability.png](plots/lm-cpu-init-stability.png)" in lines
    assert (tmp_path / "plots" / "lm-cpu-init-stability.png").stat().st_size > 0


def test_transfer_section_and_plot(tmp_path):
    for width, best in ((64, 0.1), (128, 0.1), (256, 0.215)):
        for lr in (0.0464, 0.1, 0.215):
            _fake(tmp_path, "splus", lr, [4.0, 2.0, 1.9 - width / 1000 + (0 if lr == best else 0.05)], width=width)
            _fake(tmp_path, "adamw", lr / 100, [4.0, 2.0, 2.0 - width / 1000 + (0 if lr == 0.0464 else 0.05)],
                  width=width)
    text = report.write_report(tmp_path, plots=False).read_text()
    assert "## Learning-rate transfer across width: lm · profile cpu · start init" in text
    assert "| splus | 0.1 (1.836) | 0.1 (1.772) | 0.215 (1.644) (edge) | 1 |" in text
    assert "| adamw | 0.000464 (1.936) (edge) | 0.000464 (1.872) (edge) | 0.000464 (1.744) (edge) | 0 |" in text
    assert "## lm · profile cpu-w64 · start init" in text  # each width also gets its own comparison
    lines = report.transfer_sections(report.load_runs(tmp_path), tmp_path / "plots")  # the plot alone
    assert "![lm-cpu-init-transfer.png](plots/lm-cpu-init-transfer.png)" in lines
    assert (tmp_path / "plots" / "lm-cpu-init-transfer.png").stat().st_size > 0
