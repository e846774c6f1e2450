#!/usr/bin/env bash
# The whole GPU lane, one command, on a machine with CUDA, PyTorch and Triton preinstalled and no network.
# Here (once, with network):   ../shared/gpu/stage.sh     (wheels the GPU machine lacks, into .gpu/)
# There, from the project root: source .gpu/env.sh && bash tests/gpu_lane.sh [OUT_DIR]
# It runs the tests marked `gpu` (kernels against references at serving sizes, engine vs transformers
# in float32 on random weights, CUDA-graph replay vs eager, the server on CUDA, the worker path with
# NCCL), then the GPU benchmarks
# on random weights of the bundled shapes, writing every number to OUT_DIR as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'the GPU lane needs CUDA'"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/tests.txt"
for shape in llama-1b smollm2-135m; do
  orca bench throughput --load-format dummy --model "$shape" --device cuda --dtype bfloat16 \
    --baseline hf --baseline-batch-size 16 --json "$out/throughput-$shape.json" 2>&1 | tee "$out/throughput-$shape.txt"
done
# the worker path (one rank in a worker process, NCCL, gRPC control) against in-process, in one run each
for backend in uni mp; do
  orca bench throughput --load-format dummy --model llama-1b --device cuda --dtype bfloat16 --baseline none \
    --distributed-executor-backend "$backend" --json "$out/throughput-llama-1b-$backend.json" 2>&1 \
    | tee "$out/throughput-llama-1b-$backend.txt"
done
orca bench step --load-format dummy --model llama-1b --device cuda --dtype bfloat16 --batch-sizes 16,64,256 \
  --json "$out/step-llama-1b.json" 2>&1 | tee "$out/step-llama-1b.txt"
orca bench attention --device cuda --dtype bfloat16 --json "$out/attention-llama-1b.json" 2>&1 | tee "$out/attention-llama-1b.txt"
