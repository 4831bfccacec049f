"""metatt_deploy.inference.decode: the numpy decode loop over ONNX Runtime is token-identical to PyTorch's greedy
``generate`` (merged Llama and GPT-2 exports, a factored bundle's task-id and adapter graphs, a left-padded batch),
ends on EOS / stop ids / stop strings / max tokens with the right reason, and samples reproducibly per seed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_decoders import save_tiny_adapter, save_tiny_multitask
from transformers import AutoModelForCausalLM

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import load_bundle
from metatt_deploy.export.merge import merge_adapter, merge_factored
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.decode import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecoderGraph,
    KVBatch,
    SamplingParams,
    generate,
    generation_eos_ids,
    pick,
    positions,
)
from metatt_deploy.inference.formats import ADAPTER_GRAPH, TASK_GRAPH
from metatt_deploy.inference.text import TextTokenizer

PROMPTS = ["Review: this was good today", "What is the capital of France?", "sad boring", "Premise: a man plays.", "fine"]
NEW = 16


def run(graph: DecoderGraph, ids: list[int], params: SamplingParams, eos=(), tok=None, **kwargs) -> tuple[list[int], str, str]:
    """(generated ids, joined text, finish reason); checks the stream's shape: tokens, then one final event."""
    steps = list(generate(graph, ids, params, eos, tok, **kwargs))
    assert steps[-1].token_id is None and steps[-1].finish_reason in (FINISH_STOP, FINISH_LENGTH)
    assert all(s.token_id is not None and s.finish_reason is None for s in steps[:-1])
    return [s.token_id for s in steps[:-1]], "".join(s.text for s in steps), steps[-1].finish_reason


