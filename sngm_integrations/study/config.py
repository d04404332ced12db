"""What a study runs: one `RunConfig` per training run, planned from a `StudyConfig`.

A run is identified by its `RunConfig` alone (data, model, optimizer, learning rate,
seed, schedule, precision): two runs with equal configs give the same result, so the
results file is keyed by `run_key` and an interrupted study resumes without
redoing finished runs. The grid run at the base seed doubles as the first seed of the
best learning rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sngm_integrations.schedules import check_scaling_rule, check_schedule, scale_lr

__all__ = [
    "DATASETS",
    "DEFAULT_LR_GRIDS",
    "DEFAULT_LR_SCALING",
    "OPTIMIZERS",
    "PRESETS",
    "PRECISIONS",
    "RunConfig",
    "StudyConfig",
    "preset",
    "run_key",
]

OPTIMIZERS = ("msgd", "lars", "sngm", "adamw")
DATASETS = ("fashion-mnist", "cifar10", "synthetic")
PRECISIONS = ("fp32", "bf16")

# Learning rates at the reference batch size (256), about 3x apart around a usual value.
# MSGD's and LARS's lrs are not on SNGM's scale: SNGM's step has length up to
# lr/(1-momentum) whatever the gradient's size, LARS's per-layer step is
# lr * trust_coeff * ||w||/||g|| times the gradient.
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "msgd": (0.03, 0.1, 0.3),
    "lars": (0.3, 1.0, 3.0),
    "sngm": (0.07, 0.2, 0.6),
    "adamw": (3e-4, 1e-3, 3e-3),
}
# How each grid moves with the batch size: the linear rule for MSGD (Goyal et al., 2017),
# the square-root rule for the normalized and adaptive methods.
DEFAULT_LR_SCALING: dict[str, str] = {
    "msgd": "linear",
    "lars": "sqrt",
    "sngm": "sqrt",
    "adamw": "sqrt",
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run's result.

    ``train_size``/``val_size``/``test_size`` of ``None`` mean the whole split (the
    validation split is cut from the training set; the test set is never used to choose).
    """

    dataset: str
    train_size: int | None
    val_size: int
    test_size: int | None
    split_seed: int
    width: int
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    seed: int
    momentum: float
    weight_decay: float
    warmup_epochs: float
    schedule: str
    precision: str

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
    """A whole study: every batch size x optimizer x learning rate x seed to run.

    Attributes:
        lr_grids: Per optimizer, learning rates at ``reference_batch_size``; each is scaled
            to a batch size with ``lr_scaling[optimizer]`` (``none``, ``linear`` or
            ``sqrt``, see `sngm_integrations.scale_lr`).
        seeds: Number of seeds for the best learning rate (the grid run is seed
            ``base_seed``; ``seeds - 1`` more runs follow).
        warmup_epochs: Linear warmup length in epochs, turned into optimizer steps per run.
        time_budget: Seconds after which no new run is started (``None``: no limit).
    """

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    train_size: int | None = None
    val_size: int = 6000
    test_size: int | None = None
    split_seed: int = 0
    width: int = 16
    epochs: int = 8
    batch_sizes: tuple[int, ...] = (256, 1024, 4096, 8192)
    optimizers: tuple[str, ...] = ("msgd", "lars", "sngm")
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LR_GRIDS))
    lr_scaling: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LR_SCALING))
    reference_batch_size: int = 256
    seeds: int = 2
    base_seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.5
    schedule: str = "cosine"
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
        """Raise ``ValueError`` naming the first bad setting."""
        if self.dataset not in DATASETS:
            raise ValueError(f"Invalid dataset: dataset={self.dataset!r} (choose from {DATASETS})")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ValueError(
                    f"Invalid optimizer: optimizers contains {name!r} (choose from {OPTIMIZERS})"
                )
            if not self.lr_grids.get(name):
                raise ValueError(f"Invalid lr_grids: no learning rates for optimizer {name!r}")
            if any(not lr > 0 for lr in self.lr_grids[name]):
                raise ValueError(f"Invalid lr_grids[{name!r}]={self.lr_grids[name]} (need lr > 0)")
            rule = self.lr_scaling.get(name, "none")
            check_scaling_rule(rule, f"lr_scaling[{name!r}]")
        if not self.optimizers:
            raise ValueError("Invalid optimizers: empty")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"Invalid batch_sizes: {self.batch_sizes} (need sizes >= 1)")
        positive = {
            "epochs": self.epochs,
            "seeds": self.seeds,
            "width": self.width,
            "val_size": self.val_size,
            "workers": self.workers,
            "reference_batch_size": self.reference_batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"Invalid {name}: {name}={value} (must be >= 1)")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {name}={value} (must be >= 1 or None)")
        check_schedule(self.schedule)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"Invalid precision: precision={self.precision!r} (choose from {PRECISIONS})"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"Invalid warmup_epochs: warmup_epochs={self.warmup_epochs} "
                f"(must be in [0, epochs={self.epochs}])"
            )
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"Invalid time_budget: time_budget={self.time_budget} (must be > 0)")

    def lrs(self, optimizer: str, batch_size: int) -> list[float]:
        """The learning-rate grid of ``optimizer`` scaled to ``batch_size``."""
        rule = self.lr_scaling.get(optimizer, "none")
        return [
            _round_lr(scale_lr(lr, batch_size, self.reference_batch_size, rule))
            for lr in self.lr_grids[optimizer]
        ]

    def run_config(self, optimizer: str, batch_size: int, lr: float, seed: int) -> RunConfig:
        """The config of one run of this study."""
        return RunConfig(
            dataset=self.dataset,
            train_size=self.train_size,
            val_size=self.val_size,
            test_size=self.test_size,
            split_seed=self.split_seed,
            width=self.width,
            epochs=self.epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            seed=seed,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            schedule=self.schedule,
            precision=self.precision,
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

    def grid_runs(self) -> list[RunConfig]:
        """Every learning-rate grid run (at ``base_seed``), in `batch_size_priority`."""
        return [
            self.run_config(name, batch_size, lr, self.base_seed)
            for batch_size in self.batch_size_priority()
            for name in self.optimizers
            for lr in self.lrs(name, batch_size)
        ]

    def seed_runs(self, optimizer: str, batch_size: int, lr: float) -> list[RunConfig]:
        """The reruns of the chosen ``lr`` at the seeds after ``base_seed``."""
        return [
            self.run_config(optimizer, batch_size, lr, self.base_seed + i)
            for i in range(1, self.seeds)
        ]

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-ready)."""
        data = dataclasses.asdict(self)
        data["lr_grids"] = {k: list(v) for k, v in self.lr_grids.items()}
        return data


# Settings of the two presets; anything given on the command line overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    # A few minutes on a 2-core CPU: 4,000 training images, a narrow net, 4 epochs, two
    # single-threaded worker processes (faster than one process with two threads).
    "quick": {
        "workers": 2,
        "dataset": "fashion-mnist",
        "train_size": 4000,
        "val_size": 1000,
        "test_size": 2000,
        "width": 4,
        "epochs": 4,
        "batch_sizes": (64, 512),
        "optimizers": ("msgd", "lars", "sngm"),
        "seeds": 2,
        "warmup_epochs": 1.0,
    },
    # All 60,000 images (54,000 train / 6,000 validation), ResNet-20 at width 16: 48 runs
    # of 8 epochs, 21M training images at 0.19 GFLOP each, meant for a few minutes on one
    # H100 with --workers 6 (see docs/study.md for the estimate).
    "full": {
        "dataset": "fashion-mnist",
        "train_size": None,
        "val_size": 6000,
        "test_size": None,
        "width": 16,
        "epochs": 8,
        "batch_sizes": (256, 1024, 4096, 8192),
        "optimizers": ("msgd", "lars", "sngm"),
        "seeds": 2,
        "warmup_epochs": 1.5,
        "workers": 1,
    },
}


def preset(name: str, **overrides: Any) -> StudyConfig:
    """A `StudyConfig` from preset ``name`` (``quick`` or ``full``) with ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"Invalid preset: preset={name!r} (choose from {tuple(PRESETS)})")
    settings = dict(PRESETS[name])
    settings.update(overrides)
    return StudyConfig(**settings)
