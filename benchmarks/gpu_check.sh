#!/usr/bin/env bash
# Runs benchmarks/gpu_check.py on a GPU machine without network access.
#
# The machine has torch, transformers, accelerate and peft but not diffusers, trl or datasets: they travel as wheels in
# .whl/ (ignored by git), made on a machine with network access from the repository root with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl $(grep -v '^#' benchmarks/gpu_wheels.txt)
# and installed here into /tmp/site, ahead of the machine's own packages. Arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
python3 -c "import torch, transformers, diffusers, trl, datasets, peft, accelerate; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'trl', \
trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 benchmarks/gpu_check.py "$@"
