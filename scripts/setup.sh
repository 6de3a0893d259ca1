#!/usr/bin/env bash
# Create .venv and install ptune (editable, with test tools, the sweep plugins and bitsandbytes) and a torch build
# that fits this machine.
#   TORCH_SPEC   what to install for torch when none is installed yet (default: torch==2.13.0, which is the
#                CUDA build from PyPI on a Linux GPU machine, or a local CPU wheel where pip is pointed at one)
#   PYTHON       the interpreter for the venv (default: python3, 3.10 or newer)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --disable-pip-version-check -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --disable-pip-version-check -q -e ".[dev,sweep,quant]"  # the Hydra plugins and bitsandbytes the tests run
.venv/bin/python -c "import torch, transformers, hydra; print('ptune ready: torch', torch.__version__, \
'| transformers', transformers.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU only')"
