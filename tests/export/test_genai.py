"""metatt_deploy.export.genai (export BUNDLE --genai) and serving/genai.py (generate --runtime genai):
a factored decoder bundle served by ONNX Runtime GenAI, one .onnx_adapter per task switched with
set_active_adapter, greedy generation token-identical per task to the PyTorch adapter and to ONNX
Runtime. Tiny random Llama; the tests that run GenAI skip when onnxruntime-genai is not installed."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from tiny_decoders import save_tiny_multitask
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import load_bundle
from metatt_deploy.export.genai import BYTE_LEVEL_DECODER, check_tokenizer, export_genai, genai_config, genai_tokenizer_files
from metatt_deploy.export.merge import merge_factored
from metatt_deploy.inference.decode import until_eos
from metatt_deploy.inference.formats import GENAI_CONFIG
from metatt_deploy.serving.generate import Generator

TASKS = ["sent", "nli", "city"]
PROMPTS = ["Review: this was good today", "Premise: a man plays.", "What is the capital of France?", "fine lovely", "sad boring"]
NEW = 8
# what transformers' GGUF conversion writes for a byte-level BPE (the embedded SmolLM2): a SentencePiece-style decoder
GGUF_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        BYTE_LEVEL_DECODER,
    ],
}
NEEDS_GENAI = "onnxruntime-genai is not installed (pip install 'metatt-deploy[genai]')"


@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai", reason=NEEDS_GENAI)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    _, adapter = save_tiny_multitask(root, TASKS, seed=1)
    merge_factored(adapter, root / "bundle")
    _as_gguf_conversion(root / "bundle" / "base")
    return root, root / "bundle"


@pytest.fixture(scope="module")
def genai_bundle(og, bundle):
    root, out = bundle
    ready = root / "ready"
    shutil.copytree(out, ready)
    return ready, export_genai(ready)


def _as_gguf_conversion(base) -> None:
    """Make a saved tokenizer look like a GGUF conversion (the files that gave id -1 in GenAI)."""
    data = json.loads((base / "tokenizer.json").read_text())
    data["decoder"] = GGUF_DECODER
    (base / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=True)
    (base / "tokenizer_config.json").write_text(json.dumps(config))


def _chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_genai_config_names_the_graphs_inputs_outputs_and_cache_layout(bundle) -> None:
    _, out = bundle
    config = genai_config(AutoConfig.from_pretrained(out / "base"), GenerationConfig.from_pretrained(out / "base"))
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "decoder" and decoder["filename"] == "model_adapter.onnx"
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"], decoder["num_hidden_layers"]) == (
        4,
        2,
        8,
        2,
    )
    assert (model["eos_token_id"], model["pad_token_id"], model["context_length"], model["vocab_size"]) == (2, 2, 512, 320)
    assert (
        decoder["inputs"]["past_key_names"] == "past_key_values.%d.key" and decoder["outputs"]["present_value_names"] == "present.%d.value"
    )
    assert config["search"]["past_present_share_buffer"] is False  # optimum's graph concatenates past and new keys itself


def test_tokenizer_files_reset_a_gguf_style_decoder_without_changing_transformers_ids(bundle, tmp_path) -> None:
    _, out = bundle
    data, config, changes = genai_tokenizer_files(out / "base")
    assert data["decoder"] == BYTE_LEVEL_DECODER and config["tokenizer_class"] == "GPT2Tokenizer"
    assert set(changes) == {"decoder", "tokenizer_class", "chat_template"} and config["chat_template"].startswith("{% for message")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    before, after = AutoTokenizer.from_pretrained(out / "base"), AutoTokenizer.from_pretrained(tmp_path)
    for text in PROMPTS:
        assert after(text).input_ids == before(text).input_ids and _chat(after, text) == _chat(before, text)


def test_genai_tokenizer_of_the_gguf_style_files_is_refused_and_the_written_one_matches(og, genai_bundle, bundle, tmp_path) -> None:
    ready, record = genai_bundle
    hf = AutoTokenizer.from_pretrained(ready / "base")
    assert record["tokenizer_probes_identical"] == 12 and check_tokenizer(og.Tokenizer(og.Model(str(ready))), hf) == 12
    # the same folder with the tokenizer files as converted from GGUF: GenAI maps words to -1, the check says so
    broken = tmp_path / "broken"
    shutil.copytree(ready, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ready / "base" / name, broken / name)
    ids = [int(i) for i in og.Tokenizer(og.Model(str(broken))).encode("Review: this was good today")]
    assert -1 in ids
    with pytest.raises(MetaTTError, match="encodes .* differently from transformers"):
        check_tokenizer(og.Tokenizer(og.Model(str(broken))), hf)


def test_greedy_generation_per_task_is_token_identical_to_pytorch_and_onnxruntime(og, genai_bundle) -> None:
    from metatt_deploy.serving.genai import GenAIGenerator

    ready, record = genai_bundle
    assert record["parity"]["identical"] == record["parity"]["total"] == 6
    assert set(record["adapter_bytes"]) == set(TASKS) and all(b < 1024 for b in record["adapter_bytes"].values())
    tok = AutoTokenizer.from_pretrained(ready / "base")
    prompts = [_chat(tok, p) for p in PROMPTS]
    pytorch, ort_gen, gen = load_bundle(ready), Generator(ready), GenAIGenerator(ready)
    answers = {}
    for task in [*TASKS, *reversed(TASKS)]:  # every switch, both ways: nothing carries over from the previous task
        ort_gen.use(task)
        gen.use(task)
        got = [list(gen.tokens(ids, NEW)) for ids in prompts]
        assert [until_eos(g, tok.eos_token_id) for g in got] == [ort_gen.greedy(ids, NEW) for ids in prompts], task
        for ids, tokens in zip(prompts, got):
            x = torch.tensor([ids])
            ref = pytorch.generate(x, attention_mask=torch.ones_like(x), task_ids=task, max_new_tokens=NEW, do_sample=False)
            assert ref[0, len(ids) : len(ids) + len(tokens)].tolist() == tokens, task
        answers.setdefault(task, got)
        assert answers[task] == got
    assert len({json.dumps(a) for a in answers.values()}) == len(TASKS)  # the tasks answer differently (else this proves nothing)
    # sampling: seeded, so repeatable
    sampled = [list(gen.tokens(prompts[0], NEW, temperature=1.5, seed=s)) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and all(len(s) >= 1 for s in sampled)
    # the text pieces are GenAI's own decoding of the same ids
    gen.use("nli")
    text = gen.generate(PROMPTS[2], max_new_tokens=NEW)
    assert text == tok.decode(answers["nli"][2], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def test_og_api_as_documented(og, genai_bundle) -> None:
    """The snippet of docs/multitask-decoders.md: og.Model on the bundle, og.Adapters + set_active_adapter per task."""
    import numpy as np

    ready, _ = genai_bundle
    model = og.Model(str(ready))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    for task in TASKS:
        adapters.load(str(ready / "tasks" / f"{task}.onnx_adapter"), task)
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPTS[0]}]), add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    assert list(ids) == _chat(AutoTokenizer.from_pretrained(ready / "base"), PROMPTS[0])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "city")
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    from metatt_deploy.serving.genai import GenAIGenerator

    assert list(generator.get_sequence(0))[len(ids) :] == list(GenAIGenerator(ready).tokens(list(ids), NEW, task="city"))
    # no active adapter: the graph's empty default slice fails instead of answering for some task
    generator = og.Generator(model, params)
    with pytest.raises(Exception, match="MatMul|dimension"):  # noqa: B017 (GenAI raises RuntimeError)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        generator.generate_next_token()


def test_bad_input_is_a_one_line_error(og, genai_bundle, bundle, tmp_path) -> None:
    from metatt_deploy.serving.genai import GenAIGenerator

    ready, _ = genai_bundle
    root, plain = bundle
    gen = GenAIGenerator(ready)
    with pytest.raises(MetaTTError, match="choose one with --task"):
        gen.generate("hello", max_new_tokens=2)
    with pytest.raises(MetaTTError, match="unknown task"):
        gen.use("nope")
    with pytest.raises(MetaTTError, match="one task per generator"):
        gen.use(["sent", "nli"])
    with pytest.raises(MetaTTError, match="exceeds the model's context"):
        gen.generate("hello", task="sent", max_new_tokens=600)
    with pytest.raises(MetaTTError, match="no ONNX Runtime GenAI files; write them with metatt-deploy export"):
        GenAIGenerator(plain)
    with pytest.raises(MetaTTError, match="already holds GenAI files"):
        export_genai(ready)
    with pytest.raises(MetaTTError, match="not a factored bundle"):
        export_genai(root / "llama")
    # an adapter file from another bundle is refused before GenAI loads it
    _, other_adapter = save_tiny_multitask(root, TASKS, seed=2)
    merge_factored(other_adapter, root / "other")
    swapped = tmp_path / "swapped"
    shutil.copytree(ready, swapped)
    shutil.copy(root / "other" / "tasks" / "sent.onnx_adapter", swapped / "tasks" / "sent.onnx_adapter")
    with pytest.raises(MetaTTError, match="sha256 differs"):
        GenAIGenerator(swapped).use("sent")
    # a tokenizer GenAI cannot read the same way: a one-line error, and no GenAI files are left behind
    for source, force in ((plain, False), (ready, True)):  # a first export, and --force over an earlier one
        odd = tmp_path / f"odd-{force}"
        shutil.copytree(source, odd)
        data = json.loads((odd / "base" / "tokenizer.json").read_text())
        data["pre_tokenizer"] = {"type": "Whitespace"}  # no longer byte-level: left as written, and GenAI disagrees
        (odd / "base" / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(MetaTTError, match="GenAI's tokenizer"):
            export_genai(odd, force=force)
        assert not (odd / GENAI_CONFIG).exists() and not (odd / "tokenizer.json").exists()
        assert "genai" not in json.loads((odd / "bundle.json").read_text())


def test_without_onnxruntime_genai_the_error_says_how_to_install_it(bundle, monkeypatch) -> None:
    from metatt_deploy.serving.genai import GenAIGenerator

    _, plain = bundle
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    for call in (lambda: export_genai(plain), lambda: GenAIGenerator(plain)):
        with pytest.raises(MetaTTError, match=r"not installed; pip install 'metatt-deploy\[genai\]'"):
            call()


def test_cli_export_genai_and_generate_with_runtime_genai(og, bundle, tmp_path) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    _, out = bundle
    ready = tmp_path / "cli"
    shutil.copytree(out, ready)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(ready), "--genai"])
    assert res.exit_code == 0 and "6/6 token-identical" in res.output and "sent 176 B" in res.output, res.output
    for task in TASKS:
        answers = [
            runner.invoke(
                app, ["generate", str(ready), "--task", task, "--max-new-tokens", "6", *runtime, "What is the capital of France?"]
            )
            for runtime in ([], ["--runtime", "genai"])
        ]
        assert all(a.exit_code == 0 for a in answers) and answers[0].output.strip() == answers[1].output.strip(), task
    for args, message in (
        (["export", str(ready), "--genai"], "--force"),
        (["export", str(ready), "--genai", "--quantize", "int8"], "takes no --quantize"),
        (["generate", str(out), "--runtime", "genai", "--task", "sent", "hi"], "export"),
        (["generate", str(ready), "--runtime", "genai", "--form", "tasks", "--task", "sent", "hi"], "drop --form"),
        (["generate", str(ready), "--runtime", "vllm", "hi"], "unknown --runtime"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
