"""whiten-bench as a new user meets it: every mistake is one line naming the option or file, exit code 2, no
traceback and nothing on disk; missing optional packages are named before any training; progress shows up in
logs; --help shows defaults; plots and the report say what a reader needs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from whiten.bench import cli, report, tasks

SRC = Path(__file__).resolve().parents[1] / "src"


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert lines[0].startswith("whiten-bench: error: ")
    return lines[0]


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails the test if a command gets as far as loading data: the mistakes below must be caught before."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the mistake was reported")

    monkeypatch.setattr(tasks, "make_task", refuse)


def _text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(words) + rng.choice([" ", " ", ", ", ".\n"]))
    return "".join(out)[:n]


# --------------------------------------------------------------------------------------------- help and parsing

def test_help_shows_every_option_with_its_default(capsys):
    assert cli.main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("(default: 1000)", "(default: adamw,splus)", "(default: lm)", "(default: cpu)",
                 "(default: results/compare)", "(default: 5% of --steps)", "(default: 20)"):
        assert text in out
    for sub in ("compare", "sweep", "stability", "report", "samples"):
        parser = cli.build_parser()._subparsers._group_actions[0].choices[sub]
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert undocumented == [], f"{sub}: options without help: {undocumented}"


@pytest.mark.parametrize("argv, words", [
    (["compare", "--steps", "0"], ["--steps", "positive integer"]),
    (["compare", "--task", "mnist"], ["--task", "mnist", "lm"]),
    (["sweep", "--lrs", "0.1,fast"], ["--lrs", "numbers"]),
    (["compare", "--optimizers", ","], ["--optimizers", "at least one"]),
    (["compare", "--warmup", "-3"], ["--warmup", "non-negative"]),
    ([], ["required", "compare"]),
])
def test_parse_errors_are_one_line_with_exit_code_2(capsys, argv, words):
    assert cli.main(argv) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line


# ---------------------------------------------------------------------- mistakes caught before any data loads

@pytest.mark.parametrize("argv, words", [
    (["--optimizers", "adamw,sgdx"], ["--optimizers", "unknown optimizer 'sgdx'", "splus", "pytorch_optimizer:<Class>"]),
    (["--optimizers", "adamw,pytorch_optimizer:Nope"], ["pytorch_optimizer:Nope", "no optimizer class 'Nope'", "Lion"]),
    (["--starts", "midway"], ["--starts", "'midway'", "adamw@N"]),
    (["--device", "gpu0"], ["--device gpu0", "cpu, cuda"]),
    (["--task", "vit", "--text", "x.txt"], ["--text", "lm task only"]),
    (["--data-root", "somewhere"], ["--data-root", "vit and dit"]),
    (["--task", "vit", "--data-root", "/nonexistent/dir"], ["--data-root /nonexistent/dir", "no such file or directory"]),
])
def test_mistakes_are_rejected_before_data_loads_and_leave_nothing(capsys, tmp_path, no_data_loading, argv, words):
    out = tmp_path / "out"
    assert cli.main(["compare", "--profile", "tiny", "--out", str(out), *argv]) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_negative_lrs_rejected(capsys, tmp_path, no_data_loading):
    assert cli.main(["sweep", "--lrs", "0.1,-1", "--out", str(tmp_path / "out")]) == 2
    assert "--lrs" in _error(capsys)


def test_cuda_on_a_cpu_build_of_torch(capsys, tmp_path, no_data_loading, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert cli.main(["compare", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    line = _error(capsys)
    assert "--device cuda" in line and "CPU-only build" in line and "--device cpu" in line


def test_cuda_build_without_a_visible_gpu(capsys, tmp_path, no_data_loading, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["compare", "--device", "cuda:0", "--out", str(tmp_path / "out")]) == 2
    line = _error(capsys)
    assert "sees no GPU" in line and "CUDA_VISIBLE_DEVICES" in line


def test_cuda_index_past_the_last_device(capsys, tmp_path, no_data_loading, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["compare", "--device", "cuda:5", "--out", str(tmp_path / "out")]) == 2
    assert "cuda:0 to cuda:1" in _error(capsys)


def test_mps_where_there_is_none(capsys, tmp_path, no_data_loading, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cli.main(["compare", "--device", "mps", "--out", str(tmp_path / "out")]) == 2
    assert "cannot use mps" in _error(capsys)


# --------------------------------------------------------------------------------------------------- --text

@pytest.mark.parametrize("content, words", [
    (b"\x00\xd0\x9f\xff\xfe binary \x81", ["not UTF-8 text", "byte 0xff", "iconv"]),
    (b"", ["empty", "at least 10,320 characters", "--profile tiny"]),
    (b"To be, or not to be.\n" * 20, ["420 characters", "at least 10,320"]),
])
def test_unusable_text_files(capsys, tmp_path, content, words):
    path = tmp_path / "mine.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    assert cli.main(["compare", "--text", str(path), "--out", str(out)]) == 2
    line = _error(capsys)
    assert f"--text {path}" in line and all(w in line for w in words), line
    assert not out.exists()


def test_text_that_is_not_a_file(capsys, tmp_path):
    assert cli.main(["compare", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in _error(capsys)
    assert cli.main(["compare", "--text", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a regular file" in _error(capsys)


def test_a_small_text_runs_with_a_smaller_validation_set(capsys, tmp_path):
    # tiny profile: context 32, 16 validation windows of 33 need 5,280 characters; 4,000 leave room for 12
    path = tmp_path / "small.txt"
    path.write_text(_text(4000), encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["compare", "--text", str(path), "--profile", "tiny", "--optimizers", "adamw", "--steps", "3",
                     "--evals", "1", "--out", str(out), "--no-plots"]) == 0
    stdout = capsys.readouterr().out
    assert "note: validation uses 12 windows of 33 characters, fewer than the tiny profile's 16" in stdout
    assert "the full set needs 5,280 characters" in stdout
    text = (out / "report.md").read_text()
    assert "Validation set: 12 windows of 33 characters" in text and "fewer than the profile's 16" in text
    config = json.loads(next(out.glob("**/config.json")).read_text())
    assert config["task_config"]["val_windows"] == 12


# ---------------------------------------------------------------------------------------- progress and output

def test_progress_lines_when_stderr_is_not_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_INTERVAL", 0.0)  # a line at every step instead of every 30 s
    out = tmp_path / "out"
    assert cli.main(["compare", "--profile", "tiny", "--steps", "4", "--evals", "1", "--out", str(out),
                     "--no-plots"]) == 0
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip().startswith("[run")]
    assert len(lines) == 8  # 2 runs x 4 steps
    assert lines[0].startswith("  [run 1/2] adamw lr 0.00464 seed 0 init: step 1/4, train loss ")
    assert "ETA" in lines[0] and "for all" in lines[0]
    assert lines[-1].startswith("  [run 2/2] splus") and "step 4/4" in lines[-1] and lines[-1].endswith("ETA 0s for this run, 0s for all")
    # --no-plots: no plots path announced, no plots written
    assert "report: " in captured.out and "plots:" not in captured.out
    assert not (out / "plots").exists()


def test_progress_on_a_terminal_is_a_bar_not_lines():
    class Terminal:
        def __init__(self):
            self.text = []

        def isatty(self):
            return True

        def write(self, s):
            self.text.append(s)

        def flush(self):
            pass

    from whiten.bench.run import RunConfig

    cfg = RunConfig(task="lm", profile="tiny", optimizer="adamw", lr=1e-3, seed=0, steps=3)
    stream = Terminal()
    progress = cli.Progress([cfg], stream=stream)
    progress.start_run(cfg)
    for step in (1, 2, 3):
        progress.step(step, 2.0)
    progress.close()
    text = "".join(stream.text)
    assert "3/3" in text and "[run" not in text


def test_a_rerun_skips_finished_runs_and_says_so(capsys, tmp_path):
    args = ["compare", "--profile", "tiny", "--optimizers", "adamw", "--steps", "2", "--evals", "1",
            "--out", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "1 runs of 2 steps (1 already done, skipped)" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- report, samples, list

def test_report_and_samples_errors_match_the_other_commands(capsys, tmp_path):
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no finished runs" in _error(capsys)
    assert cli.main(["samples", str(tmp_path)]) == 2
    assert "not a finished dit run" in _error(capsys)


def test_list_needs_no_data(capsys, no_data_loading):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "splus" in out and "pytorch_optimizer:<Class>" in out


def _blocked(modules: str, *argv: str, cwd=None) -> subprocess.CompletedProcess:
    """whiten-bench in a fresh interpreter in which ``modules`` cannot be imported, as without the bench extra."""
    driver = ("import sys\n"
              "for m in sys.argv[1].split(','): sys.modules[m] = None\n"
              "from whiten.bench.cli import main\n"
              "sys.exit(main(sys.argv[2:]))\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", driver, modules, *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_without_the_bench_extra(tmp_path):
    out = tmp_path / "out"
    listing = _blocked("numpy,matplotlib,tqdm,pytorch_optimizer", "list")
    assert listing.returncode == 0 and "splus" in listing.stdout
    compare = _blocked("numpy,matplotlib,tqdm,pytorch_optimizer", "compare", "--profile", "tiny", "--out", str(out))
    assert compare.returncode == 2 and "Traceback" not in compare.stderr
    assert "numpy (for the data loaders) and matplotlib (for the plots)" in compare.stderr
    assert 'pip install "whiten[bench]"' in compare.stderr and not out.exists()
    # numpy there, matplotlib not: refused before training, with --no-plots as the way out
    plots = _blocked("matplotlib", "compare", "--profile", "tiny", "--out", str(out))
    assert plots.returncode == 2 and "needs matplotlib (for the plots)" in plots.stderr
    assert "--no-plots" in plots.stderr and not out.exists()
    peer = _blocked("pytorch_optimizer", "compare", "--optimizers", "adamw,pytorch_optimizer:SOAP", "--out", str(out))
    assert peer.returncode == 2 and "pytorch_optimizer (for the pytorch_optimizer:<Class> optimizers)" in peer.stderr
    assert not out.exists()


def test_without_matplotlib_no_plots_still_runs(tmp_path):
    out = tmp_path / "out"
    run = _blocked("matplotlib", "compare", "--profile", "tiny", "--optimizers", "adamw", "--steps", "2",
                   "--evals", "1", "--out", str(out), "--no-plots")
    assert run.returncode == 0, run.stderr
    assert (out / "report.md").exists() and not (out / "plots").exists()


# ----------------------------------------------------------------------------------------------------- plots

def _fake_run(root: Path, optimizer: str, lr: float, seed: int, curve: list[float], seconds_per_step: float):
    steps = [0, 25, 50, 75, 100][: len(curve)]
    records = [{"step": s, "seconds": s * seconds_per_step, "val_loss": v} for s, v in zip(steps, curve)]
    cfg = {"task": "lm", "profile": "tiny", "optimizer": optimizer, "lr": lr, "seed": seed, "steps": 100,
           "start": "init", "warmup": -1, "schedule": "constant", "evals": 4, "compile": False}
    out = root / optimizer / f"lr{lr}-seed{seed}"
    out.mkdir(parents=True)
    (out / "done.json").write_text(json.dumps({
        "config": cfg, "diverged": False, "final_val_loss": curve[-1], "train_seconds": 100 * seconds_per_step,
        "seconds_per_step": seconds_per_step, "data_seconds": 0.0, "records": records}))


def _png_width(path: Path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(path).shape[1]


def test_plots_show_the_headline(tmp_path):
    compare, sweep = tmp_path / "compare", tmp_path / "sweep"
    for root in (compare, sweep):
        _fake_run(root, "adamw", 0.001, 0, [4.2, 2.6, 2.0, 1.8, 1.7], 0.1)
        _fake_run(root, "splus", 0.1, 0, [4.2, 2.4, 1.7, 1.6, 1.5], 0.12)  # reaches 1.7 at step 50: 0.50x
    _fake_run(sweep, "splus", 0.215, 0, [4.2, 2.5, 1.9, 1.8, 1.75], 0.12)
    report.write_report(compare)
    report.write_report(sweep)
    # steps-to-AdamW is in the legend, and the lr panel only comes with a sweep (so the figure is wider)
    assert "| splus | 0.1 | 1.500 | 0.50 | 0.60 |" in (compare / "report.md").read_text()
    assert _png_width(sweep / "plots" / "lm-tiny-init.png") > 1.3 * _png_width(compare / "plots" / "lm-tiny-init.png")


def test_log_axis_ticks_are_round_numbers_spanning_the_range():
    ticks = report._log_ticks(1.45, 4.6)
    assert 5 <= len(ticks) <= 10 and ticks == sorted(ticks)
    assert 1.45 <= ticks[0] <= 1.6 and 4 <= ticks[-1] <= 4.6
    assert all(round(t, 2) == t for t in ticks)
