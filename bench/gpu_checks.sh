#!/usr/bin/env bash
# Every GPU check of the open issues as one command, for a lent GPU machine (no internet there):
#
#   bash bench/gpu_checks.sh          # from the repository root: build, tests, benchmark
#   bash bench/gpu_checks.sh tests    # build and tests only ("bench": build and benchmark)
#
# It builds the native libraries (the CUDA custom all-reduce too, where nvcc and a CUDA torch
# are present), runs the GPU tests (portable managers under FusedMoE on NCCL, the custom
# all-reduce in eager and graph mode with 2 and 4 processes per GPU, the vendor adapters where
# their packages import) and the custom all-reduce benchmark, and writes everything to
# $OUT/gpu_checks.log ($OUT is the device tool's output folder; ./gpu_checks.log without it).
# The time limits inside add up to 9 minutes (the build aside), under the device tool's 10 a
# command. Vendor wheels that the machine lacks travel in .whl/ (see the device tool's
# README); they are installed into /tmp/site first. Exit status: 0 when every step passed.
set -uo pipefail
what="${1:-all}"
case "$what" in all | tests | bench) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;; esac
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
  rc=0
  if [ "$what" != bench ]; then
    time timeout 330 $py -m pytest -q -rs -p no:cacheprovider --timeout 240 \
      tests/test_gpu.py tests/test_custom_all_reduce.py tests/test_vendor_gpu.py
    rc=$?
    echo "pytest rc=$rc"
  fi
  if [ "$what" != tests ]; then
    for w in 2 4; do
      time timeout 100 $py bench/bench_custom_all_reduce.py --world-size "$w" --iters 100 \
        --reps 3 || rc=$?
    done
  fi
  exit "$rc"
} 2>&1 | tee "$log"
