"""whiten-bench tune (coordinate descent over every hyperparameter), the budget axis, the significance of speedups,
compare's per-task defaults and the Python API: on mock losses and on the tiny profile (seconds each)."""

import json
import math
import statistics

import pytest
import torch

from whiten.bench import api, cli
from whiten.bench import run as run_mod
from whiten.bench.metrics import data_equivalent_speedup, speedup_test, t_quantile
from whiten.bench.registry import get_spec, option_default, task_default
from whiten.bench.run import RunConfig, run_identity
from whiten.bench.sweep import compare_notes
from whiten.bench.tasks import make_task
from whiten.bench.tune import Param, coordinate_descent, resolve_space, run_config


def _surface(point, seed):
    """A known loss: best lr 0.01 (a quadratic in log lr), weight decay worth 0.001 (below the noise), β2 0.99
    worth 0.05; seed 1 is 0.01 higher (the seed noise)."""
    loss = 2.0 + (math.log10(point["lr"]) + 2) ** 2
    loss -= 0.001 * (point.get("weight_decay") == 0.2)
    loss -= 0.05 * (point.get("beta2") == 0.99)
    return {"diverged": False, "final_val_loss": loss + 0.01 * seed}


PARAMS = [Param("lr", (1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2), 1e-3), Param("weight_decay", (0.0, 0.1, 0.2), 0.1),
          Param("beta2", (0.95, 0.99), 0.95)]


