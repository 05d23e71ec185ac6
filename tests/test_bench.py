"""whiten-bench: metrics on constructed curves, the registry, tiny end-to-end runs of each task, resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from whiten.bench import cli, metrics, registry, run as run_mod
from whiten.bench.run import RunConfig, run
from whiten.bench.tasks import eval_steps, lr_factor, make_task

CURVE = [{"step": 0, "seconds": 0.0, "val_loss": 4.0}, {"step": 10, "seconds": 1.0, "val_loss": 3.0},
         {"step": 20, "seconds": 2.0, "val_loss": 2.0}, {"step": 40, "seconds": 4.0, "val_loss": 1.5}]


def test_crossing_interpolates_between_evaluations():
    assert metrics.crossing(CURVE, 2.5) == pytest.approx(15.0)
    assert metrics.crossing(CURVE, 2.5, "seconds") == pytest.approx(1.5)
    assert metrics.crossing(CURVE, 4.0) == 0.0
    assert metrics.crossing(CURVE, 1.0) == math.inf
    assert metrics.crossing(CURVE[:2] + [{"step": 20, "seconds": 2, "val_loss": float("nan")}], 2.0) == math.inf


def test_fraction_to_target():
    baseline = [{"step": 0, "seconds": 0.0, "val_loss": 4.0}, {"step": 100, "seconds": 8.0, "val_loss": 2.0}]
    steps, seconds = metrics.fraction_to_target(CURVE, baseline)
    assert steps == pytest.approx(20 / 100) and seconds == pytest.approx(2.0 / 8.0)
    never = [{"step": 0, "seconds": 0.0, "val_loss": 4.0}, {"step": 100, "seconds": 9.0, "val_loss": 3.0}]
    assert metrics.fraction_to_target(never, baseline) == (math.inf, math.inf)


def test_best_lr_flags_the_edge_and_counts_divergence_as_worst():
    assert metrics.best_lr({0.1: [2.0, 2.2], 0.2: [1.9, 2.0], 0.4: [2.5, 2.5]}) == (0.2, False)
    assert metrics.best_lr({0.1: [1.0], 0.2: [2.0]}) == (0.1, True)
    assert metrics.best_lr({0.1: [3.0], 0.2: [math.inf, 1.0]}) == (0.1, True)
    assert metrics.mean_std([1.0, math.inf])[0] == math.inf


def test_significance_rule():
    assert metrics.significantly_lower([1.0, 1.01, 0.99], [2.0, 2.01, 1.99]) is True
    assert metrics.significantly_lower([1.0, 2.0], [1.1, 2.1]) is False
    assert metrics.significantly_lower([1.0], [2.0, 2.1]) is None


def test_eval_schedule_and_lr_schedule():
    steps = eval_steps(1000, 20)
    assert steps[0] == 0 and steps[-1] == 1000 and len(steps) == 21
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps[0] > gaps[-1]  # denser near the end
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(50, 100, 10, "linear")
    with pytest.raises(ValueError, match="total"):
        eval_steps(0, 5)


def test_registry():
    grid = registry.lr_grid(-3, 0)
    assert grid == (0.1, 0.215, 0.464, 1.0)
    for a, b in zip(grid, grid[1:]):
        assert b / a == pytest.approx(10 ** (1 / 3), rel=1e-2)
    assert registry.get_spec("splus").averages
    assert registry._resolve({"a": "1/width", "b": "1-10/steps", "c": 3}, width=128, steps=500) == \
        {"a": 1 / 128, "b": 1 - 10 / 500, "c": 3}
    opt = registry.build_optimizer(registry.get_spec("splus"), make_task("lm", "tiny").build_model(0),
                                   0.1, width=32, steps=500)
    assert opt.param_groups[0]["ema_rate"] == pytest.approx(0.98)
    # SPlus's own default, derived from the model's hidden width (32 here): 1e-3 x 768 / 32
    assert [g["nonstandard_constant"] for g in opt.param_groups] == [pytest.approx(0.768 / 32)] * len(opt.param_groups)
    assert registry.get_spec("pytorch_optimizer:Lion").name == "pytorch_optimizer:Lion"
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        registry.get_spec("adam")
    model = make_task("lm", "tiny").build_model(0)
    with pytest.raises(ValueError, match="no optimizer named"):
        registry.build_optimizer(registry.get_spec("pytorch_optimizer:NoSuchThing"), model, 1e-3, 32)


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, "tiny") for name in ("lm", "vit", "dit")}


@pytest.mark.parametrize("name", ["lm", "vit", "dit"])
@pytest.mark.parametrize("optimizer", ["adamw", "splus", "torch:Muon", "pytorch_optimizer:SOAP", "pytorch_optimizer:SPlus"])
def test_tiny_end_to_end(tasks, tmp_path, name, optimizer):
    spec = registry.get_spec(optimizer)
    cfg = RunConfig(task=name, profile="tiny", optimizer=optimizer, lr=spec.default_lr, seed=0, steps=12, evals=4)
    summary = run(cfg, tasks[name], tmp_path)
    out = cfg.run_dir(tmp_path)
    records = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in summary["records"]]
    assert records[0]["step"] == 0 and records[-1]["step"] == 12 and records[-1]["seconds"] > 0
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    config = json.loads((out / "config.json").read_text())
    assert config["environment"]["torch"] == torch.__version__ and config["run"]["optimizer"] == optimizer
    if name == "vit":
        assert 0.0 <= summary["final_val_acc"] <= 1.0
    if name == "dit":
        assert (out / "model.pt").exists()


@pytest.mark.parametrize("optimizer", ["soap", "soap-ema", "shampoo", "psgd-kron", "muon", "schedule-free-adamw",
                                       "splus-bf16", "soap-bf16", "splus-state-bf16", "soap-basis4",
                                       "shampoo-state-bf16", "psgd-kron-state-bf16",
                                       "conda", "pytorch_optimizer:Conda", "prodigy", "prodigyopt:Prodigy", "mfac",
                                       "scion", "specgd"])
def test_tiny_lm_with_whiten_family(tasks, tmp_path, optimizer):
    spec = registry.get_spec(optimizer)
    cfg = RunConfig(task="lm", profile="tiny", optimizer=optimizer, lr=spec.default_lr, seed=0, steps=12, evals=4)
    summary = run(cfg, tasks["lm"], tmp_path)
    assert not summary["diverged"] and summary["final_val_loss"] < summary["records"][0]["val_loss"]


def test_same_data_for_every_optimizer(tasks):
    a, b = tasks["dit"].train_batch(3, 17), tasks["dit"].train_batch(3, 17)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(tasks["lm"].train_batch(3, 17)[0], tasks["lm"].train_batch(3, 18)[0])


def test_divergence_is_detected_and_reported(tasks, tmp_path):
    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=30.0, seed=0, steps=40, evals=8, warmup=1)
    summary = run(cfg, tasks["lm"], tmp_path)
    assert summary["diverged"] and summary["final_val_loss"] == math.inf
    from whiten.bench.report import write_report

    text = write_report(tmp_path, plots=False).read_text()
    assert "| 1/1 |" in text


def test_start_from_adamw_checkpoint(tasks, tmp_path):
    cfg = RunConfig(task="vit", profile="tiny", optimizer="splus", lr=0.2, seed=1, steps=5, evals=2, start="adamw@7")
    summary = run(cfg, tasks["vit"], tmp_path)
    ckpt = tmp_path / "checkpoints" / "vit-tiny-seed1-adamw7.pt"
    assert ckpt.exists()
    fresh = tasks["vit"].build_model(1)
    fresh.load_state_dict(torch.load(ckpt))
    start_loss = tasks["vit"].evaluate(fresh)["val_loss"]
    assert summary["records"][0]["val_loss"] == pytest.approx(start_loss)
    with pytest.raises(ValueError, match="invalid start"):
        run_mod.parse_start("adam@5")


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    args = ["sweep", "--task", "lm", "--profile", "tiny", "--optimizers", "adamw,splus", "--lrs", "0.001,0.1",
            "--steps", "6", "--evals", "2", "--out", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 0
    done = sorted(tmp_path.glob("**/done.json"))
    assert len(done) == 4
    done[0].unlink()  # as if the sweep had been killed during this run
    calls = []
    real_run = run_mod.run

    def counting_run(cfg, *a, **kw):
        if not (cfg.run_dir(tmp_path) / "done.json").exists():
            calls.append(cfg)
        return real_run(cfg, *a, **kw)

    monkeypatch.setattr(run_mod, "run", counting_run)  # the CLI imports run() when a command needs it
    assert cli.main(args) == 0
    assert len(calls) == 1 and len(list(tmp_path.glob("**/done.json"))) == 4
    report = (tmp_path / "report.md").read_text()
    assert "steps-to-AdamW" in report and "| splus |" in report


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["compare", "--optimizers", "adamw,sgdx", "--profile", "tiny", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'sgdx'" in capsys.readouterr().err
    assert cli.main(["compare", "--starts", "midway", "--profile", "tiny", "--out", str(tmp_path)]) == 2
    assert "invalid start" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert cli.main(["compare", "--steps", "0"]) == 2
    assert cli.main(["compare", "--task", "mnist"]) == 2
    capsys.readouterr()
    assert cli.main(["compare", "--task", "vit", "--text", "x.txt", "--profile", "tiny",
                     "--out", str(tmp_path)]) == 2
    assert "--text applies to the lm task only" in capsys.readouterr().err


def test_samples_and_plots(tasks, tmp_path):
    cfg = RunConfig(task="dit", profile="tiny", optimizer="splus", lr=0.2, seed=0, steps=4, evals=2)
    run(cfg, tasks["dit"], tmp_path)
    assert cli.main(["samples", str(cfg.run_dir(tmp_path)), "--steps", "3"]) == 0
    assert (cfg.run_dir(tmp_path) / "samples.png").stat().st_size > 0
    assert cli.main(["report", str(tmp_path)]) == 0
    assert list((tmp_path / "plots").glob("*.png"))
    assert cli.main(["samples", str(tmp_path)]) == 2


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "splus" in out and "pytorch_optimizer:<Class>" in out


# ---------------------------------------------------------------------------- run identity, records, the lock

def _letters(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join("abcdefgh \n"[int(i)] for i in torch.randint(0, 10, (n,), generator=g))


def test_a_finished_run_is_reused_only_with_the_same_identity(tasks, tmp_path, monkeypatch):
    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=3, evals=1)
    first = run(cfg, tasks["lm"], tmp_path)
    assert first["identity"]["data_sha256"] == run_mod.data_hash(tasks["lm"])
    monkeypatch.setattr(run_mod, "_train_step", lambda *a, **k: pytest.fail("a finished run was redone"))
    assert run(cfg, tasks["lm"], tmp_path) == first  # same identity: reused
    for other in (dict(steps=4), dict(schedule="cosine"), dict(warmup=2), dict(evals=2)):
        changed = RunConfig(**{**run_mod.asdict(cfg), **other})
        assert changed.run_dir(tmp_path) == cfg.run_dir(tmp_path)  # the same folder...
        with pytest.raises(ValueError, match=f"other settings.*{next(iter(other))}") as e:
            run(changed, tasks["lm"], tmp_path)  # ...is never reused for other settings
        assert str(cfg.run_dir(tmp_path)) in str(e.value)


def test_another_text_at_the_same_path_is_not_reused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_letters(6000, 0))
    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=2, evals=1)
    run(cfg, make_task("lm", "tiny", text_path=text), tmp_path / "out")
    text.write_text(_letters(6000, 1))
    with pytest.raises(ValueError, match="data_sha256"):
        run(cfg, make_task("lm", "tiny", text_path=text), tmp_path / "out")


def test_an_unreadable_record_is_named_and_the_run_redone(tasks, tmp_path):
    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=2, evals=1)
    run(cfg, tasks["lm"], tmp_path)
    done = cfg.run_dir(tmp_path) / "done.json"
    done.write_text('{"config": ')  # a torn write
    with pytest.warns(RuntimeWarning, match=f"unreadable run record {done}"):
        summary = run(cfg, tasks["lm"], tmp_path)
    assert json.loads(done.read_text()) == json.loads(json.dumps(summary))


def test_a_sweep_into_a_locked_directory_is_refused(tmp_path, capsys):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".whiten-bench.lock", "a") as held:  # another sweep is writing there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = ["sweep", "--task", "lm", "--profile", "tiny", "--optimizers", "adamw", "--lrs", "0.001",
                "--steps", "2", "--evals", "1", "--out", str(tmp_path), "--no-plots"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert str(tmp_path) in err and "another whiten-bench sweep" in err
        assert not list(tmp_path.glob("**/evals.jsonl"))  # nothing was run
    assert cli.main(args) == 0  # released: the sweep runs
