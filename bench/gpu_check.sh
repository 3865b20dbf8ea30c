#!/usr/bin/env bash
# One prepared GPU check (device tool): PPO iterations with the role objects on one GPU,
# DeepSpeed ZeRO-1 bf16 vs fp32 AdamW, and the same loop on the machine's CPUs.
# Expects wheels of the packages the GPU image lacks in .whl/ and a copy of the stage outputs
# (data/eval/val.parquet, sft/, reward/{coarse,fine}) in .gpucheck/. Ray is not installed there
# (its wheel exceeds what can travel), so the role objects run in one process (--only single_process).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
D=.gpucheck
GPU="ppo.policy.num_gpus=0.2 ppo.reference.num_gpus=0.2 ppo.critic.num_gpus=0.2 ppo.coarse.num_gpus=0.2 ppo.fine.num_gpus=0.2"
run() { python3 bench/ppo_iteration.py --data $D/data --sft $D/sft --reward $D/reward --only single_process --iterations 5 "$@"; }
run --out "$OUT/ppo_gpu_deepspeed_bf16.json" $GPU 2>&1 | grep -v -E "Loading weights|FutureWarning|output = func"
run --out "$OUT/ppo_gpu_adamw_fp32.json" $GPU train.deepspeed=false 2>&1 | grep -v -E "Loading weights|FutureWarning|output = func"
run --out "$OUT/ppo_cpu16.json" ppo.policy.num_cpus=16 2>&1 | grep -v -E "Loading weights|FutureWarning|output = func"
