"""metatt_deploy.serving.generate and the generate verb: streamed answers equal PyTorch's greedy ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_decoders import save_tiny_adapter
from typer.testing import CliRunner

from metatt_deploy.adapters.model import load_adapter
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.decoder_runs import greedy
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.serving.generate import Generator
from metatt_deploy.training.lm_data import prompt_ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    _, adapter_dir = save_tiny_adapter(root, "llama")
    return adapter_dir, export_onnx(adapter_dir, root / "bundle")


def test_streamed_pieces_join_to_the_adapters_greedy_answer(exported) -> None:
    adapter_dir, bundle = exported
    model, _, tok = load_adapter(adapter_dir)
    generator = Generator(bundle)
    pieces = list(generator.stream("Review: this was good", max_new_tokens=12))
    ids = prompt_ids([{"role": "user", "content": "Review: this was good"}], tok)
    expected = tok.decode(greedy(model, ids, 12, tok.eos_token_id, tok.pad_token_id), skip_special_tokens=True)
    assert "".join(pieces) == expected and len(pieces) >= 1
    assert generator.encode("Review", raw=True) == tok("Review").input_ids


def test_generate_verb_reads_arguments_and_stdin_and_refuses_bad_input(exported, tiny_base: Path) -> None:
    _, bundle = exported
    generator = Generator(bundle)
    expected = [generator.generate(p, max_new_tokens=5) for p in ("first prompt", "second prompt")]
    result = CliRunner().invoke(app, ["generate", str(bundle), "first prompt", "second prompt", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.output.splitlines()] == expected
    result = CliRunner().invoke(app, ["generate", str(bundle), "--max-new-tokens", "5"], input="first prompt\n\nsecond prompt\n")
    assert [line.strip() for line in result.output.splitlines()] == expected
    long_prompt = "word " * 600
    result = CliRunner().invoke(app, ["generate", str(bundle), long_prompt])
    assert result.exit_code == 2 and "exceeds the model's context of 512" in result.output
    with pytest.raises(MetaTTError, match="not a decoder export|not an ONNX export"):
        Generator(tiny_base)


def test_bad_prompts_are_one_line_errors(exported) -> None:
    """Standard input that is not UTF-8, an empty --raw prompt, a numeric-looking task name that is not ASCII."""
    _, bundle = exported
    for args, stdin, message in (
        ([], b"caf\xe9\n", "standard input is not UTF-8 text (byte 3)"),
        (["", "--raw"], None, "the prompt is empty"),
        (["hello", "--task", "\u0663"], None, "--task applies to factored bundles"),
        (["hello", "--temperature", "nan"], None, "temperature must be a finite number"),
        (["hello", "--top-p", "0"], None, "top_p must be in (0, 1]"),
    ):
        result = CliRunner().invoke(app, ["generate", str(bundle), *args], input=stdin)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
