"""metatt_deploy.tt.cores: contraction, shapes, rank bounds, initialisation and parameter counts."""

from __future__ import annotations

import string

import pytest
import torch

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import (
    NORMAL_STD,
    chain,
    check_ranks,
    core_shapes,
    init_core,
    init_cores,
    max_ranks,
    parameter_count,
    parse_init,
    tt_full,
    tt_ranks,
)


def einsum_full(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense reference: one explicit einsum over all cores, e.g. 'aib,bjc,ckd->aijkd'."""
    d = len(cores)
    bonds = string.ascii_uppercase[: d + 1]
    modes = string.ascii_lowercase[:d]
    spec = ",".join(f"{bonds[k]}{modes[k]}{bonds[k + 1]}" for k in range(d))
    out = torch.einsum(f"{spec}->{bonds[0]}{modes}{bonds[d]}", *cores)
    return out[0, ..., 0]


@pytest.mark.parametrize("d", [3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_tt_full_matches_einsum(d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 10 + d)
    sizes = torch.randint(1, 5, (d,), generator=g).tolist()
    ranks = torch.randint(1, 4, (d - 1,), generator=g).tolist()
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in core_shapes(sizes, ranks)]
    full = tt_full(cores)
    assert full.shape == tuple(sizes)
    torch.testing.assert_close(full, einsum_full(cores), rtol=1e-12, atol=1e-12)
    # every entry is the product of the slices of consecutive cores
    idx = [s - 1 for s in sizes]
    entry = chain([c[:, i, :] for c, i in zip(cores, idx)])
    assert entry.shape == (1, 1)
    torch.testing.assert_close(full[tuple(idx)], entry[0, 0])
    assert tt_ranks(cores) == ranks


def test_core_shapes_and_bad_rank_count() -> None:
    assert core_shapes([5, 2, 3, 7], [4, 6, 2]) == [(1, 5, 4), (4, 2, 6), (6, 3, 2), (2, 7, 1)]
    with pytest.raises(MetaTTError, match="3 bond ranks"):
        core_shapes([5, 2, 3, 7], [4, 4])


def test_max_ranks() -> None:
    assert max_ranks([3, 4, 5]) == [3, 5]  # min(3, 20), min(12, 5)
    assert max_ranks([384, 6, 4, 384]) == [384, 1536, 384]  # min(384*6, 4*384)
    assert max_ranks([32, 2, 4, 4, 8]) == [32, 64, 32, 8]


def test_check_ranks_names_the_bond() -> None:
    names, sizes = ["in", "layer", "matrix", "head", "head_dim"], [32, 2, 4, 4, 8]
    check_ranks(names, sizes, [8, 8, 8, 8])
    check_ranks(names, sizes, [32, 64, 32, 8])  # exactly at the bounds is fine
    with pytest.raises(MetaTTError, match=r"rank 9 of bond 4 \(between modes 'head' and 'head_dim'\).*between 1 and 8"):
        check_ranks(names, sizes, [8, 8, 8, 9])
    with pytest.raises(MetaTTError, match=r"bond 1 \(between modes 'in' and 'layer'\)"):
        check_ranks(names, sizes, [33, 8, 8, 8])
    with pytest.raises(MetaTTError, match=r"rank 0 of bond 2"):
        check_ranks(names, sizes, [8, 0, 8, 8])


def test_init_ze_and_id() -> None:
    assert torch.count_nonzero(init_core("ze", (3, 5, 4), "middle")) == 0
    mid = init_core("id", (3, 5, 4), "middle")
    assert mid.shape == (3, 5, 4)
    for i in range(5):
        torch.testing.assert_close(mid[:, i, :], torch.eye(3, 4))
    first = init_core("id", (1, 6, 4), "first")
    assert first.shape == (1, 6, 4)
    torch.testing.assert_close(first[0], torch.eye(6, 4))  # rectangular identity, not rank one
    last = init_core("id", (4, 6, 1), "last")
    assert last.shape == (4, 6, 1)
    torch.testing.assert_close(last[..., 0], torch.eye(4, 6))
    assert torch.linalg.matrix_rank(first[0]) == 4 and torch.linalg.matrix_rank(last[..., 0]) == 4


def test_id_chain_is_a_leading_identity() -> None:
    sizes, ranks = [6, 2, 3, 5], [4, 4, 4]
    full = tt_full(init_cores("id-id-id-id", core_shapes(sizes, ranks)))
    expected = torch.zeros(6, 5)
    expected[:4, :4] = torch.eye(4)
    for layer in range(2):
        for m in range(3):
            torch.testing.assert_close(full[:, layer, m, :], expected)


def test_default_init_is_zero_update() -> None:
    full = tt_full(init_cores("ze-id-id-id", core_shapes([6, 2, 3, 5], [3, 3, 3])))
    assert torch.count_nonzero(full) == 0


def test_init_no_seeded_and_reproducible() -> None:
    shapes = core_shapes([512, 3, 4, 512], [16, 16, 16])
    a = init_cores("no-no-no-no", shapes, seed=7)
    b = init_cores("no-no-no-no", shapes, seed=7)
    c = init_cores("no-no-no-no", shapes, seed=8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    sample = torch.cat([x.flatten() for x in a])
    assert abs(sample.std().item() - NORMAL_STD) < 0.01
    assert abs(sample.mean().item()) < 0.01
    assert NORMAL_STD == 0.2


def test_parse_init_errors() -> None:
    assert parse_init("ze-id-no", 3) == ["ze", "id", "no"]
    with pytest.raises(MetaTTError, match="must name 4 cores"):
        parse_init("ze-id-id", 4)
    with pytest.raises(MetaTTError, match="must name 3 cores"):
        parse_init("ze-xx-id", 3)
    with pytest.raises(MetaTTError, match="unknown core initialisation"):
        init_core("he", (1, 2, 1), "first")


@pytest.mark.parametrize("d_in,d_out,layers,matrices,r", [(768, 768, 12, 2, 8), (384, 1536, 6, 6, 5), (32, 48, 2, 4, 3)])
def test_parameter_count_4d_formula(d_in, d_out, layers, matrices, r) -> None:
    got = parameter_count([d_in, layers, matrices, d_out], [r] * 3)
    assert got == (d_in + d_out) * r + (layers + matrices) * r * r


@pytest.mark.parametrize("d_in,heads,head_dim,layers,matrices,r", [(768, 12, 64, 12, 2, 8), (384, 12, 32, 6, 4, 6)])
def test_parameter_count_5d_formula(d_in, heads, head_dim, layers, matrices, r) -> None:
    # our 5D cores: in, layer, matrix, head, head_dim
    got = parameter_count([d_in, layers, matrices, heads, head_dim], [r] * 4)
    assert got == (d_in + head_dim) * r + (layers + matrices + heads) * r * r


def test_parameter_count_task_core_and_unequal_ranks() -> None:
    base = parameter_count([64, 4, 3, 64], [5, 5, 5])
    assert parameter_count([64, 4, 3, 2, 64], [5, 5, 5, 5]) == base + 2 * 25
    assert parameter_count([10, 2, 3, 7], [4, 5, 6]) == 10 * 4 + 4 * 2 * 5 + 5 * 3 * 6 + 6 * 7


def test_parameter_count_roberta_base_example() -> None:
    # the design doc's example: RoBERTa-base, q and v, r = 8
    assert parameter_count([768, 12, 2, 768], [8, 8, 8]) == 13_184
    lora = 12 * 2 * (768 + 768) * 8
    assert lora == 294_912 and lora // 13_184 == 22
