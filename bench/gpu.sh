#!/usr/bin/env bash
# audit_resnet20 with the worker on CUDA: run alone on a machine with an NVIDIA GPU, from anywhere:
#   bench/gpu.sh [--smoke]                 (PYTHON=/path/to/python bench/gpu.sh to choose the interpreter)
# Installs nothing. The interpreter needs a CUDA build of torch (the project's GPU machines have one on
# disk, torch 2.14.1 + torchvision 0.29.1; elsewhere see README, "GPU workers") and pruneaudit installed
# into it (`python -m pip install -e '.[test]'` from the repository root keeps the CUDA torch that is there).
# Prints torch's CUDA device info as one JSON line, then the audit_resnet20 line (worker and reference on
# PRUNEAUDIT_DEVICE=cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PYTHON" -c '
import json, torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)"
p = torch.cuda.get_device_properties(0)
print(json.dumps({"cuda_info": {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": torch.cuda.device_count(),
    "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}}))'
PRUNEAUDIT_DEVICE=cuda exec "$PYTHON" -m bench audit_resnet20 "$@"
