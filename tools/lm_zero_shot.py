"""Zero-shot exact match and perplexity of an untouched decoder on a text-to-text task: the floor
a fine-tuned adapter must beat (docs/decoders.md).

python tools/lm_zero_shot.py [--model NAME] [--dataset movie-sentiment] [--split test] [--max-examples 200] [--output FILE.json]

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.adapters.base_model: the untouched decoder and its tokenizer: the floor is measured with no adapter at all, which no public entry point trains or loads.
- metatt_deploy.training.lm_data: training's own tokenizing of the rows, so the floor sees the prompts a trained adapter sees.
- metatt_deploy.training.lm_eval: the exact-match and perplexity evaluation `train` reports, so the floor and the trained figure are the same metric.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from metatt_deploy import DEFAULT_DECODER, MetaTTError, load_text_task  # noqa: E402
from metatt_deploy.adapters.base_model import load_causal_lm, load_tokenizer  # noqa: E402
from metatt_deploy.common.files import atomic_write_json  # noqa: E402
from metatt_deploy.training.lm_data import tokenize_text_task  # noqa: E402
from metatt_deploy.training.lm_eval import evaluate_generation  # noqa: E402


def zero_shot(model: str, dataset: str, split: str, max_examples: int, seed: int = 0, max_length: int = 256) -> dict:
    task = load_text_task(dataset=dataset, max_samples={split: max_examples}, seed=seed)
    task.splits = {split: task.splits[split]}
    tokenizer = load_tokenizer(model)
    rows = tokenize_text_task(task, tokenizer, max_length)[split]
    started = time.perf_counter()
    result = evaluate_generation(load_causal_lm(model), tokenizer, rows, batch_size=32)
    return {
        "model": model,
        "dataset": dataset,
        "split": split,
        "examples": result["examples"],
        "exact_match": result["exact_match"],
        "perplexity": result["perplexity"],
        "seconds": round(time.perf_counter() - started, 1),
        "answers": result["predictions"][:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dataset", default="movie-sentiment")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="picks the same rows as train --seed N --max-eval-samples N")
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = zero_shot(args.model, args.dataset, args.split, args.max_examples, args.seed)
    except MetaTTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        atomic_write_json(args.output, result)
    print(
        f"zero-shot {args.dataset} {args.split} ({result['examples']} examples): exact match {result['exact_match']:.4f}, perplexity {result['perplexity']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
