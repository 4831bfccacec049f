"""Serving any export with ONNX Runtime: load once, predict any task, per call or per row.

``Runtime(path)`` opens either kind of export with one API (``tasks``, ``labels``, ``predict``,
``logits``): a factored multi-task bundle (``merge --factored``) or a single-task ONNX export
(``export``: ``exported/NAME`` with manifest.json, model.onnx and the tokenizer), whose one task
is the default, so ``task`` may be omitted:

    from metatt_deploy.serving.runtime import Runtime
    rt = Runtime("exported/mt")                               # a single-task export
    rt.predict(["great film", "dull"])                        # its one task
    rt = Runtime("bundle/")                                   # a factored bundle: one session, every task
    rt.predict(["great film"], task="movie")                  # one task for the batch
    rt.predict([("A man sleeps.", "A man is awake.")], task="snli")   # sentence pairs
    rt.predict(["great film", ("a", "b")], tasks=["movie", "snli"])   # a task per row, one call

In a factored bundle, rows of tasks baked into ``model_tasks.onnx`` run in ONE call of that graph with one task id per
row; switching tasks costs nothing (it is an input). Tasks added to the bundle later (``merge
--factored --task NEW`` into an existing bundle) run through ``model_adapter.onnx`` with their
``.onnx_adapter`` file as the active adapter, loaded on first use and kept; the base graph is
never re-exported. ``form="tasks"`` or ``"adapter"`` forces one graph.

Every task file is checked against the bundle before use: unknown task names or ids, a task
file (or adapter file) of another bundle, and a head whose output count differs from the task's
labels are MetaTTErrors, never a silent wrong answer. A broken task record does not take the
other tasks down: it is left out and reported in ``skipped`` (asking for that task names the
reason). ``check`` refuses rows a task cannot answer before any model call: text that is not
valid Unicode, and a sentence pair for a single-sentence task or one sentence for a pair task
(`inference.tasks.text_inputs` decides which a task takes).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import onnxruntime as ort

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import check_utf8, jsonl_objects, read_json
from metatt_deploy.inference.formats import (
    ADAPTER_GRAPH,
    CONFIG_JSON,
    ONNX_NAME,
    TASK_GRAPH,
    TASK_IDS,
    TASKS_DIR,
    base_dir,
    is_bundle,
    is_decoder_bundle,
    read_bundle,
    read_manifest,
)
from metatt_deploy.inference.sessions import adapter_run_options, load_task_adapter, make_session, onnx_feeds
from metatt_deploy.inference.task_table import ServesTasks, TaskTable
from metatt_deploy.inference.tasks import TEXT_COLUMN_CANDIDATES, text_inputs
from metatt_deploy.inference.text import TextTokenizer

Text = str | Sequence[str]  # a sentence, or a (sentence, sentence) pair
FORMS = ("auto", "tasks", "adapter")
DEFAULT_MAX_LENGTH = 128  # tokens, as in training; a factored bundle records its own
CALL_OVERHEAD_TOKENS = (
    16  # a model call's fixed cost in padded tokens: 10 to 16 measured (MiniLM, 1 thread; docs/reports/serving-bucketing.md)
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def length_buckets(lengths: Sequence[int], overhead: int = CALL_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices grouped into model calls, cheapest first by the cost ``calls x overhead + sum of rows x longest row``.

    A batch pads every row to its longest, so rows of different lengths (tasks differ in length:
    tweets and sentence pairs are longer than movie sentences) pay for tokens they do not have;
    a call of its own pays ``overhead`` instead. Rows sorted by length are cut where the padding
    saved outweighs one more call: the exact optimum of that cost over contiguous runs (dynamic
    programming, O(rows^2); rows <= max_batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [0] * len(order)  # best[j]: cheapest cost of the j shortest rows
    cut = [0] * (len(order) + 1)  # where the last call of best[j] starts
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + overhead + (j - i) * longest, i) for i in range(j))
    buckets: list[list[int]] = []
    j = len(order)
    while j:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


def scored(task: str, logits: np.ndarray, labels: Sequence[str]) -> dict:
    """One row's answer: task, label, label_id, score (its probability) and every label's probability."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    k = int(p.argmax())
    return {"task": task, "label": labels[k], "label_id": k, "score": float(p[k]), "scores": {lab: float(v) for lab, v in zip(labels, p)}}


