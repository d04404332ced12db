"""Large-batch training with SNGM under Hugging Face Accelerate.

ResNet-20 on Fashion-MNIST with SNGM, a warmup + decay schedule sized in optimizer steps,
gradient accumulation, evaluation, checkpoints that resume exactly, a progress bar on the
main process and logging through Accelerate's trackers. The same script runs on one CPU,
one GPU, many GPUs (DDP), FSDP2 and DeepSpeed ZeRO; the configs are in
`examples/accelerate_configs/`:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \\
        --num_processes 8 examples/accelerate_large_batch.py \\
        --per-device-batch 512 --grad-accum 2 --lr 0.5

One optimizer step sees `per-device batch x processes x accumulation` examples (the
effective batch, printed at start-up). The learning-rate schedule counts optimizer steps,
so it is the same whatever way that batch is split across processes and micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    is_tensorboard_available,
    set_seed,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm.auto import tqdm

from sngm_integrations import SNGM
from sngm_integrations.comm_hooks import BucketSquaredNorms, squared_norm_allreduce_hook
from sngm_integrations.noise_scale import GradientNoiseScale, GradientNoiseScaleMeter
from sngm_integrations.schedules import SCHEDULES, warmup_decay_schedule
from sngm_integrations.vision import load_fashion_mnist, resnet20

# Per-channel statistics of the Fashion-MNIST training images.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every option has a default that trains a real model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=("resnet20", "mlp"),
        default="resnet20",
        help="resnet20 (BatchNorm), or a BatchNorm-free MLP whose gradient does "
        "not depend on how the batch is split across devices",
    )
    parser.add_argument(
        "--width", type=int, default=16, help="ResNet-20 base channels, or the MLP's hidden units"
    )
    parser.add_argument(
        "--per-device-batch", type=int, default=128, help="examples per process per micro-batch"
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches accumulated into one optimizer step",
    )
    parser.add_argument("--lr", type=float, default=0.5, help="SNGM learning rate (peak)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.05,
        help="share of the optimizer steps spent in linear warmup",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="optimizer steps to train for; overrides --epochs",
    )
    parser.add_argument(
        "--comm-hook",
        action="store_true",
        help="DDP only: all-reduce through squared_norm_allreduce_hook, which measures the "
        "gradient norms on the way: SNGM takes its norm from it (with --weight-decay 0) and "
        "the noise scale needs no pass of its own",
    )
    parser.add_argument(
        "--subset", type=int, default=0, help="train on the first N training images (0: all 60,000)"
    )
    parser.add_argument(
        "--eval-subset",
        type=int,
        default=0,
        help="evaluate on the first N test images (0: all 10,000)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST files (default: the standard places)",
    )
    parser.add_argument("--output-dir", default="runs/accelerate_large_batch")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save a resumable checkpoint every N optimizer steps (0: never)",
    )
    parser.add_argument(
        "--resume-from", default=None, help="a checkpoint folder written by --checkpoint-every"
    )
    parser.add_argument(
        "--log-with",
        choices=("tensorboard", "none"),
        default="tensorboard",
        help="Accelerate tracker to log to (files under --output-dir)",
    )
    parser.add_argument("--log-every", type=int, default=10, help="optimizer steps between logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    positive = ("width", "per_device_batch", "grad_accum", "epochs", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("subset", "eval_subset", "checkpoint_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0.0 <= args.warmup_fraction <= 1.0:
        parser.error(f"--warmup-fraction must be in [0, 1], got {args.warmup_fraction}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def mlp(hidden: int, num_classes: int = 10) -> nn.Module:
    """A two-layer perceptron on flattened 28x28 images."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def image_dataset(images: Tensor, labels: Tensor, limit: int) -> TensorDataset | Subset:
    """Normalized float images with their labels; the first `limit` examples if > 0."""
    pixels = (images.float().div(255.0) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    dataset = TensorDataset(pixels.unsqueeze(1), labels)
    if limit:
        if limit > len(dataset):
            raise ValueError(f"subset={limit} is larger than the {len(dataset)} images there are")
        return Subset(dataset, range(limit))
    return dataset


@dataclass
class Progress:
    """Optimizer steps taken so far; saved with every checkpoint."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Test loss and accuracy over every process's share of `loader`."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.numel()
    model.train()
    return {"eval/loss": loss_sum / count, "eval/accuracy": correct / count}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and save; returns the final metrics (also written to metrics.json)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        # The schedule is stepped by hand once per optimizer step (see the training loop),
        # not once per process per call as a prepared scheduler would be.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=None if args.log_with == "none" else args.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    set_seed(args.seed)

    with accelerator.main_process_first():
        data = load_fashion_mnist(args.data_dir)
    train_set = image_dataset(data.train_images, data.train_labels, args.subset)
    test_set = image_dataset(data.test_images, data.test_labels, args.eval_subset)
    train_loader = DataLoader(train_set, batch_size=args.per_device_batch, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=args.per_device_batch)

    model = resnet20(width=args.width) if args.model == "resnet20" else mlp(args.width)
    sngm = SNGM(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    # Sized before prepare (DeepSpeed needs everything in one prepare call): each process
    # gets every num_processes-th micro-batch, and an epoch's last optimizer step takes
    # whatever micro-batches are left.
    micro_batches_per_process = math.ceil(
        math.ceil(len(train_set) / args.per_device_batch) / accelerator.num_processes
    )
    steps_per_epoch = math.ceil(micro_batches_per_process / args.grad_accum)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = round(args.warmup_fraction * total_steps)
    scheduler = warmup_decay_schedule(sngm, total_steps, warmup_steps, args.schedule)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, sngm, train_loader, test_loader, scheduler
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    effective_batch = args.per_device_batch * accelerator.num_processes * args.grad_accum
    # The gradient noise scale, from the micro-batches and processes' local gradients
    # against the accumulated, all-reduced one (replicated parameters only); with the comm
    # hook, from each process's accumulated gradient against the all-reduced one.
    meter: GradientNoiseScaleMeter | None = None
    hook_noise: GradientNoiseScale | None = None
    norms = None
    if args.comm_hook:
        if not isinstance(model, DistributedDataParallel):
            raise SystemExit(
                "--comm-hook needs DDP (several processes, no FSDP or DeepSpeed), got "
                f"distributed type {accelerator.distributed_type.value} with "
                f"{accelerator.num_processes} process(es)"
            )
        norms = BucketSquaredNorms()
        model.register_comm_hook(norms, squared_norm_allreduce_hook)
        sngm.allreduce_norms = norms
        hook_noise = GradientNoiseScale()
    elif effective_batch > args.per_device_batch and accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    ):
        meter = GradientNoiseScaleMeter(model.parameters())
    noise_estimate = meter if meter is not None else hook_noise
    accelerator.print(
        f"world size {accelerator.num_processes} | "
        f"effective batch {effective_batch} = {args.per_device_batch} per device x "
        f"{accelerator.num_processes} processes x {args.grad_accum} accumulation | "
        f"{total_steps} optimizer steps ({steps_per_epoch} per epoch), {warmup_steps} warmup | "
        f"distributed type {accelerator.distributed_type.value} on {accelerator.device}"
    )
    if args.resume_from:
        accelerator.load_state(args.resume_from)
        accelerator.print(f"resumed from {args.resume_from} at step {progress.step}")
    if args.log_with == "tensorboard" and not is_tensorboard_available():
        accelerator.print("tensorboard is not installed: no tracker logs (pip install tensorboard)")
    accelerator.init_trackers("sngm", config={**vars(args), "effective_batch": effective_batch})

    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    model.train()
    for epoch in range(progress.step // steps_per_epoch, epochs):
        done_in_epoch = progress.step - epoch * steps_per_epoch
        # Resuming mid-epoch: skip the micro-batches this epoch's finished steps used.
        loader = accelerator.skip_first_batches(train_loader, done_in_epoch * args.grad_accum)
        loader.set_epoch(epoch)  # the epoch's shuffle, also for the skipping loader
        for images, labels in loader:
            with accelerator.accumulate(model):
                next_step = progress.step + 1
                logged = next_step % args.log_every == 0 or next_step == total_steps
                if meter is not None and logged and not meter.armed:
                    meter.arm()
                loss = nn.functional.cross_entropy(model(images), labels)
                accelerator.backward(loss)
                if meter is not None and accelerator.sync_gradients:
                    meter.measure(args.per_device_batch)
                if hook_noise is not None and norms is not None and accelerator.sync_gradients:
                    assert norms.global_sq is not None
                    local_batch = args.per_device_batch * args.grad_accum
                    hook_noise.update(
                        norms.mean_local_sq(), local_batch, norms.global_sq, effective_batch
                    )
                optimizer.step()  # a no-op except on the last micro-batch of a step
                optimizer.zero_grad()
            loss_sum += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress.step += 1
            bar.update(1)
            if progress.step % args.log_every == 0 or progress.step == total_steps:
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / micro_batches
                assert sngm.last_grad_norm is not None  # every SNGM step sets it
                logs = {
                    "train/loss": mean_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(sngm.last_grad_norm),
                    "epoch": epoch,
                }
                if noise_estimate is not None and noise_estimate.noise_scale is not None:
                    logs["train/noise_scale"] = float(noise_estimate.noise_scale)
                accelerator.log(logs, step=progress.step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['train/lr']:.4g}")
                loss_sum.zero_()
                micro_batches = 0
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0:
                accelerator.save_state(str(output_dir / "checkpoints" / f"step_{progress.step}"))
            if progress.step == total_steps:
                break
        metrics = evaluate(accelerator, model, test_loader)
        accelerator.log(metrics, step=progress.step)
        noise = ""
        if noise_estimate is not None:
            noise = f", noise scale {float(noise_estimate.noise_scale or 0):.0f}"
        accelerator.print(
            f"epoch {epoch}: step {progress.step}, test loss {metrics['eval/loss']:.4f}, "
            f"test accuracy {metrics['eval/accuracy']:.4f}{noise}"
        )
    bar.close()
    if not metrics:  # resumed from the last step: nothing was trained
        metrics = evaluate(accelerator, model, test_loader)

    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir / "model"))
    summary = {
        **metrics,
        "effective_batch": effective_batch,
        "num_processes": accelerator.num_processes,
        "optimizer_steps": progress.step,
        "skipped_steps": sngm.skipped_steps,
        "noise_scale": None
        if noise_estimate is None or noise_estimate.noise_scale is None
        else float(noise_estimate.noise_scale),
        "allreduce_norm_steps": sngm.allreduce_norm_steps,
        "train_seconds": time.perf_counter() - started,
    }
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.print(json.dumps(summary))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