def test_coordinate_descent_finds_the_best_point_and_ignores_gains_below_the_noise():
    calls = []

    def evaluate(point, seed):
        calls.append((json.dumps(point, sort_keys=True), seed))
        return _surface(point, seed)

    res = coordinate_descent("adamw", evaluate, 100, PARAMS, seeds=(0, 1), log=lambda *a: None)
    assert res.point == {"lr": 1e-2, "weight_decay": 0.1, "beta2": 0.99}  # weight decay's 0.001 < noise: kept
    assert res.noise == pytest.approx(statistics.stdev([0.0, 0.01]))  # the two seeds at the start
    assert res.converged and res.rounds == 2  # round 2 changed nothing
    lr_sweep = res.path[0]
    # radius 1 around 1e-3, then a walk up while the best was at the edge, one past the best
    assert [v for v, _ in lr_sweep["tried"]] == [1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
    assert lr_sweep["accepted"] and lr_sweep["best"] == 1e-2
    wd = res.path[1]
    assert wd["best"] == 0.2 and not wd["accepted"] and wd["gain"] == pytest.approx(0.001)
    assert len(calls) == len(set(calls))  # a point is evaluated once
    assert res.final == {"0": pytest.approx(1.95), "1": pytest.approx(1.96)}


def test_a_gain_within_the_noise_is_decided_on_every_noise_seed():
    # Seeds 0 and 1 differ by 0.02 at the start: noise 0.0141. Weight decay 0.2 gains 0.01 on seed 0 (within the
    # noise) and 0.03 on seed 1: a mean gain of 0.02 > 0.0141 · √(2/2), kept. β2 0.99 gains 0.01 on seed 0 and
    # loses 0.01 on seed 1: kept out. Without the confirmation neither moves.
    def evaluate(point, seed):
        loss = 2.0 + (math.log10(point["lr"]) + 3) ** 2 + 0.02 * seed
        loss -= (0.01, 0.03)[seed] * (point["weight_decay"] == 0.2)
        loss -= (0.01, -0.01)[seed] * (point["beta2"] == 0.99)
        return {"diverged": False, "final_val_loss": loss}

    quiet = dict(seeds=(0, 1), log=lambda *a: None)
    res = coordinate_descent("adamw", evaluate, 100, PARAMS, **quiet)
    assert res.point == {"lr": 1e-3, "weight_decay": 0.2, "beta2": 0.95} and res.confirm
    wd, beta2 = res.path[1], res.path[2]
    assert wd["accepted"] and wd["confirmed"]["mean_gain"] == pytest.approx(0.02)
    assert wd["confirmed"]["threshold"] == pytest.approx(statistics.stdev([0.0, 0.02]))
    assert not beta2["accepted"] and beta2["confirmed"]["mean_gain"] == pytest.approx(0.0, abs=1e-12)
    assert "confirmed" not in res.path[0]  # the lr's sweep changed nothing: no confirmation run
    plain = coordinate_descent("adamw", evaluate, 100, PARAMS, confirm=False, **quiet)
    assert plain.point == {"lr": 1e-3, "weight_decay": 0.1, "beta2": 0.95} and not plain.confirm
    assert all("confirmed" not in p for p in plain.path)


def test_a_confirmation_that_diverges_on_another_seed_is_not_kept():
    # Weight decay 0.2 wins on seed 0 by less than the noise and diverges on seed 1: its mean is infinite, it stays
    # out (no inf - inf arithmetic decides it).
    def evaluate(point, seed):
        if seed == 1 and point["weight_decay"] == 0.2:
            return {"diverged": True, "final_val_loss": math.inf}
        loss = 2.0 + (math.log10(point["lr"]) + 3) ** 2 + 0.02 * seed - 0.01 * (point["weight_decay"] == 0.2)
        return {"diverged": False, "final_val_loss": loss}

    res = coordinate_descent("adamw", evaluate, 100, PARAMS[:2], seeds=(0, 1), log=lambda *a: None)
    wd = res.path[1]
    assert wd["best"] == 0.2 and not wd["accepted"] and wd["confirmed"]["mean_gain"] == -math.inf
    assert res.point["weight_decay"] == 0.1


def test_noise_has_a_floor_and_a_full_grid_sweeps_every_value():
    res = coordinate_descent("adamw", lambda p, s: _surface(p, 0), 100, PARAMS, seeds=(0, 1), noise_floor=0.02,
                             radius=None, log=lambda *a: None)
    assert res.noise == 0.02  # the seeds agree exactly: the floor
    assert [v for v, _ in res.path[0]["tried"]] == list(PARAMS[0].grid)


def test_a_diverged_point_loses_and_a_diverged_start_is_left():
    def evaluate(point, seed):
        if point["lr"] <= 1e-3:
            return {"diverged": True, "final_val_loss": math.inf}
        return _surface(point, seed)

    res = coordinate_descent("adamw", evaluate, 100, PARAMS[:1], seeds=(0,), log=lambda *a: None)
    assert res.point["lr"] == 1e-2 and res.path[0]["accepted"]


def test_run_config_of_the_registry_point_is_the_plain_sweep_run():
    params = resolve_space("adamw")
    start = {p.key: p.start for p in params}
    cfg = run_config("adamw", start, 500, 0, task="lm", profile="cpu")
    assert cfg == RunConfig(task="lm", profile="cpu", optimizer="adamw", lr=4.64e-3, seed=0, steps=500)
    # β2 sets one element of the betas tuple; a value equal to the registry's is left out
    other = run_config("adamw", {**start, "betas[1]": 0.99, "weight_decay": 0.1, "warmup": 0.1}, 500, 0,
                       task="lm", profile="cpu")
    assert other.options == (("betas", (0.9, 0.99)),) and other.warmup == 50
    assert other.spec().options["betas"] == (0.9, 0.99)
    # an option the registry does not set starts at the constructor's default
    assert option_default(get_spec("splus"), "inverse_every") == 100
    assert {p.key: p.start for p in resolve_space("splus")}["betas[1]"] == 0.95


def test_every_hyperparameter_is_in_the_run_identity():
    task = make_task("lm", "tiny", torch.device("cpu"))
    params = resolve_space("splus")
    start = {p.key: p.start for p in params}
    base = run_config("splus", start, 10, 0, task="lm", profile="tiny")
    seen = {json.dumps(run_identity(base, task, base.spec()), sort_keys=True)}
    for p in params:
        other = next(v for v in p.grid if v != p.start)
        cfg = run_config("splus", {**start, p.key: other}, 10, 0, task="lm", profile="tiny")
        ident = json.dumps(run_identity(cfg, task, cfg.spec()), sort_keys=True)
        assert ident not in seen, p.key
        seen.add(ident)


def test_space_errors_name_the_key():
    with pytest.raises(ValueError, match="'bogus'"):
        resolve_space("adamw", {"bogus": [1, 2]})
    with pytest.raises(ValueError, match="'lr'.*positive"):
        resolve_space("adamw", {"lr": [0.1, -1]})
    with pytest.raises(ValueError, match="'weight_decay'.*non-empty"):
        resolve_space("adamw", {"weight_decay": []})
    with pytest.raises(ValueError, match="'warmup'"):
        resolve_space("adamw", {"warmup": [1.5]})
    with pytest.raises(ValueError, match="betas\\[5\\]"):
        resolve_space("adamw", {"betas[5]": [0.9]})
    space = resolve_space("adamw", {"lr": [0.1], "betas[0]": None, "weight_decay": {"grid": [0, 1], "start": 1}})
    keys = {p.key: p for p in space}
    assert "betas[0]" not in keys and keys["lr"].grid == (4.64e-3, 0.1)  # the start joins the grid
    assert keys["weight_decay"].start == 1


def test_speedup_test_interval_and_one_sided_t_test():
    out = speedup_test([0.5, 0.52])
    se = statistics.stdev([0.5, 0.52]) / math.sqrt(2)
    assert out["mean"] == pytest.approx(0.51)
    assert out["low"] == pytest.approx(0.51 - 12.706 * se) and out["high"] == pytest.approx(0.51 + 12.706 * se)
    assert out["t"] == pytest.approx(-0.49 / se) and out["significant"]
    assert not speedup_test([0.7, 1.1])["significant"]  # t = -0.5 > -6.31
    assert speedup_test([0.5, math.inf])["significant"] is False and speedup_test([0.5])["significant"] is None
    assert speedup_test([0.9, 0.9, 0.9])["significant"]  # no spread at all: below 1 is below 1
    assert t_quantile(1, two_sided=False) == 6.314 and t_quantile(100, two_sided=True) == 1.960


def test_data_equivalent_speedup_interpolates_in_log_budget():
    budgets, losses = [100, 200, 400], [2.0, 1.8, 1.7]
    assert data_equivalent_speedup(budgets, losses, 1.8, 100) == pytest.approx(2.0)  # AdamW's loss at 200 steps
    assert data_equivalent_speedup(budgets, losses, 1.9, 100) == pytest.approx(math.sqrt(2))  # halfway in log
    assert math.isnan(data_equivalent_speedup(budgets, losses, 1.6, 100))  # below AdamW's range: not extrapolated
    assert data_equivalent_speedup(budgets, losses, 2.0, 100) == pytest.approx(1.0)


def test_compare_uses_the_lr_tuned_on_the_task_and_names_the_untuned():
    assert task_default("adamw", "vit")[0] == 4.64e-4 and task_default("splus", "vit")[0] == 0.0215
    assert task_default("adamw", "lm") == (4.64e-3, {}, None)
    plan = cli._plan if hasattr(cli, "_plan") else None
    args = cli.build_parser().parse_args(["compare", "--task", "vit", "--optimizers", "adamw,splus,muon"])
    lrs = {c.optimizer: c.lr for c in plan(args)}
    assert lrs == {"adamw": 4.64e-4, "splus": 0.0215, "muon": 0.01}
    notes = compare_notes(["adamw", "splus", "muon"], "vit")
    assert len(notes) == 2 and "muon" in notes[0] and "not tuned on vit" in notes[0] and "tune" in notes[1]
    assert compare_notes(["adamw", "splus"], "lm") == []


def test_an_options_variant_runs_at_its_base_entrys_setting():
    # soap-state-bf16 against soap must measure the state option, not the option plus another lr: each variant takes
    # its base entry's setting on every task (vit has one for soap, dit none).
    for task in ("lm", "vit", "dit"):
        for base, variants in (("soap", ("soap-bf16", "soap-state-bf16", "soap-basis8", "soap-basis4")),
                               ("splus", ("splus-bf16", "splus-state-bf16", "splus-basis8", "splus-basis4")),
                               ("kfac", ("kfac-state-bf16",)), ("psgd-kron", ("psgd-kron-state-bf16",))):
            for name in variants:
                assert task_default(name, task)[:2] == task_default(base, task)[:2], (name, task)
    assert task_default("soap-basis4", "vit") == (2.15e-3, {}, None)
    note = task_default("soap-basis4", "dit")[2]
    assert "soap-basis4" in note and "soap's setting" in note and "not tuned on dit" in note


def _text(tmp_path):
    import random

    rng = random.Random(0)
    path = tmp_path / "t.txt"
    path.write_text("".join(rng.choice("abcdefgh ") for _ in range(6000)))
    return path


SPACE = {"adamw": {"lr": [1e-3, 4.64e-3, 0.0215], "betas[0]": None, "betas[1]": None, "weight_decay": [0.0, 0.1]},
         "splus": {"lr": [0.1, 0.464], "betas[0]": None, "betas[1]": None, "weight_decay": None, "ema_rate": None,
                   "inverse_every": None, "warmup": [0.05, 0.2]}}


def test_tune_cli_on_tiny_budgets_report_and_resume(tmp_path, monkeypatch, capsys):
    out, text = tmp_path / "out", _text(tmp_path)
    argv = ["tune", "--profile", "tiny", "--text", str(text), "--steps", "6", "--evals", "2", "--budgets", "1,2",
            "--seeds", "0,1", "--space", json.dumps(SPACE), "--out", str(out), "--no-plots"]
    assert cli.main(argv) == 0
    tunes = sorted((out / "tune").glob("*.json"))
    assert [p.name for p in tunes] == ["lm-tiny-adamw-12.json", "lm-tiny-adamw-6.json", "lm-tiny-splus-12.json",
                                       "lm-tiny-splus-6.json"]
    t = json.loads((out / "tune" / "lm-tiny-splus-6.json").read_text())
    assert t["start"] == {"lr": 0.1, "warmup": 0.05} and set(t["final"]) == {"0", "1"}
    assert all((out / rel / "done.json").exists() for rel in t["runs"].values())
    assert (out / "6steps").is_dir() and (out / "12steps").is_dir()
    report = (out / "report.md").read_text()
    for words in ("## Tuned: lm · profile tiny · 6 steps", "## Tuned: lm · profile tiny · 12 steps",
                  "| adamw | lr ", "Sensitivity", "one-sided t-test", "## Speedup over AdamW against the budget",
                  "| optimizer | 6 steps | 12 steps |", "round 1, lr:"):
        assert words in report, words
    # resumable: every run is found again by identity, the same decisions replay, nothing trains
    monkeypatch.setattr(run_mod, "_train_step", lambda *a, **k: pytest.fail("a finished run was redone"))
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads((out / "tune" / "lm-tiny-splus-6.json").read_text()) == t
    assert t["confirm"] and "mean over the noise seeds" in report
    # --no-confirm: the one-seed rule, recorded as such
    monkeypatch.undo()
    assert cli.main(argv[:-3] + ["--out", str(tmp_path / "plain"), "--no-plots", "--no-confirm"]) == 0
    plain = json.loads((tmp_path / "plain" / "tune" / "lm-tiny-splus-6.json").read_text())
    assert plain["confirm"] is False and all("confirmed" not in p for p in plain["path"])
    assert "mean over the noise seeds" not in (tmp_path / "plain" / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--opt", "weight_decay=0"], ["--opt", "--space"]),
    (["--warmup", "3"], ["--warmup", "--space"]),
    (["--space", "{not json"], ["--space", "JSON"]),
    (["--space", '{"adamx": {"lr": [0.1]}}'], ["--space", "adamx", "unknown optimizer"]),
    (["--space", '{"adamw": {"bogus": [1]}}'], ["--space", "bogus"]),
    (["--budgets", "1,0"], ["--budgets", "positive"]),
    (["--noise-floor", "-1"], ["--noise-floor"]),
])
def test_tune_cli_mistakes_are_one_line(tmp_path, capsys, extra, words):
    assert cli.main(["tune", "--profile", "tiny", "--optimizers", "adamw", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def _user_task(**kw):
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            i = torch.randint(0, 64, (16,), generator=g)
            yield x[i], y[i]

    def loss_fn(model, batch):
        out = model(batch[0])
        return torch.nn.functional.cross_entropy(out, batch[1]), out

    model = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))  # noqa
    return api.UserTask(model, batches, kw.pop("loss_fn", loss_fn), [(x[64:], y[64:])], name="mlp", **kw)


