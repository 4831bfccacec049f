"""The MetaTT adapter: one tensor train whose slices give every adapted matrix its update.

Modes, in core order (see docs/adapter-format.md):
- 4D:      in, layer, matrix, out
- 5D:      in, layer, matrix, head, head_dim
- (4+1)D:  in, layer, matrix, task, out     (the task core sits after the matrix core)

For the linear layer ``(layer l, matrix m)`` the update is factored as
``x -> x @ A -> @ C[l, m] (-> @ G_task[:, t, :]) -> @ B`` with ``A`` the first core as a matrix,
``C[l, m]`` the product of the layer and matrix slices (r x r) and ``B`` the output factor:
the last core for 4D, or the head and head_dim cores contracted into one ``(r, H * D_h)``
matrix for 5D (kilobytes; never the dense update). Training therefore costs
``(D_in + D_out) r + r^2`` per token, like LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import chain, init_cores, tt_ranks


class MetaTT(nn.Module):
    """Holds the cores (trainable) and computes updates for any (layer, matrix, task)."""

    def __init__(self, config: MetaTTConfig, cores: Sequence[torch.Tensor] | None = None, seed: int = 0):
        super().__init__()
        self._config = config
        if cores is None:
            cores = init_cores(config.init, config.core_shapes(), seed=seed)
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone().float()) for c in cores])
        self.alpha = float(config.alpha)
        names = config.mode_names
        self._layer, self._matrix = names.index("layer"), names.index("matrix")
        self.task_mode = names.index("task") if "task" in names else None
        # Which task each row of a forward uses: None (single task), an int, or a LongTensor of
        # shape (batch,). Set only inside `routed` (or adapters.multitask.routed for a model).
        self.task_ids: int | torch.Tensor | None = None
        # Export only (`precomputed_updates`): every (layer, matrix) update factor of the forward
        # at hand, computed once by its first adapted layer instead of once per layer.
        self.precompute = False
        self._updates: torch.Tensor | None = None
        # Export only (export/factored_lm.py): the task slice as a parameter of its own, multiplied
        # in directly, so the ONNX graph can take it as an input (an .onnx_adapter) or gather it per row.
        self.slice_input: nn.Parameter | None = None

    @property
    def config(self) -> MetaTTConfig:
        """The adapter's configuration, its ranks read off the cores (a sweep may have changed them)."""
        ranks = tt_ranks(self.cores)
        if ranks != self._config.ranks:
            self._config = replace(self._config, ranks=ranks)
        return self._config

    def set_cores(self, cores: Sequence[torch.Tensor], config: MetaTTConfig | None = None) -> None:
        """Replace the cores (after a rank-changing sweep; with ``config``, after the task mode grew or shrank)."""
        device = self.cores[0].device
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone().float().to(device)) for c in cores])
        if config is not None:
            self._config = config

    @contextmanager
    def routed(self, task_ids: int | torch.Tensor | None) -> Iterator[None]:
        """Use task ``task_ids`` (one id, or a LongTensor with one id per row) inside the block;
        the previous routing comes back on exit, exceptions included."""
        previous, self.task_ids, self._updates = self.task_ids, task_ids, None
        try:
            yield
        finally:
            self.task_ids, self._updates = previous, None

    def all_updates(self) -> torch.Tensor:
        """alpha * C[l, m] (@ G_task[:, t, :]) @ B for every (l, m): (L * M, r_1, D_out), or (batch, L * M, r_1, D_out) per row.

        The factored ONNX graph computes these once per call (a few batched MatMuls on r x r
        matrices) so that each adapted layer adds only ``(x @ A) @ U[l, m]`` and a sum; computed
        per layer instead, the small products cost more than the adapter's arithmetic
        (docs/reports/multitask-bench.md).
        """
        g_layer = self.cores[self._layer].permute(1, 0, 2).unsqueeze(1)  # (L, 1, r1, r2)
        g_matrix = self.cores[self._matrix].permute(1, 0, 2).unsqueeze(0)  # (1, M, r2, r3)
        c = g_layer @ g_matrix
        c = c.reshape(-1, c.shape[-2], c.shape[-1])  # (L * M, r1, r3), row l * M + m
        if self.task_mode is not None:
            t = self._task_slices()
            c = c @ t if t.dim() == 2 else c.unsqueeze(0) @ t.unsqueeze(1)
        return self.alpha * (c @ self.output_factor())

    def input_factor(self) -> torch.Tensor:
        """A: the first core as a (D_in, r_1) matrix."""
        return self.cores[0][0]

    def output_factor(self) -> torch.Tensor:
        """B: the cores after the index cores as one (r, D_out) matrix."""
        if self._config.mode_names[-1] == "out":
            return self.cores[-1][..., 0]
        head, head_dim = self.cores[-2], self.cores[-1]
        b = torch.einsum("ahb,bd->ahd", head, head_dim[..., 0])
        return b.reshape(head.shape[0], -1)

    def core_matrix(self, layer: int, matrix: int) -> torch.Tensor:
        """C[l, m] = G_layer[:, l, :] @ G_matrix[:, m, :], of shape (r_1, r_3)."""
        return chain([self.cores[self._layer][:, layer, :], self.cores[self._matrix][:, matrix, :]])

    def _task_slices(self) -> torch.Tensor:
        """The task core's slice for the active task(s): (r, r') or (batch, r, r')."""
        assert self.task_mode is not None, "a task slice of an adapter without a task mode"
        if self.slice_input is not None:
            return self.slice_input
        core = self.cores[self.task_mode]
        if self.task_ids is None:
            if self._config.mode_size("task") == 1:
                return core[:, 0, :]
            raise MetaTTError("this adapter serves several tasks: choose one (task=... / task_ids) before running it")
        if isinstance(self.task_ids, int):
            return core[:, self.task_ids, :]
        return core.index_select(1, self.task_ids).permute(1, 0, 2)

    def delta(self, x: torch.Tensor, layer: int, segments: Sequence[tuple[int, int, int]], out_features: int | None = None) -> torch.Tensor:
        """alpha * x @ dW[l, m] for each segment, placed at its output units (no dense dW).

        Segments are laid out by their start unit (not their matrix index); output units no
        segment owns (e.g. k of GPT-2's fused c_attn when only q,v are targeted) get zeros, up
        to ``out_features`` when given.
        """
        a, b = self.input_factor(), self.output_factor()
        if self.precompute and len(segments) == 1 and segments[0][1] == 0 and segments[0][2] == b.shape[1] == out_features:
            if self._updates is None:
                self._updates = self.all_updates()
            z = x @ (a if x.shape[-1] == a.shape[0] else a[: x.shape[-1]])
            u = self._updates.select(-3, layer * self._config.mode_size("matrix") + segments[0][0])
            return z @ u if u.dim() == 2 else _per_row_matmul(z, u)
        # slice only when a projection is narrower than the mode (leading-block scheme): unsliced,
        # the q, k, v products x @ A of a layer are one node that ONNX Runtime computes once
        z = x @ (a if x.shape[-1] == a.shape[0] else a[: x.shape[-1]])
        outs, pos = [], 0
        for m, start, end in sorted(segments, key=lambda s: s[1]):
            zm = z @ self.core_matrix(layer, m)
            if self.task_mode is not None:
                t = self._task_slices()
                zm = zm @ t if t.dim() == 2 else _per_row_matmul(zm, t)
            if start > pos:
                outs.append(zm.new_zeros(*zm.shape[:-1], start - pos))
            outs.append(zm @ (b if end - start == b.shape[1] else b[:, : end - start]))
            pos = end
        if out_features is not None and out_features > pos:
            outs.append(outs[-1].new_zeros(*outs[-1].shape[:-1], out_features - pos))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return self.alpha * out

    def dense_delta(self, layer: int, matrix: int, d_in: int, d_out: int, task: int | None = None) -> torch.Tensor:
        """alpha * dW[l, m(, t)] as a (d_in, d_out) matrix: for merging and tests."""
        c = self.core_matrix(layer, matrix)
        if self.task_mode is not None:
            c = c @ self.cores[self.task_mode][:, 0 if task is None else task, :]
        return self.alpha * (self.input_factor()[:d_in] @ c @ self.output_factor()[:, :d_out])


class MetaTTLayer(nn.Module):
    """Wraps a frozen nn.Linear or Conv1D: y = base(x) + alpha * x @ dW."""

    def __init__(self, base_layer: nn.Module, layer: int, segments: Sequence[tuple[int, int, int]], adapter: MetaTT):
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.segments: list[tuple[int, int, int]] = [(int(m), int(s), int(e)) for m, s, e in segments]
        # Not registered as a submodule: the adapter is shared by every wrapped layer and is
        # registered once on the model, so its cores appear once in parameters and exports.
        object.__setattr__(self, "adapter", adapter)

    adapter: MetaTT  # set in __init__ without registering it as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter.delta(x, self.layer, self.segments, y.shape[-1]).to(x.dtype)


def _per_row_matmul(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Row b of ``z`` (batch, ..., r) times its own matrix ``t[b]`` (batch, r, q).

    A batched MatMul rather than an einsum: ONNX Runtime runs Einsum through a generic
    path that costs several times a MatMul per call, and the factored graph has one such
    product per adapted projection (tools/bench_multitask.py measured the difference).
    """
    if z.dim() == 3:
        return z @ t
    return (z.reshape(z.shape[0], -1, z.shape[-1]) @ t).reshape(*z.shape[:-1], t.shape[-1])