class Runtime(ServesTasks):
    """An export on ONNX Runtime with its tokenizer: a factored bundle or a single-task export.

    ``kind`` is "factored" or "export". ``form`` (and the task/adapter graphs) concern factored
    bundles only; a single-task export has one graph, ``model.onnx``.
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        form: str = "auto",
        providers: list[str] | None = None,
        threads: int | None = None,
        max_length: int | None = None,
    ):
        if form not in FORMS:
            raise MetaTTError(f"unknown form '{form}'; use one of {', '.join(FORMS)}")
        self.bundle = Path(bundle)
        self.form = form
        self.providers = providers
        self.threads = threads
        self._task_session = None
        self._adapter_session = None
        self._adapters: dict[str, ort.LoraAdapter] = {}
        if not is_bundle(self.bundle) and (self.bundle / ONNX_NAME).is_file():
            self._open_export(max_length)
            return
        if not is_bundle(self.bundle) and self.bundle.is_dir():
            raise MetaTTError(
                f"{self.bundle} is neither a factored bundle (bundle.json) nor an ONNX export ({ONNX_NAME}); "
                "pass exported/NAME (metatt-deploy export) or a bundle (merge --factored)"
            )
        self.kind = "factored"
        self.info = read_bundle(self.bundle)
        if is_decoder_bundle(self.info):
            raise MetaTTError(f"{self.bundle} is a bundle of a causal LM; generate with it (metatt-deploy generate BUNDLE --task NAME)")
        if not self.info.get("onnx"):
            raise MetaTTError(f"bundle {self.bundle} has no ONNX graphs; write it with merge --factored (without --no-onnx)")
        self.max_length = max_length or int(self.info.get("max_length", DEFAULT_MAX_LENGTH))
        self.table = TaskTable.of_bundle(self.bundle, self.info, keep_going=True)
        if not self.records:
            reasons = "; ".join(self.skipped.values()) or f"{TASKS_DIR}/ holds no task record"
            raise MetaTTError(f"bundle {self.bundle} has no task that can be served: {reasons}")
        self.baked = list(self.info["onnx"]["task_graph"]["tasks"])
        self.tokenizer = TextTokenizer.from_folder(base_dir(self.bundle, self.info))
        if form == "tasks":
            self._tasks_graph()
        if form == "adapter":
            self._adapter_graph()

    def _open_export(self, max_length: int | None) -> None:
        """A single-task export: model.onnx, its manifest (task, labels) and the tokenizer beside it."""
        if self.form != "auto":
            raise MetaTTError(f"form '{self.form}' applies to factored bundles; {self.bundle} is a single-task export, drop it")
        self.kind = "export"
        self.info = read_manifest(self.bundle)
        labels = self.info.get("labels")
        if not labels and (self.bundle / CONFIG_JSON).is_file():
            labels = read_json(self.bundle / CONFIG_JSON, "model config").get("id2label")
        if not labels:
            raise MetaTTError(f"{self.bundle} records no labels (manifest.json or config.json); re-export the model")
        names = [str(labels[k]) for k in sorted(labels, key=int)]
        task = self.info.get("task") or self.info.get("name") or self.bundle.resolve().name
        self.table = TaskTable.single_task(
            self.bundle, {"task": task, "labels": names, "num_labels": len(names), "text_columns": self.info.get("text_columns")}
        )
        self.baked = []
        self.max_length = max_length or int(self.info.get("max_length", DEFAULT_MAX_LENGTH))
        self.tokenizer = TextTokenizer.from_folder(self.bundle)
        self._task_session = make_session(self.bundle / ONNX_NAME, self.providers, self.threads)

    # ------------------------------------------------------------ sessions (lazy, kept)

    def _session(self, name: str):
        path = self.bundle / name
        if not path.is_file():
            raise MetaTTError(f"bundle {self.bundle} lacks {name}; re-write it with merge --factored")
        return make_session(path, self.providers, self.threads)  # default: CUDA when offered, else CPU

    def _tasks_graph(self):
        if self._task_session is None:
            self._task_session = self._session(TASK_GRAPH)
        return self._task_session

    def _adapter_graph(self):
        if self._adapter_session is None:
            self._adapter_session = self._session(ADAPTER_GRAPH)
        return self._adapter_session

    def _run_options(self, task: str, rec: dict | None = None) -> ort.RunOptions:
        """RunOptions with the task's .onnx_adapter active; the file is checked and loaded once."""
        if task not in self._adapters:
            self._adapters[task] = load_task_adapter(self.bundle, self.info, rec or self.records[task])
        return adapter_run_options(self._adapters[task])

    # ------------------------------------------------------------ tasks and inputs (the table decides; see `TaskTable`)

    @property
    def skipped(self) -> Mapping[str, str]:
        """Task record file -> why it is not served (a broken record does not take the other tasks down)."""
        return self.table.skipped

    def text_inputs(self, task: str) -> int:
        """1 if ``task`` takes one sentence per row, 2 if a sentence pair (see `inference.tasks.text_inputs`)."""
        return text_inputs(self.records[self.task_name(task)])

    def refusal(self, text: Text, task: str) -> str | None:
        """Why ``task`` cannot answer the row ``text`` (None if it can): text that is not valid Unicode, or the wrong number of texts.

        Checked before a row joins a batch, so a bad row never reaches a model call shared with
        other rows. Lone UTF-16 surrogates (a JSON string such as "\\ud800", or command-line bytes
        that are not UTF-8) have no UTF-8 form, and the tokenizer cannot take them.
        """
        parts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if len(parts) not in (1, 2) or not all(isinstance(p, str) for p in parts):
            return f"each input must be a text or a pair of texts, got {type(text).__name__}: {str(text)[:60]}"
        if not all(_encodable(p) for p in parts):
            return "not valid Unicode text (an unpaired surrogate?); send UTF-8 text"
        want = self.text_inputs(task)
        if len(parts) != want:
            expects = "a sentence pair [first, second]" if want == 2 else "one text, not a sentence pair"
            return f"task '{task}' takes {expects} per row"
        return None

    def check(self, texts: Sequence[Text], task: str) -> None:
        """A MetaTTError naming the first row (``texts.N``) that ``task`` cannot answer (see `refusal`)."""
        for i, text in enumerate(texts):
            reason = self.refusal(text, task)
            if reason is not None:
                raise MetaTTError(f"texts.{i}: {reason}")

    def labels(self, task: str | int | None = None) -> list[str]:
        return list(self.records[self.task_name(task)]["labels"])

    def encode(self, texts: Sequence[Text]) -> dict[str, np.ndarray]:
        """Tokenize sentences and sentence pairs (mixed allowed) into one padded int64 batch."""
        for text in texts:
            pair = isinstance(text, (list, tuple)) and len(text) == 2 and all(isinstance(t, str) for t in text)
            if not (isinstance(text, str) or pair):
                raise MetaTTError(f"each input must be a text or a pair of texts, got {type(text).__name__}: {str(text)[:60]}")
        return self.tokenizer.encode_batch([t if isinstance(t, str) else (t[0], t[1]) for t in texts], self.max_length)

    def _row_tasks(self, n: int, task, tasks) -> list[str]:
        if task is None and tasks is None and len(self.tasks) == 1:
            return [self.tasks[0]] * n
        if (task is None) == (tasks is None):
            raise MetaTTError("pass task=NAME for the whole batch or tasks=[...] with one task per row (not both)")
        if tasks is None:
            return [self.task_name(task)] * n
        if len(tasks) != n:
            raise MetaTTError(f"tasks has {len(tasks)} entries for {n} inputs; give one task per row")
        return [self.task_name(t) for t in tasks]

    # ------------------------------------------------------------ inference

    def logits(self, texts: Sequence[Text], task: str | int | None = None, tasks: Sequence[str | int] | None = None) -> list[np.ndarray]:
        """Per row, its task's logits (cut from the padded layout to the task's label count).

        Rows are tokenized once, then run in calls of similar lengths (`length_buckets`), each
        call padded only to its own longest row: what a row costs no longer depends on which
        other rows (of any task) share its batch.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        names = self._row_tasks(len(texts), task, tasks)
        encoding = self.encode(texts)
        out: list[np.ndarray] = [np.empty(0)] * len(texts)
        for rows in length_buckets(encoding["attention_mask"].sum(axis=1).tolist()):
            columns = encoding["attention_mask"][rows].any(axis=0)  # drop the columns that are padding in every row of this call
            sub = {k: v[rows][:, columns] for k, v in encoding.items()}
            for i, row in zip(rows, self._run(sub, [names[i] for i in rows])):
                out[i] = row
        return out

    def _run(self, encoding: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """One padded batch through the graph(s) its tasks need: the task-id graph, or the adapter graph per added task."""
        if self.kind == "export":
            session = self._tasks_graph()  # model.onnx, opened at load
            return list(session.run(["logits"], onnx_feeds(session, encoding))[0].astype(np.float32))
        out: list[np.ndarray | None] = [None] * len(names)
        use_graph = [self.form != "adapter" and t in self.baked for t in names]
        if self.form == "tasks" and not all(use_graph):
            missing = sorted({t for t, g in zip(names, use_graph) if not g})
            raise MetaTTError(f"task(s) {', '.join(missing)} were added after model_tasks.onnx was exported; use form 'auto' or 'adapter'")
        rows = [i for i, g in enumerate(use_graph) if g]
        if rows:
            session = self._tasks_graph()
            sub = {k: v[rows] for k, v in encoding.items()}
            feeds = onnx_feeds(session, sub, leave_out=[TASK_IDS])
            feeds[TASK_IDS] = np.asarray([self.baked.index(names[i]) for i in rows], dtype=np.int64)
            logits = session.run(["logits"], feeds)[0]
            for j, i in enumerate(rows):
                out[i] = logits[j, : self.records[names[i]]["num_labels"]]
        for name in dict.fromkeys(n for n, g in zip(names, use_graph) if not g):
            rows = [i for i, n in enumerate(names) if n == name and not use_graph[i]]
            session = self._adapter_graph()
            options = self._run_options(name)
            logits = session.run(["logits"], onnx_feeds(session, {k: v[rows] for k, v in encoding.items()}), options)[0]
            if logits.shape[-1] != self.records[name]["num_labels"]:
                raise MetaTTError(
                    f"task '{name}' produced {logits.shape[-1]} logits for {self.records[name]['num_labels']} labels; re-write the task"
                )
            for j, i in enumerate(rows):
                out[i] = logits[j]
        return out  # type: ignore[return-value]

    def predict(
        self, texts: Sequence[Text], task: str | int | None = None, tasks: Sequence[str | int] | None = None, batch_size: int = 32
    ) -> list[dict]:
        """Per row: task, label, label_id, score (its probability) and the scores of every label."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        names = self._row_tasks(len(texts), task, tasks)
        for i, (text, name) in enumerate(zip(texts, names)):
            reason = self.refusal(text, name)
            if reason is not None:
                raise MetaTTError(f"input {i + 1}: {reason}")
        results: list[dict] = []
        for start in range(0, len(texts), batch_size):
            chunk = names[start : start + batch_size]
            logits = self.logits(texts[start : start + batch_size], tasks=chunk)
            results.extend(scored(name, row, self.records[name]["labels"]) for name, row in zip(chunk, logits))
        return results

    # ------------------------------------------------------------ tasks added or removed while serving

    def add_task(self, name: str) -> dict:
        """Serve the bundle's ``tasks/NAME.json`` from now on (written after this Runtime opened); returns its record.

        The record must carry this bundle's id and its files their recorded sha256; a task run by
        the adapter graph has its .onnx_adapter loaded and checked here, so a foreign or broken
        file fails now and the first request pays nothing. The task appears in one assignment:
        a concurrent `logits` call sees the old task set or the new one, never half of it.
        """
        return self.table.add(name, self._check_added)

    def _check_added(self, name: str, rec: dict) -> None:
        """Before an added task is published: the graph that will run it exists and its adapter loads."""
        if self.form == "tasks" and name not in self.baked:
            raise MetaTTError(f"task '{name}' was added after model_tasks.onnx was exported; serve with form 'auto' or 'adapter'")
        if self.form == "adapter" or name not in self.baked:
            self._adapter_graph()
            self._run_options(name, rec)

    def remove_task(self, name: str) -> None:
        """Stop serving a task (its files stay in the bundle); callers drain its in-flight rows first."""
        self._adapters.pop(self.table.remove(name), None)


