"""Text generation in numpy over an ONNX Runtime decoder graph with a KV cache.

The graphs are optimum's ``text-generation-with-past`` exports: ``input_ids``, ``attention_mask``,
(usually) ``position_ids`` and ``past_key_values.{i}.key/value`` (batch, kv_heads, past, head_dim)
in; ``logits`` and ``present.{i}.key/value`` out. The prompt runs once with an empty cache
(prefill), then every step feeds one new token per row with the cache of the step before. The
factored bundle's graphs run the same way: ``model_tasks.onnx`` takes ``task_ids`` (one per row,
passed in ``extra_feeds``), ``model_adapter.onnx`` its task through the caller's RunOptions.

Rows of one batch may differ in length: they are left-padded (mask 0 on the pads) and positions
count only real tokens, as transformers counts them, so each row decodes as it would alone. That
is what a continuous-batching server needs; `generate` decodes one sequence.

Sampling follows transformers' order (temperature, top-k, top-p) on float64 probabilities, drawn
from a generator seeded per request, so a seeded request repeats exactly whatever else runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import read_json
from metatt_deploy.inference.text import TextStream, TextTokenizer

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: real tokens count from 0, pads get 1 (transformers' ``generate``)."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


class DecoderGraph:
    """One ONNX Runtime session of a decoder with a KV cache, run one step at a time in numpy.

    The cache layout comes from the graph's own past inputs (names, dtype, kv heads, head size);
    where the graph leaves a size symbolic, ``config`` (the folder's config.json) supplies it.
    """

    def __init__(self, session: ort.InferenceSession, config: dict | None = None):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        if INPUT_IDS not in inputs or not any(n.startswith(PAST_PREFIX) for n in inputs):
            raise MetaTTError("this ONNX graph takes no input_ids and past_key_values; generation needs a decoder exported with a KV cache")
        self.past_names = sorted((n for n in inputs if n.startswith(PAST_PREFIX)), key=_layer_order)
        self.output_names = [LOGITS] + [PRESENT_PREFIX + n.removeprefix(PAST_PREFIX) for n in self.past_names]
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise MetaTTError(f"this decoder graph lacks the outputs {', '.join(missing[:3])}; re-export it (text-generation-with-past)")
        first = inputs[self.past_names[0]]
        self.past_dtype = ORT_FLOAT_TYPES.get(first.type)
        if self.past_dtype is None:
            raise MetaTTError(f"past key/values of type {first.type} are not supported; export the decoder as fp32 or fp16")
        self.kv_heads, self.head_dim = _cache_sizes(first.shape, config or {})
        self.has_positions = POSITION_IDS in inputs

    @classmethod
    def open(cls, folder: str | Path, file_name: str = "model.onnx", threads: int | None = None, providers: list[str] | None = None):
        """A session of ``folder/file_name`` (CPU unless told), with ``threads`` intra-op threads and config.json's sizes."""
        folder = Path(folder)
        path = folder / file_name
        if not path.is_file():
            raise MetaTTError(f"{path} not found; pass a decoder export folder (metatt-deploy export)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        config_path = folder / "config.json"
        return cls(session, read_json(config_path, "model config") if config_path.is_file() else None)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The cache before the first token: every past tensor with length 0."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.past_dtype) for name in self.past_names}

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: dict[str, np.ndarray],
        position_ids: np.ndarray | None = None,
        extra_feeds: dict[str, np.ndarray] | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``input_ids`` (batch, new) after ``past``; returns (float32 logits (batch, new, vocab), the cache to pass next).

        ``attention_mask`` covers the past and the new tokens (batch, past + new); the positions
        default to those the mask gives the new tokens.
        """
        feeds: dict[str, Any] = {
            INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
            ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64),
        }
        if self.has_positions:
            if position_ids is None:
                position_ids = positions(feeds[ATTENTION_MASK])[:, -feeds[INPUT_IDS].shape[1] :]
            feeds[POSITION_IDS] = np.asarray(position_ids, dtype=np.int64)
        feeds.update(past)
        if extra_feeds:
            feeds.update(extra_feeds)
        out = self.session.run(self.output_names, feeds, run_options)
        logits = out[0] if out[0].dtype == np.float32 else out[0].astype(np.float32)
        present = {name: value for name, value in zip(self.past_names, out[1:])}
        return logits, present


def _layer_order(name: str) -> tuple[int, str]:
    """past_key_values.10.key sorts after past_key_values.9.value (numeric layer, then key before value)."""
    layer, _, kind = name.removeprefix(PAST_PREFIX).partition(".")
    return (int(layer) if layer.isdigit() else -1, kind)


def _cache_sizes(shape: Sequence[Any], config: dict) -> tuple[int, int]:
    """(kv heads, head size) from a past input's shape (batch, kv_heads, past, head_dim), else from config.json."""
    heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None
    size = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else None
    attention_heads = config.get("num_attention_heads") or config.get("n_head")
    if heads is None:
        heads = config.get("num_key_value_heads") or attention_heads
    if size is None:
        hidden = config.get("hidden_size") or config.get("n_embd")
        size = config.get("head_dim") or (hidden // attention_heads if hidden and attention_heads else None)
    if not heads or not size:
        raise MetaTTError("cannot tell the KV cache's heads and head size from the graph or config.json; keep config.json beside the graph")
    return int(heads), int(size)


class KVBatch:
    """Rows of a left-padded batch and their KV cache, which rows can join and leave between steps.

    A continuous-batching server keeps one per graph: every step feeds each row's next token(s)
    in one call, the graph returns the cache one column longer, and nothing is copied on the
    steps where the rows stay the same. Rows join by padding the shorter cache on the left
    (mask 0: a row decodes as it would alone, see `positions`) and leave by taking the other
    rows, after which columns that are padding in every row are cut off.
    """

    def __init__(self, graph: DecoderGraph, rows: int = 0):
        self.graph = graph
        self.past = graph.empty_past(rows)
        self.mask = np.zeros((rows, 0), dtype=np.int64)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def forward(
        self,
        input_ids: np.ndarray,
        new_mask: np.ndarray | None = None,
        extra_feeds: dict[str, np.ndarray] | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> np.ndarray:
        """Run ``input_ids`` (rows, new) after the cache (``new_mask``: 0 on left pads of a prompt); returns logits, keeps the cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if new_mask is None:
            new_mask = np.ones_like(input_ids)
        mask = np.concatenate([self.mask, np.asarray(new_mask, dtype=np.int64)], axis=1)
        logits, self.past = self.graph.forward(input_ids, mask, self.past, extra_feeds=extra_feeds, run_options=run_options)
        self.mask = mask
        return logits

    def take(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), and drop the columns that are then padding in every row."""
        index = np.asarray(rows, dtype=np.int64)
        mask = self.mask[index]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]
        self.mask = mask[:, start:]
        self.past = {name: value[index, :, start:] for name, value in self.past.items()}

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after these, the shorter cache padded on the left."""
        length = max(self.length, other.length)
        self.past = {name: np.concatenate([_pad_left(self.past[name], length), _pad_left(other.past[name], length)]) for name in self.past}
        self.mask = np.concatenate([_pad_left(self.mask, length), _pad_left(other.mask, length)])


def _pad_left(value: np.ndarray, length: int) -> np.ndarray:
    """``value`` with zeros before its sequence axis (the last of a mask, the third of a cache) up to ``length``."""
    axis = 1 if value.ndim == 2 else 2
    missing = length - value.shape[axis]
    if missing <= 0:
        return value
    widths = [(0, 0)] * value.ndim
    widths[axis] = (missing, 0)
    return np.pad(value, widths)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy at temperature 0, else temperature, top-k (0 = off), top-p; ends at ``max_tokens``,
    an EOS or stop token id, or a ``stop`` string (which is not returned)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MetaTTError(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise MetaTTError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise MetaTTError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise MetaTTError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MetaTTError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax when greedy, else drawn after temperature, top-k and top-p."""
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, params.top_p)) + 1  # the smallest head whose mass reaches top_p
        kept = np.zeros_like(probs)
        kept[order[:keep]] = probs[order[:keep]]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass(frozen=True)
class Step:
    """One event of `generate`: a new token and the text it adds, or (``finish_reason`` set) the end.

    The final event has no token; its text is whatever was held back. The texts of all events
    join to the answer, without the EOS token and without the stop string.
    """

    token_id: int | None
    text: str = ""
    finish_reason: str | None = None


class StopText:
    """The answer's text as tokens arrive, cut before the first stop string.

    A piece that might be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to hand out, whether a stop string was found)."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Decoding:
    """One sequence's choices after its logits: the sampler (its own seeded generator), EOS and stop ids, stop strings, the text stream.

    `generate` runs one; a continuous-batching server runs one per request over rows of a shared
    batch, so a request's tokens depend only on its own logits and seed, never on its neighbours.
    """

    def __init__(self, params: SamplingParams, eos_ids: Sequence[int] = (), tokenizer: TextTokenizer | None = None):
        if params.stop and tokenizer is None:
            raise MetaTTError("stop strings need the tokenizer (to match them on the text); pass one")
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.ends = {int(t) for t in eos_ids} | set(params.stop_token_ids)
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.stops = StopText(params.stop)
        self.count = 0
        self.last: int | None = None  # the token the next step feeds
        self.finish_reason: str | None = None

    def advance(self, logits: np.ndarray) -> list[Step]:
        """The events one row of next-token logits makes: a token, and (once it ends) the final event with its reason."""
        token = pick(logits, self.params, self.rng)
        if token in self.ends:
            return self._end(_tail(self.stream, self.stops)[0], FINISH_STOP)
        self.count += 1
        self.last = token
        text = self.stream.push(token) if self.stream is not None else ""
        text, stopped = self.stops.push(text)
        if stopped:
            return [Step(token, text), *self._end("", FINISH_STOP)]
        if self.count == self.params.max_tokens:
            tail, stopped = _tail(self.stream, self.stops)
            return [Step(token, text), *self._end(tail, FINISH_STOP if stopped else FINISH_LENGTH)]
        return [Step(token, text)]

    def _end(self, text: str, reason: str) -> list[Step]:
        self.finish_reason = reason
        return [Step(None, text, reason)]


def generate(
    graph: DecoderGraph,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_ids: Sequence[int] = (),
    tokenizer: TextTokenizer | None = None,
    extra_feeds: dict[str, np.ndarray] | None = None,
    run_options: ort.RunOptions | None = None,
) -> Iterator[Step]:
    """Continue ``prompt_ids``, one `Step` per new token, then a final `Step` with its ``finish_reason``.

    "stop" when an EOS / stop token id (neither is yielded) or a stop string ends it, "length" at
    ``params.max_tokens``. With ``tokenizer`` every step carries its text (pieces held back while
    incomplete), and stop strings are matched on that text; without one, steps carry ids only.
    """
    if not len(prompt_ids):
        raise MetaTTError("the prompt has no tokens; pass some text")
    decoding = Decoding(params, eos_ids, tokenizer)
    ids = np.asarray([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    logits, past = graph.forward(ids, mask, graph.empty_past(1), extra_feeds=extra_feeds, run_options=run_options)
    while True:
        yield from decoding.advance(logits[0, -1])
        if decoding.finish_reason is not None:
            return
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        token = np.array([[decoding.last]], dtype=np.int64)
        logits, past = graph.forward(token, mask, past, extra_feeds=extra_feeds, run_options=run_options)


def _tail(stream: TextStream | None, stops: StopText) -> tuple[str, bool]:
    """(the text held back at the end, whether it completes a stop string): the streamer's rest, cut at the stop."""
    if stream is None:
        return stops.finish(), False
    text, stopped = stops.push(stream.finish())
    return (text, True) if stopped else (text + stops.finish(), False)


def until_eos(tokens: Sequence[int], eos_ids: int | Sequence[int]) -> list[int]:
    """``tokens`` before the first EOS: optimum's and GenAI's loops yield the EOS (and pads after it), this loop stops before it."""
    ends = {int(eos_ids)} if isinstance(eos_ids, int) else {int(t) for t in eos_ids}
    return next((list(tokens[:k]) for k, t in enumerate(tokens) if t in ends), list(tokens))


def generation_eos_ids(folder: str | Path) -> list[int]:
    """The EOS ids generation stops at: generation_config.json's ``eos_token_id`` (an id or a list), else config.json's."""
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            data = read_json(path, name)
            value = data.get("eos_token_id") if isinstance(data, dict) else None
            if value is not None:
                ids = value if isinstance(value, list) else [value]
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
                    raise MetaTTError(f"{path}: eos_token_id {str(value)[:60]} is not a token id or a list of them; re-save the model")
                return list(ids)
    return []
