#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: train step (float32, bfloat16) and the DDIM sampling loop, ours against
# diffusers' UNet2DModel on the same GPU (PyTorch's side follows JAX onto it: train_step.torch_device).
#   OUT=results/bench_gpu bash benchmarks/gpu.sh [train] [sampling] [bf16] [lora]   (default: the first three)
# Each part is one command of under 10 minutes on an H200, most of it XLA's GPU compile (225 s for the CIFAR-10
# train step, 41 s for a digits sampling loop). Needs CUDA builds of jax and torch, plus diffusers.
# The tables go to $OUT/<part>/*.md and *.csv.
set -euo pipefail
OUT=${OUT:-results/bench_gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; half leaves PyTorch's side room on any card
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
PARTS=${*:-train sampling bf16}
for p in $PARTS; do
  case $p in train|sampling|bf16|lora) ;;
    *) echo "benchmarks/gpu.sh: unknown part '$p' (train, sampling, bf16, lora)" >&2; exit 2 ;; esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| torch', torch.__version__, torch.cuda.get_device_name(0), '| diffusers', diffusers.__version__)"
for p in $PARTS; do
    case $p in
      train) $PY benchmarks/train_step.py --models cifar10,digits --batch 128 --rounds 5 --steps 10 --out "$OUT/f32" ;;
      bf16) $PY benchmarks/train_step.py --models cifar10,digits --batch 128 --rounds 5 --steps 10 --dtype bfloat16 \
              --out "$OUT/bf16" ;;
      lora) $PY benchmarks/lora.py --models cifar10,digits --batch 128 --rounds 5 --steps 10 ;;
      sampling) $PY benchmarks/sampling_loop.py --loops digits:1,digits:16,digits:100,cifar10:4,cifar10:64 --steps 50 \
                  --repeats 5 --out "$OUT/sampling" ;;
    esac
done