def test_api_runs_the_protocol_on_a_user_model(tmp_path):
    task = _user_task()
    assert task.width == 16
    lines = []
    path = api.compare(task, ["adamw", "splus"], steps=8, out=tmp_path / "c", evals=2, log=lines.append)
    assert "## mlp · profile custom · start init" in path.read_text()
    assert any("splus" in line and "not tuned on mlp" in line for line in lines)
    # the same batches in the same order for every optimizer, and again after the iterator restarts
    first = [task.train_batch(0, s)[1] for s in range(3)]
    assert all(torch.equal(a, task.train_batch(0, s)[1]) for s, a in enumerate(first))
    path = api.tune(task, ["adamw"], steps=8, budgets=(1, 2), out=tmp_path / "t", evals=2, log=lambda *a: None,
                    space={"adamw": {"lr": [1e-3, 0.01], "betas[0]": None, "betas[1]": None, "weight_decay": None,
                                     "warmup": None}})
    report = path.read_text()
    assert "## Tuned: mlp · profile custom · 8 steps" in report and "| optimizer | 8 steps | 16 steps |" in report
    path = api.sweep(task, ["adamw"], steps=8, lrs={"adamw": [1e-3]}, seeds=(0, 1), out=tmp_path / "s", evals=2,
                     log=lambda *a: None)
    assert "adamw" in api.report(tmp_path / "s").read_text()


