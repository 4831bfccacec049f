"""metatt_deploy.training.lm_eval: normalisation, exact match, greedy generation, perplexity."""

from __future__ import annotations

import math

import torch
from tiny_decoders import tiny_decoder, tiny_tokenizer

from metatt_deploy.training.lm_data import TextTask, as_chat, tokenize_text_task
from metatt_deploy.training.lm_eval import (
    evaluate_generation,
    exact_match,
    greedy_generate,
    left_pad,
    normalise_answer,
    strip_after_eos,
)


def test_normalisation_and_exact_match() -> None:
    assert normalise_answer("  The  Positive. ") == "positive"
    assert exact_match(["Positive.", "negative", "The sentiment is"], ["positive", "positive", "negative"]) == 1 / 3


def test_left_pad_and_strip_after_eos() -> None:
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    assert strip_after_eos([4, 5, 2, 6], 2) == [4, 5] and strip_after_eos([4], [9, 2]) == [4]


def test_batched_greedy_generation_equals_one_at_a_time() -> None:
    tok = tiny_tokenizer()
    model = tiny_decoder("llama", len(tok), eos=tok.eos_token_id)
    prompts = [tok(t).input_ids for t in ("Review: good", "Premise: a man plays. Hypothesis:", "ok")]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(len(g) <= 6 for g in batched)


def test_evaluation_reports_exact_match_and_the_perplexity_of_the_responses() -> None:
    tok = tiny_tokenizer()
    model = tiny_decoder("gpt2", len(tok), eos=tok.eos_token_id)
    from datasets import Dataset

    rows = [as_chat(f"Review: {w}", "positive") for w in ("good", "great", "fine")]
    task = TextTask("t", {"test": Dataset.from_list(rows)})
    split = tokenize_text_task(task, tok, 64)["test"]
    result = evaluate_generation(model, tok, split, batch_size=2)
    assert result["examples"] == 3 and 0.0 <= result["exact_match"] <= 1.0
    # perplexity by hand: exp(mean NLL of the response tokens)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in split:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            logp = logits.log_softmax(-1)
            for pos in range(row["prompt_length"], len(row["input_ids"])):
                nll -= float(logp[pos - 1, row["input_ids"][pos]])
                count += 1
    assert math.isclose(result["perplexity"], math.exp(nll / count), rel_tol=1e-4)
    # a random model's perplexity is about the vocabulary size, not 1
    assert result["perplexity"] > 10
