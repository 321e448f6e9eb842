#!/usr/bin/env bash
# Everything the GPU machine should run, in one call of the device tool (timeout ~560 s):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# That machine has Python 3.12 with torch, timm, numpy, OpenCV, scikit-image, pandas, pyarrow and
# tifffile, no package index, and lacks segmentation-models-pytorch, the one other package the
# check imports. Fetch it here once, as a wheel for that Python (pure Python, so any platform):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl segmentation-models-pytorch==0.6.0
# This script unpacks .whl/ into /tmp/site, checks that CUDA works, then runs
# benchmarks/gpu_check.py, which prints the numbers and writes $OUT/gpu_check.json. A failing
# part does not stop the others. CI never runs this; `gpu_check.py --smoke` is the same code at
# toy sizes on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: could not unpack the wheels in .whl/" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY has no torch that sees a CUDA GPU here" >&2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2 || true
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 540 "$PY" benchmarks/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