def test_api_mistakes_are_clear(tmp_path):
    with pytest.raises(ValueError, match="val_batches"):
        api.UserTask(lambda: torch.nn.Linear(2, 2), [], lambda m, b: 0, [])
    with pytest.raises(TypeError, match="model_factory"):
        api.UserTask(lambda: 3, [(torch.zeros(1, 2),)], lambda m, b: 0, [(torch.zeros(1, 2),)])
    with pytest.raises(ValueError, match="unknown optimizer"):
        api.compare(_user_task(), ["adamx"], steps=2, out=tmp_path / "x")
    task = _user_task(loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match=r"loss_fn must return \(loss, output\)"):
        api.sweep(task, ["sophia"], steps=12, lrs={"sophia": [1e-3]}, out=tmp_path / "f", evals=1,
                  log=lambda *a: None)


def _fake_run(name, seed, losses, lr=0.01):
    records = [{"step": 10 * i, "seconds": 1.0 * i, "cpu_seconds": 1.0 * i, "val_loss": v} for i, v in enumerate(losses)]
    return {"config": {"task": "lm", "profile": "tiny", "start": "init", "optimizer": name, "lr": lr, "seed": seed,
                       "steps": records[-1]["step"]},
            "final_val_loss": losses[-1], "diverged": False, "records": records, "seconds_per_step": 0.1,
            "train_seconds": 4.0, "data_seconds": 0.1}


def test_report_states_the_interval_and_the_test_for_steps_to_adamw():
    from whiten.bench.report import section, summarize

    runs = [_fake_run("adamw", 0, [4, 3, 2.5, 2.2, 2.0]), _fake_run("adamw", 1, [4, 3, 2.6, 2.3, 2.1]),
            # reaches AdamW's final loss halfway (step 20 of 40) on both seeds: 0.5 and 0.5
            _fake_run("splus", 0, [4, 2.5, 2.0, 1.9, 1.8]), _fake_run("splus", 1, [4, 2.6, 2.1, 2.0, 1.9]),
            # about as fast as AdamW: 0.9 and 1.0
            _fake_run("soap", 0, [4, 3, 2.5, 2.0, 1.95]), _fake_run("soap", 1, [4, 3, 2.6, 2.3, 2.1])]
    (key, by_opt), = summarize(runs).items()
    text = "\n".join(section(key, by_opt, None))
    assert "| splus | 0.50 [0.50, 0.50] | **yes** (no spread) |" in text
    soap = next(line for line in text.splitlines() if line.startswith("| soap | 0.88"))
    assert "| no (t = " in soap  # 0.75 and 1.0: the mean 0.875 is not below 1 at 2 seeds
