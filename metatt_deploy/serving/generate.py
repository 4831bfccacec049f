"""Streaming generation from a decoder export or a factored decoder bundle, on the runtime floor.

``metatt-deploy export`` writes a decoder's graph with a KV cache beside its tokenizer (with its
chat template) and generation config; ``merge --factored`` writes a multi-task decoder's two
graphs once and a few hundred bytes per task. `Generator` opens either and answers prompts with
the numpy decode loop (`inference.decode`): the prompt wrapped in the chat template (unless
``raw``), greedy or sampled tokens, text handed out piece by piece as it decodes.

A factored bundle chooses its task per call without reloading anything: with ``form="adapter"``
(default) the task's ``.onnx_adapter`` is checked and loaded once, then made active through
RunOptions on every step; with ``form="tasks"`` the task's id is fed to ``model_tasks.onnx``;
``form="auto"`` (the server's) takes ``model_tasks.onnx`` for the tasks baked into it and the
adapter graph for tasks added later. `Generator.binding` is the one place a task becomes a graph
and its inputs: task ids are per row, so rows of every baked task share one call, while RunOptions
are per call, so an added task's rows share a call only with rows of the same task (its "lane").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.decode import DecoderGraph, SamplingParams, Step, generate, generation_eos_ids
from metatt_deploy.inference.formats import (
    ADAPTER_GRAPH,
    ONNX_NAME,
    TASK_GRAPH,
    TASK_IDS,
    base_dir,
    context_length,
    is_bundle,
    is_decoder_bundle,
    is_decoder_export,
    read_bundle,
    read_manifest,
    read_model_config,
)
from metatt_deploy.inference.sessions import adapter_run_options, load_task_adapter, make_session
from metatt_deploy.inference.task_table import ServesTasks, TaskTable
from metatt_deploy.inference.text import TextTokenizer

DECODER_FORMS = ("adapter", "tasks", "auto")
TaskInputs = tuple[dict[str, np.ndarray] | None, ort.RunOptions | None]


@dataclass(frozen=True)
class Binding:
    """What makes rows run a task: the graph, its per-row inputs, its per-call RunOptions, and the lane of rows that may share a call."""

    lane: str
    graph: DecoderGraph
    feeds: dict[str, np.ndarray] | None
    run_options: ort.RunOptions | None


class DecodingBackend(Protocol):
    """What the decoder server (`openai_app`, `llm_engine`) needs of a generator: its tasks, their bindings, prompts and limits.

    `Generator` (the numpy decode loop on ONNX Runtime) is the one backend that serves it; the
    server is typed against this so what it relies on is written down in one place.
    `GenAIGenerator` does not fit: ONNX Runtime GenAI runs its own loop, with no per-step binding
    the scheduler could batch.
    """

    @property
    def bundle(self) -> Path: ...  # the export's folder: a single-task export's model id is its name

    @property
    def tasks(self) -> list[str]: ...  # empty for a single-task export

    @property
    def context(self) -> int | None: ...

    @property
    def eos_ids(self) -> list[int]: ...

    @property
    def tokenizer(self) -> TextTokenizer: ...

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]: ...

    def steps(self, ids: Sequence[int], params: SamplingParams, task: str | None = None) -> Iterator[Step]: ...

    def binding(self, task: str | None) -> Binding: ...

    def add_task(self, name: str) -> dict: ...

    def remove_task(self, name: str) -> None: ...


def encode_prompt(tokenizer: TextTokenizer, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
    """The ids of ``prompt`` as the model was trained to see it (its chat template with ``system``, or the plain
    prompt format of a model without one), or as is (``raw``). The user's text is data: special-token strings in
    it are encoded as text, never as control tokens."""
    if not prompt:
        raise MetaTTError("the prompt is empty; pass some text")
    if raw:
        if system:
            raise MetaTTError("--system goes into a chat; drop --raw, or put the system text into the prompt")
        return tokenizer.encode_text(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.prompt_ids(messages)


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


class Generator(ServesTasks):
    """A decoder export or factored decoder bundle, loaded once, that turns prompts into streamed answers."""

    def __init__(self, bundle: str | Path, threads: int | None = None, form: str = "adapter", providers: list[str] | None = None):
        self.bundle = Path(bundle)
        if not self.bundle.is_dir():
            raise MetaTTError(f"bundle not found: {self.bundle}; pass a folder written by metatt-deploy export")
        if form not in DECODER_FORMS:
            raise MetaTTError(f"unknown form '{form}'; use {' or '.join(DECODER_FORMS)}")
        self.form = form
        self.info: dict = {}
        self.baked: list[str] = []
        self.adapters: dict[str, ort.LoraAdapter] = {}  # loaded once, kept: a freed LoraAdapter leaves the empty defaults
        self.task: str | None = None
        if is_bundle(self.bundle):
            self.info = read_bundle(self.bundle)
            if not is_decoder_bundle(self.info) or not self.info.get("onnx"):
                raise MetaTTError(
                    f"{self.bundle} is not a factored bundle of a causal LM with ONNX graphs; generate needs one (merge --factored)"
                )
            self.table = TaskTable.of_bundle(self.bundle, self.info)
            self.baked = list(self.info["onnx"]["task_graph"]["tasks"])
            folder, graph_file = base_dir(self.bundle, self.info), ADAPTER_GRAPH if form == "adapter" else TASK_GRAPH
        elif is_decoder_export(read_manifest(self.bundle)):
            if form == "tasks":
                raise MetaTTError(f"form 'tasks' applies to factored bundles; {self.bundle} is a single-task export, drop it")
            folder, graph_file = self.bundle, ONNX_NAME
            self.table = TaskTable.single_task(self.bundle)  # no named task: requests name the export itself
        else:
            raise MetaTTError(f"{self.bundle} is not a decoder export (no KV-cache graph); generate needs an exported causal LM")
        self.tokenizer = TextTokenizer.from_folder(folder)
        config = read_model_config(folder)
        self.context = context_length(config)
        self.eos_ids = generation_eos_ids(folder)
        graph_folder = folder if self.table.fixed else self.bundle
        self.config, self.providers, self.threads = config, providers, threads
        self.graph = DecoderGraph(make_session(graph_folder / graph_file, providers, threads), config)
        self._adapter_graph: DecoderGraph | None = self.graph if form == "adapter" else None

    # ------------------------------------------------------------ tasks (the table decides; see `TaskTable`)

    def use(self, task: str | int) -> None:
        """Choose the task of later calls (nothing is reloaded; an adapter file is checked and read once)."""
        if self.table.fixed:
            raise MetaTTError("this export serves one task; --task applies to factored bundles (merge --factored)")
        name = self.task_name(task)
        self.task_inputs(name)  # fails now, not at the first step, for a task the graph cannot run
        self.task = name

    def task_inputs(self, task: str | None) -> TaskInputs:
        """The graph inputs that make a step run ``task``: task ids (model_tasks.onnx) or RunOptions with its adapter."""
        binding = self.binding(task)
        return binding.feeds, binding.run_options

    def binding(self, task: str | None, record: dict | None = None) -> Binding:
        """The graph that runs ``task``, its inputs, and its lane: rows of one lane may share a call.

        ``record`` is the task's record when it is not served yet (`add_task` checks a task before publishing it).
        """
        if self.table.fixed:
            return Binding("model", self.graph, None, None)
        if task is None:
            raise MetaTTError(f"this bundle serves several tasks; choose one with --task ({', '.join(self.tasks)})")
        if self.form != "adapter" and task in self.baked:
            return Binding(TASK_GRAPH, self.graph, {TASK_IDS: np.array([self.baked.index(task)], dtype=np.int64)}, None)
        if self.form == "tasks":
            raise MetaTTError(
                f"task '{task}' was added after model_tasks.onnx was written; use form 'adapter' for it (baked tasks: {', '.join(self.baked)})"
            )
        if task not in self.adapters:
            self.adapters[task] = load_task_adapter(self.bundle, self.info, record or self.records[task])
        if self._adapter_graph is None:
            self._adapter_graph = DecoderGraph(make_session(self.bundle / ADAPTER_GRAPH, self.providers, self.threads), self.config)
        return Binding(f"{ADAPTER_GRAPH}:{task}", self._adapter_graph, None, adapter_run_options(self.adapters[task]))

    def add_task(self, name: str) -> dict:
        """Serve the bundle's ``tasks/NAME.json`` from now on (written after this Generator opened); its adapter is checked and loaded now."""
        return self.table.add(name, self.binding)

    def remove_task(self, name: str) -> None:
        """Stop serving a task (its files stay in the bundle); callers finish its running sequences first."""
        self.adapters.pop(self.table.remove(name), None)

    # ------------------------------------------------------------ generation

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw, system)

    def steps(self, ids: Sequence[int], params: SamplingParams, task: str | None = None) -> Iterator[Step]:
        """The decode loop's events for prompt ids ``ids`` (with ``task``, else the chosen one, of a bundle)."""
        checked_prompt(list(ids), params.max_tokens, self.context)
        b = self.binding(self.task_name(task) if task is not None else self.task)
        return generate(b.graph, ids, params, self.eos_ids, self.tokenizer, extra_feeds=b.feeds, run_options=b.run_options)

    def logits(self, ids: Sequence[int], task: str | None = None) -> np.ndarray:
        """Next-token logits at every position of ``ids`` (one sequence, one call, an empty cache): teacher forcing."""
        b = self.binding(self.task_name(task) if task is not None else self.task)
        x = np.asarray([ids], dtype=np.int64)
        return b.graph.forward(x, np.ones_like(x), b.graph.empty_past(1), extra_feeds=b.feeds, run_options=b.run_options)[0][0]

    def greedy(self, ids: Sequence[int], max_new_tokens: int, task: str | None = None) -> list[int]:
        """The greedy continuation's token ids, EOS not included: what parity checks compare."""
        steps = self.steps(ids, SamplingParams(max_tokens=max_new_tokens), task)
        return [step.token_id for step in steps if step.token_id is not None]

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        raw: bool = False,
        system: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        task: str | None = None,
    ) -> Iterator[str]:
        """Pieces of the answer to ``prompt`` as they are generated (with ``task``, of that task of a bundle)."""
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop))
        for step in self.steps(self.encode(prompt, raw, system), params, task):
            if step.text:
                yield step.text

    def generate(self, prompt: str, **options) -> str:
        return "".join(self.stream(prompt, **options)).strip()
