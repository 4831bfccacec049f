"""Generation per task from a factored decoder bundle on ONNX Runtime GenAI (``generate --runtime genai``).

The bundle must have been made a GenAI model folder first (``export BUNDLE --genai``,
export/genai.py). One ``og.Model`` holds the graph (base weights and shared cores once); every
task's ``.onnx_adapter`` is checked like on ONNX Runtime (sha256, bundle version, shapes) and
loaded once into one ``og.Adapters``; a call makes a fresh generator (cheap: it holds only the
KV cache) and activates its task with ``set_active_adapter``, so switching tasks reloads nothing.
A generator without an active adapter is never run: the graph's empty default slice would fail.

Prompts are encoded and answers decoded exactly as on ONNX Runtime (`TextTokenizer`, its chat
template and `TextStream`): the export checked that GenAI's own tokenizer gives the same ids, and
decoding both runtimes' tokens the same way gives the same text for the same tokens (GenAI's own
token stream drops characters after an incomplete UTF-8 sequence).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import (
    GENAI_CONFIG,
    base_dir,
    context_length,
    is_decoder_bundle,
    read_bundle,
    read_model_config,
)
from metatt_deploy.inference.genai import genai_tokens, import_genai
from metatt_deploy.inference.sessions import checked_adapter_file
from metatt_deploy.inference.task_table import ServesTasks, TaskTable
from metatt_deploy.inference.text import TextStream, TextTokenizer
from metatt_deploy.serving.generate import checked_prompt, encode_prompt


class GenAIGenerator(ServesTasks):
    """A factored decoder bundle on ONNX Runtime GenAI: one model, one adapter per task, switched per call."""

    def __init__(self, bundle: str | Path, threads: int | None = None):
        og = import_genai()
        bundle = Path(bundle)
        info = read_bundle(bundle)
        if not is_decoder_bundle(info) or not info.get("onnx"):
            raise MetaTTError(f"{bundle} is not a factored bundle of a causal LM with ONNX graphs; --runtime genai needs one")
        if not info.get("genai") or not (bundle / GENAI_CONFIG).is_file():
            raise MetaTTError(f"{bundle} has no ONNX Runtime GenAI files; write them with metatt-deploy export {bundle} --genai")
        config = og.Config(str(bundle))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
        self.og, self.bundle, self.info = og, bundle, info
        self.model = og.Model(config)
        self.adapters = og.Adapters(self.model)
        self.table = TaskTable.of_bundle(bundle, info)
        self.loaded: set[str] = set()
        self.task: str | None = None
        self.tokenizer = TextTokenizer.from_folder(base_dir(bundle, info))
        self.context = context_length(read_model_config(base_dir(bundle, info)))

    def use(self, task: str | int) -> None:
        """Choose the task of the next calls (its adapter file is checked and loaded on first use, then kept)."""
        if isinstance(task, (list, tuple)):
            raise MetaTTError("ONNX Runtime GenAI answers one task per generator; one task per row needs --form tasks on ONNX Runtime")
        name = self.table.name(task)
        if name not in self.loaded:
            self.adapters.load(str(checked_adapter_file(self.bundle, self.info, self.records[name])), name)
            self.loaded.add(name)
        self.task = name

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw, system)

    def tokens(
        self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0, task: str | None = None
    ) -> Iterator[int]:
        """New token ids for prompt ids ``ids`` with the active (or given) task; EOS included when reached."""
        if task is not None:
            self.use(task)
        if self.task is None:
            raise MetaTTError(f"this bundle serves several tasks; choose one with --task ({', '.join(self.tasks)})")
        ids = checked_prompt(ids, max_new_tokens, self.context)
        yield from genai_tokens(self.og, self.model, self.adapters, self.task, ids, max_new_tokens, temperature=temperature, seed=seed)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        raw: bool = False,
        system: str | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        task: str | None = None,
    ) -> Iterator[str]:
        """Pieces of the answer to ``prompt`` as they are generated (as `Generator.stream`)."""
        if task is not None:
            self.use(task)
        stream = TextStream(self.tokenizer)
        for token in self.tokens(self.encode(prompt, raw, system), max_new_tokens, temperature=temperature, seed=seed):
            piece = stream.push(token)
            if piece:
                yield piece
        rest = stream.finish()
        if rest:
            yield rest

    def generate(self, prompt: str, **options) -> str:
        return "".join(self.stream(prompt, **options)).strip()