PAIR_SEPARATOR = " ||| "


def read_inputs(
    texts: Sequence[str] | None, path: str | Path | None, task: str | None, stdin: TextIO | None = None
) -> tuple[list, list[str], list]:
    """Inputs of `metatt-deploy predict`: (texts or pairs, task per row, id per row or None).

    From ``texts`` (``--text`` values), a file ``path`` (``-`` or ``stdin``: standard input).
    A text is a sentence, or a pair written ``first ||| second``. A file is JSON Lines when its
    name ends in .jsonl/.json or its first non-blank line starts with ``{``: one object per line
    with ``text`` (+ ``text_pair``) or a task's own columns (premise/hypothesis,
    sentence1/sentence2, question/sentence, sentence), an optional ``task`` (else ``task``) and
    an optional ``id`` echoed in the output. Any other file holds one text per line.
    """
    from_stream = path is not None and str(path) == "-"
    if sum(map(bool, (texts, path, stdin))) != 1:
        raise MetaTTError("give inputs with --text (repeatable), --input FILE, or on standard input (one of them)")
    if texts:
        if not task:
            raise MetaTTError("pass --task NAME for --text inputs (the export serves several tasks)")
        for t in texts:
            if not _encodable(t):
                raise MetaTTError(f"--text {t.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8 text; pass UTF-8 text")
        return [_text_or_pair(t) for t in texts], [task] * len(texts), [None] * len(texts)
    if stdin is not None or from_stream:
        name, lines = "standard input", (stdin or sys.stdin).read().splitlines()
        jsonl = False
    else:
        path = Path(path)  # type: ignore[arg-type]
        if not path.is_file():
            raise MetaTTError(f"input file not found: {path}; check the path")
        check_utf8(path, "input file")
        name, lines = path.name, path.read_text(encoding="utf-8").splitlines()
        jsonl = path.suffix.lower() in (".jsonl", ".json")
    first = next((line for line in lines if line.strip()), "")
    if jsonl or first.lstrip().startswith("{"):
        return _read_jsonl(lines, name, task)
    rows = [_text_or_pair(line) for line in lines if line.strip()]
    if not rows:
        raise MetaTTError(f"{name} has no inputs; write one text per line, or one JSON object per line")
    if not task:
        raise MetaTTError(f"pass --task NAME for the texts of {name} (the export serves several tasks)")
    return rows, [task] * len(rows), [None] * len(rows)


