"""The gradient noise scale `B_simple` of ResNet-20 on Fashion-MNIST while SNGM trains it.

Trains for `--steps` optimizer steps at a global batch of `--micro-batch x --accumulation`
examples and prints, every `--print-every` steps, the training loss and `B_simple`
measured from the micro-batches (`sngm_integrations.noise_scale`), for the table in
docs/batch-size.md:

    PYTHONPATH=$PWD python benchmarks/noise_scale.py --micro-batch 64 --accumulation 4
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sngm_integrations import SNGM
from sngm_integrations.noise_scale import GradientNoiseScaleMeter
from sngm_integrations.schedules import warmup_decay_schedule
from sngm_integrations.vision import load_fashion_mnist, resnet20

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--ema-decay", type=float, default=0.95)
    parser.add_argument("--print-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_fashion_mnist(download=False)
    images = (data.train_images.float().div(255).unsqueeze(1) - FASHION_MNIST_MEAN) / (
        FASHION_MNIST_STD
    )
    model = resnet20()
    optimizer = SNGM(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = warmup_decay_schedule(optimizer, args.steps, args.warmup_steps, schedule="constant")
    meter = GradientNoiseScaleMeter(model.parameters(), ema_decay=args.ema_decay)
    batch = args.micro_batch * args.accumulation
    order = torch.randperm(len(images))
    print(f"global batch {batch} = {args.micro_batch} x {args.accumulation} accumulation")
    print("| step | examples seen | train loss | B_simple |")
    print("|---|---|---|---|")
    started, cursor = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        meter.arm()
        loss_sum = 0.0
        for _ in range(args.accumulation):
            if cursor + args.micro_batch > len(order):
                order, cursor = torch.randperm(len(images)), 0
            index = order[cursor : cursor + args.micro_batch]
            cursor += args.micro_batch
            loss = nn.functional.cross_entropy(model(images[index]), data.train_labels[index])
            (loss / args.accumulation).backward()
            loss_sum += float(loss.detach()) / args.accumulation
        meter.measure(args.micro_batch)
        optimizer.step()
        scheduler.step()
        if step % args.print_every == 0 or step == args.steps:
            print(f"| {step} | {step * batch} | {loss_sum:.3f} | {float(meter.noise_scale):.0f} |")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
