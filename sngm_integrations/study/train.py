"""One training run: ResNet-20 trained for a fixed number of epochs, then evaluated.

The loop never waits on the device inside an epoch: the running loss is summed on the
device and read once per epoch. On CUDA it trains in bf16 autocast with channels-last
tensors.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sngm_integrations.schedules import warmup_decay_schedule
from sngm_integrations.study.config import RunConfig, run_key
from sngm_integrations.study.data import SplitData, augment_batch
from sngm_integrations.study.optimizers import build_optimizer
from sngm_integrations.vision import resnet20

__all__ = ["evaluate", "train_run"]


def _autocast(config: RunConfig, device: torch.device) -> AbstractContextManager[object]:
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SplitData,
    images: Tensor,
    labels: Tensor,
    config: RunConfig,
    batch_size: int = 2048,
) -> tuple[float, float]:
    """Accuracy (in %) and mean cross-entropy of ``model`` on ``images``."""
    model.eval()
    memory_format = _memory_format(images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=images.device)
    for start in range(0, len(labels), batch_size):
        batch = data.normalize(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        with _autocast(config, images.device):
            logits = model(batch.contiguous(memory_format=memory_format)).float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    model.train()
    return 100.0 * correct.item() / len(labels), loss_sum.item() / len(labels)


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_run(config: RunConfig, data: SplitData, eval_batch_size: int = 2048) -> dict[str, Any]:
    """Train one run and return its record (config, accuracies, loss curve, timing).

    A run whose training loss stops being finite ends at that epoch and is marked
    ``diverged``; it is still evaluated (at chance level, typically).
    """
    device = data.train_images.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    memory_format = _memory_format(device)
    model = resnet20(config.width, data.in_channels, data.num_classes)
    model = model.to(device).to(memory_format=memory_format)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), config.lr, config.momentum, config.weight_decay
    )
    train_count = len(data.train_labels)
    # Every sample is seen once per epoch: the last batch of an epoch may be smaller.
    steps_per_epoch = math.ceil(train_count / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    scheduler = warmup_decay_schedule(optimizer, total_steps, warmup_steps, config.schedule)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    train_loss: list[float] = []
    diverged = False
    for _ in range(config.epochs):
        order = torch.randperm(train_count, generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = augment_batch(data.train_images[index], data.crop_padding, generator)
            images = data.normalize(images).contiguous(memory_format=memory_format)
            with _autocast(config, device):
                logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, data.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(index)
        train_loss.append(loss_sum.item() / train_count)
        if not math.isfinite(train_loss[-1]):
            diverged = True
            break
    train_seconds = time.perf_counter() - started

    val_acc, val_loss = evaluate(
        model, data, data.val_images, data.val_labels, config, eval_batch_size
    )
    test_acc, test_loss = evaluate(
        model, data, data.test_images, data.test_labels, config, eval_batch_size
    )
    record: dict[str, Any] = {
        "key": run_key(config),
        "config": config.to_dict(),
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_loss": train_loss,
        "diverged": diverged,
        "steps": steps_per_epoch * len(train_loss),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    if device.type == "cuda":
        record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return record
