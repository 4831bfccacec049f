"""TaskHeads: the stacked form the factored export uses computes what routing every head does."""

from __future__ import annotations

import torch
from torch import nn

from metatt_deploy.adapters.heads import PAD_LOGIT, TaskHeads


def test_stacked_heads_equal_routed_heads() -> None:
    torch.manual_seed(0)
    heads = TaskHeads([nn.Linear(6, 2), nn.Linear(6, 3), nn.Linear(6, 2, bias=False)])
    ids = torch.tensor([2, 0, 1, 1, 2])
    heads.task_ids = ids
    for x in (torch.randn(5, 6), torch.randn(5, 4, 6)):
        routed = heads(x)
        heads.stacked = True
        stacked = heads(x)
        heads.stacked = False
        assert stacked.shape == routed.shape == (*x.shape[:-1], 3)
        assert torch.allclose(stacked, routed, atol=1e-6)
        assert (stacked[0, ..., 2] == PAD_LOGIT).all() and (stacked[2, ..., 2] != PAD_LOGIT).all()
