#!/usr/bin/env bash
# Install everything SimFlow needs into ./.venv on a fresh Debian 12 / Python 3.11 machine (idempotent).
#   bash tools/setup_env.sh            # core + test extras
#   SIMFLOW_EXTRAS=test bash tools/setup_env.sh     # without the FFCV extra (no apt needed for it)
# torch/torchvision are installed FIRST and pinned: a bare `torch` requirement would pull the newest multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${SIMFLOW_EXTRAS:-test,ffcv}
APT_PKGS=()

# Debian packages: the real demo data (Fashion-MNIST, 70,000 images) and, for the FFCV extra, its C libraries.
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || APT_PKGS+=(dataset-fashion-mnist)
if [[ ",$EXTRAS," == *",ffcv,"* ]]; then
  dpkg -s libopencv-dev libturbojpeg0-dev >/dev/null 2>&1 || APT_PKGS+=(libopencv-dev libturbojpeg0-dev)
fi
if [ ${#APT_PKGS[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PKGS[@]}" >/dev/null \
      || echo "warning: apt could not install ${APT_PKGS[*]}" >&2
  else
    echo "note: not root or no apt: skipping ${APT_PKGS[*]} (demo data falls back to photo crops; no FFCV)" >&2
  fi
fi
if [[ ",$EXTRAS," == *",ffcv,"* ]] && ! dpkg -s libturbojpeg0-dev >/dev/null 2>&1; then
  EXTRAS=$(echo ",$EXTRAS," | sed 's/,ffcv,/,/; s/^,//; s/,$//')  # ffcv cannot build without its C libraries
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
[[ ",$EXTRAS," == *",ffcv,"* ]] && python -m pip install -q pillow numpy  # ffcv's build needs them, undeclared
DS_BUILD_OPS=0 python -m pip install -q -e ".[${EXTRAS}]"
python -c "import torch, deepspeed, megatron.core, webdataset, simflow; print('simflow env ok: torch', torch.__version__)"
