"""The Lightning and Fabric examples, run for real on tiny settings."""

from __future__ import annotations

import copy
import csv
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_callbacks import weight_decay_param_groups
from sngm_integrations import SNGM
from sngm_integrations.schedules import warmup_decay_schedule
from sngm_integrations.vision import FashionMNISTUnavailable, load_fashion_mnist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fashion_mnist_available() -> None:
    try:
        load_fashion_mnist(download=False)
    except FashionMNISTUnavailable:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def test_fabric_accumulation_steps_once_per_window() -> None:
    """6 batches of 4, windows of 4: two SNGM steps, on samples 0-15 and on 16-23."""
    fabric_example = load_example("fabric_large_batch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))
    reference = copy.deepcopy(model)
    inputs, labels = torch.randn(24, 6), torch.randint(0, 4, (24,))

    fabric = Fabric(accelerator="cpu", devices=1)
    optimizer = SNGM(weight_decay_param_groups(model, 0.01), lr=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(inputs, labels), batch_size=4))
    scheduler = warmup_decay_schedule(optimizer, total_steps=2, schedule="constant")
    fabric_example.train_epoch(fabric, model, optimizer, scheduler, loader, 4)

    reference_optimizer = SNGM(weight_decay_param_groups(reference, 0.01), lr=0.5)
    for window in (slice(0, 16), slice(16, 24)):
        reference_optimizer.zero_grad()
        nn.functional.cross_entropy(reference(inputs[window]), labels[window]).backward()
        reference_optimizer.step()

    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert reference_optimizer.last_grad_norm is not None
    torch.testing.assert_close(
        optimizer.optimizer.last_grad_norm, reference_optimizer.last_grad_norm
    )


@pytest.mark.slow
def test_fabric_example_runs(fashion_mnist_available: None) -> None:
    accuracy = load_example("fabric_large_batch").main(
        ["--train-subset=256", "--test-subset=256", "--epochs=1", "--batch-size=64", "--width=4"]
    )
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_lightning_example_compares_sngm_and_msgd(
    tmp_path: Path, fashion_mnist_available: None
) -> None:
    results = load_example("lightning_image_classification").main(
        [
            "--train-subset=256",
            "--test-subset=256",
            "--epochs=1",
            "--batch-size=128",
            "--width=4",
            f"--log-dir={tmp_path}",
        ]
    )
    assert set(results) == {"SNGM", "MSGD"}
    for result in results.values():
        assert 0.0 <= float(result["test_acc"]) <= 1.0
        with open(Path(str(result["log"])) / "metrics.csv") as f:
            rows = [row for row in csv.DictReader(f) if row.get("sngm/update_norm")]
        # 256 images in batches of 128: two optimizer steps, both logged.
        assert [int(row["step"]) for row in rows] == [0, 1]
        assert all(float(row["sngm/grad_norm"]) > 0 for row in rows)
