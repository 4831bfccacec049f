"""metatt_deploy.adapters.layer: factored updates against dense references built with tt_full."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.layer import MetaTT, MetaTTLayer
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import core_shapes, tt_full

D_IN, L, M, D_OUT, T, H, DH = 6, 3, 4, 10, 3, 2, 5


def make_config(mode_names: list[str], mode_sizes: list[int], ranks: list[int], alpha: float = 1.5) -> MetaTTConfig:
    method = "metatt-5d" if mode_names[-1] == "head_dim" else "metatt-4d"
    tasks = [f"t{i}" for i in range(mode_sizes[mode_names.index("task")])] if "task" in mode_names else ["default"]
    return MetaTTConfig(
        method=method,
        mode_names=mode_names,
        mode_sizes=mode_sizes,
        ranks=ranks,
        alpha=alpha,
        init="-".join(["ze"] + ["id"] * (len(mode_sizes) - 1)),
        targets=["q", "k", "v", "o"][: mode_sizes[2]],
        layers=list(range(mode_sizes[1])),
        modules=[],
        tasks=tasks,
        label_names={tasks[0]: ["a", "b"]},
        head_modules=["classifier"],
        base_model="",
        base_fingerprint="",
        model_type="bert",
    )


def random_adapter(config: MetaTTConfig, seed: int = 0) -> MetaTT:
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(s, generator=g) for s in config.core_shapes()]
    return MetaTT(config, cores)


def full_tensor(adapter: MetaTT) -> torch.Tensor:
    return tt_full([c.detach() for c in adapter.cores])


def x_batch(d_in: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(seed))


CLOSE = dict(rtol=1e-5, atol=1e-5)


def test_4d_delta_matches_dense_slices() -> None:
    ad = random_adapter(make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 2, 4]))
    full = full_tensor(ad)
    x = x_batch(D_IN)
    with torch.no_grad():
        for layer in range(L):
            for m in range(M):
                dense = full[:, layer, m, :]
                torch.testing.assert_close(ad.delta(x, layer, [(m, 0, D_OUT)]), 1.5 * x @ dense, **CLOSE)
                torch.testing.assert_close(ad.dense_delta(layer, m, D_IN, D_OUT), 1.5 * dense, **CLOSE)


def test_5d_delta_matches_dense_slices() -> None:
    ad = random_adapter(make_config(["in", "layer", "matrix", "head", "head_dim"], [D_IN, L, M, H, DH], [3, 4, 2, 3]))
    full = full_tensor(ad)
    assert full.shape == (D_IN, L, M, H, DH)
    x = x_batch(D_IN)
    with torch.no_grad():
        for layer in range(L):
            for m in range(M):
                dense = full[:, layer, m, :, :].reshape(D_IN, H * DH)  # output unit = head * DH + d
                torch.testing.assert_close(ad.delta(x, layer, [(m, 0, H * DH)]), 1.5 * x @ dense, **CLOSE)
                torch.testing.assert_close(ad.dense_delta(layer, m, D_IN, H * DH), 1.5 * dense, **CLOSE)
        # grouped-query attention: a narrower k/v uses the leading heads
        torch.testing.assert_close(ad.delta(x, 1, [(2, 0, DH)]), 1.5 * x @ full[:, 1, 2, 0, :], **CLOSE)


def test_4plus1d_per_row_tasks() -> None:
    ad = random_adapter(make_config(["in", "layer", "matrix", "task", "out"], [D_IN, L, M, T, D_OUT], [3, 2, 4, 3]))
    full = full_tensor(ad)
    x = x_batch(D_IN)
    task_ids = torch.tensor([2, 0, 1, 2])  # a batch that mixes tasks
    with torch.no_grad():
        with ad.routed(task_ids):
            out = ad.delta(x, 1, [(3, 0, D_OUT)])
        for row, t in enumerate(task_ids.tolist()):
            torch.testing.assert_close(out[row], 1.5 * x[row] @ full[:, 1, 3, t, :], **CLOSE)
        for t in range(T):
            with ad.routed(t):
                torch.testing.assert_close(ad.delta(x, 2, [(0, 0, D_OUT)]), 1.5 * x @ full[:, 2, 0, t, :], **CLOSE)
            torch.testing.assert_close(ad.dense_delta(2, 0, D_IN, D_OUT, task=t), 1.5 * full[:, 2, 0, t, :], **CLOSE)
        with pytest.raises(MetaTTError, match="several tasks"):
            ad.delta(x, 0, [(0, 0, D_OUT)])


@pytest.mark.parametrize("shape", [(4, D_IN), (4, 5, D_IN), (4, 2, 5, D_IN)])
def test_per_row_tasks_for_any_input_rank(shape) -> None:
    """A pooled (batch, d) input and extra middle dimensions route rows like (batch, seq, d) does."""
    ad = random_adapter(make_config(["in", "layer", "matrix", "task", "out"], [D_IN, L, M, T, D_OUT], [3, 2, 4, 3]))
    full = full_tensor(ad)
    x = torch.randn(*shape)
    task_ids = torch.tensor([1, 2, 0, 1])
    with torch.no_grad(), ad.routed(task_ids):
        out = ad.delta(x, 0, [(2, 0, D_OUT)])
    assert out.shape == (*shape[:-1], D_OUT)
    for row, t in enumerate(task_ids.tolist()):
        torch.testing.assert_close(out[row], 1.5 * x[row] @ full[:, 0, 2, t, :], **CLOSE)


def test_leading_block_for_non_square_targets() -> None:
    ad = random_adapter(make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3]))
    full = full_tensor(ad)
    with torch.no_grad():
        # "down": narrower input, full output; "k" of GQA: full input, narrower output
        for d_in, d_out in [(4, D_OUT), (D_IN, 7), (2, 3)]:
            x = x_batch(d_in)
            dense = full[:d_in, 0, 1, :d_out]
            torch.testing.assert_close(ad.delta(x, 0, [(1, 0, d_out)]), 1.5 * x @ dense, **CLOSE)
            torch.testing.assert_close(ad.dense_delta(0, 1, d_in, d_out), 1.5 * dense, **CLOSE)


def test_fused_segments_any_order_and_gaps() -> None:
    ad = random_adapter(make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3]))
    full = full_tensor(ad)
    x = x_batch(D_IN)
    w = 4
    with torch.no_grad():
        qkv = torch.cat([1.5 * x @ full[:, 1, m, :w] for m in range(3)], dim=-1)
        torch.testing.assert_close(ad.delta(x, 1, [(0, 0, w), (1, w, 2 * w), (2, 2 * w, 3 * w)]), qkv, **CLOSE)
        # targets listed as v,q,k: matrix 0 owns the last third
        vqk = torch.cat([1.5 * x @ full[:, 1, m, :w] for m in (1, 2, 0)], dim=-1)
        torch.testing.assert_close(ad.delta(x, 1, [(0, 2 * w, 3 * w), (1, 0, w), (2, w, 2 * w)]), vqk, **CLOSE)
        # only q and v targeted: k's units (and any units after v) stay zero
        out = ad.delta(x, 1, [(0, 0, w), (1, 2 * w, 3 * w)], out_features=3 * w + 2)
        assert out.shape == (4, 3, 3 * w + 2)
        torch.testing.assert_close(out[..., :w], 1.5 * x @ full[:, 1, 0, :w], **CLOSE)
        assert torch.count_nonzero(out[..., w : 2 * w]) == 0 and torch.count_nonzero(out[..., 3 * w :]) == 0
        torch.testing.assert_close(out[..., 2 * w : 3 * w], 1.5 * x @ full[:, 1, 1, :w], **CLOSE)


def test_alpha_is_a_plain_scale() -> None:
    cfg = make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3], alpha=1.0)
    a1 = random_adapter(cfg)
    cfg2 = make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3], alpha=4.0)
    a4 = random_adapter(cfg2)
    x = x_batch(D_IN)
    with torch.no_grad():
        torch.testing.assert_close(a4.delta(x, 0, [(0, 0, D_OUT)]), 4 * a1.delta(x, 0, [(0, 0, D_OUT)]))


def test_default_init_and_seeded_construction() -> None:
    cfg = make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3])
    ad = MetaTT(cfg)
    assert torch.count_nonzero(ad.delta(x_batch(D_IN), 0, [(0, 0, D_OUT)])) == 0
    assert [tuple(c.shape) for c in ad.cores] == core_shapes(cfg.mode_sizes, cfg.ranks)
    cfg_no = dataclasses.replace(make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3]), init="no-no-no-no")
    assert torch.equal(MetaTT(cfg_no, seed=5).cores[2], MetaTT(cfg_no, seed=5).cores[2])


def test_set_cores_updates_ranks_and_gradients_reach_cores() -> None:
    cfg = make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3])
    ad = random_adapter(cfg)
    ad.set_cores([torch.randn(s) for s in core_shapes(cfg.mode_sizes, [2, 4, 1])])
    assert ad.config.ranks == [2, 4, 1] and cfg.ranks == [3, 3, 3]  # read off the cores; the given config is immutable
    ad.delta(x_batch(D_IN), 1, [(2, 0, D_OUT)]).sum().backward()
    assert all(c.grad is not None for c in ad.cores)
    # only the slices of layer 1 / matrix 2 get gradient
    assert torch.count_nonzero(ad.cores[1].grad[:, 0]) == 0 and torch.count_nonzero(ad.cores[1].grad[:, 1]) > 0
    assert torch.count_nonzero(ad.cores[2].grad[:, 0]) == 0 and torch.count_nonzero(ad.cores[2].grad[:, 2]) > 0


def test_layer_wraps_linear() -> None:
    cfg = make_config(["in", "layer", "matrix", "out"], [D_IN, L, M, D_OUT], [3, 3, 3])
    ad = random_adapter(cfg)
    base = nn.Linear(D_IN, 7)
    layer = MetaTTLayer(base, 2, [(1, 0, 7)], ad)
    x = x_batch(D_IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ ad.dense_delta(2, 1, D_IN, 7), **CLOSE)
    assert "adapter" not in dict(layer.named_children())  # shared, registered once on the model
