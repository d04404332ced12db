"""What a study runs: one `RunConfig` per training run, planned from a `StudyConfig`.

A run is identified by its `RunConfig` alone (data, model, optimizer, learning rate,
seed, steps, schedule, precision): two runs with equal configs give the same result, so
the results file is keyed by `run_key` and an interrupted study resumes without redoing
finished runs. A run belongs to a budget only through its number of steps, so the
largest batch's equal-epoch run is also its equal-step run when the step budget is the
largest batch's equal-epoch steps (as in both presets).

Every optimizer is tuned the same way: `lr_points` learning rates spaced by 2x around its
centre (`lr_centers`, moved with the batch size by `lr_scaling`), chosen on validation
accuracy at `base_seed`, the grid widened by one point while its best lr sits at an edge
(at most `max_widenings` times); the chosen lr is then rerun at `seeds` fresh seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sngm_integrations.schedules import check_scaling_rule, check_schedule, scale_lr

__all__ = [
    "BUDGETS",
    "DATASETS",
    "DEFAULT_LR_CENTERS",
    "DEFAULT_LR_SCALING",
    "OPTIMIZERS",
    "PRESETS",
    "PRECISIONS",
    "RunConfig",
    "StudyConfig",
    "TRAINING_SET_SIZES",
    "preset",
    "run_key",
]

OPTIMIZERS = ("msgd", "lars", "sngm", "adamw")
DATASETS = ("fashion-mnist", "cifar10", "synthetic")
PRECISIONS = ("fp32", "bf16")
BUDGETS = ("epochs", "steps")
# Images in each dataset's training set (synthetic: `synthetic_dataset`'s default).
TRAINING_SET_SIZES = {"fashion-mnist": 60000, "cifar10": 50000, "synthetic": 512}

# Grid centres at the reference batch size: each optimizer's best lr at batch 256 in the
# project's earlier Fashion-MNIST study (MSGD 0.3, LARS 3, SNGM 0.2). The lrs are not on
# one scale: SNGM's step has length up to lr/(1-momentum) whatever the gradient's size,
# LARS's per-layer step is lr * trust_coeff * ||w||/||g|| times the gradient.
DEFAULT_LR_CENTERS: dict[str, float] = {"msgd": 0.3, "lars": 3.0, "sngm": 0.2, "adamw": 1e-3}
# One rule for every optimizer: the centre stays put. In that study the best lrs of MSGD
# (0.16-0.6) and SNGM (0.2-0.57) stayed within a factor of 4 from batch 256 to 8192, while
# linear scaling put MSGD's best at its grid's bottom edge; the automatic widening covers
# any drift.
DEFAULT_LR_SCALING: dict[str, str] = {name: "none" for name in OPTIMIZERS}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run's result.

    `train_size`/`val_size`/`test_size` of `None` mean the whole split (the
    validation split is cut from the training set; the test set is never used to choose).
    `image_size` below the dataset's resizes the images (area average) once, up front.
    `decay_norm_and_bias` False keeps weight decay (and LARS's trust ratio) off every
    1-d tensor, BatchNorm's and the biases, for every optimizer.
    """

    dataset: str
    train_size: int | None
    val_size: int
    test_size: int | None
    split_seed: int
    image_size: int | None
    depth: int
    width: int
    steps: int
    warmup_steps: int
    batch_size: int
    optimizer: str
    lr: float
    seed: int
    momentum: float
    weight_decay: float
    decay_norm_and_bias: bool
    schedule: str
    precision: str
    bn_recalibration_images: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def run_key(config: RunConfig) -> str:
    """A stable short id of a run config: equal configs, equal keys, across processes."""
    canonical = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


