# Source this at the start of a command on the GPU machine (whose image has torch, triton, jax and
# transformers but not pydantic/fastapi/uvicorn): installs the carried wheels from .whl/ (filled
# here by ../shared/tools/device-wheels) and puts every package's src/ on PYTHONPATH.
#   source scripts/gpu-env.sh && python3 benchmarks/bench_kernels.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || { echo "gpu-env: wheel install failed (carry .whl)"; return 1; }
export PYTHONPATH=/tmp/site:$(pwd)/src:$(ls -d "$(pwd)"/packages/*/src | paste -sd:)
export PYTHONUNBUFFERED=1
