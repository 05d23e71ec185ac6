"""whiten as a user installs it: a wheel built from the sources, installed (not editable) into a fresh virtual
environment with the repository off the path, runs `whiten-bench list` and a tiny `compare`. The environment sees
this interpreter's packages, so torch is not installed again and nothing is downloaded. And the metadata declares
every third-party module the package imports."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import re
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sh(*cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    # Build from a copy of what a clone holds, so the build leaves nothing (build/, *.egg-info) in the repository.
    src = tmp / "whiten-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp / "dist", src)
    wheel = next((tmp / "dist").glob("whiten-*.whl"))
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # The environment sees the packages of the interpreter running the tests (torch, numpy, pip, ...) through a .pth
    # file: unlike --system-site-packages this also works when that interpreter is itself a venv, and the .pth
    # files there (the editable install of this repository) are not read. Its own site-packages come first.
    own = Path(_sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    outer = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (own / "outer.pth").write_text("\n".join(outer) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository's src/ must not be seen
    _sh(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, env=env)
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "python": python, "env": env}


def test_the_installed_package_is_the_wheel_not_the_repository(installed):
    out = _sh(installed["python"], "-c", "import whiten, whiten.bench.cli; print(whiten.__file__)",
              env=installed["env"], cwd=installed["tmp"]).stdout.strip()
    assert Path(out).is_relative_to(installed["venv"]), out


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def test_wheel_metadata_declares_the_extras_and_ships_the_licence(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        assert any(n.endswith("LICENSE") for n in whl.namelist())
    requires = _requires(installed["wheel"])
    assert any(r.startswith("torch") and "extra" not in r for r in requires)
    for package in ("numpy", "matplotlib", "tqdm", "pytorch-optimizer", "pillow"):
        assert any(r.startswith(package) and 'extra == "bench"' in r for r in requires), (package, requires)


def test_whiten_bench_list_and_a_tiny_compare(installed):
    bench = installed["venv"] / "bin" / "whiten-bench"
    listing = _sh(bench, "list", env=installed["env"], cwd=installed["tmp"])
    assert "splus" in listing.stdout and "adamw" in listing.stdout
    out = installed["tmp"] / "results"
    env = {**installed["env"], "OMP_NUM_THREADS": "1"}
    run = _sh(bench, "compare", "--profile", "tiny", "--steps", "5", "--evals", "2", "--out", out, env=env,
              cwd=installed["tmp"])
    assert "steps-to-AdamW" in run.stdout and "| splus |" in run.stdout
    assert (out / "report.md").exists() and list((out / "plots").glob("*.png"))


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    # an import name that is not its distribution's name
    names = {{"PIL": "pillow"}.get(n, n) for n in names}
    return names - set(sys.stdlib_module_names) - {"whiten", "__future__"}


def test_every_imported_package_is_declared(installed):
    """The optimizers may import only the runtime dependencies; the benchmark also its `bench` extra, the Lightning
    integration its `lightning` extra."""
    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("-", "_")

    requires = _requires(installed["wheel"])
    runtime = {name(r) for r in requires if "extra ==" not in r}
    bench = runtime | {name(r) for r in requires if 'extra == "bench"' in r}
    lightning = runtime | {name(r) for r in requires if 'extra == "lightning"' in r}
    assert "lightning" in lightning
    package = ROOT / "src" / "whiten"
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        declared = bench if "bench" in parts else lightning if parts[-1] == "lightning.py" else runtime
        undeclared = _third_party_imports(path) - declared
        assert not undeclared, f"{path.relative_to(ROOT)} imports {undeclared}, not declared in pyproject.toml"
