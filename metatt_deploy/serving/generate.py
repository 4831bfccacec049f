"""Streaming text generation from an exported decoder bundle (ONNX Runtime, KV cache).

The bundle written by ``metatt-deploy export`` for a causal LM holds the graph, the tokenizer
(with its chat template) and the generation config, so serving needs nothing else: a prompt is
wrapped in the chat template (unless ``raw``), generated greedily (or sampled when a temperature
is given) through ``ORTModelForCausalLM.generate`` and handed out piece by piece as the tokens
decode, so a caller can print them as they come.

A factored bundle of a multi-task causal LM (``merge --factored``) opens the same way: one
ONNX Runtime session of its factored graph, the base weights loaded once, and the task chosen
per call (``task=``) without reloading anything: with ``form="adapter"`` (default) the task's
``.onnx_adapter`` is checked and loaded once, then activated through RunOptions on every run;
with ``form="tasks"`` the task id is fed per row to ``model_tasks.onnx`` (so a batch may mix
tasks). `TaskSession` does this under optimum's ``ORTModelForCausalLM``, whose ``generate()``
loop runs unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx_lm import load_ort_decoder
from metatt_deploy.inference.formats import (
    ADAPTER_GRAPH,
    BASE_DIR,
    DECODER_PIPELINE,
    TASK_GRAPH,
    TASK_IDS,
    context_length,
    is_bundle,
    read_bundle,
    read_manifest,
    task_records,
)
from metatt_deploy.inference.sessions import load_task_adapter
from metatt_deploy.inference.tasks import resolve_task
from metatt_deploy.training.lm_data import prompt_ids

DECODER_FORMS = ("adapter", "tasks")


def encode_prompt(tokenizer, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
    """The ids of ``prompt`` as the model was trained to see it: in its chat template (with ``system``), or as is (``raw``)."""
    if raw:
        return tokenizer(prompt).input_ids
    if not tokenizer.chat_template:
        raise MetaTTError("this model's tokenizer has no chat template; pass --raw to feed prompts as they are")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return prompt_ids(messages, tokenizer)


def checked_prompt(ids: list[int], max_new_tokens: int, context: int | None) -> list[int]:
    """``ids``, if they and ``max_new_tokens`` new tokens fit the model's context (else a one-line error)."""
    if max_new_tokens < 1:
        raise MetaTTError("--max-new-tokens must be at least 1")
    if context and len(ids) + max_new_tokens > context:
        raise MetaTTError(
            f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the model's context of "
            f"{context}; shorten the prompt or lower --max-new-tokens"
        )
    return ids


class TaskSession:
    """An ONNX Runtime session of a factored decoder graph that runs with the chosen task.

    Stands in for the session inside ``ORTModelForCausalLM`` (which calls ``session.run(None,
    feeds)``): every run gets the active task's adapter (form "adapter") or its task ids (form
    "tasks", one per row). Running before a task is chosen is an error, never a default task.
    """

    def __init__(self, session, bundle: Path, info: dict, records: dict[str, dict], form: str):
        self.session = session
        self.bundle, self.info, self.records, self.form = bundle, info, records, form
        self.baked = list(info["onnx"]["task_graph"]["tasks"])
        self.adapters: dict[str, object] = {}  # loaded once, kept: a freed LoraAdapter would leave the empty defaults
        self.options = None
        self.task_ids: np.ndarray | None = None
        self.task: str | list[str] | None = None

    def use(self, task: str | int | Sequence[str | int]) -> None:
        """Choose the task of the next runs: one name or index, or (form "tasks") one per row."""
        import onnxruntime as ort

        names = list(self.records)
        if isinstance(task, (list, tuple)):
            if self.form != "tasks":
                raise MetaTTError("one task per row needs form 'tasks' (model_tasks.onnx); open the bundle with form='tasks'")
            chosen = [names[resolve_task(names, t, "bundle")] for t in task]
        else:
            chosen = [names[resolve_task(names, cast(str | int, task), "bundle")]]
        if self.form == "tasks":
            missing = [t for t in chosen if t not in self.baked]
            if missing:
                raise MetaTTError(
                    f"task '{missing[0]}' was added after model_tasks.onnx was written; use form 'adapter' for it "
                    f"(baked tasks: {', '.join(self.baked)})"
                )
            self.task_ids = np.array([self.baked.index(t) for t in chosen], dtype=np.int64)
        else:
            if chosen[0] not in self.adapters:
                self.adapters[chosen[0]] = load_task_adapter(self.bundle, self.info, self.records[chosen[0]])
            options = ort.RunOptions()
            options.add_active_adapter(self.adapters[chosen[0]])
            self.options = options
        self.task = chosen if isinstance(task, (list, tuple)) else chosen[0]

    def run(self, output_names, feeds: dict, run_options=None):
        if self.task is None:
            raise MetaTTError(f"choose a task (task=... / --task): this bundle serves {', '.join(self.records)}")
        if self.form == "adapter":
            return self.session.run(output_names, feeds, self.options)
        assert self.task_ids is not None
        batch = len(next(iter(feeds.values())))
        ids = self.task_ids if len(self.task_ids) == batch else np.repeat(self.task_ids[:1], batch) if len(self.task_ids) == 1 else None
        if ids is None:
            raise MetaTTError(f"{len(self.task_ids)} task ids for a batch of {batch} rows; give one task, or one per row")
        return self.session.run(output_names, {**feeds, TASK_IDS: ids}, run_options)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


