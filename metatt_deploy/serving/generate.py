"""Streaming text generation from an exported decoder bundle (ONNX Runtime, KV cache).

The bundle written by ``metatt-deploy export`` for a causal LM holds the graph, the tokenizer
(with its chat template) and the generation config, so serving needs nothing else: a prompt is
wrapped in the chat template (unless ``raw``), generated greedily (or sampled when a temperature
is given) through ``ORTModelForCausalLM.generate`` and handed out piece by piece as the tokens
decode, so a caller can print them as they come.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx import read_manifest
from metatt_deploy.export.onnx_lm import ONNX_TASK, load_ort_decoder
from metatt_deploy.training.lm_data import context_length, prompt_ids


class Generator:
    """A loaded decoder bundle that turns prompts into streamed answers."""

    def __init__(self, bundle: str | Path, threads: int | None = None):
        from transformers import AutoTokenizer

        bundle = Path(bundle)
        if not bundle.is_dir():
            raise MetaTTError(f"bundle not found: {bundle}; pass a folder written by metatt-deploy export")
        if read_manifest(bundle).get("pipeline_task") != ONNX_TASK:
            raise MetaTTError(f"{bundle} is not a decoder export (no KV-cache graph); generate needs an exported causal LM")
        self.model = load_ort_decoder(bundle, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(bundle)
        self.context = context_length(self.model.config)

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        if raw:
            return self.tokenizer(prompt).input_ids
        if not self.tokenizer.chat_template:
            raise MetaTTError("this model's tokenizer has no chat template; pass --raw to feed prompts as they are")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return prompt_ids(messages, self.tokenizer)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        raw: bool = False,
        system: str | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Iterator[str]:
        """Pieces of the answer to ``prompt`` as they are generated."""
        import torch
        from transformers import TextIteratorStreamer

        if max_new_tokens < 1:
            raise MetaTTError("--max-new-tokens must be at least 1")
        ids = self.encode(prompt, raw, system)
        if self.context and len(ids) + max_new_tokens > self.context:
            raise MetaTTError(
                f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the model's context of "
                f"{self.context}; shorten the prompt or lower --max-new-tokens"
            )
        x = torch.tensor([ids])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            torch.manual_seed(seed)
            options["temperature"] = temperature
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=streamer, **options)
            except BaseException as e:  # re-raised in the caller's thread once the stream ends
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    def generate(self, prompt: str, **options) -> str:
        return "".join(self.stream(prompt, **options)).strip()
