#!/usr/bin/env bash
# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
#
# Creates benchmarks/.ddpo-venv (git-ignored) with TRL 0.23, the last TRL release that ships DDPOTrainer, for the
# DDPO peer of benchmarks/compare_ddpo.py. TRL 0.23 needs transformers < 5 and an older diffusers, which cannot share
# an environment with trl_ddrl, hence the separate venv. torch is pinned to the main environment's version so both
# sides run the same kernels. DeepSpeed is installed on both sides (here as in trl_ddrl's `[test]` extra), so that
# both environments hold the same optional packages; each side reports whether its process imported it.
#
# Usage: bash benchmarks/setup_ddpo_venv.sh [python executable, default: python3]
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${1:-python3}"
VENV=.ddpo-venv
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    "torch==${TORCH_VERSION}" \
    "trl==0.23.1" \
    "transformers==4.57.1" \
    "diffusers==0.35.2" \
    "peft==0.17.1" \
    "accelerate==1.10.1" \
    "psutil>=5.9" \
    "pillow>=10" \
    "numpy<3" \
    "deepspeed>=0.19,<0.20"
"$VENV/bin/python" -c "import trl, diffusers, transformers, torch; from trl import DDPOTrainer; \
print('DDPO venv ready: trl', trl.__version__, 'diffusers', diffusers.__version__, 'transformers', \
transformers.__version__, 'torch', torch.__version__)"
