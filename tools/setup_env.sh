#!/usr/bin/env bash
# Install everything SimFlow needs into ./.venv on a fresh Debian 12 / Python 3.11 machine (idempotent).
#   bash tools/setup_env.sh            # core + test extras
#   SIMFLOW_EXTRAS=test,ffcv bash tools/setup_env.sh
# torch/torchvision are installed FIRST and pinned: a bare `torch` requirement would pull the newest multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${SIMFLOW_EXTRAS:-test}

# Real demo data (Fashion-MNIST, 70,000 images) from Debian; without apt/root the demo falls back to shipped photos.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "warning: apt could not install dataset-fashion-mnist; the demo will use photo crops" >&2
  else
    echo "note: not root or no apt: the demo data will use photo crops (skimage/sklearn)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
DS_BUILD_OPS=0 python -m pip install -q -e ".[${EXTRAS}]"
python -c "import torch, deepspeed, megatron.core, webdataset, simflow; print('simflow env ok: torch', torch.__version__)"
