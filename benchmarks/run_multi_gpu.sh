#!/usr/bin/env bash
# Issue #8: the multi-GPU EPLB benchmark through the `deepspeed` launcher, as a user would start it.
#
#   benchmarks/run_multi_gpu.sh N [benchmarks/multi_gpu_bench.py flags ...]
#
# = deepspeed --num_gpus N benchmarks/multi_gpu_bench.py ...  (one process per GPU, NCCL, EP = N; N = 1 works:
# EP = 1, no rotate run and no P2P probes.  On a machine without CUDA: DS_ACCELERATOR=cpu, gloo, --small sizes.)
# Results: multi_gpu_wsN_<cuda|cpu>.json in --out DIR (default benchmarks/results on CUDA, outputs/multi_gpu on
# CPU) and a table on stdout; exit code 1 when the loss comparison fails.  Environment: PYTHON (default
# .venv/bin/python, else python3), MASTER_PORT (default: the launcher's 29500).  See docs/multi_gpu.md.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_GPUS [multi_gpu_bench.py flags ...]" >&2
    exit 2
fi
N=$1
shift
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Never NVLink multicast on shared hosts (see the device notes): keep these set for every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
# The launcher: the `deepspeed` script beside the interpreter, else the module (wheels installed with
# `pip install --target` have no script on PATH).
BIN=$(dirname "$PYTHON")/deepspeed
if [[ -x $BIN ]]; then LAUNCH=("$BIN"); else LAUNCH=("$PYTHON" -m deepspeed.launcher.runner); fi
PORT=()
if [[ -n ${MASTER_PORT:-} ]]; then PORT=(--master_port "$MASTER_PORT"); fi
set -x
exec "${LAUNCH[@]}" "${PORT[@]}" --num_gpus "$N" benchmarks/multi_gpu_bench.py "$@"
