"""Large-batch training with Lightning Fabric and SNGM, with gradient accumulation.

Fabric leaves the loop to you; what SNGM needs from it is short:

* build the optimizer from the model's parameters, then `fabric.setup(model, optimizer)`;
* accumulate under `fabric.no_backward_sync(model, enabled=...)`, so that DDP
  all-reduces the gradient once per optimizer step instead of once per micro-batch;
* step the optimizer once per accumulation window: SNGM then normalizes the whole
  window's gradient (dividing the loss by the window length does not change g/||g||,
  only the gradient's weight against the weight decay);
* size warmup and decay in optimizer steps and scale the learning rate to the effective
  batch, per-device batch x accumulation x `fabric.world_size`.

On one CPU (defaults: ResNet-20 of width 8 on the first 4,096 Fashion-MNIST training
images, 3 epochs, 256 per batch x 4 accumulated):

    python examples/fabric_large_batch.py

On two processes (CPU with gloo, or GPUs):

    python examples/fabric_large_batch.py --devices 2
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _FabricModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, TensorDataset

from lightning_callbacks import weight_decay_param_groups
from sngm_integrations import SNGM
from sngm_integrations.schedules import scale_lr, warmup_decay_schedule
from sngm_integrations.vision import load_fashion_mnist, resnet20

PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


def train_epoch(
    fabric: Fabric,
    model: _FabricModule,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    loader: DataLoader,
    accumulate_grad_batches: int,
) -> float:
    """One pass over `loader`, one optimizer step per `accumulate_grad_batches` batches.

    Returns:
        The mean training loss of this process's batches.
    """
    model.train()
    total_loss = 0.0
    for index, (inputs, labels) in enumerate(loader):
        window_start = index - index % accumulate_grad_batches
        window_length = min(accumulate_grad_batches, len(loader) - window_start)
        window_done = index + 1 == window_start + window_length
        with fabric.no_backward_sync(model, enabled=not window_done):
            loss = nn.functional.cross_entropy(model(inputs), labels)
            # The mean over the window; only the weight decay's share depends on it.
            fabric.backward(loss / window_length)
        total_loss += loss.item()
        if window_done:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return total_loss / len(loader)


@torch.no_grad()
def evaluate_accuracy(fabric: Fabric, model: nn.Module, loader: DataLoader) -> float:
    """Accuracy over every process's share of `loader`."""
    model.eval()
    totals = torch.zeros(2, device=fabric.device)  # correct predictions, images
    for inputs, labels in loader:
        totals[0] += (model(inputs).argmax(dim=1) == labels).sum()
        totals[1] += len(labels)
    reduced = fabric.all_reduce(totals, reduce_op="sum")
    assert isinstance(reduced, Tensor)
    return float(reduced[0] / reduced[1])


def _as_inputs(images: Tensor) -> Tensor:
    return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=int, default=256, help="per device")
    parser.add_argument("--accumulate-grad-batches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1.0, help="at --reference-batch-size")
    parser.add_argument("--reference-batch-size", type=int, default=1024)
    parser.add_argument("--lr-scaling", default="sqrt", choices=("none", "linear", "sqrt"))
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--train-subset", type=int, default=4096, help="0: all 60,000")
    parser.add_argument("--test-subset", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
    )
    fabric.launch()
    fabric.seed_everything(args.seed)

    data = load_fashion_mnist()
    train_count = args.train_subset or len(data.train_labels)
    test_count = args.test_subset or len(data.test_labels)
    train_set = TensorDataset(
        _as_inputs(data.train_images[:train_count]), data.train_labels[:train_count]
    )
    test_set = TensorDataset(
        _as_inputs(data.test_images[:test_count]), data.test_labels[:test_count]
    )
    train_loader, test_loader = fabric.setup_dataloaders(
        DataLoader(train_set, args.batch_size, shuffle=True),
        DataLoader(test_set, batch_size=1024),
    )

    model = resnet20(width=args.width)
    effective_batch = args.batch_size * args.accumulate_grad_batches * fabric.world_size
    lr = scale_lr(args.lr, effective_batch, args.reference_batch_size, args.lr_scaling)
    optimizer = SNGM(weight_decay_param_groups(model, args.weight_decay), lr=lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)

    steps_per_epoch = -(-len(train_loader) // args.accumulate_grad_batches)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup_fraction * total_steps)
    scheduler = warmup_decay_schedule(optimizer, total_steps, warmup_steps, "cosine")
    fabric.print(
        f"effective batch {effective_batch} ({args.batch_size} x {args.accumulate_grad_batches}"
        f" accumulated x {fabric.world_size} processes), lr {lr:g}, {total_steps} steps"
    )

    for epoch in range(args.epochs):
        loss = train_epoch(
            fabric, model, optimizer, scheduler, train_loader, args.accumulate_grad_batches
        )
        # The norm SNGM divided by in the epoch's last step, already reduced over processes
        # (read from the optimizer Fabric wrapped: the wrapper copied its attributes once).
        grad_norm = optimizer.optimizer.last_grad_norm
        fabric.print(f"epoch {epoch}: train loss {loss:.4f}, last gradient norm {grad_norm:.4f}")

    accuracy = evaluate_accuracy(fabric, model, test_loader)
    fabric.print(f"test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