def _text_or_pair(text: str) -> Text:
    first, sep, second = text.partition(PAIR_SEPARATOR)
    return (first, second) if sep else text


def _read_jsonl(lines: list[str], name: str, task: str | None) -> tuple[list, list[str], list]:
    rows: list = []
    tasks: list[str] = []
    ids: list = []
    candidates = (("text", "text_pair"), *TEXT_COLUMN_CANDIDATES)
    for n, obj in jsonl_objects(lines, name):
        columns = next((c for c in candidates if all(isinstance(obj.get(k), str) for k in c)), None)
        if columns is None:
            raise MetaTTError(
                f"line {n} of {name} has no text field (text, text_pair, premise/hypothesis, sentence1/sentence2, sentence); add one"
            )
        rows.append(obj[columns[0]] if len(columns) == 1 else (obj[columns[0]], obj[columns[1]]))
        row_task = obj.get("task", task)
        if not row_task:
            raise MetaTTError(f'line {n} of {name} names no task; add "task" to the line or pass --task')
        tasks.append(row_task)
        ids.append(obj.get("id"))
    if not rows:
        raise MetaTTError(f"{name} has no inputs; write one JSON object per line")
    return rows, tasks, ids


def _encodable(text: str) -> bool:
    """Whether ``text`` is proper Unicode (command-line bytes that are not UTF-8 arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
