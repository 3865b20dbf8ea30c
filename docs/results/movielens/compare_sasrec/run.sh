#!/usr/bin/env bash
# MovieLens: in-house SASRec and RecBole's SASRec under the same budget (30 epochs, patience 5),
# side by side (one CPU each), then one report with the bar's models (issue 15).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 WANDB_MODE=offline RAY_AUTH_MODE=disabled
E="--config pagellm/configs/embedded.yaml --config configs/movielens.yaml --data runs/ml/data --seeds 0 --out runs/ml/compare_sasrec"
O=(eval.baseline_epochs=30 eval.baseline_patience=5 'eval.recbole_settings={SASRec: {epochs: 30, stopping_step: 5}}')
pagellm experiment compare --baselines sasrec popularity itemknn multivae $E "${O[@]}" > runs/ml_sasrec_inhouse.log 2>&1 &
pagellm experiment compare --baselines recbole:SASRec recbole:MultiVAE $E "${O[@]}" > runs/ml_sasrec_recbole.log 2>&1 &
wait
pagellm experiment compare --baselines popularity itemknn multivae sasrec recbole:MultiVAE recbole:SASRec $E "${O[@]}" > runs/ml_sasrec_final.log 2>&1
