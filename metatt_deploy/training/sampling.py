"""The order of training batches: a pure function of (seed, epoch), so resumed runs repeat it exactly.

One task: its rows in a seeded, length-grouped order (`epoch_order`), cut into batches. Several
tasks: each step draws a task (proportional or temperature sampling) and takes that task's next
batch (`epoch_plan`). The loop replays the plan of an epoch and skips the steps already done.
How much a task's drawn steps count is the other half of the balance: `task_loss_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from metatt_deploy.common.errors import MetaTTError

SAMPLING = ("proportional", "temperature")
DEFAULT_SAMPLING = "proportional"
# T of temperature sampling (p_t ~ n_t^(1/T)); only read when sampling is "temperature".
DEFAULT_TEMPERATURE = 2.0

Plan = list[tuple[int, list[int]]]  # one (task index, row indices) per optimizer step


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 50) -> list[int]:
    """The example order of epoch ``epoch``: a pure function of the seed, for exact resumes.

    Length-grouped like transformers' LengthGroupedSampler: shuffle, sort each window of
    ``group`` batches by length so a batch pads to similar lengths (on CPU, padding is most of
    the cost of short sentences), then shuffle the order of the batches.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


def check_sampling(sampling: str, temperature: float) -> None:
    if sampling not in SAMPLING:
        raise MetaTTError(f"unknown --task-sampling '{sampling}'; use {' or '.join(SAMPLING)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise MetaTTError("--temperature must be positive (1 = proportional, larger flattens towards uniform)")


def task_probabilities(sizes: Sequence[int], sampling: str = DEFAULT_SAMPLING, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """p_t proportional to n_t (proportional) or to n_t ** (1 / T) (temperature; T=1 is proportional)."""
    check_sampling(sampling, temperature)
    n = np.asarray(sizes, dtype=np.float64)
    if (n <= 0).any():
        raise MetaTTError("every task needs training examples; check the train split of each --task")
    w = n if sampling == "proportional" else n ** (1.0 / temperature)
    return w / w.sum()


def parse_task_weights(texts: Sequence[str]) -> dict[str, float]:
    """``--task-weight NAME=W`` values (repeated or comma-separated) as {name: weight}."""
    weights: dict[str, float] = {}
    for text in (t.strip() for item in texts for t in item.split(",")):
        name, sep, value = text.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not (weight > 0 and math.isfinite(weight)):
            raise MetaTTError(f"bad --task-weight '{text}'; write NAME=W with W a positive number, e.g. --task-weight snli=2")
        if name.strip() in weights:
            raise MetaTTError(f"--task-weight names task '{name.strip()}' twice; give each task one weight")
        weights[name.strip()] = weight
    return weights


def task_loss_weights(names: Sequence[str], weights: dict[str, float]) -> list[float] | None:
    """Each task's loss multiplier (1 unless named in ``weights``); None when every weight is 1.

    With proportional sampling a task's expected share of the shared cores' gradient is
    p_t * w_t; the loss weight shifts that share without changing how often a task's rows are
    seen (the sampling probability does that), so the two knobs can be tuned apart.
    """
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise MetaTTError(f"--task-weight names unknown task(s) {', '.join(unknown)}; the run's tasks are {', '.join(names)}")
    scale = [weights.get(n, 1.0) for n in names]
    return None if all(w == 1.0 for w in scale) else scale


def single_task_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> Plan:
    """One task's epoch: `epoch_order` cut into batches (the last one may be short)."""
    order = epoch_order(list(lengths), batch_size, seed, epoch)
    return [(0, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def epoch_plan(lengths: Sequence[Sequence[int]], batch_size: int, probs: Sequence[float], seed: int, epoch: int) -> Plan:
    """The batches of one epoch as (task, row indices): a pure function of (seed, epoch).

    ``lengths[t]`` are the token counts of task t's training rows. With one task this is
    `single_task_plan`. With several, an epoch has sum_t ceil(n_t / batch) steps; each step
    draws a task from ``probs`` and takes the task's next ``batch_size`` rows of its seeded,
    length-grouped order (`epoch_order`; a new order once one is used up, so a task sampled
    more often than its size cycles through it).
    """
    if len(lengths) == 1:
        return single_task_plan(lengths[0], batch_size, seed, epoch)
    rng = np.random.default_rng([seed, epoch])
    steps = sum(math.ceil(len(n) / batch_size) for n in lengths)
    choice = rng.choice(len(lengths), size=steps, p=np.asarray(probs))
    streams: list[list[int]] = [[] for _ in lengths]
    cycles = [0] * len(lengths)
    plan = []
    for t in choice.tolist():
        while len(streams[t]) < batch_size:
            streams[t].extend(epoch_order(list(lengths[t]), batch_size, seed * 7919 + t, epoch * 1000 + cycles[t]))
            cycles[t] += 1
        plan.append((t, streams[t][:batch_size]))
        del streams[t][:batch_size]
    return plan