def reference(model, ids: list[int], new: int, eos: int, **kwargs) -> tuple[list[int], str]:
    """PyTorch's greedy tokens (EOS dropped) and the finish reason they imply."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new, pad_token_id=eos, **kwargs)
    tokens = out[0, len(ids) :].tolist()
    return (tokens[: tokens.index(eos)], FINISH_STOP) if eos in tokens else (tokens, FINISH_LENGTH)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def merged(request, tmp_path_factory):
    """A merged tiny decoder (an adapter with random cores, so the answers vary), its ONNX export and tokenizer."""
    root = tmp_path_factory.mktemp(f"decode-{request.param}")
    _, adapter = save_tiny_adapter(root, request.param)
    merge_adapter(adapter, root / "merged")
    export = export_onnx(root / "merged", root / "onnx")
    model = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    return model, DecoderGraph.open(export), TextTokenizer.from_folder(export), export


def chat(tok: TextTokenizer, prompt: str) -> list[int]:
    return tok.chat_ids([{"role": "user", "content": prompt}])


def test_greedy_tokens_are_identical_to_pytorch(merged) -> None:
    model, graph, tok, export = merged
    eos = generation_eos_ids(export)
    assert eos == [tok.eos_token_id]
    answers = set()
    for prompt in PROMPTS:
        for ids in (chat(tok, prompt), tok.encode(prompt)):
            expected, reason = reference(model, ids, NEW, eos[0])
            tokens, text, finish = run(graph, ids, SamplingParams(max_tokens=NEW), eos, tok)
            assert (tokens, finish) == (expected, reason), prompt
            assert text == tok.decode(tokens)
            answers.add(tuple(tokens))
    assert len(answers) > 3  # the prompts get different answers (else identity proves little)


def test_a_left_padded_batch_decodes_each_row_as_it_decodes_alone(merged) -> None:
    model, graph, tok, _ = merged
    prompts = [chat(tok, PROMPTS[1]), tok.encode(PROMPTS[2])]
    assert len(prompts[0]) != len(prompts[1])
    width = max(map(len, prompts))
    ids = np.array([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    np.testing.assert_array_equal(positions(mask)[1], [1] * (width - len(prompts[1])) + list(range(len(prompts[1]))))
    logits, past = graph.forward(ids, mask, graph.empty_past(2))
    rows: list[list[int]] = [[], []]
    for _ in range(NEW):
        step = logits[:, -1].argmax(-1)
        for row, token in zip(rows, step):
            row.append(int(token))
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = graph.forward(step[:, None], mask, past)
    for prompt, row in zip(prompts, rows):
        x = torch.tensor([prompt])
        alone = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW, eos_token_id=None)
        assert row == alone[0, len(prompt) :].tolist()


def test_eos_stop_ids_and_max_tokens_end_with_their_reason(merged) -> None:
    _, graph, tok, _ = merged
    ids = chat(tok, PROMPTS[0])
    tokens, _, finish = run(graph, ids, SamplingParams(max_tokens=6))
    assert len(tokens) == 6 and finish == FINISH_LENGTH
    assert run(graph, ids, SamplingParams(max_tokens=6), eos=[tokens[0]]) == ([], "", FINISH_STOP)  # EOS is not yielded
    assert run(graph, ids, SamplingParams(max_tokens=6, stop_token_ids=[tokens[2]]))[0] == tokens[: tokens.index(tokens[2])]
    assert run(graph, ids, SamplingParams(max_tokens=1))[0] == tokens[:1]


def test_stop_strings_cut_the_text_before_them(merged) -> None:
    _, graph, tok, _ = merged
    ids = tok.encode(PROMPTS[0])
    tokens, full, plain_finish = run(graph, ids, SamplingParams(max_tokens=NEW), tok=tok)
    visible = full.strip("\ufffd")
    assert len(visible) >= 4, full
    stop = visible[2:4]
    cut, text, finish = run(graph, ids, SamplingParams(max_tokens=NEW, stop=[stop, "never there"]), tok=tok)
    assert finish == FINISH_STOP and text == full[: full.index(stop)] and cut == tokens[: len(cut)]
    assert run(graph, ids, SamplingParams(max_tokens=NEW, stop="never there"), tok=tok) == (tokens, full, plain_finish)
    with pytest.raises(MetaTTError, match="stop strings need the tokenizer"):
        list(generate(graph, ids, SamplingParams(stop=["x"])))


def test_seeded_sampling_repeats_and_differs_across_seeds_and_top_k_1_is_greedy(merged) -> None:
    _, graph, tok, _ = merged
    ids = chat(tok, PROMPTS[0])
    greedy = run(graph, ids, SamplingParams(max_tokens=NEW))[0]
    hot = dict(max_tokens=NEW, temperature=2.0, top_p=0.95, top_k=50)
    first = run(graph, ids, SamplingParams(seed=1, **hot))[0]
    assert run(graph, ids, SamplingParams(seed=1, **hot))[0] == first
    assert len({tuple(run(graph, ids, SamplingParams(seed=s, **hot))[0]) for s in range(2, 6)} | {tuple(first)}) > 1
    assert run(graph, ids, SamplingParams(max_tokens=NEW, temperature=1.0, top_k=1, seed=3))[0] == greedy
    assert run(graph, ids, SamplingParams(max_tokens=NEW, temperature=1.0, top_p=1e-9, seed=3))[0] == greedy


def test_top_k_and_top_p_keep_the_tokens_they_should() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)

    def drawn(**params) -> set[int]:
        p = SamplingParams(temperature=1.0, **params)
        return {pick(logits, p, rng) for _ in range(400)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.45) == {0}  # the smallest head whose mass reaches top_p
    assert drawn(top_p=0.7) == {0, 1}
    assert drawn(top_p=0.9) == {0, 1, 2}
    assert drawn(top_k=3, top_p=0.99) == {0, 1, 2}
    assert pick(logits, SamplingParams(), rng) == 0
    hot = SamplingParams(temperature=1.0)
    draws = [np.random.default_rng(7) for _ in range(2)]
    assert [pick(logits, hot, draws[0]) for _ in range(20)] == [pick(logits, hot, draws[1]) for _ in range(20)]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be"),
        ({"max_tokens": 2.5}, "max_tokens must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"temperature": float("inf")}, "temperature must be"),
        ({"temperature": -0.1}, "temperature must be"),
        ({"top_p": 0}, "top_p must be"),
        ({"top_p": 1.5}, "top_p must be"),
        ({"top_p": float("nan")}, "top_p must be"),
        ({"top_k": -1}, "top_k must be"),
        ({"stop": [""]}, "stop strings must be"),
    ],
)
def test_invalid_sampling_params_are_one_line_errors(params: dict, message: str) -> None:
    with pytest.raises(MetaTTError, match=message) as e:
        SamplingParams(**params)
    assert "\n" not in str(e.value)


def test_a_classifier_graph_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    export = export_onnx(tiny_base, tmp_path / "onnx")
    with pytest.raises(MetaTTError, match="exported with a KV cache"):
        DecoderGraph.open(export)
    with pytest.raises(MetaTTError, match="not found"):
        DecoderGraph.open(tmp_path)


TASKS = ["sent", "nli", "city"]


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode-factored")
    _, adapter = save_tiny_multitask(root, TASKS, seed=1)
    merge_factored(adapter, root / "bundle")
    return root / "bundle"


def test_factored_graphs_decode_each_task_as_pytorch(factored: Path) -> None:
    tok = TextTokenizer.from_folder(factored / "base")
    eos = tok.eos_token_id
    pytorch = load_bundle(factored)
    tasks_graph = DecoderGraph.open(factored, TASK_GRAPH)
    adapter_graph = DecoderGraph.open(factored, ADAPTER_GRAPH)
    answers = set()
    for index, task in enumerate(TASKS):
        adapter = ort.LoraAdapter()
        adapter.Load(str(factored / "tasks" / f"{task}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        for prompt in PROMPTS[:3]:
            ids = chat(tok, prompt)
            expected = reference(pytorch, ids, NEW, eos, task_ids=task)
            feeds = {"task_ids": np.array([index], dtype=np.int64)}
            assert run(tasks_graph, ids, SamplingParams(max_tokens=NEW), [eos], extra_feeds=feeds)[::2] == expected, (task, prompt)
            assert run(adapter_graph, ids, SamplingParams(max_tokens=NEW), [eos], run_options=options)[::2] == expected, (task, prompt)
            answers.add(tuple(expected[0]))
    assert len(answers) > 1


def fake_session(shape: list, dtype: str = "tensor(float)") -> SimpleNamespace:
    """Just the signature of a 2-layer decoder graph whose past inputs have ``shape``."""
    names = [f"past_key_values.{i}.{kind}" for i in (1, 0) for kind in ("value", "key")]
    inputs = [SimpleNamespace(name=n, shape=["batch", "seq"], type="tensor(int64)") for n in ("input_ids", "attention_mask")]
    inputs += [SimpleNamespace(name=n, shape=shape, type=dtype) for n in names]
    outputs = [SimpleNamespace(name=n) for n in ["logits", *(n.replace("past_key_values", "present") for n in names)]]
    return SimpleNamespace(get_inputs=lambda: inputs, get_outputs=lambda: outputs)


def test_cache_layout_comes_from_the_graph_else_from_config_json() -> None:
    graph = DecoderGraph(fake_session(["batch", 3, "past", 64], "tensor(float16)"))  # type: ignore[arg-type]
    assert graph.past_names == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    assert not graph.has_positions and graph.output_names[1] == "present.0.key"
    past = graph.empty_past(2)
    assert all(v.shape == (2, 3, 0, 64) and v.dtype == np.float16 for v in past.values())
    symbolic = fake_session(["batch", "heads", "past", "size"])
    sized = DecoderGraph(symbolic, {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576})  # type: ignore[arg-type]
    assert (sized.kv_heads, sized.head_dim) == (3, 64)
    assert DecoderGraph(symbolic, {"num_attention_heads": 4, "hidden_size": 64, "head_dim": 256}).head_dim == 256  # type: ignore[arg-type]
    with pytest.raises(MetaTTError, match="keep config.json beside the graph"):
        DecoderGraph(symbolic)  # type: ignore[arg-type]
    with pytest.raises(MetaTTError, match="not supported"):
        DecoderGraph(fake_session(["batch", 3, "past", 64], "tensor(int8)"))  # type: ignore[arg-type]


def test_kv_batch_rows_join_padded_left_and_leave_with_their_padding_cut() -> None:
    """Joining pads the shorter cache on the left (mask 0); leaving keeps the other rows' values and drops all-pad columns."""
    graph = DecoderGraph(fake_session(["batch", 1, "past", 2]))  # type: ignore[arg-type]
    first, second = KVBatch(graph, 1), KVBatch(graph, 2)
    first.mask, second.mask = np.ones((1, 4), np.int64), np.array([[0, 1], [1, 1]])
    first.past = {n: np.full((1, 1, 4, 2), 1.0, np.float32) for n in graph.past_names}
    second.past = {n: np.full((2, 1, 2, 2), 2.0, np.float32) for n in graph.past_names}
    first.extend(second)
    assert first.rows == 3 and first.length == 4
    np.testing.assert_array_equal(first.mask, [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]])
    key = first.past[graph.past_names[0]]
    assert key.shape == (3, 1, 4, 2) and (key[1:, :, :2] == 0).all() and (key[1:, :, 3] == 2).all()
    np.testing.assert_array_equal(positions(first.mask)[:, -1], [3, 0, 1])  # each row counts its own tokens
    first.take([2, 1])  # the long row leaves: two columns are padding in every remaining row
    np.testing.assert_array_equal(first.mask, [[1, 1], [0, 1]])
    assert first.past[graph.past_names[0]].shape == (2, 1, 2, 2) and (first.past[graph.past_names[0]] == 2).all()


@pytest.mark.parametrize("value", ["../../outside", [2, "x"], True, -1, [1.5]])
def test_an_eos_id_that_is_no_token_id_is_one_line(tmp_path: Path, value) -> None:
    """A damaged generation_config.json (found by the decoder fuzz: int('../../outside') was a traceback in generate)."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(MetaTTError, match="is not a token id"):
        generation_eos_ids(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert generation_eos_ids(tmp_path) == [2, 7]
