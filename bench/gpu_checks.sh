#!/usr/bin/env bash
# Every GPU check of the open issues as one command, for a lent GPU machine (no internet there).
#
#   bash bench/gpu_checks.sh          # from the repository root; ~5-8 min on one H200
#
# It builds the native libraries (the CUDA custom all-reduce too, where nvcc and a CUDA torch
# are present), runs the GPU tests (portable managers under FusedMoE on NCCL, the custom
# all-reduce in eager and graph mode with 2 and 4 processes per GPU, the vendor adapters where
# their packages import) and the custom all-reduce benchmark, and writes everything to
# $OUT/gpu_checks.log ($OUT is the device tool's output folder; ./gpu_checks.log without it).
# Vendor wheels that the machine lacks travel in .whl/ (see the device tool's README); they are
# installed into /tmp/site first when present. Exit status: pytest's.
set -uo pipefail
log="${OUT:-.}/gpu_checks.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
py=python3
{
  date -u
  nvidia-smi -L
  if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count())"
  command -v nvcc || export PATH="$PATH:/usr/local/cuda/bin"
  time $py setup.py -q build_ext --inplace
  $py -m moe_ep topo
  time timeout 420 $py -m pytest -q -rs -p no:cacheprovider --timeout 300 \
    tests/test_gpu.py tests/test_custom_all_reduce.py tests/test_vendor_gpu.py
  rc=$?
  for w in 2 4; do time timeout 150 $py bench/bench_custom_all_reduce.py --world-size "$w"; done
  echo "pytest rc=$rc"
  exit "$rc"
} 2>&1 | tee "$log"
