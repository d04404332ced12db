"""One training run: a CIFAR-style ResNet trained for a fixed number of optimizer steps.

Validation accuracy is measured at the end of every epoch (and of the run), so the time
to reach an accuracy can be read off a run; BatchNorm's statistics are recomputed on
training images before every evaluation, the same for every optimizer (the running
averages lag far behind the weights after a few large, fast-moving steps). The loop never
waits on the device inside an epoch: the running loss is summed on the device and read
once per epoch. On CUDA it trains in bf16 autocast with channels-last tensors.

After every epoch `probe_noise_scale` measures the gradient noise scale at the current
weights, from images drawn with a generator of its own and with the BatchNorm buffers
put back afterwards, so the run trains and evaluates exactly as it would without it.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sngm_integrations.noise_scale import GradientNoiseScale
from sngm_integrations.norms import squared_norms
from sngm_integrations.schedules import warmup_decay_schedule
from sngm_integrations.study.config import RunConfig, run_key
from sngm_integrations.study.data import SplitData, augment_batch
from sngm_integrations.study.optimizers import build_optimizer
from sngm_integrations.vision import ResNet

__all__ = ["evaluate", "probe_noise_scale", "recalibrate_batch_norm", "train_run"]

NOISE_PROBE_MICRO_BATCHES = 8
"""The probe's batch (the run's batch size) is split into this many micro-batches."""


def _autocast(config: RunConfig, device: torch.device) -> AbstractContextManager[object]:
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module, data: SplitData, config: RunConfig, batch_size: int = 2048
) -> None:
    """Recompute every BatchNorm's running statistics on the first training images.

    Uses `config.bn_recalibration_images` images (none: left as they are), unaugmented,
    averaged with equal weight per batch.
    """
    count = min(config.bn_recalibration_images, len(data.train_labels))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if count == 0 or not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    memory_format = _memory_format(data.train_images.device)
    for start in range(0, count, batch_size):
        images = data.normalize(data.train_images[start : min(count, start + batch_size)])
        with _autocast(config, images.device):
            model(images.contiguous(memory_format=memory_format))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SplitData,
    images: Tensor,
    labels: Tensor,
    config: RunConfig,
    batch_size: int = 2048,
) -> tuple[float, float]:
    """Accuracy (in %) and mean cross-entropy of `model` on `images`."""
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


def probe_noise_scale(
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    generator: torch.Generator,
    estimator: GradientNoiseScale,
) -> None:
    """Add one measurement at the current weights to `estimator` (see `noise_scale`).

    A batch of `config.batch_size` augmented training images (no fewer than one per
    micro-batch) is split into `NOISE_PROBE_MICRO_BATCHES` micro-batches: the small batch
    is one micro-batch (`|G_b|²` averaged over them), the big one all of them. Gradients
    come from `torch.autograd.grad`, so `.grad` is not touched; BatchNorm normalises each
    micro-batch with its own statistics, as it would a batch of that size, and its
    running buffers are restored.
    """
    device = data.train_images.device
    micro = max(1, config.batch_size // NOISE_PROBE_MICRO_BATCHES)
    count = micro * NOISE_PROBE_MICRO_BATCHES
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b.clone() for b in model.buffers()]
    order = torch.randperm(len(data.train_labels), generator=generator, device=device)[:count]
    memory_format = _memory_format(device)
    total: list[Tensor] | None = None
    small_sq = torch.zeros((), device=device, dtype=torch.float64)
    model.train()
    for index in torch.split(order, micro):
        images = augment_batch(data.train_images[index], data.crop_padding, generator)
        images = data.normalize(images).contiguous(memory_format=memory_format)
        with _autocast(config, device):
            logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, data.train_labels[index])
        grads = list(torch.autograd.grad(loss, params))
        small_sq += squared_norms(grads).sum().to(device)
        if total is None:
            total = grads
        else:
            torch._foreach_add_(total, grads)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    assert total is not None
    parts = NOISE_PROBE_MICRO_BATCHES
    big_sq = squared_norms(total).sum().to(device) / parts**2
    estimator.update(small_sq / parts, micro, big_sq, count)


def train_run(config: RunConfig, data: SplitData, eval_batch_size: int = 2048) -> dict[str, Any]:
    """Train one run and return its record (config, accuracies, curves, timing).

    `cpu_seconds` is this process's CPU time for the run (all its threads): on a busy
    machine it tells the run's cost better than the wall-clock `seconds`.

    Each epoch sees every training image once (the last batch may be smaller); a run of
    more steps than whole epochs ends part-way through its last one. A run is marked
    `diverged` when its training loss stops being finite (it ends there) or its last
    epoch's loss is above its first step's; it is still evaluated.
    """
    device = data.train_images.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    memory_format = _memory_format(device)
    model = ResNet(config.depth, config.width, data.in_channels, data.num_classes)
    model = model.to(device).to(memory_format=memory_format)
    optimizer = build_optimizer(
        config.optimizer,
        model.parameters(),
        config.lr,
        config.momentum,
        config.weight_decay,
        config.decay_norm_and_bias,
    )
    train_count = len(data.train_labels)
    steps_per_epoch = math.ceil(train_count / config.batch_size)
    scheduler = warmup_decay_schedule(optimizer, config.steps, config.warmup_steps, config.schedule)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    probe_generator = torch.Generator(device=device).manual_seed(config.seed + 1_000_003)
    noise = GradientNoiseScale(ema_decay=0.9)

    train_loss: list[float] = []
    history: list[dict[str, Any]] = []
    first_loss: Tensor | None = None
    diverged = False
    step = images_seen = 0
    train_seconds = 0.0
    while step < config.steps and not diverged:
        epoch_started = time.perf_counter()
        order = torch.randperm(train_count, generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        epoch_images = 0
        batches = torch.split(order, config.batch_size)
        for index in batches[: config.steps - step]:
            images = augment_batch(data.train_images[index], data.crop_padding, generator)
            images = data.normalize(images).contiguous(memory_format=memory_format)
            with _autocast(config, device):
                logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, data.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
            optimizer.step()
            scheduler.step()
            if first_loss is None:
                first_loss = loss.detach()
            loss_sum += loss.detach() * len(index)
            epoch_images += len(index)
            step += 1
        train_loss.append(loss_sum.item() / epoch_images)
        images_seen += epoch_images
        train_seconds += time.perf_counter() - epoch_started
        diverged = not math.isfinite(train_loss[-1])
        if not diverged:
            probe_noise_scale(model, data, config, probe_generator, noise)
        recalibrate_batch_norm(model, data, config, eval_batch_size)
        val_acc, val_loss = evaluate(
            model, data, data.val_images, data.val_labels, config, eval_batch_size
        )
        history.append(
            {
                "step": step,
                "images": images_seen,
                "train_seconds": round(train_seconds, 3),
                "train_loss": train_loss[-1],
                "val_acc": val_acc,
                "val_loss": val_loss,
                "noise_scale": _value(noise.noise_scale),
            }
        )
    initial_loss = float(first_loss) if first_loss is not None else math.nan
    diverged = diverged or not train_loss[-1] <= initial_loss
    test_acc, test_loss = evaluate(
        model, data, data.test_images, data.test_labels, config, eval_batch_size
    )
    record: dict[str, Any] = {
        "key": run_key(config),
        "config": config.to_dict(),
        "val_acc": history[-1]["val_acc"],
        "val_loss": history[-1]["val_loss"],
        "test_acc": test_acc,
        "test_loss": test_loss,
        "initial_loss": initial_loss,
        "train_loss": train_loss,
        "history": history,
        "noise_scale": history[-1]["noise_scale"],
        "diverged": diverged,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "device": str(device),
    }
    if device.type == "cuda":
        record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return record


def _value(tensor: Tensor | None) -> float | None:
    return None if tensor is None or not math.isfinite(float(tensor)) else float(tensor)