class Generator:
    """A loaded decoder bundle that turns prompts into streamed answers."""

    def __init__(self, bundle: str | Path, threads: int | None = None, form: str = "adapter"):
        from transformers import AutoTokenizer

        bundle = Path(bundle)
        self.tasks: list[str] = []
        self.session: TaskSession | None = None
        if not bundle.is_dir():
            raise MetaTTError(f"bundle not found: {bundle}; pass a folder written by metatt-deploy export")
        if is_bundle(bundle):
            self._open_bundle(bundle, threads, form)
            return
        if read_manifest(bundle).get("pipeline_task") != DECODER_PIPELINE:
            raise MetaTTError(f"{bundle} is not a decoder export (no KV-cache graph); generate needs an exported causal LM")
        self.model = load_ort_decoder(bundle, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(bundle)
        self.context = context_length(self.model.config)

    def _open_bundle(self, bundle: Path, threads: int | None, form: str) -> None:
        from transformers import AutoTokenizer

        if form not in DECODER_FORMS:
            raise MetaTTError(f"unknown form '{form}'; use {' or '.join(DECODER_FORMS)}")
        info = read_bundle(bundle)
        if info.get("task_type") != "causal-lm" or not info.get("onnx"):
            raise MetaTTError(f"{bundle} is not a factored bundle of a causal LM with ONNX graphs; generate needs one (merge --factored)")
        records = {r["task"]: r for r in task_records(bundle, info)}
        self.model = load_ort_decoder(bundle, threads=threads, file_name=ADAPTER_GRAPH if form == "adapter" else TASK_GRAPH)
        self.session = TaskSession(self.model.session, bundle, info, records, form)
        if form == "tasks":
            self.model.input_names.pop(TASK_IDS)  # fed by the TaskSession, not by optimum
        self.model.session = self.session
        self.tasks = list(records)
        self.tokenizer = AutoTokenizer.from_pretrained(bundle / info.get("base_dir", BASE_DIR))
        self.context = context_length(self.model.config)

    def use(self, task: str | int | Sequence[str | int]) -> None:
        """Switch the task of a factored bundle (nothing is reloaded; an adapter file is read once)."""
        if self.session is None:
            raise MetaTTError("this export serves one task; --task applies to factored bundles (merge --factored)")
        self.session.use(task)

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw, system)

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
        """Pieces of the answer to ``prompt`` as they are generated (with ``task``, of that task of a bundle)."""
        import torch
        from transformers import TextIteratorStreamer

        if task is not None:
            self.use(task)
        elif self.session is not None and self.session.task is None:
            raise MetaTTError(f"this bundle serves several tasks; choose one with --task ({', '.join(self.tasks)})")
        ids = checked_prompt(self.encode(prompt, raw, system), max_new_tokens, self.context)
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
