"""What SNGM's engine recognition does where no engine shards it (one process, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sngm_integrations import SNGM
from sngm_integrations.sharding import norm_group


def one_rank_group(tmp_path: Path) -> dist.ProcessGroup:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    return dist.ProcessGroupGloo(store, 0, 1)


def test_a_rank_without_gradients_still_joins_the_norms_all_reduce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = one_rank_group(tmp_path)
    calls: list[dist.ProcessGroup | None] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("group"))
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = SNGM([weight], lr=0.1, process_group=group)
    optimizer.step()  # no gradient on this rank: it contributes zero instead of returning
    assert calls == [group]
    assert optimizer.last_grad_norm is not None and optimizer.last_grad_norm.item() == 0.0
    torch.testing.assert_close(weight.detach(), torch.ones(3))


def test_without_gradients_or_a_group_a_step_reduces_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all-reduce called"))
    optimizer = SNGM([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    optimizer.step()
    assert optimizer.last_grad_norm is None


def test_norm_group_without_an_engine_is_the_optimizers_process_group(tmp_path: Path) -> None:
    group = one_rank_group(tmp_path)
    assert norm_group(SNGM([torch.nn.Parameter(torch.ones(1))], lr=0.1)) is None
    assert (
        norm_group(SNGM([torch.nn.Parameter(torch.ones(1))], lr=0.1, process_group=group)) is group
    )
    assert norm_group(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)) is None
