"""opt="sngm" in timm's own optimizer factory (`create_optimizer_v2`)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.optim import create_optimizer_v2, list_optimizers  # noqa: E402

import timm_optim  # noqa: E402  (registers opt="sngm")
from sngm_integrations import SNGM  # noqa: E402


def test_sngm_is_a_timm_optimizer_name_and_register_is_idempotent() -> None:
    assert "sngm" in list_optimizers()
    count = len(list_optimizers())
    timm_optim.register()
    assert len(list_optimizers()) == count and timm_optim.is_registered()


def test_the_factory_builds_sngm_with_timm_weight_decay_groups_and_momentum_default() -> None:
    model = timm.create_model("resnet18", num_classes=3)
    optimizer = create_optimizer_v2(model, opt="sngm", lr=0.5, weight_decay=5e-5)
    assert type(optimizer) is SNGM
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups
    }
    assert set(groups) == {0.0, 5e-5}
    assert all(model.get_parameter(n).ndim <= 1 for n in groups[0.0])  # biases and BN
    assert "bn1.weight" in groups[0.0] and "fc.bias" in groups[0.0]
    assert all(model.get_parameter(n).ndim > 1 for n in groups[5e-5])
    assert len(groups[0.0]) + len(groups[5e-5]) == len(list(model.parameters()))
    for group in optimizer.param_groups:
        assert group["lr"] == 0.5 and group["momentum"] == 0.9 and group["nesterov"] is False

    custom = create_optimizer_v2(
        model, opt="sngm", lr=0.1, weight_decay=0.0, momentum=0.8, eps=1e-6, nesterov=True
    )
    assert all(
        g["momentum"] == 0.8 and g["eps"] == 1e-6 and g["nesterov"] for g in custom.param_groups
    )
    with pytest.raises(ValueError, match="momentum"):
        create_optimizer_v2(model, opt="sngm", lr=0.1, momentum=1.5)


def test_the_factory_built_sngm_trains_and_takes_lookahead() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = create_optimizer_v2(model, opt="sngm", lr=0.05, weight_decay=1e-4)
    inputs, targets = torch.randn(64, 4), torch.randint(0, 2, (64,))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert float(optimizer.last_grad_norm) > 0
    lookahead = create_optimizer_v2(model, opt="lookahead_sngm", lr=0.05)
    assert type(lookahead._base_optimizer) is SNGM