@dataclass
class StudyConfig:
    """A whole study: every budget x batch size x optimizer x learning rate x seed to run.

    Attributes:
        epochs: The equal-epoch budget: every batch size trains this many epochs.
        equal_steps: The equal-step budget: every batch size trains this many optimizer
            steps (`None`: the largest batch's steps in `epochs`; `0`: no step budget).
        lr_centers: Per optimizer, the grid's centre at `reference_batch_size`, moved to
            a batch size with `lr_scaling[optimizer]` (`none`, `linear` or `sqrt`,
            see `sngm_integrations.scale_lr`).
        lr_points: Learning rates per grid, 2x apart, the same number for every optimizer.
        max_widenings: How many points a grid may grow by while its best lr is at an edge.
        seeds: Fresh seeds of each chosen lr (`base_seed`, which chose it, is not one).
        warmup_fraction: Linear warmup, as a fraction of each run's steps.
        target_val_acc: Validation accuracy (%) whose time to reach is reported (`None`:
            99% of the best final validation accuracy at the smallest batch, epoch budget).
        bn_recalibration_images: Training images over which BatchNorm's statistics are
            recomputed before every evaluation (0: keep the running averages).
        time_budget: Seconds after which no new run is started (`None`: no limit).
    """

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    train_size: int | None = None
    val_size: int = 6000
    test_size: int | None = None
    split_seed: int = 0
    image_size: int | None = None
    depth: int = 3
    width: int = 16
    epochs: int = 30
    equal_steps: int | None = None
    batch_sizes: tuple[int, ...] = (256, 1024, 4096, 8192)
    optimizers: tuple[str, ...] = ("msgd", "lars", "sngm")
    lr_centers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR_CENTERS))
    lr_scaling: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LR_SCALING))
    lr_points: int = 3
    max_widenings: int = 3
    reference_batch_size: int = 256
    seeds: int = 5
    base_seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    warmup_fraction: float = 0.05
    schedule: str = "cosine"
    target_val_acc: float | None = None
    bn_recalibration_images: int = 2048
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 1
    time_budget: float | None = None
    eval_batch_size: int = 2048

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.optimizers = tuple(self.optimizers)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first bad setting."""
        if self.dataset not in DATASETS:
            raise ValueError(f"Invalid dataset: dataset={self.dataset!r} (choose from {DATASETS})")
        if not self.optimizers:
            raise ValueError("Invalid optimizers: empty")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ValueError(
                    f"Invalid optimizer: optimizers contains {name!r} (choose from {OPTIMIZERS})"
                )
            center = self.lr_centers.get(name)
            if center is None or not center > 0:
                raise ValueError(f"Invalid lr_centers[{name!r}]={center} (need lr > 0)")
            check_scaling_rule(self.lr_scaling.get(name, "none"), f"lr_scaling[{name!r}]")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"Invalid batch_sizes: {self.batch_sizes} (need sizes >= 1)")
        positive = {
            "epochs": self.epochs,
            "seeds": self.seeds,
            "depth": self.depth,
            "width": self.width,
            "val_size": self.val_size,
            "workers": self.workers,
            "lr_points": self.lr_points,
            "reference_batch_size": self.reference_batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"Invalid {name}: {name}={value} (must be >= 1)")
        non_negative = {
            "max_widenings": self.max_widenings,
            "bn_recalibration_images": self.bn_recalibration_images,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"Invalid {name}: {name}={value} (must be >= 0)")
        for name in ("train_size", "test_size", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {name}={value} (must be >= 1 or None)")
        if self.equal_steps is not None and self.equal_steps < 0:
            raise ValueError(
                f"Invalid equal_steps: equal_steps={self.equal_steps} (must be >= 0 or None)"
            )
        check_schedule(self.schedule)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"Invalid precision: precision={self.precision!r} (choose from {PRECISIONS})"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(
                f"Invalid warmup_fraction: warmup_fraction={self.warmup_fraction} "
                "(must be in [0, 1))"
            )
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"Invalid time_budget: time_budget={self.time_budget} (must be > 0)")

    def train_count(self) -> int:
        """Training images per epoch."""
        available = TRAINING_SET_SIZES[self.dataset]
        return available - self.val_size if self.train_size is None else self.train_size

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of one epoch (the last batch of an epoch may be smaller)."""
        return math.ceil(self.train_count() / batch_size)

    def budgets(self) -> list[str]:
        """The budgets this study runs: `epochs` and, unless `equal_steps == 0`, `steps`."""
        return ["epochs"] if self.equal_steps == 0 else list(BUDGETS)

    def budget_steps(self, budget: str, batch_size: int) -> int:
        """Optimizer steps of a run at `batch_size` under `budget`."""
        if budget == "epochs":
            return self.epochs * self.steps_per_epoch(batch_size)
        if budget == "steps":
            if self.equal_steps:
                return self.equal_steps
            return self.epochs * self.steps_per_epoch(max(self.batch_sizes))
        raise ValueError(f"Invalid budget: budget={budget!r} (choose from {BUDGETS})")

    def initial_lrs(self, optimizer: str, batch_size: int) -> list[float]:
        """The first `lr_points` learning rates of a grid: 2x apart around its centre."""
        rule = self.lr_scaling.get(optimizer, "none")
        center = scale_lr(self.lr_centers[optimizer], batch_size, self.reference_batch_size, rule)
        low = -(self.lr_points // 2)
        return [_round_lr(center * 2.0**k) for k in range(low, low + self.lr_points)]

    def run_config(
        self, budget: str, optimizer: str, batch_size: int, lr: float, seed: int
    ) -> RunConfig:
        """The config of one run of this study."""
        steps = self.budget_steps(budget, batch_size)
        return RunConfig(
            dataset=self.dataset,
            train_size=self.train_size,
            val_size=self.val_size,
            test_size=self.test_size,
            split_seed=self.split_seed,
            image_size=self.image_size,
            depth=self.depth,
            width=self.width,
            steps=steps,
            warmup_steps=round(self.warmup_fraction * steps),
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            seed=seed,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            decay_norm_and_bias=self.decay_norm_and_bias,
            schedule=self.schedule,
            precision=self.precision,
            bn_recalibration_images=self.bn_recalibration_images,
        )

    def batch_size_priority(self) -> list[int]:
        """Batch sizes in the order their grids run: largest, smallest, then inwards.

        The largest batches are the point of the study and the smallest its baseline, so a
        study stopped by its time budget has those first (8192, 256, 4096, 1024).
        """
        ascending = sorted(self.batch_sizes)
        order = []
        while ascending:
            order.append(ascending.pop())
            if ascending:
                order.append(ascending.pop(0))
        return order

    def groups(self) -> list[tuple[str, str, int]]:
        """Every (budget, optimizer, batch size) tuned on its own, in run order."""
        return [
            (budget, name, batch_size)
            for budget in self.budgets()
            for batch_size in self.batch_size_priority()
            for name in self.optimizers
        ]

    def seed_runs(self, budget: str, optimizer: str, batch_size: int, lr: float) -> list[RunConfig]:
        """The reruns of the chosen `lr` at the `seeds` seeds after `base_seed`."""
        return [
            self.run_config(budget, optimizer, batch_size, lr, self.base_seed + i)
            for i in range(1, self.seeds + 1)
        ]

    def training_images(self) -> int:
        """Training images of the first grids and their seeds (widenings not counted).

        A step-budget run equal to an epoch-budget run (same steps) is counted once.
        """
        shapes = {
            (self.budget_steps(budget, batch_size), batch_size, name)
            for budget, name, batch_size in self.groups()
        }
        return sum(steps * batch * (self.lr_points + self.seeds) for steps, batch, _ in shapes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


# Settings of the two presets; anything given on the command line overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a 2-core CPU (two single-threaded workers): 2,560 training images at
    # 14x14 and a width-8 ResNet-8, so that batch 256 still gets 150 steps in 15 epochs
    # (batch 32: 1,200); three fresh seeds of every chosen lr.
    "quick": {
        "workers": 2,
        "dataset": "fashion-mnist",
        "train_size": 2560,
        "val_size": 1000,
        "test_size": 2000,
        "image_size": 14,
        "depth": 1,
        "width": 8,
        "epochs": 15,
        "batch_sizes": (32, 256),
        "optimizers": ("msgd", "lars", "sngm"),
        "seeds": 3,
        "bn_recalibration_images": 512,
        "eval_batch_size": 1024,
    },
    # All 60,000 images (54,000 train / 6,000 validation), ResNet-20 at width 16, 30
    # epochs at every batch (210 steps at 8192), five fresh seeds; for a GPU, resumable
    # across calls (see docs/study.md for its size).
    "full": {
        "dataset": "fashion-mnist",
        "train_size": None,
        "val_size": 6000,
        "test_size": None,
        "width": 16,
        "epochs": 30,
        "batch_sizes": (256, 1024, 4096, 8192),
        "optimizers": ("msgd", "lars", "sngm"),
        "seeds": 5,
        "workers": 1,
    },
}


def preset(name: str, **overrides: Any) -> StudyConfig:
    """A `StudyConfig` from preset `name` (`quick` or `full`) with `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"Invalid preset: preset={name!r} (choose from {tuple(PRESETS)})")
    settings = dict(PRESETS[name])
    settings.update(overrides)
    return StudyConfig(**settings)
